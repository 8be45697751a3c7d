"""Inputs made by other tools or other people, read as hostile: prompt lists whose lines hold
Unicode line breaks or invalid UTF-8, bytes columns in prompt tables, training keys that
point outside the training set, and caption or metadata files far larger than any caption."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.prompts import PromptsError, read_prompts
from tests.test_data_hostile import unchecked_strings

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
