"""Inputs made by other tools or other people, read as hostile: prompt lists whose lines hold
Unicode line breaks or invalid UTF-8, bytes columns in prompt tables, training keys that
point outside the training set, and caption or metadata files far larger than any caption."""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.data import DataConfigError, RejectLog, iter_records, open_dataset
from pipeline.prompts import PromptsError, read_prompts
from pipeline.training_images import fetch_training_images
from tests.conftest import REPO, stage_env
from tests.test_data import CONF_DATA, FORMATS, add_member, colour, good_samples, jpeg_bytes, write_dataset
from tests.test_data_hostile import add_bad_record, png_bytes, unchecked_strings

# Characters str.splitlines() breaks at besides \n and \r: they belong inside a caption.
UNICODE_BREAKS = ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e"]


# --- 1. prompt lists: lines end at \n only --------------------------------------------------


def test_txt_prompts_split_on_newline_only(tmp_path):
    lines = [
        "a cat\u2028on a mat",
        "a dog\u2029in a fog",
        "a bird\x85in\x0ca tree",
        "a fish\x0bin\x1ca\x1ddish\x1e",
        "a plain caption",
    ]
    path = tmp_path / "prompts.txt"
    # Windows line ends on some lines: the \r goes, the line stays one prompt.
    path.write_bytes(("\r\n".join(lines[:2]) + "\n" + "\n".join(lines[2:]) + "\r\n").encode("utf-8"))

    prompts = read_prompts(path)

    assert [p.caption for p in prompts] == [line.strip() for line in lines]
    assert [p.prompt_id for p in prompts] == ["00000", "00001", "00002", "00003", "00004"]
    for p in prompts:
        assert "\r" not in p.caption and "\n" not in p.caption
    assert sum(any(c in p.caption for c in UNICODE_BREAKS) for p in prompts) == 4


def test_txt_prompts_with_invalid_utf8_name_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a fine caption\nanother\ncaf\xe9 au lait\n")
    with pytest.raises(PromptsError, match=r"^prompts: '.*prompts\.txt' line 3 is not valid UTF-8 \(byte 0xe9\)") as err:
        read_prompts(path)
    assert "\n" not in str(err.value)


# --- 2. bytes columns in a prompts parquet ----------------------------------------------------


def test_bytes_captions_and_ids_decode_as_utf8(tmp_path, caplog):
    path = tmp_path / "selected.parquet"
    table = pa.table(
        {
            "prompt_id": pa.array([b"p0", b"p1", b"p2", b"p3"], pa.binary()),
            "caption": pa.array([b"caf\xc3\xa9 au lait", b"caf\xe9 au lait", b"  a red bus ", b"\xff\xfe"], pa.binary()),
            "dup_count": [5, 4, 3, 2],
        }
    )
    pq.write_table(table, path)

    with caplog.at_level(logging.WARNING, logger="pipeline.prompts"):
        prompts = read_prompts(path)

    assert [(p.prompt_id, p.caption, p.dup_count) for p in prompts] == [("p0", "café au lait", 5), ("p2", "a red bus", 3)]
    assert all("b'" not in p.caption and "b'" not in p.prompt_id for p in prompts)
    [warning] = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert "skipped 2 caption(s)" in warning and "selected.parquet" in warning
    assert "'p1'" in warning and "'p3'" in warning


def test_string_caption_column_with_an_invalid_byte_skips_only_that_prompt(tmp_path, caplog):
    # pyarrow writes string columns without checking them, so another tool's table can hold this.
    captions = unchecked_strings([b"good one", b"caf\xe9 bad"])
    path = tmp_path / "selected.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "caption": captions}), path)

    with caplog.at_level(logging.WARNING, logger="pipeline.prompts"):
        prompts = read_prompts(path)

    assert [(p.prompt_id, p.caption) for p in prompts] == [("a", "good one")]
    assert any("'b'" in r.getMessage() and "not valid UTF-8" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("raw", [b"ab\xff", b"p1\n", b"../x"])
def test_bytes_prompt_id_that_is_not_a_plain_name_is_refused(raw, tmp_path):
    path = tmp_path / "selected.parquet"
    pq.write_table(pa.table({"prompt_id": pa.array([raw], pa.binary()), "caption": ["a caption"]}), path)
    with pytest.raises(PromptsError, match=r"^prompts: .* not plain file names"):
        read_prompts(path)


# --- 3. training keys are names inside data.path, nothing else ---------------------------------


class ReadRecorder:
    """Records every path opened or read through ``open``, ``Path.open`` and ``Path.read_bytes``."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        real_open, real_read_bytes, real_path_open = builtins.open, Path.read_bytes, Path.open

        def recording_open(file, *args, **kwargs):
            self.paths.append(os.path.realpath(file) if isinstance(file, (str, Path)) else str(file))
            return real_open(file, *args, **kwargs)

        def recording_read_bytes(path):
            self.paths.append(os.path.realpath(path))
            return real_read_bytes(path)

        def recording_path_open(path, *args, **kwargs):
            self.paths.append(os.path.realpath(path))
            return real_path_open(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", recording_open)
        monkeypatch.setattr(Path, "read_bytes", recording_read_bytes)
        monkeypatch.setattr(Path, "open", recording_path_open)

    def touched(self, *paths: Path) -> list[str]:
        real = {os.path.realpath(p) for p in paths}
        return [p for p in self.paths if p in real]


def training_set_with_outside_files(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A ``files`` training set at ``tmp_path/train`` (one good record, one symlink leading out)
    and real images outside it; returns the set's path and ``{hostile key: the file it names}``."""
    root = tmp_path / "train"
    (root / "00000").mkdir(parents=True)
    (root / "00000" / "good.jpg").write_bytes(jpeg_bytes(colour(1)))
    (root / "00000" / "good.txt").write_text("a good caption")
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(Image.new("RGB", (8, 8), (9, 9, 9))))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "img.jpg").write_bytes(jpeg_bytes(colour(2)))
    (root / "00000" / "link").symlink_to(elsewhere, target_is_directory=True)
    (root / "00000" / "leak.jpg").symlink_to(secret)
    hostile = {
        "../secret": secret,  # <path>/../secret.png
        str(tmp_path / "secret"): secret,  # absolute: <path> / "/abs" is "/abs"
        "00000/../../secret": secret,
        "00000/link/img": elsewhere / "img.jpg",  # a folder symlink leading out
        "00000/leak": secret,  # a file symlink leading out
    }
    return root, hostile


