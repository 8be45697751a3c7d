"""The generator: seeded, batched sampling on a tiny random SD-structured model, resumable and sharded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.budget import generation_budget
from pipeline.generate import generate, read_samples
from pipeline.generate.regenerate import main as regenerate_main
from pipeline.generate.regenerate import regenerate
from pipeline.generate.sampling import PromptEncoder, SampleTask, SamplingSettings, sample_batch, sample_seed
from pipeline.generations import PROMPTS_FILE, consolidate_prompts, load_prompts, sample_path
from pipeline.generations import read_prompts as read_generation_prompts
from pipeline.io import is_done, marker_path
from pipeline.models import ModelLoadError, Runtime, load_pipeline, optimize_pipeline, resolve_dtype
from pipeline.prompts import Prompt, PromptsError, read_prompts, shard_prompts

from .conftest import REPO, compose_config, stage_env

SIZE = 16
SETTINGS = SamplingSettings(steps=2, guidance_scale=5.0, height=SIZE, width=SIZE)
RUNTIME = Runtime()  # the defaults: sdpa, fused QKV, channels-last, float32 on the CPU
PROMPTS = [Prompt("00000", "a red barn in a snowy field", 150), Prompt("00001", "portrait of an astronaut cat", 40)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random demo-architecture pipeline saved to disk, loaded back as a user would."""
    from pipeline.demo.model import DemoModelConfig, build_pipeline

    config = DemoModelConfig(unet_channels=(16, 32), cross_attention_levels=(False, True), norm_num_groups=8, resolution=SIZE)
    out = tmp_path_factory.mktemp("tiny_model")
    build_pipeline(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def pipe(model_dir):
    return optimize_pipeline(load_pipeline(str(model_dir)), RUNTIME)


def run(pipe, model_dir, out_dir, prompts=PROMPTS, **kwargs):
    options = dict(model=str(model_dir), settings=SETTINGS, runtime=RUNTIME, n_samples=3, batch_size=4, progress=False)
    return generate(pipe, prompts, out_dir, **{**options, **kwargs})


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def all_samples(out_dir: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out_dir)): pixels(p) for p in sorted(out_dir.glob("*/*.png"))}


def expected_files(prompts, n):
    return sorted(f"{p.prompt_id}/{i:05d}.png" for p in prompts for i in range(n))


# --- seeds and prompts -------------------------------------------------------------------


def test_sample_seed_is_stable_distinct_and_fits_int64():
    seeds = {sample_seed(base, pid, i) for base in (0, 1) for pid in ("00000", "00001") for i in range(50)}
    assert len(seeds) == 200
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, "00003", 7) == sample_seed(0, "00003", 7)


def test_read_prompts_from_each_format(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  \na dog on a sofa\n", encoding="utf-8")
    got = read_prompts(txt)
    assert [(p.prompt_id, p.caption) for p in got] == [("00000", "a cat"), ("00001", "a dog on a sofa")]

    selected = tmp_path / "selected.parquet"
    pd.DataFrame(
        {"prompt_id": ["00007", "00002"], "caption": ["x", "y"], "dup_count": [9, 3], "keys": [["a"], ["b"]]}
    ).to_parquet(selected)
    got = read_prompts(selected)
    assert [(p.prompt_id, p.caption, p.dup_count) for p in got] == [("00007", "x", 9), ("00002", "y", 3)]
    assert [p.prompt_id for p in read_prompts(selected, limit=1)] == ["00007"]

    csv = tmp_path / "p.csv"
    pd.DataFrame({"text": ["one", "", "three"]}).to_csv(csv, index=False)
    assert [p.caption for p in read_prompts(csv, caption_column="text")] == ["one", "three"]
    with pytest.raises(PromptsError, match="caption_column"):
        read_prompts(csv)


def test_read_prompts_errors_name_the_config_key(tmp_path):
    with pytest.raises(PromptsError, match="prompts: no such file"):
        read_prompts(tmp_path / "missing.parquet")
    bad = tmp_path / "dups.csv"
    pd.DataFrame({"prompt_id": ["a", "a"], "caption": ["x", "y"]}).to_csv(bad, index=False)
    with pytest.raises(PromptsError, match="duplicate prompt ids"):
        read_prompts(bad)
    unsafe = tmp_path / "unsafe.csv"
    pd.DataFrame({"prompt_id": ["../x"], "caption": ["x"]}).to_csv(unsafe, index=False)
    with pytest.raises(PromptsError, match="not plain file names"):
        read_prompts(unsafe)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(PromptsError, match="no non-empty caption"):
        read_prompts(empty)


def test_shards_split_prompts_exactly_once():
    prompts = [Prompt(f"{i:05d}", f"c{i}") for i in range(7)]
    shards = [shard_prompts(prompts, r, 3) for r in range(3)]
    ids = [p.prompt_id for shard in shards for p in shard]
    assert sorted(ids) == [p.prompt_id for p in prompts]
    with pytest.raises(ValueError, match="rank"):
        shard_prompts(prompts, 3, 3)


# --- loading -----------------------------------------------------------------------------


def test_load_pipeline_errors_name_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="model.path: no such directory"):
        load_pipeline(str(tmp_path / "nowhere" / "model"))
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ModelLoadError, match="model.path: .*no model_index.json"):
        load_pipeline(str(tmp_path / "not_a_model"))
    with pytest.raises(ModelLoadError, match="allow_download"):
        load_pipeline("memaudit-tests/no-such-model")


