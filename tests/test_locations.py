"""The location index: every format's records located, an index written per rank, training
images fetched by key through it with exactly the bytes the stream gives, and changes caught."""

from __future__ import annotations

import gzip
import io
import json
import logging
import shutil
import tarfile
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data import RejectLog, iter_records
from pipeline.data.location import Location
from pipeline.data.locations import (
    ROW_GROUP_ROWS,
    LocationIndex,
    location_table,
    write_manifest,
    write_rank_file,
)
from pipeline.training_images import fetch_training_images
from tests.test_data import FORMATS, good_samples, jpeg_bytes, write_dataset


def build_index(fmt: str, path, folder, world_size: int = 1, decode: bool = True) -> dict:
    data = {"format": fmt, "path": str(path)}
    for rank in range(world_size):
        records = iter_records(fmt, path, rank=rank, world_size=world_size, decode=decode)
        write_rank_file(folder, rank, location_table((r.key, r.location) for r in records))
    write_manifest(folder, data, world_size)
    return {**data, "locations": str(folder)}


def pixels(images: dict) -> dict:
    return {key: np.asarray(image) for key, image in images.items()}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("world_size", [1, 3])
def test_fetch_by_location_equals_the_stream(fmt, world_size, tmp_path):
    samples = good_samples(12, n_shards=2)
    path = write_dataset(fmt, tmp_path / fmt, samples, n_shards=2)
    data = build_index(fmt, path, tmp_path / "locations", world_size)
    wanted = [samples[i].dataset_key for i in (0, 3, 7, 11)] + ["00000/not-a-key"]

    indexed_rejects, streamed_rejects = RejectLog(), RejectLog()
    indexed = fetch_training_images(data, wanted, indexed_rejects)
    streamed = fetch_training_images({"format": fmt, "path": str(path)}, wanted, streamed_rejects)

    assert sorted(indexed) == sorted(wanted[:-1])
    # The very same decoded pixels: the same bytes are decoded either way.
    assert {k: v.tobytes() for k, v in pixels(indexed).items()} == {k: v.tobytes() for k, v in pixels(streamed).items()}
    assert [e["key"] for e in indexed_rejects.entries] == ["00000/not-a-key"]
    assert "no record with this key in the location index" in indexed_rejects.entries[0]["reason"]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_lookup_reads_only_the_row_groups_holding_wanted_keys(fmt, tmp_path, monkeypatch):
    n = 3 * ROW_GROUP_ROWS + 5  # four row groups in the one rank file
    keys = [f"{i:09d}" for i in range(n)]
    table = location_table((k, Location("f", i)) for i, k in enumerate(keys))
    folder = tmp_path / "locations"
    write_rank_file(folder, 0, table)
    assert pq.ParquetFile(folder / "locations_0.parquet").metadata.num_row_groups == 4
    (tmp_path / "set").mkdir()
    write_manifest(folder, {"format": fmt, "path": str(tmp_path / "set")}, 1)
    index, why = LocationIndex.open(folder, {"format": fmt, "path": str(tmp_path / "set")})
    assert index is not None, why
    by_directory = index.lookup([keys[5], keys[ROW_GROUP_ROWS * 3 + 1], "absent"])
    for part in ("hash", "entries", "names"):  # without its directory the rank file is read
        (folder / f"locations_0.{part}.npy").unlink()
    read = []
    original = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda self, i, *a, **k: read.extend(i) or original(self, i, *a, **k))

    found = index.lookup([keys[5], keys[ROW_GROUP_ROWS * 3 + 1]])

    assert {k: loc.offset for k, loc in found.items()} == {keys[5]: 5, keys[ROW_GROUP_ROWS * 3 + 1]: ROW_GROUP_ROWS * 3 + 1}
    assert set(read) == {0, 3}  # the two groups whose key range holds a wanted key, no other
    assert found == by_directory


def test_changed_tar_member_is_rejected_not_served(tmp_path):
    samples = good_samples(4)
    path = write_dataset("webdataset", tmp_path / "wds", samples)
    data = build_index("webdataset", path, tmp_path / "locations")
    # The shard rewritten in place with a different picture of the same size under one key.
    tar_path = path / "00000.tar"
    changed = jpeg_bytes((250, 0, 0))
    members = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            members.append((member, tar.extractfile(member).read()))
    with tarfile.open(tar_path, "w") as tar:
        for member, blob in members:
            if member.name == f"{samples[1].key}.jpg":
                blob = changed
                member.size = len(blob)
            tar.addfile(member, io.BytesIO(blob))
    rejects = RejectLog()

    found = fetch_training_images(data, [samples[0].dataset_key, samples[1].dataset_key, samples[2].dataset_key], rejects)

    assert samples[1].dataset_key not in found
    reasons = {e["key"]: e["reason"] for e in rejects.entries}
    assert "changed since it was indexed" in reasons[samples[1].dataset_key]