def test_training_keys_outside_the_data_set_are_rejected_and_never_read(tmp_path, monkeypatch):
    root, hostile = training_set_with_outside_files(tmp_path)
    odd = ["a\x00b", "a\\..\\..\\secret"]
    recorder = ReadRecorder(monkeypatch)
    rejects = RejectLog()

    found = fetch_training_images({"format": "files", "path": str(root)}, [*hostile, *odd, "00000/good"], rejects)

    assert list(found) == ["00000/good"]
    assert recorder.touched(*hostile.values()) == []
    reasons = {entry["key"]: entry["reason"] for entry in rejects.entries}
    assert set(reasons) == set(hostile) | set(odd)
    assert all(reason.startswith("unsafe training key: ") for reason in reasons.values())
    assert "'..' component" in reasons["../secret"] and "absolute" in reasons[str(tmp_path / "secret")]
    assert "NUL" in reasons["a\x00b"] and "backslash" in reasons["a\\..\\..\\secret"]
    assert "outside" in reasons["00000/link/img"] and "outside" in reasons["00000/leak"]
    assert len(rejects) == len(hostile) + len(odd)


def test_training_set_behind_a_symlinked_path_still_reads(tmp_path):
    root, _ = training_set_with_outside_files(tmp_path)
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    rejects = RejectLog()
    found = fetch_training_images({"format": "files", "path": str(alias)}, ["00000/good"], rejects)
    assert list(found) == ["00000/good"] and len(rejects) == 0


def test_imagefolder_row_naming_a_file_through_a_symlink_out_is_never_read(tmp_path, monkeypatch):
    root, hostile = training_set_with_outside_files(tmp_path)
    (root / "captions.jsonl").write_text(
        "\n".join(json.dumps({"file": f, "caption": "c"}) for f in ["00000/good.jpg", "00000/link/img.jpg", "00000/leak.jpg"])
    )
    recorder = ReadRecorder(monkeypatch)
    rejects = RejectLog()

    records = list(iter_records("imagefolder", root, rejects=rejects))

    assert [r.key for r in records] == ["00000/good"]
    assert recorder.touched(*hostile.values()) == []
    outside = [e for e in rejects.entries if "outside" in e["reason"]]
    assert sorted(e["key"] for e in outside) == ["00000/leak", "00000/link/img"]
    assert all(e["reason"].startswith("missing image: the file ") for e in outside)


# --- 4. captions and metadata far larger than any caption --------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_oversized_caption_rejects_the_record_in_every_format(fmt, tmp_path):
    samples = good_samples(2)
    path = write_dataset(fmt, tmp_path / fmt, samples)
    bad_key = add_bad_record(fmt, path, b"x" * 100, b"{}")
    rejects = RejectLog()

    records = list(open_dataset({"format": fmt, "path": str(path), "max_caption_bytes": 64}, rejects=rejects, progress=False))

    assert sorted(r.key for r in records) == sorted(s.dataset_key for s in samples)
    [entry] = rejects.entries
    assert (entry["key"], entry["reason"]) == (bad_key, "oversized caption: 100 bytes, above data.max_caption_bytes = 64")


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_oversized_metadata_file_rejects_the_record(fmt, tmp_path):
    samples = good_samples(2)  # their .json: {"url": ...}, about 40 bytes
    path = write_dataset(fmt, tmp_path / fmt, samples)
    meta = json.dumps({"title": "y" * 200}).encode()
    bad_key = add_bad_record(fmt, path, b"a fine caption", meta)
    rejects = RejectLog()

    records = list(iter_records(fmt, path, rejects=rejects, max_metadata_bytes=100))

    assert sorted(r.key for r in records) == sorted(s.dataset_key for s in samples)
    [entry] = rejects.entries
    assert entry["key"] == bad_key
    assert entry["reason"] == f"oversized metadata: {len(meta)} bytes, above data.max_metadata_bytes = 100"


