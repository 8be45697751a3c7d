"""Reruns of the duplicate finder and the prescreen after an input changed: what the change
decides is redone (the result equals a fresh run's on the changed inputs), nothing else is, and
no input folder is written into."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.dedup import DedupSettings, run_dedup
from pipeline.dedup.scratch import SCRATCH_PREFIX, scratch_folder
from pipeline.dedup.settings import embedder_identity
from pipeline.demo.dataset import build_demo_dataset
from pipeline.embedders.thumbnail import ThumbnailEmbedder
from pipeline.identity import tree_identity

from .conftest import SHIPPED_DEMO_MODEL, compose_config

# A tiny demo set: 1 original x 6 copies, 2 x 3, 10 singletons (22 records, files layout).
TINY_BANDS = {"heavy": (1, 6), "mid": (2, 3), "single": (10, 1)}
STEPS = ("embed", "train", "index", "search", "verify", "group")
# With precomputed embeddings nothing is embedded, and pairs are not verified (no images).
PRECOMPUTED_STEPS = ("train", "index", "search", "group")


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_demo")
    build_demo_dataset(root, seed=5, bands=TINY_BANDS)
    return root / "images"


@pytest.fixture
def data_dir(tiny_source, tmp_path) -> Path:
    """A copy of the tiny set this test may change."""
    return Path(shutil.copytree(tiny_source, tmp_path / "images"))


class CountingEmbedder(ThumbnailEmbedder):
    """The thumbnail embedder, counting the images it embeds."""

    def __init__(self):
        super().__init__()
        self.images = 0

    def embed(self, images):
        self.images += len(images)
        return super().embed(images)


def dedup(out: Path, data: Path, embedder=None, **options) -> dict:
    embedder = embedder or ThumbnailEmbedder()
    settings = DedupSettings(threshold=embedder.threshold, top_k=4)
    return run_dedup(out, settings, data={"format": "files", "path": str(data)}, embedder=embedder, progress=False, **options)


def stats(out: Path, step: str) -> dict:
    return json.loads((out / "stats" / f"{step}_0.json").read_text())


def outputs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(out / "groups.parquet"), pd.read_parquet(out / "selected.parquet")


def assert_same_outputs(out: Path, fresh: Path) -> None:
    for got, expected in zip(outputs(out), outputs(fresh)):
        pd.testing.assert_frame_equal(got, expected)


def marker_stamp(out: Path, name: str) -> int:
    return (out / ".done" / f"{name}.json").stat().st_mtime_ns


def test_unchanged_rerun_skips_every_unit_and_leaves_the_data_as_it_was(data_dir, tmp_path):
    before = tree_identity(data_dir, skip_hidden=False)
    out = tmp_path / "run" / "dedup"
    first = CountingEmbedder()
    dedup(out, data_dir, first)
    assert first.images == 22
    again = CountingEmbedder()
    summary = dedup(out, data_dir, again)
    assert again.images == 0
    for step in STEPS:
        assert stats(out, step)["done"] == 0 and stats(out, step)["skipped"] == stats(out, step)["units"] == 1, step
    assert summary["records_embedded"] == 22
    # Nothing was written into the data set's folder, hidden files included.
    assert tree_identity(data_dir, skip_hidden=False) == before
    assert not [p for p in out.iterdir() if p.name.startswith(SCRATCH_PREFIX)]  # the group phase's scratch is gone


def replace_picture(data: Path) -> None:
    """000000.jpg becomes another record's picture (a singleton's, the last file)."""
    pictures = sorted(data.glob("*.jpg"))
    assert pictures[0].read_bytes() != pictures[-1].read_bytes()
    pictures[0].write_bytes(pictures[-1].read_bytes())


def edit_caption(data: Path) -> None:
    caption = sorted(data.glob("*.txt"))[0]
    caption.write_text(caption.read_text(encoding="utf-8")[::-1] + " (edited)", encoding="utf-8")


def add_record(data: Path) -> None:
    """One more copy of the first record, under a new key."""
    shutil.copyfile(data / "000000.jpg", data / "zz_added.jpg")
    shutil.copyfile(data / "000000.txt", data / "zz_added.txt")


def remove_record(data: Path) -> None:
    for path in sorted(data.glob("000000.*")):
        path.unlink()


@pytest.mark.parametrize("change", [replace_picture, edit_caption, add_record, remove_record], ids=lambda f: f.__name__)
def test_a_changed_data_set_is_embedded_again_and_grouped_as_a_fresh_run(data_dir, tmp_path, change):
    out = tmp_path / "run" / "dedup"
    dedup(out, data_dir)
    old = outputs(out)
    change(data_dir)
    embedder = CountingEmbedder()
    dedup(out, data_dir, embedder)
    assert embedder.images > 0
    for step in STEPS:
        assert stats(out, step)["done"] == 1, step
    fresh = tmp_path / "fresh" / "dedup"
    dedup(fresh, data_dir)
    assert_same_outputs(out, fresh)
    # The change shows in the groups (a guard against comparing two stale runs).
    assert not all(a.equals(b) for a, b in zip(old, outputs(out)))


def test_a_later_phase_of_an_array_refuses_data_changed_since_the_embedding(data_dir, tmp_path):
    out = tmp_path / "run" / "dedup"
    for rank in (0, 1):
        dedup(out, data_dir, phase="embed", rank=rank, world_size=2)
    edit_caption(data_dir)
    with pytest.raises(RuntimeError, match="needs embed_0, embed_1 done first .*other settings or input files"):
        dedup(out, data_dir, phase="train", world_size=2)


def test_summary_evaluates_against_the_ground_truth_of_the_rerun(tiny_source, data_dir, tmp_path):
    out = tmp_path / "run" / "dedup"
    truth = pd.read_parquet(tiny_source.parent / "ground_truth.parquet")
    first = dedup(out, data_dir, ground_truth=tiny_source.parent / "ground_truth.parquet")["evaluation"]
    # Every record its own original: no true pair left, so the precision falls to 0.
    truth.assign(original_id=truth["key"]).to_parquet(tmp_path / "singles.parquet")
    second = dedup(out, data_dir, ground_truth=tmp_path / "singles.parquet")["evaluation"]
    assert first["precision"] > 0 and second["precision"] == 0 and stats(out, "group")["done"] == 0
    assert json.loads((out / "summary.json").read_text())["evaluation"] == second
    assert "evaluation" not in dedup(out, data_dir) and "evaluation" not in json.loads((out / "summary.json").read_text())


def test_an_output_folder_inside_the_data_set_is_refused(data_dir):
    before = tree_identity(data_dir, skip_hidden=False)
    with pytest.raises(ValueError, match="^data.path: .* holds the output folder"):
        dedup(data_dir / "run" / "dedup", data_dir)
    assert tree_identity(data_dir, skip_hidden=False) == before


def test_precomputed_embeddings_rerun_on_a_metadata_or_vector_change(tiny_source, tmp_path):
    source = tmp_path / "source" / "dedup"
    dedup(source, tiny_source)
    embeddings = Path(shutil.copytree(source / "embeddings", tmp_path / "embeddings"))
    settings = DedupSettings(threshold=ThumbnailEmbedder().threshold, top_k=4)

    def run(out: Path) -> None:
        run_dedup(out, settings, embeddings_dir=embeddings, progress=False)

    out = tmp_path / "run" / "dedup"
    run(out)
    run(out)
    assert all(stats(out, step)["done"] == 0 for step in PRECOMPUTED_STEPS)
    # A caption changed in the metadata: only the grouping is redone, with the new caption.
    meta_path = embeddings / "metadata" / "metadata_0.parquet"
    meta = pd.read_parquet(meta_path)
    meta.loc[0, "caption"] = "an edited caption"
    meta.to_parquet(meta_path)
    run(out)
    assert [stats(out, step)["done"] for step in PRECOMPUTED_STEPS] == [0, 0, 0, 1]
    assert "an edited caption" in set(pd.read_parquet(out / "groups.parquet")["caption"])
    fresh = tmp_path / "fresh" / "dedup"
    run(fresh)
    assert_same_outputs(out, fresh)
    # The vectors rewritten (the same values, a new file): every phase is redone.
    vectors = embeddings / "img_emb" / "img_emb_0.npy"
    array = np.load(vectors)
    vectors.unlink()
    np.save(vectors, array)
    run(out)
    assert [stats(out, step)["done"] for step in PRECOMPUTED_STEPS] == [1, 1, 1, 1]
    assert_same_outputs(out, fresh)


def test_embedder_weights_replaced_in_place_change_its_identity(tmp_path):
    from omegaconf import OmegaConf

    weights = tmp_path / "ViT-B-32.pt"
    weights.write_bytes(b"weights")
    config = OmegaConf.create({"_target_": "x.Embedder", "model_name": "ViT-B-32", "pretrained": str(weights), "device": "cpu"})
    first = embedder_identity(config)
    assert embedder_identity(config) == first
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert embedder_identity(config) != first
    assert "device" not in first  # where it runs does not change the vectors


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_group_scratch_is_per_process_and_a_dead_process_leftovers_are_removed(tmp_path):
    import socket

    host = socket.gethostname().replace(".", "_")
    out = tmp_path / "dedup"
    leftover = out / f"{SCRATCH_PREFIX}{host}.{dead_pid()}.abc123"
    (leftover / "records").mkdir(parents=True)
    (leftover / "records" / "run_0.arrow").write_bytes(b"partial")
    running = out / f"{SCRATCH_PREFIX}{host}.{os.getppid()}.def456"  # a live process's: kept
    other_host = out / f"{SCRATCH_PREFIX}elsewhere.{dead_pid()}.ghi789"  # its process may run: kept
    running.mkdir()
    other_host.mkdir()
    with scratch_folder(out) as first, scratch_folder(out) as second:
        assert first != second and first.is_dir() and second.is_dir()
        assert not leftover.exists() and running.is_dir() and other_host.is_dir()
    assert not first.exists() and not second.exists()


def test_a_killed_group_leaves_nothing_that_stops_the_rerun(data_dir, tmp_path, monkeypatch):
    """A group phase that fails part-way (as a killed one would) leaves neither scratch nor a
    partial groups file in the way; the rerun groups as a fresh run does."""
    from pipeline.dedup import records

    out = tmp_path / "run" / "dedup"
    original = records._GroupsWriter.close

    def fail(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(records._GroupsWriter, "close", fail)
    with pytest.raises(KeyboardInterrupt):
        dedup(out, data_dir)
    monkeypatch.setattr(records._GroupsWriter, "close", original)
    assert not [p.name for p in out.iterdir() if p.name.startswith((SCRATCH_PREFIX, ".groups.parquet"))]
    dedup(out, data_dir)
    fresh = tmp_path / "fresh" / "dedup"
    dedup(fresh, data_dir)
    assert_same_outputs(out, fresh)


# ----------------------------------------------------------------------------------------
# The prescreen


@pytest.fixture
def demo_model(tmp_path) -> Path:
    """A copy of the shipped demo model this test may touch."""
    assert (SHIPPED_DEMO_MODEL / "model_index.json").exists(), f"the shipped demo model is missing from {SHIPPED_DEMO_MODEL}"
    return Path(shutil.copytree(SHIPPED_DEMO_MODEL, tmp_path / "model"))


def write_prompts(path: Path, captions: list[str], dup_counts: list[int] | None = None) -> Path:
    dup_counts = dup_counts or [3, 1, 2]
    pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(len(captions))],
            "caption": captions,
            "dup_count": dup_counts,
            "keys": [[f"k{i}_{j}" for j in range(n)] for i, n in enumerate(dup_counts)],
        }
    ).to_parquet(path)
    return path


def prescreen_run(run_dir: Path, prompts: Path, model: Path):
    from pipeline.prescreen import stage

    overrides = [
        f"run_dir={run_dir}",
        f"prompts={prompts}",
        f"model.path={model}",
        "device=cpu",
        "prescreen.seeds=1",
        "prescreen.steps=2",
        "prescreen.batch_size=4",
        "prescreen.keep_top=2",
        "prescreen.keep_fraction=null",
        "progress=false",
    ]
    return stage.run(compose_config("prescreen", overrides)).table


@pytest.fixture
def loads(monkeypatch) -> list:
    """Every model the prescreen loads, from now on."""
    from pipeline.prescreen import step

    loaded = []
    original = step.load_prescreen_model
    monkeypatch.setattr(step, "load_prescreen_model", lambda cfg: loaded.append(cfg.model.path) or original(cfg))
    return loaded


@pytest.mark.slow
def test_prescreen_rescores_when_the_weights_or_a_caption_change(demo_model, tmp_path, loads):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    prompts = write_prompts(inputs / "prompts.parquet", ["zubrak melino", "tesh vorla", "quen dasso"])
    untouched = {folder: tree_identity(folder, skip_hidden=False) for folder in (inputs, demo_model)}
    run_dir = tmp_path / "run"
    first = prescreen_run(run_dir, prompts, demo_model)
    out = run_dir / "prescreen"
    assert len(loads) == 1
    stamp = marker_stamp(out, "scores_0")

    # Unchanged: nothing scored, no model loaded, the same table.
    again = prescreen_run(run_dir, prompts, demo_model)
    assert len(loads) == 1 and marker_stamp(out, "scores_0") == stamp
    pd.testing.assert_frame_equal(again, first)
    assert {folder: tree_identity(folder, skip_hidden=False) for folder in untouched} == untouched

    # The UNet's weights rewritten in place with the same bytes: a new file, scored again.
    weights = demo_model / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)
    rescored = prescreen_run(run_dir, prompts, demo_model)
    assert len(loads) == 2 and marker_stamp(out, "scores_0") != stamp
    pd.testing.assert_frame_equal(rescored, first)  # the same bytes: the same scores
    # A file beside the components (notes, an evaluation) is not the model.
    (demo_model / "notes.txt").write_text("evaluated", encoding="utf-8")
    prescreen_run(run_dir, prompts, demo_model)
    assert len(loads) == 2

    # A caption changed: scored again, as a fresh run scores the new list.
    write_prompts(prompts, ["zubrak melino", "a red barn in a snowy field", "quen dasso"])
    changed = prescreen_run(run_dir, prompts, demo_model)
    assert len(loads) == 3
    fresh = prescreen_run(tmp_path / "fresh", prompts, demo_model)
    pd.testing.assert_frame_equal(changed, fresh)
    assert "a red barn in a snowy field" in set(changed["caption"])


def test_prescreen_takes_dup_counts_and_keys_from_the_current_list_without_rescoring(demo_model, tmp_path, loads):
    captions = ["zubrak melino", "tesh vorla", "quen dasso"]
    prompts = write_prompts(tmp_path / "prompts.parquet", captions)
    run_dir = tmp_path / "run"
    prescreen_run(run_dir, prompts, demo_model)
    write_prompts(prompts, captions, dup_counts=[1, 4, 2])
    table = prescreen_run(run_dir, prompts, demo_model)
    assert len(loads) == 1  # scores depend on the captions only
    assert dict(zip(table["prompt_id"], table["dup_count"])) == {"p0": 1, "p1": 4, "p2": 2}
    selected = pd.read_parquet(run_dir / "prescreen" / "selected.parquet")
    listed = dict(zip(selected["prompt_id"], selected["keys"]))
    assert {p: len(keys) for p, keys in listed.items()} == dict(zip(selected["prompt_id"], selected["dup_count"]))


def test_prescreen_refuses_to_write_over_its_inputs(demo_model, tmp_path, loads):
    from pipeline.cli import ConfigError

    run_dir = tmp_path / "run"
    (run_dir / "prescreen").mkdir(parents=True)
    inside = write_prompts(run_dir / "prescreen" / "selected.parquet", ["zubrak melino", "tesh vorla", "quen dasso"])
    with pytest.raises(ConfigError, match="^prompts: .* inside the prescreen's output folder"):
        prescreen_run(run_dir, inside, demo_model)
    prompts = write_prompts(tmp_path / "prompts.parquet", ["zubrak melino", "tesh vorla", "quen dasso"])
    before = tree_identity(demo_model, skip_hidden=False)
    with pytest.raises(ConfigError, match="^model.path: .* holds the prescreen's output folder"):
        prescreen_run(demo_model / "runs", prompts, demo_model)
    assert tree_identity(demo_model, skip_hidden=False) == before and not loads
