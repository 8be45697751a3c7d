"""The demo data set: deterministic for a seed, duplication as the bands say, readable back."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from pipeline.data import RejectLog, iter_records, open_dataset
from pipeline.demo.dataset import build_demo_dataset

# Small bands: 2 originals x 6 copies, 2 x 3, 5 singletons = 23 records.
BANDS = {"heavy": (2, 6), "low": (2, 3), "single": (5, 1)}
IMAGE_SIZE = 32


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The set built three times: seed 0 twice, seed 1 once."""
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out_dir = tmp_path_factory.mktemp(f"demo_{name}")
        ground_truth = build_demo_dataset(out_dir, seed=seed, image_size=IMAGE_SIZE, bands=BANDS)
        out[name] = (out_dir, ground_truth)
    return out


def test_same_seed_gives_identical_bytes_and_ground_truth(built):
    (dir_a, truth_a), (dir_b, truth_b) = built["a"], built["b"]
    files_a = files_under(dir_a / "images")
    assert files_a == files_under(dir_b / "images")
    assert files_under(dir_a / "originals") == files_under(dir_b / "originals")
    pd.testing.assert_frame_equal(truth_a, truth_b)
    pd.testing.assert_frame_equal(pd.read_parquet(dir_a / "ground_truth.parquet"), truth_a)


def test_different_seed_gives_a_different_set(built):
    (dir_a, truth_a), (dir_c, truth_c) = built["a"], built["c"]
    assert files_under(dir_a / "images") != files_under(dir_c / "images")
    assert list(truth_a.caption) != list(truth_c.caption)


def test_ground_truth_counts_match_the_bands(built):
    out_dir, truth = built["a"]
    assert len(truth) == sum(n * copies for n, copies in BANDS.values())
    assert truth.key.is_unique
    for band, (n, copies) in BANDS.items():
        rows = truth[truth.band == band]
        assert rows.original_id.nunique() == n
        assert (rows.groupby("original_id").size() == copies).all()
        assert (rows.dup_count == copies).all()
        # Exactly one untransformed record per original.
        assert (rows["transform"] == "original").sum() == n
    assert len(list((out_dir / "originals").glob("*.png"))) == sum(n for n, _ in BANDS.values())


def test_files_reader_reads_it_back_without_rejects(built):
    out_dir, truth = built["a"]
    rejects = RejectLog()

    records = list(iter_records("files", out_dir / "images", rejects=rejects))

    assert len(rejects) == 0, rejects.summary()
    assert [r.key for r in records] == list(truth.key)
    assert [r.caption for r in records] == list(truth.caption)
    assert all(r.image.size == (IMAGE_SIZE, IMAGE_SIZE) for r in records)


def test_demo_data_config_reads_it(built):
    out_dir, truth = built["a"]
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "demo.yaml")
    cfg.path = str(out_dir / "images")

    keys = [r.key for r in open_dataset(cfg, decode=False, progress=False)]

    assert keys == list(truth.key)
