"""Untrusted text (captions, prompt ids, training keys) is shown plain, bounded and bidi-safe."""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from pathlib import Path

import pandas as pd
import pytest

from pipeline.report import load_run, write_report
from pipeline.text import display_text
from tests.test_report import audited_run

BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
# C0 and C1 controls other than the whitespace an HTML file may hold.
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
HOSTILE = "file\u202egnp.exe\x00 bell\x07 \x1b[31mred\x1b[0m next\x85line \u2067rtl\u2069 \u200fmark"
ARABIC = "قطة سوداء على الأريكة"


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> Path:
    return audited_run(tmp_path_factory.mktemp("audited"))


def report_with(run_dir: Path, tmp_path: Path, caption: str, prompt_id: str = "00000", train_key: str | None = None) -> str:
    """The report of a copy of ``run_dir``'s detection whose flagged and extracted prompt (00000)
    has this caption, prompt id and training key, as if another tool had written them."""
    detect = Path(shutil.copytree(run_dir / "detect", tmp_path / "detect"))
    memorized = pd.read_parquet(detect / "memorized.parquet")
    extracted = pd.read_parquet(detect / "extracted.parquet")
    memorized.loc[memorized["prompt_id"] == "00000", ["prompt_id", "caption"]] = [prompt_id, caption]
    rows = extracted["prompt_id"] == "00000"
    extracted.loc[rows, "prompt_id"] = prompt_id
    if train_key is not None:
        extracted.loc[rows, "train_key"] = train_key
        memorized.loc[memorized["prompt_id"] == prompt_id, "best_train_key"] = train_key
    memorized.to_parquet(detect / "memorized.parquet")
    extracted.to_parquet(detect / "extracted.parquet")
    # The generator's table names the prompt too, so that its card has a regeneration command.
    generations = tmp_path / "generations"
    generations.mkdir()
    recipe = pd.read_parquet(run_dir / "generations" / "prompts.parquet")
    recipe.loc[recipe["prompt_id"] == "00000", "prompt_id"] = prompt_id
    recipe.to_parquet(generations / "prompts.parquet")
    shutil.copytree(run_dir / "generations" / "00000", generations / "00000")
    summary = json.loads((detect / "summary.json").read_text(encoding="utf-8"))
    (detect / "summary.json").write_text(json.dumps({**summary, "generations_dir": str(generations)}), encoding="utf-8")
    (detect / "matches" / "00000.png").rename(detect / "matches" / f"{prompt_id}.png")
    out = write_report(load_run(detect), tmp_path / "index.html", title="t")
    return out.read_text(encoding="utf-8")


def test_bidi_and_control_characters_are_shown_as_escapes(audited, tmp_path):
    html = report_with(audited, tmp_path, HOSTILE, prompt_id="id\u202ecod.exe", train_key="part0/\u202e00007\x00")
    assert not [c for c in BIDI_CONTROLS if c in html]
    assert not RAW_CONTROL.search(html)
    # Each one is still visible, as an escape, where it was.
    assert r"file\u202egnp.exe\x00 bell\x07 \x1b[31mred\x1b[0m next\x85line \u2067rtl\u2069 \u200fmark" in html
    assert re.search(r"<bdi>id\\u202ecod\.exe</bdi>", html)
    assert re.search(r"<bdi>part0/\\u202e00007\\x00</bdi>", html)
    # The command that regenerates its sample names it in bash's $'...' quoting: exact, yet shown as escapes.
    quoted = r"\$&#39;id\\u202ecod\.exe"  # $'id\u202ecod.exe, HTML-escaped
    assert re.search(
        rf"<code>python -m pipeline.generate.regenerate \S+ {quoted}&#39; 4 --out \$&#39;regenerated_id\\u202ecod\.exe_00004\.png&#39;</code>",
        html,
    )


def test_a_long_caption_is_shortened_and_shown_in_full_once(audited, tmp_path):
    caption = ("lorem ipsum dolor sit amet " * 4000)[:100_000]
    html = report_with(audited, tmp_path, caption)
    shortened = re.search(r"<bdi>([^<]*)… \(([\d,]+) more characters\)</bdi>", html)
    assert shortened, "the caption is not shortened where it is listed"
    head, more = shortened.group(1), int(shortened.group(2).replace(",", ""))
    assert head == caption[: len(caption) - more] and len(head) <= 1000
    assert html.count(caption) == 1


def test_an_arabic_caption_reads_as_written(audited, tmp_path):
    html = report_with(audited, tmp_path, ARABIC)
    # Letters untouched, isolated from the LTR text around them.
    assert f"<bdi>{ARABIC}</bdi>" in html


def unsafe(char: str) -> bool:
    """What Unicode says can hide, reorder or break the text around it (not display_text's own list)."""
    explicit = {"LRE", "RLE", "PDF", "LRO", "RLO", "LRI", "RLI", "FSI", "PDI"}
    return (
        unicodedata.category(char) in {"Cc", "Cs", "Zl", "Zp"}
        or unicodedata.bidirectional(char) in explicit
        or char in "\u200e\u200f\u061c"
    )


def test_display_text_escapes_every_control_and_nothing_else():
    chars = [chr(code) for code in range(0x110000)]
    hostile = "".join(c for c in chars if unsafe(c))
    escaped = display_text(hostile, limit=None)
    assert escaped.isascii() and escaped.count("\\") == len(hostile)
    assert len(hostile) > 2048 + 65  # surrogates, C0 and C1, and more
    ordinary = "".join(c for c in chars if not unsafe(c))
    assert display_text(ordinary, limit=None) == ordinary


def test_display_text_escapes_are_readable():
    assert display_text(HOSTILE) == (r"file\u202egnp.exe\x00 bell\x07 \x1b[31mred\x1b[0m next\x85line \u2067rtl\u2069 \u200fmark")
    assert display_text("a\tb\nc\rd\x7f\u2028\ud800") == r"a\x09b\x0ac\x0dd\x7f\u2028\ud800"


def test_display_text_keeps_ordinary_text():
    for text in (ARABIC, "שלום עולם", "naïve café", "👩\u200d💻 می\u200cخواهم", "<b>&amp;</b> stays for the HTML escaper"):
        assert display_text(text) == text


def test_display_text_bounds_the_length():
    assert display_text("a" * 12_355, limit=10) == "a" * 10 + "… (12,345 more characters)"
    assert display_text("a" * 10, limit=10) == "a" * 10
    assert display_text("a" * 100_000, limit=None) == "a" * 100_000
    # The limit counts characters of the value, not of their escapes.
    assert display_text("\x00" * 5, limit=3) == r"\x00\x00\x00… (2 more characters)"


def test_display_text_of_other_values():
    assert display_text(None) == ""
    assert display_text(42) == "42"
    assert display_text(Path("dir") / "file\u202egnp.exe") == r"dir/file\u202egnp.exe"
