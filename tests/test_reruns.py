"""A result is a function of its inputs: reruns after a changed caption, model, sample or
training image redo what the change decides or refuse in one line; stages never write into
the folders they read; a sample's index is fixed by its file name.

Every test runs the real stages on a tiny random model and a few images made here.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.detect.stage import run_detect
from pipeline.detect.verify import run_verify
from pipeline.generations import PROMPTS_FILE, list_samples, load_prompts
from pipeline.identity import tree_identity
from pipeline.prompts import Prompt
from pipeline.rule import NearCopyRule

from .conftest import REPO, stage_env
from .test_generate import RUNTIME, SETTINGS, model_dir, pipe, run  # noqa: F401  (fixtures)

ENV = stage_env()
RULE = NearCopyRule(threshold=0.15, min_clique=2)
# One grey level of an 8-bit image: what regeneration from a recorded recipe promises.
ONE_GREY_LEVEL = 1


def snapshot(folder: Path) -> list:
    """Every file under ``folder``, hidden ones too, with size and modification time."""
    return tree_identity(folder, skip_hidden=False)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def detect_and_verify(generations: Path, out: Path, train: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    memorized = run_detect(generations, out, RULE, progress=False)
    return run_verify(memorized, generations, out, data={"format": "files", "path": str(train)}, delta=0.15, progress=False)


# --- the generator: a prompt id whose caption changed -----------------------------------


def test_a_changed_caption_under_an_existing_prompt_id_is_refused_naming_the_prompt(pipe, model_dir, tmp_path):
    out = tmp_path / "generations"
    run(pipe, model_dir, out, prompts=[Prompt("00000", "a red barn"), Prompt("00001", "an astronaut cat")], n_samples=2)
    before = {p: p.read_bytes() for p in sorted(out.glob("*/*.png"))}
    table_before = load_prompts(out)

    # A prompt list whose first line was edited: id 00000 (a position) now names another caption.
    with pytest.raises(
        ValueError,
        match=r"prompt 00000: its samples in .*00000 were made from another caption "
        r"\('a red barn' then, 'a blue barn' now\); delete that folder",
    ):
        run(pipe, model_dir, out, prompts=[Prompt("00000", "a blue barn"), Prompt("00001", "an astronaut cat")], n_samples=2)
    # Nothing was relabelled or remade.
    assert {p: p.read_bytes() for p in sorted(out.glob("*/*.png"))} == before
    pd.testing.assert_frame_equal(load_prompts(out), table_before)

    # The choice the message offers: the folder deleted, the new caption is sampled and labelled.
    shutil.rmtree(out / "00000")
    run(pipe, model_dir, out, prompts=[Prompt("00000", "a blue barn"), Prompt("00001", "an astronaut cat")], n_samples=2)
    table = load_prompts(out).set_index("prompt_id")
    assert table.loc["00000", "caption"] == "a blue barn" and table.loc["00001", "caption"] == "an astronaut cat"
    assert sorted(p.name for p in (out / "00000").glob("*.png")) == ["00000.png", "00001.png"]
    # The other prompt's samples were kept as they were (same caption, same recipe).
    assert all(p.read_bytes() == data for p, data in before.items() if p.parent.name == "00001")


def test_a_changed_caption_is_refused_also_in_a_folder_without_prompt_records(pipe, model_dir, tmp_path):
    """A folder whose prompts carry no record (made by an older generator) is checked against
    the caption its prompt table lists."""
    out = tmp_path / "generations"
    run(pipe, model_dir, out, prompts=[Prompt("00000", "a red barn")], n_samples=2)
    (out / "00000" / ".prompt.json").unlink()
    with pytest.raises(ValueError, match="prompt 00000: its samples"):
        run(pipe, model_dir, out, prompts=[Prompt("00000", "a blue barn")], n_samples=2)


@pytest.mark.slow
def test_after_regenerating_under_another_world_size_the_table_labels_samples_with_their_caption(pipe, model_dir, tmp_path):
    out = tmp_path / "generations"
    run(pipe, model_dir, out, prompts=[Prompt("00000", "a red barn"), Prompt("00001", "a cat")], n_samples=3)
    shutil.rmtree(out / "00000")
    # The old prompts_0-of-1.parquet still lists 00000 with the old caption and 3 samples.
    new = [Prompt("00000", "a blue barn"), Prompt("00001", "a cat")]
    run(pipe, model_dir, out, prompts=new, n_samples=2, rank=0, world_size=2)
    table = load_prompts(out, write=False).set_index("prompt_id")
    assert table.loc["00000", "caption"] == "a blue barn"
    assert int(table.loc["00000", "n_samples"]) == 2


def test_weights_replaced_at_the_same_path_are_another_model(pipe, model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "generations"
    run(pipe, model, out, prompts=[Prompt("00000", "a red barn")], n_samples=2)
    run(pipe, model, out, prompts=[Prompt("00000", "a red barn")], n_samples=2)  # unchanged: accepted, nothing to do
    weights = next((model / "unet").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place
    with pytest.raises(ValueError, match="model_identity"):
        run(pipe, model, out, prompts=[Prompt("00000", "a red barn")], n_samples=2)


@pytest.mark.slow
def test_a_changed_prompt_list_is_refused_from_the_command_line_in_one_line(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    command = [
        sys.executable,
        "-m",
        "pipeline.generate",
        f"run_dir={tmp_path / 'run'}",
        f"prompts={prompts}",
        f"model.path={model_dir}",
        "model.height=16",
        "model.width=16",
        "model.steps=2",
        "n_samples=2",
        "batch_size=4",
        "progress=false",
    ]
    prompts.write_text("a red barn\nan astronaut cat\n", encoding="utf-8")
    first = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    prompts.write_text("a blue barn\nan astronaut cat\n", encoding="utf-8")
    second = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    lines = [line for line in second.stderr.splitlines() if line.startswith("generate:")]
    assert len(lines) == 1 and "prompt 00000" in lines[0] and "delete that folder" in lines[0], second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    captions = load_prompts(tmp_path / "run" / "generations", write=False).set_index("prompt_id")["caption"]
    assert captions["00000"] == "a red barn"


# --- the detector: verdicts follow the samples on disk -----------------------------------


def training_set(root: Path, images: dict[str, np.ndarray]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for key, image in images.items():
        Image.fromarray(image).save(root / f"{key}.png")
        (root / f"{key}.txt").write_text(f"training caption {key}", encoding="utf-8")
    return root


@pytest.mark.slow
def test_detect_after_regenerating_equals_a_detect_into_a_fresh_folder(pipe, model_dir, tmp_path):
    generations = tmp_path / "run" / "generations"
    prompts = [Prompt("00000", "a red barn", 3, ("t0",)), Prompt("00001", "a cat", 1, ("t1",))]
    run(pipe, model_dir, generations, prompts=prompts, n_samples=3)
    train = training_set(
        tmp_path / "train", {"t0": pixels(generations / "00000" / "00001.png"), "t1": pixels(generations / "00001" / "00002.png")}
    )
    first, _ = detect_and_verify(generations, tmp_path / "run" / "detect", train)
    assert first.set_index("prompt_id")["best_sample"].to_dict() == {"00000": 1, "00001": 2}

    # The folder deleted and made again with other settings (another base seed): other images.
    shutil.rmtree(generations)
    run(pipe, model_dir, generations, prompts=prompts, n_samples=3, base_seed=7)
    again, again_pairs = detect_and_verify(generations, tmp_path / "run" / "detect", train)
    fresh, fresh_pairs = detect_and_verify(generations, tmp_path / "fresh" / "detect", train)
    pd.testing.assert_frame_equal(again, fresh)
    pd.testing.assert_frame_equal(again_pairs, fresh_pairs)
    # The seed-0 copies of t0 and t1 are gone: the old verdicts are not served.
    assert not again.equals(first)


def test_detect_redoes_a_prompt_whose_sample_file_was_replaced_with_the_same_name(tmp_path):
    rng = np.random.default_rng(0)
    generations = tmp_path / "generations"
    (generations / "p").mkdir(parents=True)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    for i, image in enumerate(images):
        Image.fromarray(image).save(generations / "p" / f"{i:05d}.png")
    train = training_set(tmp_path / "train", {"t": images[2]})
    first, _ = detect_and_verify(generations, tmp_path / "detect", train)
    assert bool(first.loc[0, "extracted"]) and int(first.loc[0, "best_sample"]) == 2
    Image.fromarray(255 - images[2]).save(generations / "p" / "00002.png")  # same name, same size, other picture
    again, _ = detect_and_verify(generations, tmp_path / "detect", train)
    assert not bool(again.loc[0, "extracted"])
    fresh, _ = detect_and_verify(generations, tmp_path / "fresh", train)
    pd.testing.assert_frame_equal(again, fresh)


def test_verification_is_redone_when_a_training_image_changes(tmp_path):
    rng = np.random.default_rng(1)
    generations = tmp_path / "generations"
    (generations / "p").mkdir(parents=True)
    sample = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(sample).save(generations / "p" / "00000.png")
    train = training_set(tmp_path / "train", {"t": 255 - sample})
    first, _ = detect_and_verify(generations, tmp_path / "detect", train)
    assert not bool(first.loc[0, "extracted"])
    training_set(train, {"t": sample})  # the training image replaced at the same key
    again, _ = detect_and_verify(generations, tmp_path / "detect", train)
    assert bool(again.loc[0, "extracted"])


@pytest.mark.slow
def test_detect_never_writes_into_the_generations_folder(pipe, model_dir, tmp_path):
    generations = tmp_path / "generations"
    prompts = [Prompt("00000", "a red barn", 3, ("t0",)), Prompt("00001", "a cat")]
    for rank in (0, 1):  # shard files only, as a finished array leaves them before anyone consolidated
        run(pipe, model_dir, generations, prompts=prompts, n_samples=2, rank=rank, world_size=2)
    (generations / PROMPTS_FILE).unlink()
    train = training_set(tmp_path / "train", {"t0": pixels(generations / "00000" / "00000.png")})
    before = snapshot(generations)
    command = [
        sys.executable,
        "-m",
        "pipeline.detect",
        f"generations_dir={generations}",
        f"out_dir={tmp_path / 'detect'}",
        "data=files",
        f"data.path={train}",
        "progress=false",
    ]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert snapshot(generations) == before
    memorized = pd.read_parquet(tmp_path / "detect" / "memorized.parquet").set_index("prompt_id")
    assert memorized.loc["00000", "caption"] == "a red barn" and bool(memorized.loc["00000", "extracted"])


# --- sample identity ----------------------------------------------------------------------


def test_a_stray_file_is_no_sample_and_shifts_no_index(tmp_path):
    rng = np.random.default_rng(2)
    generations = tmp_path / "generations"
    (generations / "p").mkdir(parents=True)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    for i, image in enumerate(images):
        Image.fromarray(image).save(generations / "p" / f"{i:05d}.png")
    # Sorted before the samples; a copy of sample 2, so that it would match too.
    Image.fromarray(images[2]).save(generations / "p" / "-contact-sheet.png")
    Image.fromarray(images[0]).save(generations / "p" / "2.png")  # a look-alike of index 2
    from pipeline.data.rejects import RejectLog

    rejects = RejectLog()
    samples = list_samples(generations, "p", rejects)
    assert [(s.index, s.file) for s in samples] == [(0, "p/00000.png"), (1, "p/00001.png"), (2, "p/00002.png")]
    assert sorted(e["key"] for e in rejects.entries) == sorted([ascii("p/-contact-sheet.png"), ascii("p/2.png")])

    train = training_set(tmp_path / "train", {"t": images[2]})
    memorized, pairs = detect_and_verify(generations, tmp_path / "detect", train)
    row = memorized.iloc[0]
    assert int(row["n_samples"]) == 3
    assert int(row["best_sample"]) == 2 and row["best_sample_file"] == "p/00002.png"
    assert pairs["sample_file"].tolist() == ["p/00002.png"] and pairs["sample"].tolist() == [2]


@pytest.mark.slow
def test_the_report_card_regenerate_command_remakes_the_card_image(pipe, model_dir, tmp_path):
    run_dir = tmp_path / "run"
    generations = run_dir / "generations"
    run(pipe, model_dir, generations, prompts=[Prompt("00000", "a red barn", 5, ("t0",))], n_samples=4)
    best = 2
    train = training_set(tmp_path / "train", {"t0": pixels(generations / "00000" / f"{best:05d}.png")})
    # A stray file that sorts before the samples (a contact sheet another tool left).
    Image.fromarray(pixels(generations / "00000" / "00003.png")).save(generations / "00000" / "-contact-sheet.png")
    detect = [
        sys.executable,
        "-m",
        "pipeline.detect",
        f"run_dir={run_dir}",
        "data=files",
        f"data.path={train}",
        "progress=false",
    ]
    done = subprocess.run(detect, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = subprocess.run(
        [sys.executable, "-m", "pipeline.report", f"run_dir={run_dir}"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    html = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    card = re.search(r'<section class="card" id="card-0">(.*?)</section>', html, re.S).group(1)
    shown = np.asarray(
        Image.open(
            io.BytesIO(base64.b64decode(re.search(r'class="thumb sample" src="data:image/png;base64,([^"]*)"', card).group(1)))
        ).convert("RGB")
    )
    command = re.search(r"<code>(python -m pipeline\.generate\.regenerate [^<]*)</code>", card).group(1)
    assert f" 00000 {best} " in command
    # The command as a user pastes it, with the environment's python first on the PATH.
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    remade = subprocess.run(
        command, shell=True, executable="/bin/bash", cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert remade.returncode == 0, remade.stderr[-3000:]
    regenerated = pixels(tmp_path / f"regenerated_00000_{best:05d}.png")
    assert np.abs(regenerated.astype(int) - shown.astype(int)).max() <= ONE_GREY_LEVEL
    assert np.array_equal(shown, pixels(generations / "00000" / f"{best:05d}.png"))


def test_a_deleted_sample_is_made_again_and_its_prompt_waits_for_it(pipe, model_dir, tmp_path):
    out = tmp_path / "generations"
    prompts = [Prompt("00000", "a red barn"), Prompt("00001", "a cat")]
    run(pipe, model_dir, out, prompts=prompts, n_samples=3)
    original = pixels(out / "00001" / "00001.png")
    (out / "00001" / "00001.png").unlink()
    # The detector does not take a verdict on the samples that are left.
    memorized = run_detect(out, tmp_path / "detect", RULE, progress=False)
    assert memorized["prompt_id"].tolist() == ["00000"]
    # The generator makes it again (its seed is fixed), and then the prompt is screened.
    summary = run(pipe, model_dir, out, prompts=prompts, n_samples=3)
    assert summary.images == 1
    # Made alone rather than in a batch: the same image within one grey level (the regeneration promise).
    assert np.abs(pixels(out / "00001" / "00001.png").astype(int) - original.astype(int)).max() <= ONE_GREY_LEVEL
    assert run_detect(out, tmp_path / "detect", RULE, progress=False)["prompt_id"].tolist() == ["00000", "00001"]


def test_tree_identity_walks_a_symlink_loop_once(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "data" / "a" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    assert [entry[0] for entry in tree_identity(tmp_path / "data")] == ["a/x.png"]


@pytest.mark.parametrize("marker", ['{"n_samples": []}', '{"n_samples": 3, "n_generated": null}', '{"n_samples": "x"}', "[]"])
def test_a_hostile_generator_marker_is_redone_not_a_crash(pipe, model_dir, tmp_path, marker):
    out = tmp_path / "generations"
    prompts = [Prompt("00000", "a red barn")]
    run(pipe, model_dir, out, prompts=prompts, n_samples=2)
    (out / ".done" / "00000.json").write_text(marker, encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts ready to screen"):  # not complete: not screened, no crash
        run_detect(out, tmp_path / "detect", RULE, progress=False)
    summary = run(pipe, model_dir, out, prompts=prompts, n_samples=2)
    assert summary.images == 0  # every sample is on disk: the prompt is only marked again
    assert run_detect(out, tmp_path / "detect", RULE, progress=False)["prompt_id"].tolist() == ["00000"]


def test_the_report_refuses_to_show_a_sample_that_changed_since_it_was_verified(tmp_path):
    from pipeline.layout import write_prompt_table
    from pipeline.report.stage import run_report

    rng = np.random.default_rng(3)
    run_dir = tmp_path / "run"
    generations = run_dir / "generations"
    (generations / "p").mkdir(parents=True)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    for i, image in enumerate(images):
        Image.fromarray(image).save(generations / "p" / f"{i:05d}.png")
    train = training_set(tmp_path / "train", {"t": images[1]})
    memorized, _ = detect_and_verify(generations, run_dir / "detect", train)
    write_prompt_table(memorized, run_dir / "detect" / "memorized.parquet")
    assert bool(memorized.loc[0, "extracted"]) and memorized.loc[0, "best_sample_file"] == "p/00001.png"
    assert run_report(run_dir / "detect", run_dir / "report" / "index.html", title="audit") is not None

    # The evidence replaced after verification (same name, other picture): no page shows it.
    Image.fromarray(255 - images[1]).save(generations / "p" / "00001.png")
    with pytest.raises(ValueError, match=r"sample p/00001\.png of prompt p is not the one the detector verified"):
        run_report(run_dir / "detect", tmp_path / "again.html", title="audit")


def test_an_unchanged_rerun_of_detect_and_report_touches_no_artifact(tmp_path):
    from pipeline.detect.stage import run as detect
    from pipeline.report.stage import run as report

    from .conftest import compose_config

    rng = np.random.default_rng(4)
    run_dir = tmp_path / "run"
    (run_dir / "generations" / "p").mkdir(parents=True)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    for i, image in enumerate(images):
        Image.fromarray(image).save(run_dir / "generations" / "p" / f"{i:05d}.png")
    train = training_set(tmp_path / "train", {"t": images[0]})
    overrides = [f"run_dir={run_dir}", "data=files", f"data.path={train}", "progress=false"]
    detect(compose_config("detect", overrides))
    assert report(compose_config("report", [f"run_dir={run_dir}"])).written
    artifacts = {p: p.stat().st_mtime_ns for p in (run_dir / "detect").glob("*.*")} | {
        p: p.stat().st_mtime_ns for p in (run_dir / "report").glob("*.html")
    }
    detect(compose_config("detect", overrides))
    assert not report(compose_config("report", [f"run_dir={run_dir}"])).written
    assert {p: p.stat().st_mtime_ns for p in artifacts} == artifacts
