"""The data layer on hostile input: captions files and captions that are not valid
UTF-8, images in modes other than 8-bit RGB, and shards that break part-way. The promise:
a record that cannot be read is skipped, logged with its reason and counted, once per
record lost, and every other record is read."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import DataConfigError, RejectLog, decode_image, iter_records
from tests.test_data import FORMATS, add_member, colour, good_samples, jpeg_bytes, reject_lines, write_dataset

BAD_CAPTION = b"caf\xe9 au lait"  # Latin-1 e-acute: 0xe9 starts a 3-byte UTF-8 sequence, then " " breaks it


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def tiff_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="TIFF")
    return buffer.getvalue()


# --- 2. imagefolder captions files with an invalid byte -------------------------------------


def write_long_captions(root: Path, suffix: str, n: int, bad_row: int) -> None:
    """``n`` rows over placeholder image files; row ``bad_row`` (0-based) holds ``BAD_CAPTION``.

    The rows are long enough (about 60 bytes) that the bad byte sits several 8 KiB read
    buffers into the file, with good rows before it in the same buffer.
    """
    (root / "pics").mkdir(parents=True)
    lines = [b"file,caption"] if suffix == "csv" else []
    for i in range(n):
        (root / "pics" / f"{i:06d}.jpg").write_bytes(b"not decoded")
        caption = BAD_CAPTION if i == bad_row else f"a long enough caption for row number {i}".encode()
        if suffix == "csv":
            lines.append(b"pics/%06d.jpg,%s" % (i, caption))
        else:
            lines.append(b'{"file": "pics/%06d.jpg", "caption": "%s"}' % (i, caption))
    (root / f"captions.{suffix}").write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_imagefolder_invalid_utf8_rejects_only_its_row(suffix, tmp_path):
    n, bad_row = 400, 250
    write_long_captions(tmp_path, suffix, n, bad_row)
    rejects = RejectLog(tmp_path / "out" / "rejects.jsonl")

    records = list(iter_records("imagefolder", tmp_path, rejects=rejects, decode=False))

    assert [r.key for r in records] == [f"pics/{i:06d}" for i in range(n) if i != bad_row]
    [line] = reject_lines(tmp_path / "out" / "rejects.jsonl")
    line_number = bad_row + (2 if suffix == "csv" else 1)  # 1-based, after the CSV header
    assert line["key"] == f"pics/{bad_row:06d}"
    assert line["reason"].startswith("unreadable caption: not valid UTF-8 (")
    assert f"line {line_number}" in line["reason"] and "0xe9" in line["reason"]
    assert len(rejects) == 1


def test_imagefolder_csv_header_with_an_invalid_byte_is_a_config_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(colour(1)))
    (tmp_path / "captions.csv").write_bytes(b"file,capt\xefon\na.jpg,a caption\n")
    with pytest.raises(DataConfigError, match=r"^data\.captions: the header of .*captions\.csv is not valid UTF-8 \(.*0xef"):
        iter_records("imagefolder", tmp_path)


def test_imagefolder_csv_that_breaks_counts_a_lower_bound(tmp_path):
    # csv refuses a field above its limit (131,072 characters) and cannot resynchronise after it.
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(colour(1)))
    rows = [b"file,caption", b"a.jpg,a", b'b.jpg,"' + b"x" * 200_000 + b'"', b"c.jpg,c"]
    (tmp_path / "captions.csv").write_bytes(b"\n".join(rows) + b"\n")
    rejects = RejectLog()

    records = list(iter_records("imagefolder", tmp_path, rejects=rejects))

    assert [r.key for r in records] == ["a"]
    [entry] = rejects.entries
    assert entry["reason"].startswith("unreadable caption: ")
    assert "at least 1 row" in entry["reason"]  # the rows after the break cannot be counted
    assert len(rejects) == 1


# --- 3. images in other modes ---------------------------------------------------------------


def as_array(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img, dtype=int)


@pytest.mark.parametrize("encode", [png_bytes, tiff_bytes])
def test_16_bit_greyscale_scales_to_8_bit(encode):
    rng = np.random.default_rng(0)
    first = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    second = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    wide = Image.fromarray(first)
    assert wide.mode == "I;16"

    decoded = as_array(decode_image(encode(wide)))
    other = as_array(decode_image(encode(Image.fromarray(second))))

    # v in 0..65535 maps to round(v / 257) in 0..255, the inverse of 8-bit k -> 257 k. Exact:
    # v / 257 is never a half (257 is odd), so no rounding convention can differ.
    expected = np.rint(first.astype(float) / 257).astype(int)
    assert (decoded == expected[..., None]).all()
    assert not np.array_equal(decoded, other)  # different images stay different
    # Against the 8-bit version a tool makes by dropping the low byte (v >> 8 = floor(v / 256)):
    # round(v / 257) - floor(v / 256) lies in (-0.5 - v/65792, 1.5 - v/65792), inside (-1.5, 1.5)
    # as v / 65792 < 1, so the two integers differ by at most one grey level.
    eight_bit = as_array(decode_image(encode(Image.fromarray((first >> 8).astype(np.uint8)))))
    assert np.abs(decoded - eight_bit).max() <= 1


def test_32_bit_integer_and_float_modes_scale_to_8_bit():
    values = np.array([[0, 257, 65535, 70000], [-5, 32896, 1000, 65535]], dtype=np.int32)
    # Mode I holds 16-bit data (Pillow's mode for it in some versions): as above, outside clipped.
    decoded = as_array(decode_image(tiff_bytes(Image.fromarray(values))))
    assert (decoded[..., 0] == np.rint(np.clip(values, 0, 65535) / 257)).all()

    unit = np.array([[0.0, 0.5, 1.0], [0.25, np.nan, 0.1]], dtype=np.float32)
    decoded = as_array(decode_image(tiff_bytes(Image.fromarray(unit))))
    # Floats within [0, 1] are on the unit scale: round(255 x), NaN as 0. 0.5 -> 127.5 -> 128
    # (halves round up).
    assert decoded[..., 0].tolist() == [[0, 128, 255], [64, 0, 26]]
    byte_scale = np.array([[0.0, 12.4, 255.0, 300.0]], dtype=np.float32)
    decoded = as_array(decode_image(tiff_bytes(Image.fromarray(byte_scale))))
    assert decoded[..., 0].tolist() == [[0, 12, 255, 255]]  # above 1: Pillow's 0..255 scale, clipped


def test_alpha_palette_cmyk_and_bilevel_modes_decode_to_rgb():
    white, red = (255, 255, 255), (255, 0, 0)
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (255, 0, 0, 128)])
    # Alpha is composited on white, as img2dataset does: out = a/255 c + (1 - a/255) 255. For
    # a = 128 and c = 0: 127/255 * 255 = 127 exactly; c = 255 gives 255.
    assert as_array(decode_image(png_bytes(rgba))).tolist() == [[list(white), list(red), [255, 127, 127]]]

    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    assert as_array(decode_image(png_bytes(la))).tolist() == [[list(white), [0, 0, 0]]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    palette.info["transparency"] = 0  # index 0 (red) is transparent
    assert as_array(decode_image(png_bytes(palette))).tolist() == [[list(white), [0, 0, 255]]]

    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (0, 255, 255, 0)])  # no ink: white; magenta + yellow: red
    assert as_array(decode_image(tiff_bytes(cmyk))).tolist() == [[list(white), list(red)]]

    bilevel = Image.new("1", (2, 1))
    bilevel.putdata([0, 255])
    assert as_array(decode_image(png_bytes(bilevel))).tolist() == [[[0, 0, 0], list(white)]]


# --- 4. captions and metadata that are not valid UTF-8, in every format ----------------------


def add_bad_record(fmt: str, path: Path, caption: bytes, meta: bytes) -> str:
    """Add a record ``bad`` to the data set ``write_dataset`` wrote at ``path``; its key."""
    image = jpeg_bytes(colour(9))
    if fmt == "files":
        (path / "00000" / "bad.jpg").write_bytes(image)
        (path / "00000" / "bad.txt").write_bytes(caption)
        (path / "00000" / "bad.json").write_bytes(meta)
    elif fmt == "webdataset":
        with tarfile.open(path / "00001.tar", "w") as tar:
            add_member(tar, "bad.jpg", image)
            add_member(tar, "bad.txt", caption)
            add_member(tar, "bad.json", meta)
        return "00001/bad"
    elif fmt == "parquet":
        table = pa.table(
            {"key": ["00000/bad"], "jpg": pa.array([image], pa.binary()), "caption": pa.array([caption], pa.binary())}
        )
        pq.write_table(table, path / "00001.parquet")
    else:
        (path / "00000" / "bad.jpg").write_bytes(image)
        with (path / "captions.csv").open("ab") as f:
            f.write(b'00000/bad.jpg,"%s"\r\n' % caption)
    return "00000/bad"


@pytest.mark.parametrize("fmt", FORMATS)
def test_invalid_utf8_caption_is_rejected_in_every_format(fmt, tmp_path):
    samples = good_samples(2)
    path = write_dataset(fmt, tmp_path / fmt, samples)
    bad_key = add_bad_record(fmt, path, BAD_CAPTION, b"{}")
    rejects = RejectLog()

    records = list(iter_records(fmt, path, rejects=rejects))

    assert sorted(r.key for r in records) == sorted(s.dataset_key for s in samples)
    [entry] = rejects.entries
    assert entry["key"] == bad_key
    assert entry["reason"].startswith("unreadable caption: not valid UTF-8 (") and "0xe9" in entry["reason"]


def unchecked_strings(values: list[bytes]) -> pa.Array:
    """A string array holding ``values`` as they are: pyarrow (like a parquet file) does not check UTF-8."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(
        pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))]
    )