def test_index_of_another_data_set_is_not_used(tmp_path, caplog):
    samples = good_samples(4)
    path = write_dataset("parquet", tmp_path / "a", samples)
    other = write_dataset("parquet", tmp_path / "b", samples)
    data = build_index("parquet", path, tmp_path / "locations")
    data_b = {**data, "path": str(other)}
    index, why = LocationIndex.open(data_b["locations"], data_b)
    assert index is None and "describes root" in why
    with caplog.at_level(logging.INFO, logger="pipeline.training_images"):
        found = fetch_training_images(data_b, [samples[0].dataset_key])
    assert list(found) == [samples[0].dataset_key]  # streamed instead
    assert any("streamed" in r.getMessage() for r in caplog.records)


def test_compressed_tar_records_are_indexed_unlocated_and_streamed(tmp_path):
    samples = good_samples(6, n_shards=2)
    path = write_dataset("webdataset", tmp_path / "wds", samples, n_shards=2)
    with (path / "00001.tar").open("rb") as src, gzip.open(path / "00001.tar.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (path / "00001.tar").unlink()
    assert all((r.location is None) == r.key.startswith("00001/") for r in iter_records("webdataset", path))
    data = build_index("webdataset", path, tmp_path / "locations")
    wanted = [s.dataset_key for s in samples]
    rejects = RejectLog()

    found = fetch_training_images(data, wanted, rejects)

    assert sorted(found) == sorted(wanted) and not rejects.entries


def robust_embedder():
    import hydra

    from tests.conftest import compose_config

    return hydra.utils.instantiate(compose_config("dedup").embedder)


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_embed_phase_writes_the_index_per_rank_and_fetches_use_it(fmt, tmp_path, caplog):
    from pipeline.dedup.settings import DedupSettings
    from pipeline.dedup.stage import run_dedup
    from pipeline.training_images import with_location_index

    samples = good_samples(10, n_shards=2)
    path = write_dataset(fmt, tmp_path / fmt, samples, n_shards=2)
    data = {"format": fmt, "path": str(path)}
    out = tmp_path / "dedup"
    for rank in range(2):  # an array of two embed tasks
        run_dedup(
            out, DedupSettings(threshold=0.86), data=data, embedder=robust_embedder(), phase="embed", rank=rank, world_size=2
        )
    listed = sorted(p.name for p in (out / "locations").iterdir() if not p.name.endswith(".npy"))
    assert listed == ["index.json", "locations_0.parquet", "locations_1.parquet"]
    assert (out / "locations" / "locations_1.hash.npy").is_file()
    manifest = json.loads((out / "locations" / "index.json").read_text())
    assert manifest["rows"] == 10 and manifest["format"] == fmt

    located = with_location_index(data, out)
    assert located["locations"] == str(out / "locations")
    wanted = [s.dataset_key for s in samples[::3]]
    with caplog.at_level(logging.INFO, logger="pipeline.training_images"):
        by_index = fetch_training_images(located, wanted)
    assert not any("streamed" in r.getMessage() for r in caplog.records)
    by_stream = fetch_training_images(data, wanted)
    assert {k: v.tobytes() for k, v in pixels(by_index).items()} == {k: v.tobytes() for k, v in pixels(by_stream).items()}
    assert sorted(by_index) == sorted(wanted)


def test_locate_phase_indexes_a_set_whose_embeddings_were_precomputed(tmp_path):
    from pipeline.data.embeddings_store import write_shard
    from pipeline.dedup.settings import DedupSettings
    from pipeline.dedup.stage import run_dedup

    samples = good_samples(6)
    path = write_dataset("webdataset", tmp_path / "wds", samples)
    import pandas as pd

    vectors = np.eye(6, 8, dtype=np.float32)
    write_shard(tmp_path / "emb", 0, vectors, pd.DataFrame({"key": [s.dataset_key for s in samples], "caption": ["c"] * 6}))
    data = {"format": "webdataset", "path": str(path)}
    out = tmp_path / "dedup"
    run_dedup(out, DedupSettings(threshold=0.9), data=data, embeddings_dir=tmp_path / "emb", locate=True, phase="all")
    index, why = LocationIndex.open(out / "locations", data)
    assert index is not None, why
    assert sorted(index.lookup([s.dataset_key for s in samples])) == sorted(s.dataset_key for s in samples)
    # Without locate=true, precomputed embeddings index nothing.
    run_dedup(tmp_path / "dedup2", DedupSettings(threshold=0.9), data=data, embeddings_dir=tmp_path / "emb", phase="all")
    assert not (tmp_path / "dedup2" / "locations").exists()


def test_verification_reads_through_the_duplicate_finders_index(tmp_path, monkeypatch):
    import pipeline.training_images as training_images
    from pipeline.detect.verify import run_verify
    from tests.test_detect import build_run, detect

    run = build_run(tmp_path)
    run_dir, train = run["run_dir"], run["train"]
    memorized = detect(run)
    data = {"format": "files", "path": str(train)}
    streamed, _ = run_verify(memorized, run_dir / "generations", tmp_path / "streamed", data, progress=False)
    build_index("files", train, run_dir / "dedup" / "locations")

    def no_stream(*args, **kwargs):
        raise AssertionError("the training set was read without its location index")

    monkeypatch.setattr(training_images, "_fetch_streaming", no_stream)
    indexed, _ = run_verify(
        memorized, run_dir / "generations", tmp_path / "indexed", data, dedup_dir=run_dir / "dedup", progress=False
    )

    columns = ["prompt_id", "extracted", "samples_matched", "best_train_key", "best_distance"]
    assert indexed[columns].equals(streamed[columns])
    assert indexed["extracted"].any()


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_key_table_keys_records_by_url_and_rejects_the_unlisted(fmt, tmp_path):
    import pandas as pd

    from pipeline.data import open_dataset
    from tests.test_data import url

    samples = good_samples(5)
    path = write_dataset(fmt, tmp_path / fmt, samples)
    listed = pd.DataFrame({"url": [url(s) for s in samples[:3]], "caption": ["c"] * 3, "key": ["a/1", "b/2", "c/3"]})
    listed.to_parquet(tmp_path / "candidates.parquet")
    rejects = RejectLog()

    records = list(
        open_dataset(
            {"format": fmt, "path": str(path), "key_table": str(tmp_path / "candidates.parquet")}, rejects=rejects, progress=False
        )
    )

    assert sorted(r.key for r in records) == ["a/1", "b/2", "c/3"]
    assert sorted(e["key"] for e in rejects.entries) == sorted(s.dataset_key for s in samples[3:])
    assert all(e["reason"].startswith("not listed") for e in rejects.entries)


def test_adaptive_sampling_reads_each_prompts_group_through_the_index(tmp_path, monkeypatch):
    """The generator's stop_when_extracted fetches the prompts' training images by location
    (never by streaming the set) when the duplicate finder's folder has an index."""
    import pandas as pd

    import pipeline.training_images as training_images
    from pipeline.generate import run as run_generate
    from tests.conftest import SHIPPED_DEMO_MODEL, compose_config

    samples = good_samples(8)
    train = write_dataset("webdataset", tmp_path / "train", samples)
    build_index("webdataset", train, tmp_path / "run" / "dedup" / "locations")
    prompts = pd.DataFrame(
        {
            "prompt_id": ["00000", "00001"],
            "caption": ["a red barn", "a blue cat"],
            "dup_count": [3, 2],
            "keys": [[s.dataset_key for s in samples[:3]], [s.dataset_key for s in samples[3:5]]],
        }
    )
    prompts.to_parquet(tmp_path / "prompts.parquet")
    fetched = []
    original = training_images.read_located

    def counting(data, located, rejects):
        fetched.append(sorted(located))
        return original(data, located, rejects)

    def no_stream(*args, **kwargs):
        raise AssertionError("the training set was streamed although it has a location index")

    monkeypatch.setattr(training_images, "read_located", counting)
    monkeypatch.setattr(training_images, "_fetch_streaming", no_stream)
    cfg = compose_config(
        "generate",
        [
            f"run_dir={tmp_path / 'run'}",
            f"prompts={tmp_path / 'prompts.parquet'}",
            f"model.path={SHIPPED_DEMO_MODEL}",
            "model.steps=2",
            "n_samples=8",
            "adaptive.enabled=true",
            "adaptive.first_round=4",
            "adaptive.stop_when_extracted=true",
            "data=webdataset",
            f"data.path={train}",
            "progress=false",
        ],
    )
    run_generate(cfg)

    # Each prompt's group read once (kept for its later rounds), by location.
    assert sorted(map(tuple, fetched)) == sorted(tuple(sorted(k)) for k in prompts["keys"])


def test_directory_lookup_equals_the_rank_files(tmp_path):
    """Every key, and keys that are not there, found alike through the directory and the parquet
    file; a rank with a file name too long for the directory is read from its parquet file."""
    rng = np.random.default_rng(0)
    keys = [f"{rng.integers(0, 10**9):09d}/{i}" for i in range(5000)]
    located = [
        (k, None if i % 97 == 0 else Location(f"shard_{i % 7}.tar", i, -1, i % 300, None if i % 5 else f"{i:040x}"))
        for i, k in enumerate(keys)
    ]
    long_name = [("z" * 20, Location("d/" * 600 + "x.jpg", 0, -1, 1, None))]
    folder = tmp_path / "locations"
    write_rank_file(folder, 0, location_table(located))
    write_rank_file(folder, 1, location_table(long_name))
    (tmp_path / "set").mkdir()
    data = {"format": "webdataset", "path": str(tmp_path / "set")}
    write_manifest(folder, data, 2)
    assert (folder / "locations_0.hash.npy").is_file() and not (folder / "locations_1.hash.npy").exists()
    index, _ = LocationIndex.open(folder, data)
    wanted = keys[::3] + ["missing", "z" * 20]

    fast = index.lookup(wanted)
    for part in ("hash", "entries", "names"):
        (folder / f"locations_0.{part}.npy").unlink()
    slow = index.lookup(wanted)

    assert fast == slow
    expected = {k: (loc if loc is None or loc.sha1 is None else replace(loc, sha1=loc.sha1[:16])) for k, loc in located[::3]}
    assert {k: v for k, v in fast.items() if k != "z" * 20} == expected
    assert fast["z" * 20].file == "d/" * 600 + "x.jpg"