def test_scheduler_from_config_and_dtype_rules(model_dir):
    pipe = load_pipeline(str(model_dir), scheduler="PNDMScheduler", scheduler_kwargs={"skip_prk_steps": True})
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.skip_prk_steps
    assert pipe.safety_checker is None
    with pytest.raises(ValueError, match="model.scheduler"):
        load_pipeline(str(model_dir), scheduler="NoSuchScheduler")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", torch.device("cpu"))


# --- sampling ----------------------------------------------------------------------------


def assert_same_sample(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to batch-size rounding: CPU convolutions sum in a batch-dependent order, and
    25 denoising steps can turn that last-bit difference into one grey level on a rare pixel."""
    diff = np.abs(actual.astype(int) - expected.astype(int))
    assert diff.max() <= 1, f"pixels differ by up to {diff.max()} levels"
    assert (diff > 0).mean() <= 0.01, f"{(diff > 0).mean():.1%} of pixel values differ"


def test_a_sample_does_not_depend_on_its_batch(pipe):
    """The same (caption, seed) alone or in a mixed batch gives the same pixels; seeds and captions matter."""
    encoder = PromptEncoder(pipe, SETTINGS.guidance_scale)
    tasks = [SampleTask(p.prompt_id, p.caption, i, sample_seed(0, p.prompt_id, i)) for i in range(3) for p in PROMPTS]
    batch = sample_batch(pipe, tasks, SETTINGS, encoder)
    assert batch.shape == (6, SIZE, SIZE, 3) and batch.dtype == np.uint8
    for k in (0, 3, 5):
        alone = sample_batch(pipe, [tasks[k]], SETTINGS, encoder)[0]
        assert_same_sample(alone, batch[k])
    assert not np.array_equal(batch[0], batch[2])  # same caption, other seed
    other_caption = SampleTask("x", PROMPTS[1].caption, 0, tasks[0].seed)
    assert not np.array_equal(sample_batch(pipe, [other_caption], SETTINGS, encoder)[0], batch[0])


# --- the stage ---------------------------------------------------------------------------


def test_generates_every_sample_with_a_recipe_that_regenerates_it(pipe, model_dir, tmp_path):
    out = tmp_path / "generations"
    summary = run(pipe, model_dir, out)
    assert summary.images == 6 and summary.prompts_skipped == 0
    assert sorted(all_samples(out)) == expected_files(PROMPTS, 3)
    assert all(is_done(out, p.prompt_id) for p in PROMPTS)

    table = pd.read_parquet(out / PROMPTS_FILE)
    assert table["prompt_id"].tolist() == ["00000", "00001"]
    assert table["caption"].tolist() == [p.caption for p in PROMPTS]
    assert table["dup_count"].tolist() == [150, 40]
    row = table.iloc[1]
    assert list(row["seeds"]) == [sample_seed(0, "00001", i) for i in range(3)]
    assert (row["scheduler"], row["steps"], row["guidance_scale"], row["height"], row["width"], row["dtype"]) == (
        "DDPMScheduler",
        2,
        5.0,
        SIZE,
        SIZE,
        "float32",
    )
    assert json.loads(row["scheduler_config"])["num_train_timesteps"] == 1000
    assert row["model"] == str(model_dir) and row["generator_device"] == "cpu"

    # Sample 2 of prompt 00001 was made in a batch with another prompt's samples; remade alone
    # from its row, by a pipeline loaded afresh from the recorded model path, it is identical.
    assert_same_sample(regenerate(row, 2), pixels(sample_path(out, "00001", 2)))
    assert_same_sample(regenerate(table.iloc[0].to_dict(), 0, pipe=pipe), pixels(sample_path(out, "00000", 0)))
    with pytest.raises(IndexError, match="sample_index"):
        regenerate(row, 3, pipe=pipe)
    # The command the report prints on an extraction card remakes the same sample.
    regenerate_main([str(out), "00001", "2", "--out", str(tmp_path / "again.png")])
    assert_same_sample(pixels(tmp_path / "again.png"), pixels(sample_path(out, "00001", 2)))
    for bad in (["nope", "0"], ["00001", "7"]):
        with pytest.raises(SystemExit) as exit_info:
            regenerate_main([str(out), *bad, "--out", str(tmp_path / "bad.png")])
        assert exit_info.value.code == 2 and not (tmp_path / "bad.png").exists()

    # The stage executor's bookkeeping: its stats in a hidden folder (sub-folders are prompts).
    stats = json.loads((out / ".logs" / "stats" / "generate_0.json").read_text())
    assert (stats["units"], stats["done"], stats["skipped"]) == (2, 2, 0)
    again = run(pipe, model_dir, out)  # everything is marked done: nothing to make
    assert again.images == 0 and again.prompts_skipped == 2
    stats = json.loads((out / ".logs" / "stats" / "generate_0.json").read_text())
    assert (stats["units"], stats["done"], stats["skipped"]) == (2, 0, 2)
    assert sorted(read_generation_prompts(out)["prompt_id"]) == ["00000", "00001"]  # no bookkeeping folder reads as a prompt


class Interrupt(RuntimeError):
    pass


@pytest.mark.slow
def test_interrupted_run_resumes_with_no_lost_or_duplicated_samples(pipe, model_dir, tmp_path):
    reference = tmp_path / "reference"
    run(pipe, model_dir, reference, n_samples=5, batch_size=10)

    def stop_after_first_batch(batch):
        raise Interrupt("killed")

    out = tmp_path / "generations"
    with pytest.raises(Interrupt):
        run(pipe, model_dir, out, n_samples=5, batch_size=3, on_batch=stop_after_first_batch)
    partial = all_samples(out)
    assert len(partial) == 3 and not is_done(out, "00000")
    # A process killed mid-write leaves a temporary file beside the samples.
    (out / "00000" / ".00004.png.abc123.tmp").write_bytes(b"half a png")

    summary = run(pipe, model_dir, out, n_samples=5, batch_size=4)
    assert summary.images == 7
    final = all_samples(out)
    assert sorted(final) == expected_files(PROMPTS, 5)
    assert not list(out.glob("*/.*.tmp"))
    for name, image in all_samples(reference).items():
        np.testing.assert_array_equal(final[name], image, err_msg=name)

    # Deleted samples and marker: only those are made again, with the same pixels.
    for name in ("00000/00001.png", "00000/00004.png"):
        (out / name).unlink()
    marker_path(out, "00000").unlink()
    summary = run(pipe, model_dir, out, n_samples=5, batch_size=4)
    assert summary.images == 2 and summary.prompts_skipped == 1
    assert {k: v.tobytes() for k, v in all_samples(out).items()} == {k: v.tobytes() for k, v in final.items()}

    # More samples later: only the new indexes are made.
    summary = run(pipe, model_dir, out, n_samples=6, batch_size=4)
    assert summary.images == 2 and sorted(all_samples(out)) == expected_files(PROMPTS, 6)
    assert pd.read_parquet(out / PROMPTS_FILE)["n_samples"].tolist() == [6, 6]


def test_refuses_to_mix_settings_in_one_folder(pipe, model_dir, tmp_path):
    out = tmp_path / "generations"
    run(pipe, model_dir, out, n_samples=1)
    other = SamplingSettings(steps=2, guidance_scale=7.5, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="run_dir: .*guidance_scale"):
        run(pipe, model_dir, out, n_samples=1, settings=other)


def test_two_shards_cover_every_prompt_once(pipe, model_dir, tmp_path):
    prompts = PROMPTS + [Prompt("00002", "a bowl of fruit"), Prompt("00003", "a lighthouse at dusk")]
    out = tmp_path / "generations"
    assert consolidate_prompts(out).empty  # safe before anything exists
    made = {}
    for rank in (1, 0):
        run(pipe, model_dir, out, prompts=prompts, n_samples=2, rank=rank, world_size=2)
        made[rank] = {p.parent.name for p in out.glob("*/*.png")} - set().union(*made.values())
    assert made[0] & made[1] == set()
    assert made[0] | made[1] == {p.prompt_id for p in prompts}
    assert sorted(all_samples(out)) == expected_files(prompts, 2)
    table = load_prompts(out, complete_only=True)
    assert table["prompt_id"].tolist() == [p.prompt_id for p in prompts]
    assert sorted((out / f).name for f in os.listdir(out) if f.startswith("prompts_")) == [
        "prompts_0-of-2.parquet",
        "prompts_1-of-2.parquet",
    ]
    pd.testing.assert_frame_equal(consolidate_prompts(out), table)


# --- config and command line -------------------------------------------------------------


def test_model_configs_follow_the_paper_and_the_demo():
    sd = compose_config("generate", ["model=sd14"]).model
    assert (sd.path, sd.steps, sd.guidance_scale, sd.height, sd.width, sd.scheduler) == (
        "CompVis/stable-diffusion-v1-4",
        50,
        7.5,
        512,
        512,
        None,
    )
    assert sd.allow_download is False
    demo = compose_config("generate", []).model
    assert (demo.path, demo.height, demo.steps) == ("models/demo", 32, 50)


def test_launcher_configs_compose():
    cfg = compose_config("generate", ["hydra/launcher=slurm", "world_size=8"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.hydra.sweeper.params.rank == "range(0,8)"
    cfg = compose_config("generate", ["hydra/launcher=local", "world_size=3"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 3


def test_run_from_config_reports_a_missing_model(tmp_path):
    from pipeline.generate import run as run_stage

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    cfg = compose_config("generate", [f"run_dir={tmp_path}", f"prompts={prompts}", f"model.path={tmp_path / 'no' / 'model'}"])
    with pytest.raises(ModelLoadError, match="model.path"):
        run_stage(cfg)


@pytest.mark.slow
def test_local_multirun_two_processes(model_dir, tmp_path):
    """`-m hydra/launcher=local`: two joblib processes, one shard each, every sample once."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red barn\nan astronaut cat\na bowl of fruit\n", encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "pipeline.generate",
        "-m",
        "hydra/launcher=local",
        "world_size=2",
        "rank=range(0,2)",
        f"run_dir={tmp_path / 'run'}",
        f"prompts={prompts}",
        f"model.path={model_dir}",
        f"model.height={SIZE}",
        f"model.width={SIZE}",
        "model.steps=2",
        "n_samples=2",
        "batch_size=4",
        "progress=false",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run" / "generations"
    assert sorted(all_samples(out)) == expected_files([Prompt(f"{i:05d}", "") for i in range(3)], 2)
    assert (out / "prompts_0-of-2.parquet").exists() and (out / "prompts_1-of-2.parquet").exists()
    assert load_prompts(out, complete_only=True)["caption"].tolist() == ["a red barn", "an astronaut cat", "a bowl of fruit"]


# --- adaptive sampling -------------------------------------------------------------------

ADAPTIVE_PROMPTS = PROMPTS + [Prompt("00002", "a bowl of fruit on a table", 1)]
FULL = 4  # the sample budget: rounds of 2 and 4 under the rule below


def first_pair_distances(folder: Path, prompts, count: int = 2) -> dict[str, float]:
    """Tiled L2 between the first two samples of each prompt (the first round's only pair)."""
    from pipeline.distance import tiled_l2

    return {
        p.prompt_id: float(tiled_l2(np.stack([pixels(sample_path(folder, p.prompt_id, i)) for i in range(count)]))[0, 1])
        for p in prompts
    }


@pytest.fixture(scope="module")
def brute(pipe, model_dir, tmp_path_factory):
    """A brute-force reference run (FULL samples per prompt) and an adaptive rule under which exactly
    one prompt's first pair is close (the threshold sits between the two smallest first-pair
    distances), so that prompt continues and the others stop after their first round."""
    from pipeline.generate.adaptive import AdaptiveSettings
    from pipeline.metrics import TiledL2
    from pipeline.rule import NearCopyRule

    out = tmp_path_factory.mktemp("brute")
    run(pipe, model_dir, out, prompts=ADAPTIVE_PROMPTS, n_samples=FULL, batch_size=8)
    distances = first_pair_distances(out, ADAPTIVE_PROMPTS)
    order = sorted(distances, key=distances.get)
    threshold = (distances[order[0]] + distances[order[1]]) / 2
    assert distances[order[0]] < threshold < distances[order[1]]
    rule = AdaptiveSettings(enabled=True, first_round=2, growth=2.0, rule=NearCopyRule(TiledL2(grid=4), threshold=threshold))
    return {"out": out, "rule": rule, "continues": order[0], "stop": sorted(order[1:])}


@pytest.mark.slow
def test_adaptive_sampling_stops_unpromising_prompts_after_their_first_round(pipe, model_dir, tmp_path, brute):
    batches = []
    out = tmp_path / "adaptive"
    summary = run(
        pipe,
        model_dir,
        out,
        prompts=ADAPTIVE_PROMPTS,
        n_samples=FULL,
        batch_size=4,
        adaptive=brute["rule"],
        on_batch=lambda batch: batches.append([(t.prompt_id, t.index) for t in batch]),
    )
    keep, stop = brute["continues"], brute["stop"]
    assert summary.images == FULL + 2 * len(stop) and summary.stopped_early == len(stop)
    expected = sorted([f"{keep}/{i:05d}.png" for i in range(FULL)] + [f"{pid}/{i:05d}.png" for pid in stop for i in range(2)])
    assert sorted(all_samples(out)) == expected
    # Same seeds: every adaptive sample is the brute-force run's sample, pixel for pixel.
    reference = all_samples(brute["out"])
    for name, image in all_samples(out).items():
        np.testing.assert_array_equal(image, reference[name], err_msg=name)

    # Rounds: every prompt's first round (indexes 0-1) is sampled before any later sample, and
    # batches mix prompts.
    order = [item for batch in batches for item in batch]
    first_round_done = max(k for k, (_, i) in enumerate(order) if i < 2)
    assert all(i >= 2 for _, i in order[first_round_done + 1 :]) and len(order) == summary.images
    assert any(len({pid for pid, _ in batch}) > 1 for batch in batches)

    table = pd.read_parquet(out / PROMPTS_FILE).set_index("prompt_id")
    assert table.loc[keep, "n_generated"] == FULL and not table.loc[keep, "stopped_early"]
    assert table.loc[stop, "n_generated"].tolist() == [2] * len(stop) and table.loc[stop, "stopped_early"].all()
    assert (table["n_samples"] == FULL).all() and all(len(s) == FULL for s in table["seeds"])
    assert json.loads(table.loc[keep, "adaptive"])["first_round"] == 2
    assert json.loads(table.loc[keep, "adaptive"])["rule"] == brute["rule"].rule.describe()  # the rule, stored with the samples
    assert all(is_done(out, p.prompt_id) for p in ADAPTIVE_PROMPTS)
    assert json.loads(marker_path(out, stop[0]).read_text())["stopped_early"] is True
    assert load_prompts(out, complete_only=True)["prompt_id"].tolist() == [p.prompt_id for p in ADAPTIVE_PROMPTS]
    # A stopped sample not made can still be remade from its recorded seed, as brute force made it.
    assert_same_sample(
        regenerate(table.loc[stop[0]].to_dict() | {"prompt_id": stop[0]}, 3, pipe=pipe), reference[f"{stop[0]}/00003.png"]
    )

    # The same rule again: nothing to do. Brute force over the folder: the stopped prompts are filled up.
    again = run(pipe, model_dir, out, prompts=ADAPTIVE_PROMPTS, n_samples=FULL, batch_size=4, adaptive=brute["rule"])
    assert again.images == 0 and again.prompts_skipped == 3
    filled = run(pipe, model_dir, out, prompts=ADAPTIVE_PROMPTS, n_samples=FULL, batch_size=4)
    assert filled.images == (FULL - 2) * len(stop) and filled.prompts_skipped == 1
    assert {k: v.tobytes() for k, v in all_samples(out).items()} == {k: v.tobytes() for k, v in reference.items()}
    table = pd.read_parquet(out / PROMPTS_FILE)
    assert table["n_generated"].tolist() == [FULL] * 3 and not table["stopped_early"].any()


@pytest.mark.slow
def test_stop_when_flagged_ends_a_prompt_at_its_clique_and_brute_force_fills_it_up(pipe, model_dir, tmp_path, brute):
    """With cliques of 2, the continuing prompt's first pair is already a flag: it stops there too,
    as "flagged" and not as a miss; a brute-force rerun still completes every prompt."""
    from dataclasses import replace

    rule = replace(brute["rule"], stop_when_flagged=True, rule=replace(brute["rule"].rule, min_clique=2))
    out = tmp_path / "flagged"
    summary = run(pipe, model_dir, out, prompts=ADAPTIVE_PROMPTS, n_samples=FULL, batch_size=4, adaptive=rule)
    assert summary.images == 2 * len(ADAPTIVE_PROMPTS)
    assert (summary.stopped_early, summary.stopped_flagged) == (len(brute["stop"]), 1)
    table = pd.read_parquet(out / PROMPTS_FILE).set_index("prompt_id")
    keep = brute["continues"]
    assert table.loc[keep, "stop_reason"] == "flagged" and not table.loc[keep, "stopped_early"]
    assert (table.loc[brute["stop"], "stop_reason"] == "no_close_pairs").all()
    marker = json.loads(marker_path(out, keep).read_text())
    assert marker["n_generated"] == 2 and marker["stop_reason"] == "flagged" and marker["adaptive"]["stop_when_flagged"]
    assert marker["adaptive"]["rule"]["min_clique"] == 2
    assert len(load_prompts(out, complete_only=True)) == len(ADAPTIVE_PROMPTS)
    budget = generation_budget(table.reset_index())
    assert (budget["prompts_stopped_early"], budget["prompts_stopped_flagged"]) == (len(brute["stop"]), 1)

    again = run(pipe, model_dir, out, prompts=ADAPTIVE_PROMPTS, n_samples=FULL, batch_size=4, adaptive=rule)
    assert again.images == 0 and again.prompts_skipped == len(ADAPTIVE_PROMPTS)
    filled = run(pipe, model_dir, out, prompts=ADAPTIVE_PROMPTS, n_samples=FULL, batch_size=4)
    assert filled.images == (FULL - 2) * len(ADAPTIVE_PROMPTS)
    assert sorted(all_samples(out)) == sorted(all_samples(brute["out"]))


@pytest.mark.parametrize("min_clique", [3, 5])
def test_stops_on_the_verdict_match_their_replay_on_brute_force_samples(pipe, model_dir, tmp_path, brute, min_clique):
    """With both stops on the verdict, the generator makes exactly what :func:`adaptive_outcome`
    replays on the brute-force samples: the same samples per prompt and the same stop reason.
    Cliques of 5 cannot form among 4 samples: the continuing prompt stops as out of reach after
    its first round; with cliques of 3 its next round ends after one sample (where a flag could
    first come), not at the geometric end."""
    from dataclasses import replace

    from pipeline.generate.adaptive import OUT_OF_REACH, adaptive_outcome

    rule = replace(
        brute["rule"],
        stop_when_flagged=True,
        stop_when_out_of_reach=True,
        rule=replace(brute["rule"].rule, min_clique=min_clique),
    )
    out = tmp_path / f"verdict{min_clique}"
    summary = run(pipe, model_dir, out, prompts=ADAPTIVE_PROMPTS, n_samples=FULL, batch_size=4, adaptive=rule)
    table = pd.read_parquet(out / PROMPTS_FILE).set_index("prompt_id")
    for p in ADAPTIVE_PROMPTS:
        made, reason = adaptive_outcome(lambda k, pid=p.prompt_id: read_samples(brute["out"], pid, k), FULL, rule)
        recorded = table.loc[p.prompt_id, "stop_reason"]
        assert (table.loc[p.prompt_id, "n_generated"], None if pd.isna(recorded) else recorded) == (made, reason), p.prompt_id
    assert sorted(all_samples(out)) == sorted(f"{pid}/{i:05d}.png" for pid, n in table.n_generated.items() for i in range(n))
    keep = brute["continues"]
    if min_clique == 5:
        assert table.loc[keep, "stop_reason"] == OUT_OF_REACH and table.loc[keep, "n_generated"] == 2
        assert summary.stopped_out_of_reach == 1 and not table.loc[keep, "stopped_early"]
        assert generation_budget(table.reset_index())["prompts_stopped_out_of_reach"] == 1
    else:
        assert table.loc[keep, "n_generated"] in (3, 4)  # 3 if the third sample completed a clique of 3
        assert summary.stopped_flagged == int((table.stop_reason == "flagged").sum())


@pytest.mark.slow
def test_interrupted_adaptive_run_resumes_to_the_same_samples(pipe, model_dir, tmp_path, brute):
    seen = []

    def stop_after_second_batch(batch):
        seen.append(batch)
        if len(seen) == 2:
            raise Interrupt("killed")

    out = tmp_path / "adaptive"
    options = dict(prompts=ADAPTIVE_PROMPTS, n_samples=FULL, batch_size=3, adaptive=brute["rule"])
    with pytest.raises(Interrupt):
        run(pipe, model_dir, out, on_batch=stop_after_second_batch, **options)
    assert len(all_samples(out)) == 6  # the first round of every prompt
    summary = run(pipe, model_dir, out, **options)
    assert summary.images == FULL - 2  # only the continuing prompt's later rounds
    reference = all_samples(brute["out"])
    final = all_samples(out)
    assert len(final) == FULL + 2 * len(brute["stop"])
    for name, image in final.items():
        np.testing.assert_array_equal(image, reference[name], err_msg=name)
    table = pd.read_parquet(out / PROMPTS_FILE).set_index("prompt_id")
    assert table["stopped_early"].to_dict() == {p.prompt_id: p.prompt_id in brute["stop"] for p in ADAPTIVE_PROMPTS}

    # Another rule over the same folder decides again from the samples on disk: a threshold
    # nothing passes stops every prompt that is not complete yet (none here: all are done
    # under the old rule or complete), while a brute-force marker is never undone.
    from pipeline.generate.adaptive import AdaptiveSettings
    from pipeline.rule import NearCopyRule

    strict = AdaptiveSettings(enabled=True, first_round=2, rule=NearCopyRule(threshold=1e-9))
    again = run(pipe, model_dir, out, prompts=ADAPTIVE_PROMPTS, n_samples=FULL, batch_size=3, adaptive=strict)
    assert again.images == 0 and again.stopped_early == len(brute["stop"])  # re-decided, same verdict
    assert again.prompts_skipped == 1


def test_adaptive_checks_skip_unreadable_samples_as_the_detector_does(pipe, model_dir, tmp_path, brute):
    """A sample on disk that does not decode is left out of the round checks and recorded in
    rejects.jsonl (it used to end the run with an error), as the detector leaves it out."""
    import shutil

    from pipeline.detect import run_detect

    out = tmp_path / "damaged"
    for p in ADAPTIVE_PROMPTS:  # the first round exists already; the continuing prompt's second sample is damaged
        for i in range(2):
            sample_path(out, p.prompt_id, i).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample_path(brute["out"], p.prompt_id, i), sample_path(out, p.prompt_id, i))
    keep = brute["continues"]
    sample_path(out, keep, 1).write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    summary = run(pipe, model_dir, out, prompts=ADAPTIVE_PROMPTS, n_samples=FULL, batch_size=4, adaptive=brute["rule"])
    assert summary.images == 0 and summary.samples_rejected == 1  # one readable sample: no pair, it stops
    assert summary.stopped_early == len(ADAPTIVE_PROMPTS)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rejects] == [f"{keep}/00001.png"] and rejects[0]["reason"].startswith("corrupt image")
    memorized = run_detect(out, tmp_path / "detect", brute["rule"].rule, progress=False).set_index("prompt_id")
    assert memorized.loc[keep, "n_samples"] == 1 and memorized.loc[keep, "n_rejected"] == 1