def test_parquet_oversized_text_columns_reject_their_row(tmp_path):
    image = jpeg_bytes(colour(1))
    table = pa.table(
        {
            "key": ["a", "b", "c"],
            "jpg": pa.array([image] * 3, pa.binary()),
            "caption": ["short", "x" * 100, "short too"],
            "url": ["http://x/a", "http://x/b", "http://x/" + "c" * 300],
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    rejects = RejectLog()

    records = list(iter_records("parquet", tmp_path, rejects=rejects, max_caption_bytes=64, max_metadata_bytes=100))

    assert [(r.key, r.caption, r.meta["url"]) for r in records] == [("a", "short", "http://x/a")]
    assert [(e["key"], e["reason"]) for e in rejects.entries] == [
        ("b", "oversized caption: 100 bytes, above data.max_caption_bytes = 64"),
        ("c", "oversized metadata: 309 bytes, above data.max_metadata_bytes = 100"),
    ]


def test_imagefolder_oversized_fields_and_lines_reject_their_row(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(colour(1)))
    rows = [
        json.dumps({"file": "a.jpg", "caption": "fine"}),
        json.dumps({"file": "b.jpg", "caption": "fine", "note": "n" * 200}),
        json.dumps({"file": "c.jpg", "caption": "\u00e9" * 20_000}),  # JSON-escaped: 6 bytes a character
        json.dumps({"file": "d.jpg", "caption": "fine"}),
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(rows) + "\n")
    for name in "bcd":
        (tmp_path / f"{name}.jpg").write_bytes(jpeg_bytes(colour(2)))
    rejects = RejectLog()

    records = list(iter_records("imagefolder", tmp_path, rejects=rejects, max_caption_bytes=64, max_metadata_bytes=100))

    assert [r.key for r in records] == ["a", "d"]
    reasons = [(e["key"], e["reason"].split(":")[0]) for e in rejects.entries]
    assert reasons == [("b", "oversized metadata"), ("captions.jsonl:line 3", "oversized row"), ("c", "missing caption")]


@pytest.mark.parametrize("value", ["64k", 0, -1, True, 1.5, None])
@pytest.mark.parametrize("key", ["max_caption_bytes", "max_metadata_bytes"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_size_limit_that_is_not_a_positive_integer_names_its_key(fmt, key, value, tmp_path):
    path = write_dataset(fmt, tmp_path / fmt, good_samples(1))
    with pytest.raises(DataConfigError, match=rf"^data\.{key}: must be a positive integer \(bytes\), got ") as err:
        open_dataset({"format": fmt, "path": str(path), key: value}, progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shipped_data_configs_state_the_default_limits(fmt):
    cfg = OmegaConf.load(CONF_DATA / f"{fmt}.yaml")
    assert (cfg.max_caption_bytes, cfg.max_metadata_bytes) == (64 * 1024, 1024 * 1024)


class Repeated(io.RawIOBase):
    """``size`` bytes of ``b"a"``, read in pieces (never held whole)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = b"a" * n
        self.left -= n
        return n


# The peak memory of the reading process alone: VmHWM starts afresh at exec, whereas ru_maxrss
# keeps the high-water mark of the (forked) test process that started it.
MEASURE = """
import json, re, sys
from pathlib import Path
from pipeline.data import RejectLog, open_dataset
rejects = RejectLog()
keys = [r.key for r in open_dataset({"format": "webdataset", "path": sys.argv[1]}, rejects=rejects, progress=False)]
peak = int(re.search(r"^VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))
print(json.dumps({"keys": keys, "rejects": rejects.entries, "peak_kib": peak}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak memory is read from Linux's /proc/self/status")
def test_a_200_mb_caption_in_a_small_tar_is_rejected_without_being_held(tmp_path):
    caption_size = 200_000_000
    shard = tmp_path / "00000.tar.gz"
    with tarfile.open(shard, "w:gz", compresslevel=1) as tar:
        add_member(tar, "000.jpg", jpeg_bytes(colour(1)))
        add_member(tar, "000.txt", b"a fine caption")
        add_member(tar, "001.jpg", jpeg_bytes(colour(2)))
        info = tarfile.TarInfo("001.txt")
        info.size = caption_size
        tar.addfile(info, io.BufferedReader(Repeated(caption_size)))
    assert shard.stat().st_size < 2_000_000

    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(shard)], capture_output=True, text=True, timeout=300, cwd=REPO, env=stage_env()
    )

    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["keys"] == ["00000/000"]
    [entry] = out["rejects"]
    assert entry["key"] == "00000/001"
    assert entry["reason"] == f"oversized caption: {caption_size} bytes, above data.max_caption_bytes = 65536"
    assert out["peak_kib"] < 1024 * 1024  # under 1 GiB
