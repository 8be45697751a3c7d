"""The HTML report: self-contained, escaped, and showing what the detector found as evidence.

The run directories here are written by hand in the detect stage's schema (memorized.parquet
with the verification columns, extracted.parquet, matches/, summary.json), so the report is
tested against that contract alone; ``audited_run`` is shared with test_report_hostile.py,
test_report_browser.py and test_notebook.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.layout import write_prompt_table
from pipeline.report import (
    RunResults,
    extracted_prompts,
    flagged_prompts,
    load_run,
    prompt_table,
    rates_by_duplicates,
    run,
    shell_word,
    write_report,
)
from pipeline.report.results import REGENERATE
from pipeline.stats import wilson_interval
from pipeline.text import display_text

from .conftest import REPO

SIZE = 32  # pixels of every sample and training image
SAMPLES = 30  # per prompt
DELTA = 0.15  # the verification threshold recorded in summary.json
CAPTIONS = {"00000": "<script>alert('x')</script> a memorized caption", "00001": "nine copies", "00002": "all different"}
DUP_COUNTS = {"00000": 40, "00001": 10, "00002": 1}
TRAIN_KEY = "part0/00007"  # the training image prompt 00000's samples reproduce
MEMBERS = list(range(0, 24, 2))  # prompt 00000's clique: 12 of 30 samples
REPRESENTATIVE = 10
BEST = 4  # prompt 00000's sample closest to the training image
OTHER_KEY, OTHER_AT = "part9/00001", [5, 7]  # with other=True: another caption's image, and 00001's samples within DELTA of it
RULE = {"metric": "tiled_l2", "grid": 4, "size": None, "threshold": 0.15, "min_clique": 10, "max_clique_steps": 200000}


def seed_of(prompt_id: str, index: int) -> int:
    return 1_000_003 * int(prompt_id) + 7919 * index + 11


def build_audited_run(
    root: Path,
    verified: bool = True,
    recipe: bool = True,
    prescreen: bool = False,
    colours: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
    other: bool = False,
) -> Path:
    """A run directory as the detect stage leaves it, for three prompts of 30 samples each.

    ``00000`` (40 duplicates) is flagged (a clique of 12) and, when ``verified``, extracted: 12
    samples within DELTA of TRAIN_KEY, sample BEST closest; ``00001`` (10 duplicates, a clique of 9)
    is neither, its closest training image beyond DELTA; ``00002`` (1 duplicate) had no candidate.
    ``recipe``: the generator's prompts.parquet with seeds; ``prescreen``: prescreen scores;
    ``colours``: paint prompt 00000's best sample and its training image in these flat colours
    (RGB), so that they can be found in a screenshot; ``other``: prompt 00001's samples OTHER_AT
    are within DELTA of OTHER_KEY, a training image outside its duplicate group (not extracted,
    counted in ``samples_matched_other``).
    """
    rng = np.random.default_rng(0)
    run_dir = root / "run"
    generations, detect = run_dir / "generations", run_dir / "detect"
    original = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    for pid in CAPTIONS:
        (generations / pid).mkdir(parents=True)
        for i in range(SAMPLES):
            if pid == "00000" and i in MEMBERS:
                noise = rng.integers(-4, 5, original.shape)
                image = np.clip(original.astype(int) + noise, 0, 255).astype(np.uint8)
            else:
                image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            if colours and pid == "00000" and i == BEST:
                image = np.full((SIZE, SIZE, 3), colours[0], dtype=np.uint8)
            Image.fromarray(image).save(generations / pid / f"{i:05d}.png")
    if recipe:
        pd.DataFrame(
            {
                "prompt_id": list(CAPTIONS),
                "caption": list(CAPTIONS.values()),
                "n_samples": SAMPLES,
                "seeds": [[seed_of(pid, i) for i in range(SAMPLES)] for pid in CAPTIONS],
                "steps": 25,
                "guidance_scale": 3.0,
            }
        ).to_parquet(generations / "prompts.parquet")
    if prescreen:
        (run_dir / "prescreen").mkdir(parents=True)
        pd.DataFrame(
            {
                "prompt_id": ["00002", "00000", "00001", "99999"],
                "score": [0.5, 9.25, 1.5, 0.1],
                "robust_z": [-0.7, 6.5, 0.7, -1.0],
                "kept": [True, True, True, False],
            }
        ).to_parquet(run_dir / "prescreen" / "prescreen.parquet")

    rows = []
    for pid, clique, members in (("00000", 12, MEMBERS), ("00001", 9, list(range(1, 18, 2))), ("00002", 1, [0])):
        representative = REPRESENTATIVE if pid == "00000" else members[0]
        rows.append(
            {
                "prompt_id": pid,
                "caption": CAPTIONS[pid],
                "dup_count": DUP_COUNTS[pid],
                "keys": [f"part0/{DUP_COUNTS[pid]:05d}"],
                "n_samples": SAMPLES,
                "n_rejected": 0,
                "clique_size": clique,
                "flagged": clique >= RULE["min_clique"],
                "members": members,
                "member_files": [f"{pid}/{m:05d}.png" for m in members],
                "representative": representative,
                "representative_file": f"{pid}/{representative:05d}.png",
                "max_pair_distance": 0.05 if pid == "00000" else 0.12,
                "median_pair_distance": 0.41,
                "clique_exact": True,
            }
        )
    memorized = pd.DataFrame(rows)
    summary = {
        "generations_dir": str(generations.resolve()),
        "settings": RULE,
        "prompts": 3,
        "flagged": 1,
        "samples": 3 * SAMPLES,
        "rejected_samples": 0,
        "stopped_under_another_rule": [],
    }
    detect.mkdir(parents=True)
    if verified:
        distances = {m: 0.0612 + 0.001 * abs(m - BEST) for m in MEMBERS}
        pairs = pd.DataFrame(
            {
                "prompt_id": "00000",
                "sample": MEMBERS,
                "sample_file": [f"00000/{m:05d}.png" for m in MEMBERS],
                "train_key": TRAIN_KEY,
                "distance": [distances[m] for m in MEMBERS],
                "in_group": True,
            }
        )
        if other:
            pairs = pd.concat(
                [
                    pairs,
                    pd.DataFrame(
                        {
                            "prompt_id": "00001",
                            "sample": OTHER_AT,
                            "sample_file": [f"00001/{m:05d}.png" for m in OTHER_AT],
                            "train_key": OTHER_KEY,
                            "distance": [0.11, 0.12],
                            "in_group": False,
                        }
                    ),
                ],
                ignore_index=True,
            )
        pairs.to_parquet(detect / "extracted.parquet")
        matched = {"00000": len(MEMBERS), "00001": 0, "00002": 0}
        memorized["extracted"] = [matched[p] > 0 for p in memorized["prompt_id"]]
        memorized["samples_matched"] = [matched[p] for p in memorized["prompt_id"]]
        memorized["samples_matched_other"] = [0, len(OTHER_AT) if other else 0, 0]
        memorized["samples_verified"] = SAMPLES
        memorized["n_candidates"] = [23, 11, 0]
        memorized["reproduction_rate"] = memorized["samples_matched"] / SAMPLES
        bounds = [wilson_interval(k, SAMPLES) for k in memorized["samples_matched"]]
        memorized["reproduction_ci_low"], memorized["reproduction_ci_high"] = zip(*bounds)
        memorized["best_sample"] = pd.array([BEST, OTHER_AT[0] if other else 3, None], dtype="Int64")
        memorized["best_sample_file"] = [
            f"00000/{BEST:05d}.png",
            f"00001/{OTHER_AT[0]:05d}.png" if other else "00001/00003.png",
            "",
        ]
        memorized["best_train_key"] = [TRAIN_KEY, OTHER_KEY if other else "part1/00003", ""]
        memorized["best_distance"] = [distances[BEST], 0.11 if other else 0.31, np.nan]
        memorized["best_in_group"] = pd.array([True, not other, None], dtype="boolean")
        (detect / "matches").mkdir()
        match = np.full((SIZE, SIZE, 3), colours[1], dtype=np.uint8) if colours else original
        Image.fromarray(match).save(detect / "matches" / "00000.png")
        if other:
            Image.fromarray(original).save(detect / "matches" / "00001.png")
        summary["verification"] = {"delta": DELTA, "metric": {"name": "tiled_l2", "grid": 4, "size": None}}
    write_prompt_table(memorized, detect / "memorized.parquet")
    (detect / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run_dir


def audited_run(root: Path, verified: bool = True, **options) -> Path:
    """A run directory with one flagged prompt, extracted when ``verified`` (see build_audited_run)."""
    return build_audited_run(root, verified=verified, **options)


def image_sources(html: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)


def report(run_dir: Path, out: Path, **options) -> str:
    return write_report(load_run(run_dir / "detect"), out, **{"title": "t", **options}).read_text(encoding="utf-8")


def test_report_is_self_contained_and_escapes_captions(tmp_path):
    run_dir = audited_run(tmp_path)
    out = write_report(load_run(run_dir / "detect"), run_dir / "report" / "index.html", title="Audit <b>x</b>")
    html = out.read_text(encoding="utf-8")

    # The caption holds a <script> tag: it must come out as text.
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert "Audit &lt;b&gt;x&lt;/b&gt;" in html
    # Nothing is fetched: no links, stylesheets, scripts or remote images; every image inlined,
    # every link an in-page anchor.
    assert not re.search(r"https?://|<link|@import|url\(", html)
    assert all(href.startswith("#") for href in re.findall(r'\shref="([^"]*)"', html))
    sources = image_sources(html)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    for src in sources:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    # The card's sample and training image + the plot + 6 thumbnails of the clique.
    assert len(sources) == 2 + 1 + 6

    assert re.search(r"Prompts screened</td><td>3<", html)
    assert re.search(r"Prompts flagged</td><td>1<", html)
    assert "1 of 3 (1 of 1 flagged)" in html
    low, high = wilson_interval(12, 3 * SAMPLES)  # pooled over every sample of the run
    assert f"13% (95% CI {100 * low:.0f}–{100 * high:.0f}%), 12/90 (90 readable samples compared)" in html
    assert 'alt="flag and reproduction rate by duplicate count"' in html


def test_a_card_shows_the_evidence_of_an_extraction(tmp_path):
    run_dir = audited_run(tmp_path)
    html = report(run_dir, tmp_path / "r.html")
    card = re.search(r'<section class="card" id="card-0">(.*?)</section>', html, re.S).group(1)
    sample = base64.b64decode(re.search(r'class="thumb sample" src="data:image/png;base64,([^"]*)"', card).group(1))
    match = base64.b64decode(re.search(r'class="thumb match" src="data:image/png;base64,([^"]*)"', card).group(1))
    generations = run_dir / "generations"
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(sample))), np.asarray(Image.open(generations / f"00000/{BEST:05d}.png"))
    )
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(match))), np.asarray(Image.open(run_dir / "detect/matches/00000.png")))
    assert "<bdi>00000</bdi>" in card and "&lt;script&gt;" in card
    assert "<strong>0.0612</strong> &le; threshold 0.15 (tiled_l2)" in card
    assert f"seed {seed_of('00000', BEST)}" in card and f"<bdi>{TRAIN_KEY}</bdi>" in card
    assert "40% (95% CI 25–58%), 12/30" in card  # Wilson interval of 12 of 30
    assert "30 readable samples with 23 candidate training image(s)" in card
    assert "12 matching (sample, training image) pair(s)" in card
    command = f"{REGENERATE} {generations.resolve()} 00000 {BEST} --out regenerated_00000_{BEST:05d}.png"
    assert f"<code>{command}</code>" in card
    # The unflagged, unextracted prompts have no card.
    assert html.count('<section class="card"') == 1


def test_table_lists_every_prompt_with_its_rate_and_interval(tmp_path):
    run_dir = audited_run(tmp_path, prescreen=True)
    results = load_run(run_dir / "detect")
    table = prompt_table(results)
    assert table["prompt_id"].tolist() == ["00000", "00001", "00002"]
    assert table["score"].tolist() == [9.25, 1.5, 0.5] and "99999" not in set(table["prompt_id"])  # not screened
    assert table["extracted"].tolist() == [True, False, False]
    low, high = wilson_interval(0, SAMPLES)
    assert table.loc[1, ["reproduction_ci_low", "reproduction_ci_high"]].tolist() == [low, high]

    html = report(run_dir, tmp_path / "r.html")
    rows = re.findall(r"<tr class=\"[a-z]*\">(.*?)</tr>", html, re.S)
    assert len(rows) == 3
    cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", rows[0], re.S)]
    assert cells == [
        "00000",
        "<script>alert('x')</script> a memorized caption".replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#39;"),
        "40",
        "9.25",
        "6.50",
        "12/30",
        "yes",
        "yes",
        "40% (95% CI 25–58%), 12/30",
        "0.0612",
    ]
    assert 'href="#card-0"' in rows[0]
    cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", rows[2], re.S)]
    assert cells[-3:] == ["no", f"0% (95% CI 0–{100 * high:.0f}%), 0/30", "—"]
    assert "prescreen score</th>" in html and "robust z</th>" in html
    # Without the prescreen, no such columns.
    assert "prescreen score" not in report(audited_run(tmp_path / "plain"), tmp_path / "p.html")


def test_rates_by_duplicate_count_pool_samples_with_wilson_intervals(tmp_path):
    run_dir = audited_run(tmp_path)
    rates = rates_by_duplicates(load_run(run_dir / "detect"))
    assert rates["bin"].tolist() == ["1", "10", "40"]
    assert rates["prompts"].tolist() == [1, 1, 1]
    assert rates["flag_rate"].tolist() == [0, 0, 1] and rates["extraction_rate"].tolist() == [0, 0, 1]
    assert rates["reproduction_rate"].tolist() == [0, 0, 12 / 30]
    assert rates.loc[2, ["reproduction_rate_ci_low", "reproduction_rate_ci_high"]].tolist() == list(wilson_interval(12, 30))
    assert rates.loc[2, ["flag_rate_ci_low", "flag_rate_ci_high"]].tolist() == list(wilson_interval(1, 1))

    # Many distinct counts are grouped by powers of two, and samples pooled within a bin.
    counts = np.arange(1, 40)
    n_samples = np.where(counts % 2 == 0, 10, 30)
    matched = np.where(counts >= 32, counts - 30, 0)
    memorized = pd.DataFrame(
        {
            "prompt_id": [f"{i:05d}" for i in counts],
            "dup_count": pd.array(counts, dtype="Int64"),
            "flagged": counts >= 16,
            "extracted": matched > 0,
            "n_samples": n_samples,
            "samples_matched": matched,
        }
    )
    grouped = rates_by_duplicates(RunResults(memorized, None, {}, tmp_path, tmp_path))
    assert grouped["bin"].tolist() == ["1", "2-3", "4-7", "8-15", "16-31", "32-63"]
    assert grouped["prompts"].tolist() == [1, 2, 4, 8, 16, 8]
    assert grouped["flag_rate"].tolist() == [0, 0, 0, 0, 1, 1]
    assert grouped["extraction_rate"].tolist() == [0, 0, 0, 0, 0, 1]
    last = grouped.iloc[-1]  # counts 32..39: matched 2..9 = 44 of 4 x 10 + 4 x 30 samples
    assert (last["samples_matched"], last["samples"]) == (44, 160) and last["reproduction_rate"] == 44 / 160
    assert (last["reproduction_rate_ci_low"], last["reproduction_rate_ci_high"]) == wilson_interval(44, 160)

    # Prompts of unknown duplication are left out; none known, no rates.
    unknown = memorized.assign(dup_count=pd.array([None] * len(memorized), dtype="Int64"))
    assert rates_by_duplicates(RunResults(unknown, None, {}, tmp_path, tmp_path)) is None


def test_report_without_verification_or_duplicate_counts(tmp_path, caplog):
    run_dir = audited_run(tmp_path, verified=False)
    # Verification of an earlier detection left behind: not this detection's, so not shown.
    pd.DataFrame(
        {
            "prompt_id": ["00000"],
            "sample": [4],
            "sample_file": ["00000/00004.png"],
            "train_key": ["k"],
            "distance": [0.01],
            "extracted": [True],
        }
    ).to_parquet(run_dir / "detect" / "extracted.parquet")
    results = load_run(run_dir / "detect")
    assert not results.verified and results.extracted is None and "ignoring it" in caplog.text
    assert extracted_prompts(results).empty and "extracted" not in prompt_table(results).columns
    assert flagged_prompts(results)["prompt_id"].tolist() == ["00000"]
    html = report(run_dir, tmp_path / "r.html")
    assert "Verification did not run" in html and "verification did not run (no training set given)" in html
    assert 'class="card"' not in html and "reproduction rate" not in html
    assert "flagged, not verified" in html
    assert len(image_sources(html)) == 1 + 6  # the plot (flag rate only) and the clique

    memorized_path = run_dir / "detect" / "memorized.parquet"
    pd.read_parquet(memorized_path).assign(dup_count=None).to_parquet(memorized_path)  # prompts of unknown duplication
    html = report(run_dir, tmp_path / "r.html")
    assert "so no plot" in html and len(image_sources(html)) == 6
    with pytest.raises(FileNotFoundError, match="pipeline.detect"):
        load_run(tmp_path / "nowhere")


def test_report_when_nothing_is_flagged_or_extracted(tmp_path):
    run_dir = audited_run(tmp_path)
    detect = run_dir / "detect"
    memorized = pd.read_parquet(detect / "memorized.parquet")
    memorized = memorized.assign(flagged=False, extracted=False, samples_matched=0, reproduction_rate=0.0)
    memorized.to_parquet(detect / "memorized.parquet")
    pd.read_parquet(detect / "extracted.parquet").iloc[0:0].to_parquet(detect / "extracted.parquet")
    html = report(run_dir, tmp_path / "r.html")
    assert "No prompt was flagged." in html and "No prompt was extracted" in html
    assert "0 of 3 (0 of 0 flagged)" in html
    assert len(image_sources(html)) == 1  # the plot only


def test_stale_extracted_rows_are_dropped(tmp_path, caplog):
    run_dir = audited_run(tmp_path)
    path = run_dir / "detect" / "extracted.parquet"
    pairs = pd.read_parquet(path)
    # Rows of a prompt no longer screened, and of one this verification did not find extracted.
    stale = pd.DataFrame(
        {
            "prompt_id": ["gone", "00001"],
            "sample": [0, 3],
            "sample_file": ["gone/00000.png", "00001/00003.png"],
            "train_key": ["k", "part1/00003"],
            "distance": [0.01, 0.02],
        }
    )
    pd.concat([pairs, stale], ignore_index=True).to_parquet(path)
    results = load_run(run_dir / "detect")
    assert results.extracted["prompt_id"].unique().tolist() == ["00000"] and len(results.extracted) == len(MEMBERS)
    assert results.extracted["distance"].is_monotonic_increasing
    assert "ignoring 2 row(s): 1 of prompts not in memorized.parquet, 1 of prompts it does not mark extracted" in caplog.text
    assert "12 matching (sample, training image) pair(s)" in report(run_dir, tmp_path / "r.html")

    # Without extracted.parquet the cards still show the best match, with a warning.
    path.unlink()
    html = report(run_dir, tmp_path / "r.html")
    assert "<strong>0.0612</strong>" in html and "matching (sample" not in html and "is missing" in caplog.text


def test_a_half_written_verification_schema_is_an_error(tmp_path):
    run_dir = audited_run(tmp_path)
    path = run_dir / "detect" / "memorized.parquet"
    pd.read_parquet(path).drop(columns=["best_sample_file", "reproduction_ci_low"]).to_parquet(path)
    with pytest.raises(ValueError, match=r"best_sample_file.*reproduction_ci_low|reproduction_ci_low.*best_sample_file"):
        load_run(run_dir / "detect")


def test_the_regenerate_command_reads_back_exactly_in_bash(tmp_path):
    """Prompt ids and folders are untrusted: each argument is one bash word that reads back as
    it was, and the command shows no raw control or bidi character."""
    generations = tmp_path / "gen dir 'x' $HOME"
    hostile = "it's \u202e$(touch pwned) `id` \u0085;|&*"
    results = RunResults(
        pd.DataFrame({"prompt_id": [hostile]}), None, {}, tmp_path, generations, seeds={hostile: [5, 6, 7], "-x": [1]}
    )

    def words(command: str) -> list[str]:
        """The arguments bash passes for ``command``, printed instead of run."""
        assert display_text(command, None) == command and command.startswith(REGENERATE + " ")
        env = {**os.environ, "LC_ALL": "C.UTF-8"}
        script = f"printf '%s\\0' {command[len(REGENERATE) + 1 :]}"
        out = subprocess.run(["bash", "-c", script], capture_output=True, cwd=tmp_path, env=env, check=True).stdout
        return out.decode("utf-8").split("\0")[:-1]

    assert words(results.regenerate_command(hostile, 2)) == [
        str(generations),
        hostile,
        "2",
        "--out",
        f"regenerated_{hostile}_00002.png",
    ]
    assert not (tmp_path / "pwned").exists()
    # An id argparse would take for an option comes after "--".
    assert words(results.regenerate_command("-x", 0)) == ["--out", "regenerated_-x_00000.png", "--", str(generations), "-x", "0"]
    assert shell_word("plain-name") == "plain-name" and shell_word("a b") == "'a b'"
    assert results.regenerate_command(hostile, 3) is None and results.regenerate_command("other", 0) is None


def test_samples_without_a_recipe_have_no_command(tmp_path):
    run_dir = audited_run(tmp_path, recipe=False)
    results = load_run(run_dir / "detect")
    assert results.seeds == {}
    cards = extracted_prompts(results)
    assert cards["seed"].isna().all() and cards["command"].isna().all()
    html = report(run_dir, tmp_path / "r.html")
    assert "seed not recorded" in html and "no command regenerates it" in html and REGENERATE not in html


def test_seeds_are_read_from_the_generators_shard_tables_without_writing_into_its_folder(tmp_path):
    """The generator's table may still be split in shard tables (an array still running, or a
    folder on a read-only mount): the report consolidates them in memory for the seeds and
    writes nothing into the generations folder."""
    run_dir = audited_run(tmp_path)
    generations = run_dir / "generations"
    (generations / "prompts.parquet").rename(generations / "prompts_0-of-1.parquet")
    pd.read_parquet(generations / "prompts_0-of-1.parquet").assign(prompt_index=0, n_samples=SAMPLES).to_parquet(
        generations / "prompts_0-of-1.parquet"
    )
    before = {p: p.read_bytes() for p in generations.rglob("*") if p.is_file()}
    results = load_run(run_dir / "detect")
    assert results.seed("00000", BEST) == seed_of("00000", BEST)
    assert {p: p.read_bytes() for p in generations.rglob("*") if p.is_file()} == before


def test_command_line_report(tmp_path):
    run_dir = audited_run(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.report", f"run_dir={run_dir}", "thumbnails=2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    html = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert len(image_sources(html)) == 2 + 1 + 2


def test_report_shows_the_sampling_cost_when_the_generator_wrote_a_budget(tmp_path, caplog):
    from pipeline.budget import BUDGET_FILE, write_generation_budget

    run_dir = audited_run(tmp_path, verified=False)
    generations = run_dir / "generations"
    assert "Sampling cost" not in report(run_dir, tmp_path / "r.html")  # no budget.json
    prompts = pd.DataFrame(
        {
            "prompt_id": ["a", "b", "c", "d"],
            "n_samples": 32,
            "steps": 25,
            "guidance_scale": 3.0,
            "n_generated": [32, 8, 8, 16],
            "stopped_early": [False, True, True, False],
            "stop_reason": [None, "no_close_pairs", "no_close_pairs", "flagged"],
        }
    )
    budget = write_generation_budget(generations, prompts)
    html = report(run_dir, tmp_path / "r.html")
    assert "Sampling cost</td><td>3,200 UNet evaluations, 50.0% of brute force" in html  # (32+8+8+16) x 25 x 2 of 4 x 32 x 25 x 2
    assert "2 prompt(s) stopped early with no near-copy pair; 1 stopped once flagged" in html
    assert f"{budget['unet_evaluations']:,} UNet evaluations" in html
    # Prompts stopped once extracted: their verdicts were taken on fewer samples, and the page says so.
    stopped = prompts.assign(
        n_generated=[32, 8, 8, 8],
        stopped_early=[False, True, True, False],
        stop_reason=[None, "no_close_pairs", "extracted", "extracted"],
    )
    budget = write_generation_budget(generations, stopped)
    html = report(run_dir, tmp_path / "r.html")
    assert "2 stopped once extracted" in html
    assert (
        f"the verdicts of {len(budget['fewer_samples'])} prompt(s) were taken on fewer samples" in html
        and budget["fewer_samples"]
    )
    (generations / BUDGET_FILE).write_text("{not json")
    assert "Sampling cost" not in report(run_dir, tmp_path / "r.html") and "unreadable" in caplog.text


def test_reproductions_of_another_captions_image_get_their_own_cards(tmp_path):
    """Prompt 00001 is not extracted, but two of its samples reproduce another caption's
    training image: the report shows that evidence apart from the extracted prompts, never drops it."""
    run_dir = audited_run(tmp_path, other=True)
    results = load_run(run_dir / "detect")
    assert extracted_prompts(results)["prompt_id"].tolist() == ["00000"]
    assert extracted_prompts(results, other=True)["prompt_id"].tolist() == ["00001"]
    assert set(results.extracted["prompt_id"]) == {"00000", "00001"}  # both prompts' pairs are kept
    html = report(run_dir, tmp_path / "r.html")
    head, other_section = html.split("<h2>Other captions' training images reproduced</h2>")
    assert 'id="card-0"' in head and 'id="other-0"' in other_section
    card = other_section.split('id="other-0"')[1].split("</section>")[0]
    assert "reproduces another caption's training image" in card and OTHER_KEY in card
    assert "not among this caption's duplicates" in card and "0.11" in card
    assert "<td>another caption's</td>" in card  # the pairs table marks whose image each is
    assert 'href="#other-0"' in head  # the summary line links to it
    # Without such samples there is no such section.
    assert "Other captions" not in report(audited_run(tmp_path / "plain"), tmp_path / "p.html")


def test_the_report_unit_is_complete_once_written_and_redone_when_the_page_changes(tmp_path):
    """The executor finds the page's unit complete right after the step wrote it (its stats
    list nothing unfinished, and the finish merges them); a rerun skips it until the page changes."""
    run_dir = audited_run(tmp_path)
    page = run_dir / "report" / "index.html"
    cfg = OmegaConf.create(
        {
            "detect_dir": str(run_dir / "detect"),
            "out": str(page),
            "title": "t",
            "thumbnails": 2,
            "thumb_size": 32,
            "max_prompts": 10,
            "rank": 0,
            "world_size": 1,
        }
    )
    first = run(cfg)
    assert first.written and (first.out, first.prompts, first.flagged, first.extracted) == (page, 3, 1, 1)
    stats = json.loads((run_dir / "report" / "stats" / "report_0.json").read_text(encoding="utf-8"))
    assert (stats["done"], stats["unfinished"]) == (1, [])
    merged = json.loads((run_dir / "report" / "stats.json").read_text(encoding="utf-8"))["report"]
    assert merged["counts"] == {"prompts": 3, "flagged": 1, "extracted": 1}
    again = run(cfg)
    assert not again.written and (again.prompts, again.flagged) == (3, 1)
    page.write_text("edited", encoding="utf-8")
    assert run(cfg).written and page.read_text(encoding="utf-8") != "edited"