def test_generate_config_has_adaptive_off_by_default():
    from pipeline.generate.adaptive import adaptive_settings

    cfg = compose_config("generate", [])
    assert cfg.adaptive.enabled is False and cfg.budget.brute_force_memorized is None
    settings = adaptive_settings(compose_config("generate", ["adaptive.enabled=true", "adaptive.first_round=8"]).adaptive)
    assert settings.enabled and settings.first_round == 8 and settings.growth == 2.0
    with pytest.raises(ValueError, match="adaptive.first_round"):
        adaptive_settings(compose_config("generate", ["adaptive.first_round=1"]).adaptive)


def test_demo_experiment_screens_cheaply():
    """experiment=demo: adaptive sampling on, stopping flagged prompts at the detector's clique size."""
    from omegaconf import OmegaConf

    from pipeline.generate.adaptive import adaptive_settings
    from pipeline.prescreen import PrescreenSettings
    from pipeline.rule import rule_from_config

    generate_cfg = compose_config("generate", ["experiment=demo"])
    settings = adaptive_settings(generate_cfg.adaptive, rule_from_config(generate_cfg))
    detect = compose_config("detect", ["experiment=demo"])
    prescreen = compose_config("prescreen", ["experiment=demo"])
    assert settings.enabled and settings.stop_when_flagged
    # One near-copy rule: the generator's and the detector's are the same, clique of 10 on tiled L2 at 0.15.
    assert settings.rule.describe() == rule_from_config(detect).describe()
    assert (settings.rule.min_clique, settings.rule.threshold, settings.rule.metric.grid) == (10, 0.15, 4)
    kept = PrescreenSettings(**OmegaConf.to_container(prescreen.prescreen, resolve=True))
    assert kept.keep_fraction is None and kept.min_robust_z == 3.5


