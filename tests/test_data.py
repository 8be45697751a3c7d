"""The data layer, on small data sets the tests write in each format: reading, bad input,
sharding by rank, and config errors."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from PIL import Image

import pipeline.data.images as images
from pipeline.data import (
    READERS,
    BadImage,
    DataConfigError,
    EmptyDatasetError,
    RejectLog,
    decode_image,
    iter_records,
    open_dataset,
)

FORMATS = ["files", "webdataset", "parquet", "imagefolder"]
CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


# --- writing small data sets -------------------------------------------------------------


@dataclass
class Sample:
    key: str  # the key inside its shard
    caption: str | None  # None: no caption at all
    image: bytes | None  # None: no image
    shard: int = 0

    @property
    def dataset_key(self) -> str:
        """The key every reader gives it: the shard folder / tar / parquet key column."""
        return f"{self.shard:05d}/{self.key}"


def colour(i: int) -> tuple[int, int, int]:
    return ((37 * i) % 256, (91 * i + 50) % 256, (13 * i + 100) % 256)


def jpeg_bytes(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """The first 60% of a noisy 64x64 JPEG: the header is fine, the scan data stops early."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) * 6 // 10]


def good_samples(n: int, n_shards: int = 1) -> list[Sample]:
    return [Sample(f"{i:09d}", f"caption number {i}", jpeg_bytes(colour(i)), shard=i % n_shards) for i in range(n)]


def url(sample: Sample) -> str:
    return f"http://example.com/{sample.key}.jpg"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_dataset(fmt: str, root: Path, samples: list[Sample], n_shards: int = 1) -> Path:
    """Write ``samples`` in format ``fmt`` under ``root`` (one shard folder or file per shard)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = {shard: [s for s in samples if s.shard == shard] for shard in range(n_shards)}
    if fmt == "files":
        for s in samples:
            folder = root / f"{s.shard:05d}"
            folder.mkdir(exist_ok=True)
            if s.image is not None:
                (folder / f"{s.key}.jpg").write_bytes(s.image)
            if s.caption is not None:
                (folder / f"{s.key}.txt").write_text(s.caption, encoding="utf-8")
            (folder / f"{s.key}.json").write_text(json.dumps({"url": url(s)}), encoding="utf-8")
    elif fmt == "webdataset":
        for shard, members in shards.items():
            with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
                for s in members:
                    if s.image is not None:
                        add_member(tar, f"{s.key}.jpg", s.image)
                    if s.caption is not None:
                        add_member(tar, f"{s.key}.txt", s.caption.encode())
                    add_member(tar, f"{s.key}.json", json.dumps({"url": url(s)}).encode())
    elif fmt == "parquet":
        schema = pa.schema(
            [("key", pa.string()), ("jpg", pa.binary()), ("caption", pa.string()), ("status", pa.string()), ("url", pa.string())]
        )
        for shard, members in shards.items():
            table = pa.table(
                {
                    "key": [s.dataset_key for s in members],
                    "jpg": [s.image for s in members],
                    "caption": [s.caption for s in members],
                    "status": ["success" for s in members],
                    "url": [url(s) for s in members],
                },
                schema=schema,
            )
            pq.write_table(table, root / f"{shard:05d}.parquet", row_group_size=2)
    elif fmt == "imagefolder":
        rows = []
        for s in samples:
            rel = f"{s.shard:05d}/{s.key}.jpg"
            if s.image is not None:
                (root / rel).parent.mkdir(exist_ok=True)
                (root / rel).write_bytes(s.image)
            if s.caption is not None:  # an image nobody lists has no caption
                rows.append({"file": rel, "caption": s.caption})
        with (root / "captions.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(fmt)
    return root


def reject_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- reading every format ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_every_format(fmt, tmp_path):
    samples = good_samples(6, n_shards=2)
    path = write_dataset(fmt, tmp_path / fmt, samples, n_shards=2)
    rejects = RejectLog()

    records = list(iter_records(fmt, path, rejects=rejects))

    assert len(rejects) == 0, rejects.entries
    assert sorted(r.key for r in records) == sorted(s.dataset_key for s in samples)
    number = {s.dataset_key: i for i, s in enumerate(samples)}
    for record in records:
        i = number[record.key]
        assert record.caption == samples[i].caption
        assert record.image.mode == "RGB" and record.image.size == (8, 8)
        # Each record carries its own picture (a flat colour, within JPEG error).
        assert np.abs(np.asarray(record.image, dtype=int) - colour(i)).max() <= 3
        if fmt != "imagefolder":
            assert record.meta["url"] == url(samples[i])
    # Keys and order are the same on every run.
    assert [r.key for r in iter_records(fmt, path)] == [r.key for r in records]


def test_reads_tars_written_by_webdataset_tarwriter(tmp_path):
    """img2dataset writes its shards with webdataset's TarWriter; read one back."""
    from webdataset.writer import TarWriter

    samples = good_samples(3)
    with TarWriter(str(tmp_path / "00000.tar")) as writer:
        for s in samples:
            writer.write({"__key__": s.key, "jpg": s.image, "txt": s.caption, "json": json.dumps({"url": url(s)}).encode()})

    records = list(iter_records("webdataset", tmp_path / "00000.tar"))

    assert [(r.key, r.caption, r.meta["url"]) for r in records] == [(s.dataset_key, s.caption, url(s)) for s in samples]


