"""Inputs made by other tools or other people, read as hostile: prompt lists whose lines hold
Unicode line breaks or invalid UTF-8, bytes columns in prompt tables, training keys that
point outside the training set, and caption or metadata files far larger than any caption."""

from __future__ import annotations

import builtins
import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import RejectLog, iter_records
from pipeline.prompts import PromptsError, read_prompts
from pipeline.training_images import fetch_training_images
from tests.test_data import colour, jpeg_bytes
from tests.test_data_hostile import png_bytes, unchecked_strings

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