def test_run_from_config_writes_and_prints_the_budget(model_dir, tmp_path, capsys):
    from pipeline.generate import run as run_stage

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red barn\nan astronaut cat\n", encoding="utf-8")
    cfg = compose_config(
        "generate",
        [
            f"run_dir={tmp_path}",
            f"prompts={prompts}",
            f"model.path={model_dir}",
            f"model.height={SIZE}",
            f"model.width={SIZE}",
            "model.steps=2",
            "n_samples=4",
            "batch_size=8",
            "progress=false",
            "adaptive.enabled=true",
            "adaptive.first_round=2",
            "rule.threshold=1e-9",
        ],
    )
    summary = run_stage(cfg)
    assert summary.stopped_early == 2  # nothing is that close: both stop after 2 samples
    budget = json.loads((tmp_path / "generations" / "budget.json").read_text())
    assert budget["brute_force_evaluations"] == 2 * 4 * 2 * 2  # prompts x samples x steps x CFG
    assert budget["unet_evaluations"] == 2 * 2 * 2 * 2 and budget["fraction"] == 0.5
    assert "budget: 16 UNet evaluations of 32 brute force (50.0%)" in capsys.readouterr().out


# --- the detector on the generator's folders ---------------------------------------------


def test_detect_screens_complete_prompts_only_and_every_shard(pipe, model_dir, tmp_path, brute):
    from pipeline.detect import run_detect
    from pipeline.rule import NearCopyRule

    out = tmp_path / "generations"
    for rank in (0, 1):
        run(
            pipe,
            model_dir,
            out,
            prompts=ADAPTIVE_PROMPTS,
            n_samples=FULL,
            batch_size=8,
            adaptive=brute["rule"],
            rank=rank,
            world_size=2,
        )
    # As if shard 1 had not consolidated yet and were still sampling its prompt 00001.
    (out / PROMPTS_FILE).unlink()
    marker_path(out, "00001").unlink()
    settings = NearCopyRule(threshold=brute["rule"].rule.threshold, min_clique=2)
    memorized = run_detect(out, tmp_path / "detect", settings, progress=False).set_index("prompt_id")
    assert sorted(memorized.index) == sorted({"00000", "00002"})  # 00001 waits for its marker
    # The shard files were united in memory: the detector never writes into its input folder.
    assert not (out / PROMPTS_FILE).exists()
    expected = {pid: FULL if pid == brute["continues"] else 2 for pid in memorized.index}
    assert memorized["n_samples"].to_dict() == expected  # the PNGs that exist, not n_samples
    assert memorized["flagged"].to_dict() == {pid: pid == brute["continues"] for pid in memorized.index}

    # Shard 1 finishes (its marker comes back) and a later run adds samples: detect rescreens.
    run(
        pipe, model_dir, out, prompts=ADAPTIVE_PROMPTS, n_samples=FULL, batch_size=8, adaptive=brute["rule"], rank=1, world_size=2
    )
    run(pipe, model_dir, out, prompts=ADAPTIVE_PROMPTS, n_samples=FULL, batch_size=8, rank=0, world_size=2)
    memorized = run_detect(out, tmp_path / "detect", settings, progress=False).set_index("prompt_id")
    assert memorized["n_samples"].to_dict() == {
        "00000": FULL,
        "00001": FULL if "00001" == brute["continues"] else 2,
        "00002": FULL,
    }