def test_parquet_string_column_with_invalid_utf8_rejects_only_its_row(tmp_path):
    image = jpeg_bytes(colour(1))
    table = pa.table(
        {
            "key": ["a", "b", "c", "d"],
            "jpg": pa.array([image] * 4, pa.binary()),
            "caption": unchecked_strings([b"a", BAD_CAPTION, b"c", b"d"]),
            "url": unchecked_strings([b"http://x/a", b"http://x/b", b"http://x/c", b"http://x/caf\xe9"]),
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    rejects = RejectLog()

    records = list(iter_records("parquet", tmp_path, rejects=rejects))

    assert [(r.key, r.caption, r.meta["url"]) for r in records] == [("a", "a", "http://x/a"), ("c", "c", "http://x/c")]
    assert [(e["key"], e["reason"].split(" (")[0]) for e in rejects.entries] == [
        ("b", "unreadable caption: not valid UTF-8"),
        ("d", "unreadable metadata: not valid UTF-8"),
    ]
    assert "column 'caption': byte 0xe9" in rejects.entries[0]["reason"]


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
@pytest.mark.parametrize("meta", [b'{"title": "caf\xe9"}', b'{"title": "\\udce9"}'], ids=["byte", "escaped-surrogate"])
def test_invalid_utf8_metadata_is_rejected(fmt, meta, tmp_path):
    samples = good_samples(2)
    path = write_dataset(fmt, tmp_path / fmt, samples)
    bad_key = add_bad_record(fmt, path, b"a fine caption", meta)
    rejects = RejectLog(tmp_path / "rejects.jsonl")  # writing the entry must not fail either

    records = list(iter_records(fmt, path, rejects=rejects))

    assert sorted(r.key for r in records) == sorted(s.dataset_key for s in samples)
    [line] = reject_lines(tmp_path / "rejects.jsonl")
    assert line["key"] == bad_key
    assert line["reason"].startswith("unreadable metadata: not valid UTF-8 (")


# --- 5. one count per record lost -------------------------------------------------------------


def test_reject_log_counts_the_records_an_entry_stands_for(tmp_path):
    rejects = RejectLog(tmp_path / "rejects.jsonl")
    rejects.add("00000/*", "00000.tar", "unreadable file: truncated; 3 records lost", count=3)
    rejects.add("k", "somewhere", "missing caption: empty")

    assert len(rejects) == 4
    assert rejects.counts() == {"unreadable file": 3, "missing caption": 1}
    assert rejects.summary().startswith("4 records rejected: 3 unreadable file, 1 missing caption")
    first, second = reject_lines(tmp_path / "rejects.jsonl")
    assert first["count"] == 3 and "count" not in second  # a line without "count" stands for one record
    with pytest.raises(ValueError, match="count"):
        rejects.add("k", "somewhere", "missing caption: empty", count=0)


def truncated_shard(root: Path, n: int, keep: int) -> list[str]:
    """``00000.tar`` with ``n`` records, cut half-way through image number ``keep``; all keys."""
    samples = good_samples(n)
    write_dataset("webdataset", root, samples)
    tar_path = root / "00000.tar"
    with tarfile.open(tar_path) as tar:
        image = [m for m in tar.getmembers() if m.name.endswith(".jpg")][keep]
    tar_path.write_bytes(tar_path.read_bytes()[: image.offset_data + image.size // 2])
    return [s.dataset_key for s in samples]


def write_sidecar(root: Path, kind: str, n_success: int) -> None:
    """What img2dataset writes beside ``00000.tar``: its metadata table or its stats."""
    if kind == "parquet":
        status = ["success"] * n_success + ["failed_to_download"]  # failed downloads are not in the tar
        keys = [f"{i:09d}" for i in range(len(status))]
        pq.write_table(pa.table({"key": keys, "status": status, "url": [f"http://x/{k}" for k in keys]}), root / "00000.parquet")
    elif kind == "stats":
        stats = {"count": n_success + 1, "successes": n_success, "failed_to_download": 1, "failed_to_resize": 0}
        (root / "00000_stats.json").write_text(json.dumps(stats), encoding="utf-8")


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("sidecar", ["none", "parquet", "stats"])
def test_truncated_tar_counts_the_records_it_lost(sidecar, world_size, tmp_path):
    n, keep = 5, 2  # the break is in record 2: it and records 3, 4 are lost
    keys = truncated_shard(tmp_path, n, keep)
    write_sidecar(tmp_path, sidecar, n)

    read, entries, lost = [], [], 0
    for rank in range(world_size):
        rejects = RejectLog()
        read += [r.key for r in iter_records("webdataset", tmp_path, rank, world_size, rejects, require_nonempty=False)]
        entries += rejects.entries
        lost += len(rejects)

    assert sorted(read) == keys[:keep]  # the sidecar parquet is not read as data
    assert all(e["key"] == "00000/*" and e["reason"].startswith("unreadable file: ") for e in entries)
    if sidecar == "none":
        assert lost == 1  # only the record being read at the break is known to be lost
        assert "at least 1" in entries[0]["reason"]
    else:
        assert lost == n - keep
        assert f"{n - keep} records" in entries[0]["reason"]


@pytest.mark.parametrize("inside_header", [False, True])
def test_tar_cut_at_a_header_is_not_a_clean_end(inside_header, tmp_path):
    # tarfile ends quietly when the file stops at or inside a header; only the all-zero
    # end-of-archive block is a clean end.
    samples = good_samples(5)
    keys = [s.dataset_key for s in samples]
    tar_path = write_dataset("webdataset", tmp_path, samples) / "00000.tar"
    with tarfile.open(tar_path) as tar:
        header = [m for m in tar.getmembers() if m.name.endswith(".jpg")][2].offset
    tar_path.write_bytes(tar_path.read_bytes()[: header + (100 if inside_header else 0)])
    rejects = RejectLog()

    read = [r.key for r in iter_records("webdataset", tmp_path, rejects=rejects)]

    # Record 1 was being read when the file stopped: its members may be cut off, so it is lost too.
    assert read == keys[:1]
    [entry] = rejects.entries
    assert "end-of-archive marker" in entry["reason"] and "at least 1 record" in entry["reason"]

    write_sidecar(tmp_path, "stats", 5)
    rejects = RejectLog()
    list(iter_records("webdataset", tmp_path, rejects=rejects))
    assert len(rejects) == 4  # 5 written, 1 read


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_parquet_with_wrong_columns_counts_its_rows(world_size, tmp_path):
    write_dataset("parquet", tmp_path, good_samples(2))  # 00000.parquet: the columns are checked on it
    renamed = pa.table({"key": ["x", "y", "z"], "image": pa.array([b"a", b"b", b"c"], pa.binary()), "text": ["x", "y", "z"]})
    pq.write_table(renamed, tmp_path / "00001.parquet")

    lost = 0
    for rank in range(world_size):
        rejects = RejectLog()
        list(iter_records("parquet", tmp_path, rank, world_size, rejects, require_nonempty=False))
        lost += len(rejects)
        assert all(e["key"] == "00001/*" for e in rejects.entries)

    assert lost == 3


def corrupt_row_group(path: Path, row_group: int) -> None:
    """Overwrite the page header of ``row_group``'s first column: its pages cannot be read."""
    start = pq.ParquetFile(path).metadata.row_group(row_group).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_parquet_broken_mid_read_counts_the_rows_lost(world_size, tmp_path):
    samples = good_samples(6)
    write_dataset("parquet", tmp_path, samples)  # row groups of 2 rows
    corrupt_row_group(tmp_path / "00000.parquet", 1)

    read, lost = [], 0
    for rank in range(world_size):
        rejects = RejectLog()
        records = iter_records("parquet", tmp_path, rank, world_size, rejects, require_nonempty=False, batch_size=2)
        read += [r.key for r in records]
        lost += len(rejects)

    assert sorted(read) == [s.dataset_key for s in samples[:2]]
    assert lost == 4  # rows 2 to 5


def test_unreadable_parquet_says_its_count_is_a_lower_bound(tmp_path):
    write_dataset("parquet", tmp_path, good_samples(2))
    (tmp_path / "00001.parquet").write_bytes(b"PAR1 no footer")
    rejects = RejectLog()

    list(iter_records("parquet", tmp_path, rejects=rejects))

    [entry] = rejects.entries
    assert entry["key"] == "00001/*" and "at least 1 record" in entry["reason"]
    assert len(rejects) == 1


def test_names_that_are_not_utf8_give_storable_keys(tmp_path):
    """A file or tar member named with bytes that are not UTF-8 is still a record, with a key
    that parquet can store (it once crashed the duplicate finder when it wrote its tables)."""
    files = tmp_path / "files"
    files.mkdir()
    for stem in ("\udcff\udcfe", "ok"):  # Python's spelling of the bytes ff fe in a file name
        (files / f"{stem}.jpg").write_bytes(jpeg_bytes(colour(1)))
        (files / f"{stem}.txt").write_text("a caption")
    shard = tmp_path / "tars" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w", encoding="utf-8", errors="surrogateescape") as tar:
        for stem in ("\udcff\udcfe", "ok"):
            add_member(tar, f"{stem}.jpg", jpeg_bytes(colour(2)))
            add_member(tar, f"{stem}.txt", b"a caption")
    for fmt, path in (("files", files), ("webdataset", shard)):
        keys = sorted(record.key for record in iter_records(fmt, path))
        assert len(keys) == 2, fmt
        pa.table({"key": keys})  # storable: raises on a lone surrogate
        assert any("\\xff\\xfe" in key for key in keys), keys