def test_decode_false_reads_no_images(tmp_path):
    samples = good_samples(2) + [Sample("corrupt", "not decoded, so not checked", b"garbage")]
    for fmt in FORMATS:
        path = write_dataset(fmt, tmp_path / fmt, samples)
        records = list(iter_records(fmt, path, decode=False))
        assert sorted(r.key for r in records) == sorted(s.dataset_key for s in samples)
        assert all(r.image is None for r in records)


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_records_are_skipped_and_logged(fmt, tmp_path):
    good = good_samples(3)
    bad = {
        "corrupt": (Sample("corrupt", "a corrupt file", b"this is not an image at all"), "corrupt image"),
        "truncated": (Sample("truncated", "a truncated jpeg", truncated_jpeg()), "corrupt image"),
        "nocaption": (Sample("nocaption", None, jpeg_bytes((1, 2, 3))), "missing caption"),
        "emptycaption": (Sample("emptycaption", "  \n", jpeg_bytes((4, 5, 6))), "missing caption"),
    }
    path = write_dataset(fmt, tmp_path / fmt, good + [sample for sample, _ in bad.values()])
    rejects = RejectLog(tmp_path / "rejects.jsonl")

    records = list(iter_records(fmt, path, rejects=rejects))

    assert sorted(r.key for r in records) == sorted(s.dataset_key for s in good)
    lines = reject_lines(tmp_path / "rejects.jsonl")
    assert {line["key"]: line["reason"].split(":")[0] for line in lines} == {
        sample.dataset_key: kind for sample, kind in bad.values()
    }
    assert all(line["source"] for line in lines)
    truncated = next(line for line in lines if line["key"].endswith("truncated"))
    assert "truncated" in truncated["reason"]
    assert rejects.counts() == {"corrupt image": 2, "missing caption": 2}
    assert rejects.summary().startswith("4 records rejected")


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_empty_folder_is_a_clear_error(fmt, tmp_path):
    empty = tmp_path / "empty_set"
    empty.mkdir()
    records = iter_records(fmt, empty)  # nothing is read until iterated
    with pytest.raises(EmptyDatasetError, match=r"^data\.path: no usable records in .*empty_set: 0 records rejected"):
        list(records)
    assert list(iter_records(fmt, empty, require_nonempty=False)) == []