def test_stop_when_extracted_stops_at_the_round_holding_a_training_copy_as_its_replay_does(
    pipe, model_dir, tmp_path, brute, caplog
):
    """Training images: copies of sample 1 of the continuing prompt and of one stopping prompt
    (their keys); the third prompt carries no keys. The first two stop after their first round as
    "extracted" (the continuing one would have gone on to the full budget), the third as before;
    the replay on brute force's samples with the same training images decides the same. Without
    a training set the setting is refused."""
    import logging
    from dataclasses import replace

    from pipeline.generate.adaptive import EXTRACTED, NO_SIGN, adaptive_outcome
    from pipeline.training_images import GroupMatcher

    keep, copied, bare = brute["continues"], brute["stop"][0], brute["stop"][1]
    training = tmp_path / "training"
    training.mkdir()
    for pid in (keep, copied):
        Image.fromarray(pixels(sample_path(brute["out"], pid, 1))).save(training / f"copy-{pid}.png")
    prompts = [replace(p, keys=None if p.prompt_id == bare else (f"copy-{p.prompt_id}",)) for p in ADAPTIVE_PROMPTS]
    rule = replace(brute["rule"], stop_when_extracted=True)
    data = {"format": "files", "path": str(training)}
    with pytest.raises(ValueError, match="adaptive.stop_when_extracted"):
        run(pipe, model_dir, tmp_path / "refused", prompts=prompts, n_samples=FULL, adaptive=rule)
    matcher = GroupMatcher(data, rule.rule.metric, rule.rule.threshold)
    out = tmp_path / "extracted"
    with caplog.at_level(logging.INFO, logger="pipeline.generate.stage"):
        summary = run(pipe, model_dir, out, prompts=prompts, n_samples=FULL, batch_size=4, adaptive=rule, matcher=matcher)
    assert "1 of 3 prompts carry no training keys" in caplog.text
    # Every prompt finished, so no group's training images are kept any more.
    assert not matcher._images and matcher.bytes_kept == 0
    table = pd.read_parquet(out / PROMPTS_FILE).set_index("prompt_id")
    expected = {keep: (2, EXTRACTED), copied: (2, EXTRACTED), bare: (2, NO_SIGN)}
    replay_matcher = GroupMatcher(data, rule.rule.metric, rule.rule.threshold)
    for p in prompts:
        recorded = (int(table.loc[p.prompt_id, "n_generated"]), table.loc[p.prompt_id, "stop_reason"])
        group = list(p.keys or [])
        matches = (
            (lambda s, e, pid=p.prompt_id, g=group: replay_matcher.any_match(read_samples(brute["out"], pid, e, start=s), g))
            if group
            else None
        )
        replayed = adaptive_outcome(lambda k, pid=p.prompt_id: read_samples(brute["out"], pid, k), FULL, rule, matches)
        assert recorded == replayed == expected[p.prompt_id], p.prompt_id
    assert (summary.stopped_extracted, summary.stopped_early) == (2, 1)
    budget = generation_budget(table.reset_index())
    assert budget["prompts_stopped_extracted"] == 2 and budget["fewer_samples"] == sorted([keep, copied])


def test_near_training_holds_prompts_with_a_sample_near_their_training_images_as_its_replay_does(
    pipe, model_dir, tmp_path, brute
):
    """A black-and-white checkerboard as the training image of one stopping prompt (its key): no
    sample reproduces it (within a matcher threshold of 1e-9), but every sample is within near_training=10 (the tiled L2
    of pixels in [0, 1] is at most 1): the prompt is held to the full budget instead of stopping
    after its first round; the prompt without keys stops as before. The generator's stage and
    the replay on brute force's samples decide alike."""
    from dataclasses import replace

    from pipeline.generate.adaptive import NO_SIGN, adaptive_outcome
    from pipeline.training_images import GroupMatcher

    held, bare = brute["stop"][0], brute["stop"][1]
    training = tmp_path / "training"
    training.mkdir()
    checkers = (np.indices((32, 32)).sum(axis=0) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.repeat(checkers[..., None], 3, axis=2)).save(training / "checkers.png")
    prompts = [
        replace(p, keys=("checkers",) if p.prompt_id == held else None) for p in ADAPTIVE_PROMPTS if p.prompt_id in (held, bare)
    ]
    rule = replace(brute["rule"], stop_when_extracted=True, near_training=10.0)
    data = {"format": "files", "path": str(training)}
    out = tmp_path / "held"
    run(
        pipe,
        model_dir,
        out,
        prompts=prompts,
        n_samples=FULL,
        batch_size=4,
        adaptive=rule,
        matcher=GroupMatcher(data, rule.rule.metric, 1e-9),
    )
    table = pd.read_parquet(out / PROMPTS_FILE).set_index("prompt_id")
    recorded = {
        pid: (
            int(table.loc[pid, "n_generated"]),
            table.loc[pid, "stop_reason"] if pd.notna(table.loc[pid, "stop_reason"]) else None,
        )
        for pid in (held, bare)
    }
    assert recorded == {held: (FULL, None), bare: (2, NO_SIGN)}
    replay = GroupMatcher(data, rule.rule.metric, 1e-9)
    for p in prompts:
        group = list(p.keys or [])
        matches = (
            (lambda s, e, pid=p.prompt_id: replay.any_match(read_samples(brute["out"], pid, e, start=s), group))
            if group
            else None
        )
        near = (
            (lambda e, pid=p.prompt_id: replay.any_match(read_samples(brute["out"], pid, e), group, within=10.0))
            if group
            else None
        )
        assert (
            adaptive_outcome(lambda k, pid=p.prompt_id: read_samples(brute["out"], pid, k), FULL, rule, matches, near)
            == recorded[p.prompt_id]
        )