def test_empty_imagefolder_is_a_clear_error(tmp_path):
    with pytest.raises(DataConfigError, match=r"^data\.path: .* has neither captions\.csv nor captions\.jsonl"):
        iter_records("imagefolder", tmp_path)
    (tmp_path / "captions.csv").write_text("file,caption\n", encoding="utf-8")
    with pytest.raises(EmptyDatasetError, match=r"^data\.path: no usable records"):
        list(iter_records("imagefolder", tmp_path))


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_records_rejected_is_a_clear_error(fmt, tmp_path):
    samples = [Sample("a", "a corrupt one", b"garbage"), Sample("b", None, jpeg_bytes((9, 9, 9)))]
    path = write_dataset(fmt, tmp_path / fmt, samples)
    with pytest.raises(EmptyDatasetError) as info:
        list(iter_records(fmt, path, rejects=RejectLog(tmp_path / "rejects.jsonl")))
    message = str(info.value)
    assert str(path) in message
    assert "2 records rejected: " in message and "1 corrupt image" in message and "1 missing caption" in message
    assert str(tmp_path / "rejects.jsonl") in message


def test_an_empty_shard_names_the_rank(tmp_path):
    path = write_dataset("files", tmp_path / "files", good_samples(2))
    with pytest.raises(EmptyDatasetError, match=r"shard rank=2 of world_size=3"):
        list(iter_records("files", path, rank=2, world_size=3))


def test_decompression_bomb_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    samples = [
        Sample("small", "8x8 is 64 pixels", jpeg_bytes(colour(1), 8)),
        Sample("big", "16x16 is 256", jpeg_bytes(colour(2), 16)),
    ]
    path = write_dataset("files", tmp_path / "files", samples)
    rejects = RejectLog(tmp_path / "rejects.jsonl")

    records = list(iter_records("files", path, rejects=rejects))

    assert [r.key for r in records] == ["00000/small"]
    [line] = reject_lines(tmp_path / "rejects.jsonl")
    assert line["key"] == "00000/big"
    assert line["reason"].startswith("oversized image: 16x16 pixels is above the limit of 100")


def test_pillows_own_bomb_guard_stays_on(monkeypatch):
    assert Image.MAX_IMAGE_PIXELS is not None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    # Above Pillow's limit it only warns; above twice the limit it raises. Both are rejected.
    for size in (8, 16):
        with pytest.raises(BadImage, match="^oversized image"):
            decode_image(jpeg_bytes(colour(3), size))


def test_truncated_tar_keeps_what_was_read(tmp_path):
    samples = good_samples(8, n_shards=2)
    path = write_dataset("webdataset", tmp_path / "tars", samples, n_shards=2)
    broken = path / "00001.tar"
    with tarfile.open(broken) as tar:
        third_image = [m for m in tar.getmembers() if m.name.endswith(".jpg")][2]
    broken.write_bytes(broken.read_bytes()[: third_image.offset_data + third_image.size // 2])
    rejects = RejectLog(tmp_path / "rejects.jsonl")

    keys = [r.key for r in iter_records("webdataset", path, rejects=rejects)]

    shard0 = [s.dataset_key for s in samples if s.shard == 0]
    shard1 = [s.dataset_key for s in samples if s.shard == 1]
    assert keys == shard0 + shard1[:2]
    [line] = reject_lines(tmp_path / "rejects.jsonl")
    assert line["key"] == "00001/*" and line["source"] == str(broken)
    assert line["reason"].startswith("unreadable file: ") and "after the first 2 of this shard are lost" in line["reason"]


def test_tar_records_missing_parts_and_duplicate_keys(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        add_member(tar, "a.jpg", jpeg_bytes(colour(1)))
        add_member(tar, "a.txt", b"first a")
        add_member(tar, "b.txt", b"a caption without its image")
        add_member(tar, "c.png", jpeg_bytes(colour(2)))  # the extension says png; the bytes decide
        add_member(tar, "c.txt", b"  c  ")
        add_member(tar, "a.jpg", jpeg_bytes(colour(3)))  # a later record reusing the key a
        add_member(tar, "a.txt", b"second a")
        add_member(tar, "d.jpg", jpeg_bytes(colour(4)))
        add_member(tar, "d.txt", b"d")
        add_member(tar, "d.json", b"[1, 2]")  # metadata that is not an object
    rejects = RejectLog()

    records = list(iter_records("webdataset", tmp_path, rejects=rejects))

    assert [(r.key, r.caption) for r in records] == [("00000/a", "first a"), ("00000/c", "c")]
    assert [(e["key"], e["reason"].split(":")[0]) for e in rejects.entries] == [
        ("00000/b", "missing image"),
        ("00000/a", "duplicate key"),
        ("00000/d", "unreadable metadata"),
    ]


def test_files_layout_edge_cases(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg_bytes(colour(1)))
    (root / "a.png").write_bytes(jpeg_bytes(colour(2)))  # the same key twice
    (root / "a.txt").write_text("a", encoding="utf-8")
    (root / "b.txt").write_text("a caption without its image", encoding="utf-8")
    (root / "._a.jpg").write_bytes(b"macOS resource fork")  # hidden: not part of the data
    (root / "00000_stats.json").write_text("{}", encoding="utf-8")  # img2dataset's stats: not a record
    (root / "c.jpg").write_bytes(jpeg_bytes(colour(3)))
    (root / "c.txt").write_text("c", encoding="utf-8")
    (root / "c.json").write_text("{not json", encoding="utf-8")
    rejects = RejectLog()

    records = list(iter_records("files", root, rejects=rejects))

    assert [(r.key, r.caption) for r in records] == [("a", "a")]
    assert np.abs(np.asarray(records[0].image, dtype=int) - colour(1)).max() <= 3  # a.jpg, not a.png
    assert [(e["key"], e["reason"].split(":")[0]) for e in rejects.entries] == [
        ("a", "duplicate key"),
        ("b", "missing image"),
        ("c", "unreadable metadata"),
    ]


def test_parquet_img2dataset_rows_and_fallback_keys(tmp_path):
    jpg = jpeg_bytes(colour(1))
    # img2dataset's parquet output: failed downloads are rows with a null image.
    pq.write_table(
        pa.table(
            {
                "key": ["000000000", "000000001", "000000002"],
                "jpg": pa.array([jpg, None, jpg], pa.binary()),
                "txt": ["zero", "one", "two"],
                "status": ["success", "failed_to_download", "success"],
                "error_message": [None, "timeout", None],
            }
        ),
        tmp_path / "00000.parquet",
        row_group_size=2,
    )
    # Without a key column the key is <file stem>/<row>.
    pq.write_table(pa.table({"jpg": pa.array([jpg, jpg], pa.binary()), "txt": ["x", "y"]}), tmp_path / "extra.parquet")
    rejects = RejectLog()

    records = list(iter_records("parquet", tmp_path, rejects=rejects, batch_size=2))

    assert [(r.key, r.caption) for r in records] == [
        ("000000000", "zero"),
        ("000000002", "two"),
        ("extra/0", "x"),
        ("extra/1", "y"),
    ]
    assert records[0].meta["status"] == "success"
    assert rejects.entries == [
        {
            "key": "000000001",
            "source": f"{tmp_path / '00000.parquet'}:row 1",
            "reason": "not downloaded: status failed_to_download (timeout)",
        }
    ]


def test_parquet_hugging_face_image_column(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images_ = pa.array([{"bytes": jpeg_bytes(colour(i)), "path": f"{i}.jpg"} for i in range(2)], image_type)
    pq.write_table(pa.table({"image": images_, "text": ["first", "second"]}), tmp_path / "train.parquet")

    records = list(
        iter_records("parquet", tmp_path / "train.parquet", image_column="image", caption_column="text", key_column=None)
    )

    assert [(r.key, r.caption) for r in records] == [("train/0", "first"), ("train/1", "second")]
    assert np.abs(np.asarray(records[1].image, dtype=int) - colour(1)).max() <= 3


def test_unreadable_parquet_file_is_skipped(tmp_path):
    samples = [Sample(f"{i:09d}", f"caption {i}", jpeg_bytes(colour(i)), shard=1) for i in range(2)]
    write_dataset("parquet", tmp_path, samples, n_shards=2)
    (tmp_path / "00000.parquet").write_bytes(b"PAR1 this is not a parquet file")  # shard 0, read first
    rejects = RejectLog()

    keys = [r.key for r in iter_records("parquet", tmp_path, rejects=rejects)]

    assert keys == [s.dataset_key for s in samples]
    [entry] = rejects.entries
    assert entry["key"] == "00000/*" and entry["reason"].startswith("unreadable file")


def test_imagefolder_jsonl_edge_cases(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(jpeg_bytes(colour(1)))
    (tmp_path / "pics" / "b.png").write_bytes(jpeg_bytes(colour(2)))
    (tmp_path / "unlisted.jpg").write_bytes(jpeg_bytes(colour(3)))
    lines = [
        json.dumps({"file": "pics/a.jpg", "caption": "a", "source": "camera"}),
        "",  # blank lines are not rows
        "{broken json",
        json.dumps({"file": "pics/missing.jpg", "caption": "listed, not there"}),
        json.dumps({"file": "../outside.jpg", "caption": "leaves the folder"}),
        json.dumps({"file": "./pics/a.jpg", "caption": "a again"}),
        json.dumps({"file": "pics/b.png", "caption": "b"}),
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rejects = RejectLog()

    records = list(iter_records("imagefolder", tmp_path, rejects=rejects))

    assert [(r.key, r.caption, r.meta) for r in records] == [("pics/a", "a", {"source": "camera"}), ("pics/b", "b", {})]
    assert [(e["key"], e["reason"].split(":")[0]) for e in rejects.entries] == [
        ("captions.jsonl:line 3", "unreadable caption"),
        ("pics/missing", "unreadable file"),
        ("captions.jsonl:line 5", "missing image"),
        ("pics/a", "duplicate key"),
        ("unlisted", "missing caption"),
    ]


# --- sharding ------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3, 5])
@pytest.mark.parametrize("fmt", FORMATS)
def test_ranks_cover_every_record_exactly_once(fmt, world_size, tmp_path):
    # 3 shard files: world_size 2 and 3 split tar/parquet by file, 5 by record.
    good = good_samples(10, n_shards=3)
    bad = [Sample("bad1", "corrupt", b"garbage", shard=1), Sample("bad2", None, jpeg_bytes((7, 7, 7)), shard=2)]
    path = write_dataset(fmt, tmp_path / fmt, good + bad, n_shards=3)

    keys, rejected, per_rank = [], [], []
    for rank in range(world_size):
        rejects = RejectLog()
        shard = [r.key for r in iter_records(fmt, path, rank, world_size, rejects, require_nonempty=False)]
        keys += shard
        per_rank.append(shard)
        rejected += [e["key"] for e in rejects.entries]

    assert sorted(keys) == sorted(s.dataset_key for s in good)  # a key twice would show here
    assert sorted(rejected) == sorted(s.dataset_key for s in bad)
    if fmt in ("webdataset", "parquet") and world_size <= 3:  # split by file
        for shard in per_rank:
            assert len({key.split("/")[0] for key in shard}) <= (3 + world_size - 1) // world_size


def test_bad_rank_or_world_size_names_the_key(tmp_path):
    path = write_dataset("files", tmp_path / "files", good_samples(1))
    with pytest.raises(ValueError, match=r"^rank: must be in \[0, world_size=2\), got 2"):
        iter_records("files", path, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"^world_size: must be at least 1, got 0"):
        iter_records("files", path, rank=0, world_size=0)


# --- config errors -------------------------------------------------------------------------


def test_unknown_format_names_the_key(tmp_path):
    with pytest.raises(DataConfigError, match=r"^data\.format: unknown format 'tfrecord'; expected one of"):
        iter_records("tfrecord", tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_path_names_the_key(fmt, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"^data\.path: .*nowhere does not exist"):
        iter_records(fmt, missing)
    with pytest.raises(FileNotFoundError, match=r"^data\.path: .*nowhere does not exist"):
        READERS[fmt](missing)  # the readers check too, when called directly


def test_parquet_column_errors_fail_at_once(tmp_path):
    pq.write_table(
        pa.table({"key": ["k"], "jpg": pa.array([jpeg_bytes(colour(1))], pa.binary()), "text": ["a caption"]}),
        tmp_path / "a.parquet",
    )
    # Each call raises itself, before a single record is read.
    with pytest.raises(
        DataConfigError, match=r"^data\.caption_column: not set and none of caption, txt .*\(columns: key, jpg, text\)"
    ):
        iter_records("parquet", tmp_path)
    with pytest.raises(DataConfigError, match=r"^data\.caption_column: no column 'title' in .*a\.parquet"):
        iter_records("parquet", tmp_path, caption_column="title")
    with pytest.raises(DataConfigError, match=r"^data\.image_column: no column 'png'"):
        iter_records("parquet", tmp_path, image_column="png", caption_column="text")
    with pytest.raises(DataConfigError, match=r"^data\.image_column: column 'text' .* holds string"):
        iter_records("parquet", tmp_path, image_column="text", caption_column="text")
    with pytest.raises(DataConfigError, match=r"^data\.batch_size: must be a positive integer"):
        iter_records("parquet", tmp_path, caption_column="text", batch_size=0)
    assert [r.caption for r in iter_records("parquet", tmp_path, caption_column="text")] == ["a caption"]


def test_other_config_errors_name_the_key(tmp_path):
    path = write_dataset("imagefolder", tmp_path / "folder", good_samples(1))
    with pytest.raises(
        DataConfigError, match=r"^data\.caption_column: no column 'text' in .*captions\.csv \(columns: file, caption\)"
    ):
        iter_records("imagefolder", path, caption_column="text")
    with pytest.raises(DataConfigError, match=r"^data\.image_column: not an option of the imagefolder format"):
        iter_records("imagefolder", path, image_column="jpg")
    (path / "captions.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataConfigError, match=r"^data\.captions: .* has both captions\.csv and captions\.jsonl"):
        iter_records("imagefolder", path)
    assert len(list(iter_records("imagefolder", path, captions="captions.csv"))) == 1
    with pytest.raises(DataConfigError, match=r"^data\.path: .*00000\.tar is not a \.parquet"):
        tars = write_dataset("webdataset", tmp_path / "tars", good_samples(1))
        iter_records("parquet", tars / "00000.tar")


@pytest.mark.parametrize("fmt", FORMATS)
def test_conf_data_yaml_reads_its_format(fmt, tmp_path):
    cfg = OmegaConf.load(CONF_DATA / f"{fmt}.yaml")
    assert cfg.format == fmt
    with pytest.raises(DataConfigError, match=r"^data\.path: not set"):
        open_dataset(cfg)
    samples = good_samples(3)
    cfg.path = str(write_dataset(fmt, tmp_path / fmt, samples))

    records = list(open_dataset(cfg, progress=False))

    assert sorted(r.key for r in records) == sorted(s.dataset_key for s in samples)


# --- progress and the reject log -----------------------------------------------------------


def test_progress_bar_counts_records_and_rejects(tmp_path, capsys):
    samples = good_samples(5) + [Sample("bad", "corrupt", b"garbage")]
    path = write_dataset("files", tmp_path / "files", samples)

    records = list(iter_records("files", path, progress=True))

    assert len(records) == 5
    err = capsys.readouterr().err
    assert "reading files" in err and "5img" in err.replace(" ", "") and "rejected=1" in err


def test_reject_log_keeps_counting_past_its_memory_cap(tmp_path):
    rejects = RejectLog(tmp_path / "rejects.jsonl", keep_in_memory=2)
    for i in range(5):
        rejects.add(f"k{i}", "somewhere", "missing caption: empty")
    assert len(rejects) == 5 and len(rejects.entries) == 2
    assert len(reject_lines(tmp_path / "rejects.jsonl")) == 5
    assert rejects.summary() == f"5 records rejected: 5 missing caption (see {tmp_path / 'rejects.jsonl'})"
