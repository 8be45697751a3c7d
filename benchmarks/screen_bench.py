"""Benchmark: cheap screening (prescreen + adaptive sampling) against brute-force sampling.

    .venv/bin/python benchmarks/screen_bench.py --tiny                  # a tiny random model, seconds
    .venv/bin/python benchmarks/screen_bench.py --model models/demo --data data/demo \\
        --prompts 120 --n-samples 24 --steps 25 --seeds 0,1,2
    .venv/bin/python benchmarks/screen_bench.py --prompts 1000 --brute-singletons 60 --max-fraction 0.02   # a realistic mix

Two audits of the same prompts on the same model, in one process:

(a) brute force (Carlini et al.): every prompt gets ``--n-samples`` samples, then the detector;
(b) the Wen et al. first-step prescreen scores every prompt (``seeds`` UNet evaluations each,
    plus ``seeds`` unconditional ones shared by all); the outliers (robust z-score >=
    ``--keep-z``, ``--singleton-keep-z`` for singleton prompts, each z against the singleton
    prompts' median and MAD: :mod:`pipeline.prescreen.keep`; and/or the top
    ``--keep-fraction``) are sampled with adaptive sampling (rounds
    of ``--first-round``, x``--growth``, ...; a prompt stops after a round whose samples have no
    near-copy pair, or, unless ``--no-stop-when-flagged``, whose samples already hold a clique
    of ``--min-clique``, or, unless ``--no-stop-when-out-of-reach``, whose remaining budget can
    no longer complete one, or, unless ``--no-stop-when-extracted``, one of whose new samples
    is within the threshold of one of the prompt's training images, or, unless
    ``--no-stop-when-unlikely``, whose clique's growth bound falls short (a heuristic, see
    :mod:`pipeline.generate.adaptive`); rounds end early where those stops could first apply),
    then the detector. The defaults score with ``own_images`` (each caption also against its own
    training images) and sample the kept prompts in tiers (:func:`sampling_tiers`): groups of
    fewer than ``--min-copies`` copies from ``--few-first-round`` (one sample); caption-only z >=
    ``--strong-z`` from one sample, held until extracted; the other groups of ``--min-copies`` or
    more from ``--weak-first-round``; prompts of unknown group size from ``--first-round``.

Both runs are verified against the demo set's images (each prompt's candidates: the images of
its original's copies, from the ground truth), so a prompt is *found* when flagged or
extracted, and recall is that of (a)'s found prompts.

Prompts are the originals' captions of the demo set's ground truth (every duplicated original,
then singletons up to ``--prompts``; a round-robin over the bands when ``--prompts`` is
smaller), or the top of a duplicate finder's ``--selected`` ranking. Printed side by side:
UNet evaluations, wall time, samples, prompts flagged, recall of (b) against (a)'s flagged
prompts, the evaluation fraction (b)/(a), and the prescreen's ROC AUC for telling heavy
prompts (``dup_count >= --heavy-dup-count``) from the singletons (and from every other
prompt). Since a sample is fixed by its seed, (b)'s samples are (a)'s first ones, and what
adaptive sampling alone would have missed is replayed exactly on (a)'s samples. The
targets: ROC AUC >= 0.95, and (b) flags >= 95% of what (a) flags for <= 10% of its UNet
evaluations (on every seed), and at a realistic mix (1000 prompts, 1 duplicated
original in 31) <= 2%.

``--seeds 0,1,2`` runs the whole comparison once per seed (prompt choice, sampling seeds and
prescreen noise all follow it) and prints each seed's figures and the worst. ``--brute-singletons
K`` samples brute force on every duplicated prompt and on a random K of the singletons only:
its cost is extrapolated exactly (prompts x samples x steps x 2 under guidance, every prompt
has the same recipe), and what those K singletons show (normally nothing found) is printed and
counted. The demo set has 900 singletons, so ``--prompts 1000`` gives 932 prompts (every
original there is; the benchmark says so) at 1 duplicated original in 29. The last line,
``RESULT {...}``, is the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.budget import brute_force_evaluations, generation_budget, missed_by_shortcuts
from pipeline.detect import run_detect
from pipeline.detect.verify import run_verify
from pipeline.generate import generate, read_samples
from pipeline.generate.adaptive import NO_SIGN, AdaptiveSettings, adaptive_outcome
from pipeline.generate.recipe import SETTINGS_FILE
from pipeline.generate.sampling import SamplingSettings
from pipeline.generations import load_prompts, sample_path
from pipeline.io import write_json
from pipeline.models import Runtime, load_model, resolve_device
from pipeline.prescreen import PrescreenSettings, heavy_prompt_aucs, prescreen, roc_auc, unet_evaluations
from pipeline.prescreen.own_images import keys_to_fetch
from pipeline.prescreen.scores import SCORES, TEXT_SCORES
from pipeline.prescreen.scoring import table_evaluations
from pipeline.prompts import Prompt, read_prompts
from pipeline.rule import NearCopyRule
from pipeline.training_images import GroupMatcher, fetch_training_images

TINY_BANDS = {"heavy": (2, 8), "mid": (2, 3), "single": (6, 1)}
TINY_DEFAULTS = dict(
    prompts=8,
    n_samples=6,
    steps=2,
    batch_size=16,
    min_clique=3,
    keep_fraction=0.5,
    keep_z=None,
    singleton_keep_z=None,
    prescreen_seeds=2,
    first_round=2,
    growth=2.0,
    heavy_dup_count=TINY_BANDS["heavy"][1],
    min_copies=TINY_BANDS["heavy"][1],
)


def demo_prompts(ground_truth: pd.DataFrame, n: int, seed: int = 0) -> list[Prompt]:
    """``n`` originals' captions from a demo ground truth, one prompt per original.

    Every duplicated original (most copies first) and then randomly chosen singletons; when
    ``n`` is below the number of duplicated originals, a round-robin over the bands (most
    duplicated band first, singletons included) so that each band is represented. Each prompt
    carries its original's copies as ``keys`` (the training images verification compares with).
    """
    originals = ground_truth.drop_duplicates("original_id").sort_values(["dup_count", "original_id"], ascending=[False, True])
    multi = originals[originals.dup_count > 1]
    singles = originals[originals.dup_count == 1].sample(frac=1.0, random_state=seed)
    if n >= len(multi):
        chosen = pd.concat([multi, singles.head(n - len(multi))])
    else:
        bands = [
            group for _, group in sorted(pd.concat([multi, singles]).groupby("band"), key=lambda kv: -kv[1].dup_count.iloc[0])
        ]
        picks, depth = [], 0
        while len(picks) < n:
            picks += [band.iloc[depth] for band in bands if depth < len(band)][: n - len(picks)]
            depth += 1
        chosen = pd.DataFrame(picks)
    copies = (
        ground_truth.groupby("original_id")["key"].agg(lambda keys: tuple(sorted(str(k) for k in keys)))
        if "key" in ground_truth
        else {}
    )
    return [
        Prompt(str(r.original_id), str(r.original_caption), int(r.dup_count), copies.get(r.original_id))
        for r in chosen.itertuples()
    ]


def brute_force_prompts(prompts: list[Prompt], singletons: int | None, seed: int) -> list[Prompt]:
    """The prompts brute force samples: all, or (``singletons`` given) every duplicated prompt
    and a random ``singletons`` of the others (``dup_count`` <= 1 or unknown), in list order."""
    if singletons is None:
        return list(prompts)
    single = [i for i, p in enumerate(prompts) if (p.dup_count or 0) <= 1]
    rng = np.random.default_rng(seed)
    picked = set(rng.choice(single, size=min(int(singletons), len(single)), replace=False).tolist()) if single else set()
    return [p for i, p in enumerate(prompts) if (p.dup_count or 0) > 1 or i in picked]


def build_tiny(out: Path) -> tuple[Path, Path]:
    """A tiny random demo-architecture model and a tiny demo set (16 x 16) under ``out``."""
    from pipeline.demo.dataset import build_demo_dataset
    from pipeline.demo.model import DemoModelConfig, build_pipeline

    model_dir, data_dir = out / "tiny_model", out / "tiny_data"
    config = DemoModelConfig(
        unet_channels=(16, 32), cross_attention_levels=(False, True), norm_num_groups=8, resolution=16, text_width=32
    )
    build_pipeline(config).save_pretrained(model_dir)
    build_demo_dataset(data_dir, image_size=16, bands=TINY_BANDS)
    return model_dir, data_dir


def audit(
    pipe,
    prompts: list[Prompt],
    out: Path,
    args,
    runtime: Runtime,
    adaptive: AdaptiveSettings | None,
    data: dict | None,
    seed: int,
) -> dict:
    """Generate ``prompts`` into ``out/generations``, detect and (with ``data``, a training set)
    verify against each prompt's ``keys``; returns the run's figures."""
    settings = SamplingSettings(steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size)
    rule = near_copy_rule(args)
    matcher = (
        GroupMatcher(data, rule.metric, delta(args))
        if data is not None and adaptive is not None and adaptive.stop_when_extracted
        else None
    )
    cache = Path(args.brute_cache) / f"seed_{seed}" if adaptive is None and args.brute_cache else None
    if cache is not None:
        reuse_samples(cache, out / "generations", prompts, args.n_samples)
    started = time.perf_counter()
    summary = generate(
        pipe,
        prompts,
        out / "generations",
        model=str(args.model),
        settings=settings,
        runtime=runtime,
        n_samples=args.n_samples,
        base_seed=seed,
        batch_size=args.batch_size,
        progress=args.progress,
        adaptive=adaptive,
        matcher=matcher,
    )
    generated = time.perf_counter()
    generate_s, reused = generated - started, 0
    if cache is not None:
        # Every sample has the same recipe: the time of the reused ones is the timed ones' per sample.
        per_sample, reused = store_samples(cache, out / "generations", summary.images, generate_s)
        generate_s = per_sample * len(prompts) * args.n_samples
    memorized = run_detect(out / "generations", out / "detect", rule, progress=args.progress)
    extracted: set[str] = set()
    if data is not None:
        # Candidates: each prompt's group only (its keys).
        memorized, _ = run_verify(
            memorized,
            out / "generations",
            out / "detect",
            data=data,
            delta=delta(args),
            exhaustive=False,
            metric=rule.metric,
            progress=args.progress,
        )
        extracted = set(memorized.loc[memorized.extracted.fillna(False).astype(bool), "prompt_id"])
    done = time.perf_counter()
    flagged = set(memorized.loc[memorized.flagged, "prompt_id"])
    return {
        "table": load_prompts(out / "generations"),
        "memorized": memorized,
        "flagged": flagged,
        "extracted": extracted,
        "found": flagged | extracted,
        "images": summary.images,
        "reused": reused,
        "generate_s": generate_s,
        "detect_s": done - generated,
    }


def screened_audit(
    pipe,
    prompts: list[Prompt],
    tiers: Mapping[str, str],
    rules: Mapping[str, AdaptiveSettings],
    out: Path,
    args,
    runtime,
    data,
    seed: int,
) -> dict:
    """(b)'s sampling: each tier's kept prompts (``tiers``: prompt id to tier, the kept prompts
    only) through :func:`audit` with its tier's adaptive rule, into ``out/<tier>``; returns
    :func:`audit`'s figures over every tier (tables concatenated, sets and times added up). A
    sample is fixed by its seed, the prompt and its index, so every tier's samples are still
    brute force's first ones."""
    parts = []
    for tier, rule in rules.items():
        chosen = [p for p in prompts if tiers.get(p.prompt_id) == tier]
        if chosen:
            parts.append(audit(pipe, chosen, out / tier, args, runtime, adaptive=rule, data=data, seed=seed))
    if not parts:
        parts.append(audit(pipe, [], out / STANDARD, args, runtime, adaptive=rules[STANDARD], data=data, seed=seed))
    merged = {
        "table": pd.concat([part["table"] for part in parts], ignore_index=True),
        "memorized": pd.concat([part["memorized"] for part in parts], ignore_index=True),
    }
    for key in ("flagged", "extracted", "found"):
        merged[key] = set().union(*(part[key] for part in parts))
    for key in ("images", "reused", "generate_s", "detect_s"):
        merged[key] = sum(part[key] for part in parts)
    return merged


def reuse_samples(cache: Path, generations: Path, prompts: list[Prompt], n_samples: int) -> None:
    """Hard-link the brute-force samples ``cache`` holds for ``prompts`` into a new ``generations``
    folder, with the settings they were made with: :func:`generate` then makes only the missing
    ones, and refuses (one line naming the folder) if this run's settings differ. A sample is
    fixed by the model, the recipe, the base seed, the prompt id and its index, so a prompt's
    samples are the same in every prompt mix of a seed."""
    if not (cache / SETTINGS_FILE).is_file():
        return
    generations.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cache / SETTINGS_FILE, generations / SETTINGS_FILE)
    for p in prompts:
        for i in range(n_samples):
            source = sample_path(cache, p.prompt_id, i)
            if source.is_file():
                link_once(source, sample_path(generations, p.prompt_id, i))


def link_once(source: Path, target: Path) -> None:
    """Hard-link ``source`` at ``target`` (its folder made) unless ``target`` exists."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)


def store_samples(cache: Path, generations: Path, made: int, seconds: float) -> tuple[float, int]:
    """Add a brute-force run's samples and settings to ``cache`` and its timing to the cache's
    ``timing.json``; returns (seconds per sample over every timed sample, samples this run reused)."""
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / SETTINGS_FILE).is_file():
        shutil.copyfile(generations / SETTINGS_FILE, cache / SETTINGS_FILE)
    total = 0
    for png in generations.glob("*/*.png"):
        total += 1
        link_once(png, cache / png.parent.name / png.name)
    timing_path = cache / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"samples": 0, "seconds": 0.0}
    timing = {"samples": timing["samples"] + int(made), "seconds": timing["seconds"] + float(seconds)}
    write_json(timing, timing_path)
    per_sample = timing["seconds"] / timing["samples"] if timing["samples"] else float("nan")
    return per_sample, total - int(made)


# Sampling tiers of the screened run: which adaptive rule samples a kept prompt (see sampling_tiers).
STANDARD, STRONG, WEAK, FEW = "standard", "strong", "weak", "few_copies"
# A caption-only robust z (against the singleton prompts) from which a kept prompt of a large
# group is sampled as STRONG; the first rounds of STRONG, WEAK and FEW.
STRONG_Z = 5.0
STRONG_FIRST_ROUND = 1
WEAK_FIRST_ROUND = 8
FEW_FIRST_ROUND = 1
# The training copies (``dup_count``, the duplicate group's size) from which a kept prompt is
# sampled as STRONG or WEAK; a smaller group is FEW.
MIN_COPIES = 10
# adaptive.near_training at this distance holds every prompt with a sample: tiled L2 between
# images in [0, 1] is at most 1.
HOLD_ALWAYS = 1.0


def sampling_tiers(scores: pd.DataFrame, args) -> dict[str, str]:
    """The sampling tier of each kept prompt of a ranked prescreen table: ``{prompt_id: tier}``.

    FEW: a duplicate group (``dup_count``) known and smaller than ``--min-copies``; STRONG: its
    caption-only robust z (``z_text`` under ``--score own_images``, else ``robust_z``) is at
    least ``--strong-z`` (None: no prompt is); WEAK: the other prompts of ``--min-copies`` or
    more copies; STANDARD: the rest (group size unknown). Every kept prompt has exactly one tier.
    """
    kept = scores[scores.kept]
    text = kept["z_text" if "z_text" in kept.columns else "robust_z"].to_numpy(dtype=float)
    copies = (
        kept["dup_count"].to_numpy(dtype=float, na_value=np.nan) if "dup_count" in kept.columns else np.full(len(kept), np.nan)
    )
    tiers = {}
    for prompt_id, z, n in zip(kept.prompt_id, text, copies):
        if not np.isnan(n) and n < args.min_copies:
            tiers[str(prompt_id)] = FEW
        elif args.strong_z is not None and z >= args.strong_z:
            tiers[str(prompt_id)] = STRONG
        elif not np.isnan(n):
            tiers[str(prompt_id)] = WEAK
        else:
            tiers[str(prompt_id)] = STANDARD
    return tiers


def tier_rules(args, data: dict | None) -> dict[str, AdaptiveSettings]:
    """The adaptive rule of each sampling tier (:func:`sampling_tiers`): STANDARD's is
    :func:`adaptive_rule`'s; STRONG's starts with ``--strong-first-round`` samples and, with the
    stop once extracted, is held past the stops on the flag (no near-copy pair, out of reach,
    unlikely) until extracted, flagged or out of budget (``near_training`` at
    :data:`HOLD_ALWAYS`: a prompt that far above the bulk is memorized, and its first samples
    showing nothing does not say otherwise); WEAK's starts with ``--weak-first-round`` and has
    no stop on an unlikely clique (a weakly memorized prompt is found by a late extraction, which
    the clique's growth bound does not foresee); FEW's starts with ``--few-first-round``, held
    as STANDARD's (a sample within ``--near-training``). Without the stop once extracted nothing
    holds a prompt on one sample, so a first round is at least 2."""
    standard = adaptive_rule(args, data)
    if standard.stop_when_extracted:
        strong = replace(standard, first_round=args.strong_first_round, near_training=HOLD_ALWAYS)
        few = replace(standard, first_round=args.few_first_round)
    else:  # nothing holds a prompt on one sample: its first round needs a pair
        strong = replace(standard, first_round=max(2, args.strong_first_round))
        few = replace(standard, first_round=max(2, args.few_first_round))
    if few.first_round < 2 and few.near_training is None:
        few = replace(few, first_round=2)
    weak = replace(standard, first_round=args.weak_first_round, stop_when_unlikely=False)
    return {STANDARD: standard, STRONG: strong, WEAK: weak, FEW: few}


def adaptive_rule(args, data: dict | None) -> AdaptiveSettings:
    """The screened run's adaptive sampling; the stops comparing samples with training images only
    where the demo set gives them."""
    extracting = args.stop_when_extracted and data is not None
    return AdaptiveSettings(
        enabled=True,
        first_round=args.first_round,
        growth=args.growth,
        min_close_pairs=args.min_close_pairs,
        stop_when_flagged=args.stop_when_flagged,
        stop_when_out_of_reach=args.stop_when_out_of_reach,
        stop_when_extracted=extracting,
        stop_when_unlikely=args.stop_when_unlikely,
        near_training=args.near_training if extracting else None,
        rule=near_copy_rule(args),
    )


def screened_figures(pipe, prompts, scores, ps, out: Path, args, runtime, data, seed: int, prescreen_s: float) -> dict:
    """``--screened-only``: run (b) alone (no brute force): print and return its evaluations and
    their share of brute force's (exact: prompts x samples x steps x 2), the prompts it found
    (each also found by brute force, whose samples (b)'s are the first of), and the time. Recall
    is not measured."""
    n = len(prompts)
    kept = set(scores.loc[scores.kept, "prompt_id"])
    tiers = sampling_tiers(scores, args)
    screened = screened_audit(pipe, prompts, tiers, tier_rules(args, data), out / "screened", args, runtime, data, seed)
    budget = generation_budget(screened["table"], {"prompts": n, "unet_evaluations": table_evaluations(scores, ps)})
    brute_evaluations = brute_force_evaluations(n, args.n_samples, args.steps, args.guidance)
    fraction = budget["unet_evaluations"] / brute_evaluations
    seconds = prescreen_s + screened["generate_s"] + screened["detect_s"]
    print(
        f"screened seed {seed}: {n} prompts, {len(kept)} kept, {budget['samples']} samples; {budget['unet_evaluations']:,} UNet "
        f"evaluations (prescreen {budget['prescreen_evaluations']:,}) of brute force's {brute_evaluations:,} = {fmt(fraction, 4)}; "
        f"found {len(screened['found'])}: {', '.join(sorted(screened['found']))}; {seconds:.0f} s (recall not measured)"
    )
    return {
        "seed": seed,
        "prompts": n,
        "kept": sorted(kept),
        "samples": budget["samples"],
        "unet_evaluations": budget["unet_evaluations"],
        "prescreen_evaluations": budget["prescreen_evaluations"],
        "brute_force_evaluations": brute_evaluations,
        "evaluation_fraction": fraction,
        "found": sorted(screened["found"]),
        "tiers": tiers,
        "n_generated": dict(zip(screened["table"].prompt_id, screened["table"].n_generated.astype(int))),
        "stop_reason": dict(zip(screened["table"].prompt_id, screened["table"].stop_reason)),
        "seconds": seconds,
    }


def near_copy_rule(args) -> NearCopyRule:
    """The one near-copy rule of both runs: the detector's, and adaptive sampling's (tiled L2)."""
    return NearCopyRule(threshold=args.threshold, min_clique=args.min_clique)


def delta(args) -> float:
    """The verification threshold: ``--delta``, else the near-copy rule's (as the detector's default)."""
    return args.threshold if args.delta is None else args.delta


def adaptive_alone(
    generations: Path,
    table: pd.DataFrame,
    rule: AdaptiveSettings,
    matcher: GroupMatcher | None = None,
    rules: Mapping[str, AdaptiveSettings] | None = None,
) -> pd.DataFrame:
    """What adaptive sampling would have done to every prompt, replayed on brute-force samples
    (``matcher``: the training images, for ``stop_when_extracted``, compared with each prompt's ``keys``),
    under ``rule``, or ``rules[prompt_id]`` where given (a kept prompt's sampling tier)."""
    rows = []
    keys = dict(zip(table.prompt_id, table["keys"])) if "keys" in table.columns else {}
    for prompt_id, n in zip(table.prompt_id, table.n_samples):
        rule_of = (rules or {}).get(prompt_id, rule)
        group = [str(k) for k in keys.get(prompt_id)] if keys.get(prompt_id) is not None else []
        matches = near = None
        if matcher is not None and group:

            def matches(start, end, pid=prompt_id, group=group):
                return matcher.any_match(read_samples(generations, pid, end, start=start), group)

            def near(end, pid=prompt_id, group=group, within=rule_of.near_training):
                return matcher.any_match(read_samples(generations, pid, end), group, within=within)

        made, reason = adaptive_outcome(
            lambda k, pid=prompt_id: read_samples(generations, pid, k), int(n), rule_of, matches, near
        )
        rows.append({"prompt_id": prompt_id, "n_generated": made, "stopped_early": reason == NO_SIGN, "stop_reason": reason})
    return pd.DataFrame(rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/demo", help="a saved diffusers pipeline (the demo model)")
    parser.add_argument("--data", default="data/demo", help="the demo set: its ground_truth.parquet gives prompts and dup counts")
    parser.add_argument("--selected", default=None, help="a duplicate finder's selected.parquet to take prompts from instead")
    parser.add_argument(
        "--prompts", type=int, default=120, help="number of prompts (the 32 duplicated originals, then singletons)"
    )
    parser.add_argument("--n-samples", type=int, default=24, help="samples per prompt (brute force; adaptive's budget)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (the demo model's config: 5)")
    parser.add_argument("--size", type=int, default=None, help="image side; default: the model's")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-clique", type=int, default=10, help="the detector's clique size for a flag")
    parser.add_argument("--keep-fraction", type=float, default=None, help="prescreen: share of prompts kept for sampling")
    parser.add_argument(
        "--keep-z",
        type=float_or_none,
        default=2.5,
        help="prescreen: keep prompts whose robust z-score is at least this (prescreen.min_robust_z; each z against "
        "the singleton prompts' median and MAD, so a cut means the same at 120 prompts as at 932; own_images: the "
        "largest of its z values). 2.5: the weakest prompt brute force extracts on the demo model, orig-00006 (40 "
        "copies), scores 3.2-5.1 at seeds 0-2; with --keep-fraction, both must hold",
    )
    parser.add_argument(
        "--singleton-keep-z",
        type=float_or_none,
        default=3.5,
        help="prescreen: the cut for singleton prompts (dup_count 1) instead of --keep-z (prescreen.singleton_min_robust_z; "
        "none: --keep-z). 3.5: of 900 singletons it keeps 6-12 where 2.5 keeps 30-40, and no singleton is found by "
        "brute force on the demo model",
    )
    parser.add_argument(
        "--prescreen-seeds",
        type=int,
        default=6,
        help="prescreen noise draws (prescreen.seeds): 6 (at 4 the weakest extracted prompts' z drops to "
        "about 2 on some draws; 8 costs more than the 1000-prompt mix's budget allows)",
    )
    parser.add_argument(
        "--score",
        choices=SCORES,
        default="own_images",
        help="the prescreen's score (prescreen.score): own_images (default), each caption against its own training "
        "images (the prompt's keys; --images, --image-levels, --image-draws) beside --text-score, which keeps orig-00006 "
        "(40 copies) where the text score alone drops it; wen_levels, Wen's norm at --levels, the strongest outlier (on "
        "the demo model it keeps the 10- and 40-copy prompts the first step misses); wen (the first step alone); anisotropy",
    )
    parser.add_argument(
        "--text-score",
        choices=TEXT_SCORES,
        default="wen_levels",
        help="own_images: the caption-only score beside it (prescreen.text_score)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=2,
        help="own_images: training images of each prompt's group scored (prescreen.images): 2, at one level and one draw "
        "(4 evaluations a duplicated prompt, 2 a singleton; more images or levels cost more and kept orig-00006 no more often)",
    )
    parser.add_argument(
        "--image-levels",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[0.08],
        help="own_images: noise levels of the training images, fractions of the schedule (prescreen.image_levels)",
    )
    parser.add_argument(
        "--image-draws", type=int, default=1, help="own_images: noise draws per image and level (prescreen.image_draws)"
    )
    parser.add_argument(
        "--levels",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[0.125],
        help="wen_levels' noise levels, fractions of the schedule, comma-separated (prescreen.levels): 0.125 "
        "alone, since adding 0.25 doubles the prescreen's cost and raised no weak prompt's z on the demo model",
    )
    parser.add_argument(
        "--first-round",
        type=int,
        default=4,
        help="adaptive: samples in the first round: 4 (a prompt kept is mostly extracted within its first 4 "
        "samples, or held by --near-training; every singleton kept costs this many)",
    )
    parser.add_argument(
        "--strong-z",
        type=float_or_none,
        default=STRONG_Z,
        help="adaptive: kept prompts of --min-copies or more copies whose caption-only robust z is at least this are "
        "sampled in first rounds of --strong-first-round and held until extracted (they are extracted in their first "
        "samples); none: no prompt is",
    )
    parser.add_argument(
        "--strong-first-round",
        type=int,
        default=STRONG_FIRST_ROUND,
        help="adaptive: the first round of the prompts at or above --strong-z",
    )
    parser.add_argument(
        "--weak-first-round",
        type=int,
        default=WEAK_FIRST_ROUND,
        help="adaptive: the first round of the kept prompts of --min-copies or more copies below --strong-z: weakly "
        "memorized prompts, whose first sample near a training copy can come late (orig-00006's 7th at seed 1)",
    )
    parser.add_argument(
        "--few-first-round",
        type=int,
        default=FEW_FIRST_ROUND,
        help="adaptive: the first round of the kept prompts of fewer than --min-copies copies (singletons among them): "
        "one sample, held on by --near-training when it comes near a training image",
    )
    parser.add_argument(
        "--min-copies",
        type=int,
        default=MIN_COPIES,
        help="adaptive: the duplicate group size (dup_count) from which a kept prompt is sampled as strong or weak; "
        "smaller groups (no prompt of fewer than 10 copies is found on the demo model) get --few-first-round",
    )
    parser.add_argument(
        "--growth",
        type=float,
        default=1.01,
        help="adaptive: round growth factor: 1.01, rounds of one sample after the first (ceil(k x 1.01) = k + 1 "
        "below 100 samples), so that a prompt stops at the sample that extracts it",
    )
    parser.add_argument(
        "--min-close-pairs",
        type=int,
        default=AdaptiveSettings.min_close_pairs,
        help="adaptive: near-copy pairs a round needs to go on",
    )
    parser.add_argument(
        "--no-stop-when-flagged",
        dest="stop_when_flagged",
        action="store_false",
        help="adaptive: sample flagged prompts to the full budget (default: stop once a clique of --min-clique exists)",
    )
    parser.add_argument(
        "--no-stop-when-out-of-reach",
        dest="stop_when_out_of_reach",
        action="store_false",
        help="adaptive: sample on when the budget left can no longer complete a clique of --min-clique",
    )
    parser.add_argument(
        "--no-stop-when-extracted",
        dest="stop_when_extracted",
        action="store_false",
        help="adaptive: sample on after a sample reproduces one of the prompt's training images",
    )
    parser.add_argument(
        "--no-stop-when-unlikely",
        dest="stop_when_unlikely",
        action="store_false",
        help="adaptive: sample on when a clique is unlikely to complete (the Wilson bound heuristic)",
    )
    parser.add_argument(
        "--near-training",
        type=float_or_none,
        default=0.25,
        help="adaptive: hold a prompt with a sample within this of one of its training images past the stops on "
        "the flag (adaptive.near_training; needs stop once extracted; none: off)",
    )
    parser.add_argument("--heavy-dup-count", type=int, default=100, help="dup_count from which a prompt is heavy (ROC AUC)")
    parser.add_argument("--seed", type=int, default=0, help="one seed (prompt choice, sampling and prescreen noise)")
    parser.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",") if x.strip()],
        default=None,
        help="comma-separated seeds, e.g. 0,1,2: a run per seed, each seed's figures and the worst (overrides --seed)",
    )
    parser.add_argument(
        "--brute-singletons",
        type=int,
        default=None,
        help="brute force samples every duplicated prompt and only this many random singletons; its cost is "
        "extrapolated exactly (default: every prompt)",
    )
    parser.add_argument(
        "--brute-cache",
        default=None,
        help="a folder keeping brute force's samples per seed: a later run (any prompt mix, same model and recipe) "
        "reuses them and makes only the missing ones; its generation time is extrapolated from the samples timed",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="an empty or new folder for both runs' outputs (default: a temporary one)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument(
        "--prescreen-only",
        action="store_true",
        help="only the prescreen, per seed: prompts kept, evaluations, ROC AUCs by dup_count, each duplicated prompt's z (no sampling)",
    )
    parser.add_argument(
        "--screened-only",
        action="store_true",
        help="the prescreen and (b) alone, per seed: its exact evaluation fraction and the prompts it found (no brute "
        "force, so no recall)",
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and demo set: a check that runs in seconds")
    parser.add_argument(
        "--delta",
        type=float,
        default=None,
        help="verification (and stop_when_extracted): a sample within this of a training image reproduces it; default --threshold",
    )
    parser.add_argument(
        "--brute-kept-only",
        action="store_true",
        help="a partial check: brute force samples only the prompts the prescreen kept (recall is then adaptive "
        "sampling's alone; the cost fraction is still exact)",
    )
    parser.add_argument(
        "--max-fraction",
        type=float,
        default=0.10,
        help="the evaluation fraction target (0.10 at 120 prompts, 0.02 at the 1000-prompt mix)",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.15, help="tiled L2 of near-copies, for the detector and adaptive sampling"
    )
    if parser.parse_args(argv).tiny:  # small defaults; flags given explicitly still win
        parser.set_defaults(**TINY_DEFAULTS)
    return parser.parse_args(argv)


def _plain(value):
    """JSON-ready: NaN as null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}"


def bench_prescreen_settings(args, seed: int) -> PrescreenSettings:
    """(b)'s prescreen settings: the prescreen's own (:class:`PrescreenSettings`, the defaults of
    ``conf/prescreen.yaml`` where no option sets them: the robust z against the singleton
    prompts, ``reference_singletons``) with this benchmark's options and ``seed``."""
    return PrescreenSettings(
        seeds=args.prescreen_seeds,
        steps=args.steps,
        keep_fraction=args.keep_fraction,
        min_robust_z=args.keep_z,
        singleton_min_robust_z=args.singleton_keep_z,
        base_seed=seed,
        height=args.size,
        width=args.size,
        score=args.score,
        levels=tuple(args.levels),
        text_score=args.text_score,
        images=args.images,
        image_levels=tuple(args.image_levels),
        image_draws=args.image_draws,
    )


def one_seed(pipe, prompts: list[Prompt], out: Path, args, runtime: Runtime, device, data: dict | None, seed: int) -> dict:
    """Brute force against prescreen + adaptive sampling on ``prompts`` with ``seed``; prints the
    comparison and returns its figures (JSON-ready after :func:`_plain`)."""
    n = len(prompts)
    # (b)'s prescreen first: --brute-kept-only needs its choice (it sees no sample of either run).
    ps = bench_prescreen_settings(args, seed)
    started = time.perf_counter()
    training = None
    if ps.score == "own_images":
        if data is None:
            raise SystemExit(f"--score own_images: needs the training images, {args.data}/images")
        # Fetching each prompt's training images is part of the prescreen's time.
        training = fetch_training_images(data, keys_to_fetch([p.keys for p in prompts], ps.images))
    scores = prescreen(pipe, prompts, ps, progress=args.progress, images=training)
    prescreen_s = time.perf_counter() - started
    kept = set(scores.loc[scores.kept, "prompt_id"])
    if args.prescreen_only:
        return prescreen_figures(scores, ps, seed, prescreen_s)
    if args.screened_only:
        prescreen_figures(scores, ps, seed, prescreen_s)
        return screened_figures(pipe, prompts, scores, ps, out, args, runtime, data, seed, prescreen_s)

    # (a) brute force, on every prompt, or on every duplicated prompt and a random share of the
    # singletons, or (a partial check) on the kept prompts only
    if args.brute_kept_only:
        sampled = [p for p in prompts if p.prompt_id in kept]
    else:
        sampled = brute_force_prompts(prompts, args.brute_singletons, seed)
    brute = audit(pipe, sampled, out / "brute", args, runtime, adaptive=None, data=data, seed=seed)
    brute_measured_s = brute["generate_s"] + brute["detect_s"]
    # Every prompt has the same recipe, so the time of the prompts not sampled is the sampled ones' per prompt.
    brute_s = brute_measured_s * n / len(sampled)

    # (b) adaptive sampling of the kept prompts
    rule = adaptive_rule(args, data)
    tiers, rules = sampling_tiers(scores, args), tier_rules(args, data)
    screened = screened_audit(pipe, prompts, tiers, rules, out / "screened", args, runtime, data, seed)
    screened_s = prescreen_s + screened["generate_s"] + screened["detect_s"]

    brute_budget = generation_budget(brute["table"])
    screened_budget = generation_budget(screened["table"], {"prompts": n, "unet_evaluations": table_evaluations(scores, ps)})
    assert brute_budget["unet_evaluations"] == brute_force_evaluations(len(sampled), args.n_samples, args.steps, args.guidance)
    # Brute force's cost on every prompt: exact, not estimated (prompts x samples x steps x 2).
    brute_evaluations = brute_force_evaluations(n, args.n_samples, args.steps, args.guidance)
    assert screened_budget["brute_force_evaluations"] == brute_evaluations
    matcher = GroupMatcher(data, rule.rule.metric, delta(args)) if rule.stop_when_extracted else None
    replay = adaptive_alone(
        out / "brute" / "generations", brute["table"], rule, matcher, {pid: rules[tier] for pid, tier in tiers.items()}
    )
    missed = missed_by_shortcuts(brute["memorized"], scores, replay)
    dup_counts = scores.dup_count.to_numpy(dtype=float, na_value=math.nan)
    aucs = heavy_prompt_aucs(scores.score.to_numpy(), dup_counts, args.heavy_dup_count)
    auc = aucs["heavy_vs_singletons"]
    found = len(brute["found"] & screened["found"])
    recall = found / len(brute["found"]) if brute["found"] else float("nan")
    fraction = screened_budget["unet_evaluations"] / brute_evaluations
    # What sampling only the found prompts to the full budget would cost (the stops can go below it).
    floor = len(brute["found"]) / n
    # Singletons: what brute force's sample of them found (normally nothing), and what the
    # screened run found among those brute force did not sample (unknown to brute force).
    sampled_ids = {p.prompt_id for p in sampled}
    singles_sampled = {p.prompt_id for p in sampled if (p.dup_count or 0) <= 1}
    n_singles = sum((p.dup_count or 0) <= 1 for p in prompts)
    singles_found = sorted(brute["found"] & singles_sampled)
    unknown_to_brute = sorted(screened["found"] - sampled_ids)

    rows = [
        ("UNet evaluations", brute_evaluations, screened_budget["unet_evaluations"]),
        ("  of which prescreen", 0, screened_budget["prescreen_evaluations"]),
        ("wall time (s)", brute_s, screened_s),
        ("  prescreen (s)", 0.0, prescreen_s),
        ("  generate (s)", brute["generate_s"] * n / len(sampled), screened["generate_s"]),
        ("  detect+verify (s)", brute["detect_s"] * n / len(sampled), screened["detect_s"]),
        ("prompts sampled", n, screened_budget["prompts_sampled"]),
        ("  stopped, no near-copies", 0, screened_budget["prompts_stopped_early"]),
        ("  stopped once flagged", 0, screened_budget["prompts_stopped_flagged"]),
        ("  stopped, out of reach", 0, screened_budget["prompts_stopped_out_of_reach"]),
        ("  stopped once extracted", 0, screened_budget["prompts_stopped_extracted"]),
        ("  stopped, unlikely", 0, screened_budget["prompts_stopped_unlikely"]),
        ("samples", n * args.n_samples, screened_budget["samples"]),
        ("prompts flagged", len(brute["flagged"]), len(screened["flagged"])),
        ("prompts extracted", len(brute["extracted"]), len(screened["extracted"])),
        ("prompts found (either)", len(brute["found"]), len(screened["found"])),
    ]
    print(
        f"screen_bench seed {seed}: {n} prompts ({n - n_singles} duplicated originals, {n_singles} singletons), {args.n_samples} "
        f"samples x {args.steps} steps, guidance {args.guidance}, model {args.model}, {device.type} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__})"
    )
    if args.brute_kept_only:
        print(
            f"(a) sampled on the {len(sampled)} prompts the prescreen kept only: recall below is adaptive sampling's alone "
            f"(the prescreen's misses are NOT measured); its UNet evaluations are exact for all {n}, its times scaled"
        )
    elif len(sampled) < n:
        print(
            f"(a) sampled on {len(sampled)} prompts (every duplicated one, {len(singles_sampled)} random singletons of {n_singles}); "
            f"its UNet evaluations are exact for all {n} ({n} x {args.n_samples} x {args.steps} x 2), its times scaled from "
            f"{brute_measured_s:.1f} s measured; found among the sampled singletons: {len(singles_found)}"
            + (
                f" ({', '.join(singles_found)}: counted in (a)'s found prompts; at that rate the {n_singles} singletons would hold "
                f"~{len(singles_found) * n_singles / max(1, len(singles_sampled)):.0f})"
                if singles_found
                else ""
            )
        )
    if brute["reused"]:
        print(
            f"(a): {brute['reused']:,} of its {len(sampled) * args.n_samples:,} samples reused from --brute-cache {args.brute_cache} "
            f"(made earlier with the same model, recipe and seeds); its generation time is extrapolated from the samples timed"
        )
    keep_rule = " and ".join(
        ([f"top {args.keep_fraction:.0%}"] if args.keep_fraction is not None else [])
        + ([f"robust z >= {args.keep_z:g}"] if args.keep_z is not None else [])
        + ([f"singletons' robust z >= {args.singleton_keep_z:g}"] if args.singleton_keep_z is not None else [])
    )
    text_name = ps.caption_score + (
        f" at levels {', '.join(f'{v:g}' for v in ps.level_values())}" if ps.caption_score == "wen_levels" else ""
    )
    score_name = text_name
    if args.score == "own_images":
        score_name = (
            f"own_images ({ps.images} images at levels {', '.join(f'{v:g}' for v in ps.image_levels)}, {ps.image_draws} draws; "
            f"{int(scores.own_images.sum())} images, {table_evaluations(scores, ps) - unet_evaluations(n, ps.text_settings())} "
            f"evaluations) or {text_name}"
        )
    print(
        f"(b): prescreen {score_name}, {args.prescreen_seeds} seeds, keep {keep_rule} ({len(kept)} prompts); adaptive rounds {rule.first_round} "
        f"x{rule.growth:g}, go on with >= {rule.min_close_pairs} near-copy pair(s)"
        + (", stop once flagged" if rule.stop_when_flagged else "")
        + (", stop once a clique is out of reach" if rule.stop_when_out_of_reach else "")
        + (", stop once extracted" if rule.stop_when_extracted else "")
        + (", stop once a clique is unlikely" if rule.stop_when_unlikely else "")
        + (
            f", held while a sample is within {rule.near_training:g} of a training image"
            if rule.near_training is not None
            else ""
        )
        + f"; tiers (prompts): {', '.join(f'{t} {sum(v == t for v in tiers.values())}' for t in rules)}; "
        + f"few_copies (groups under {args.min_copies} copies): first round {rules[FEW].first_round}; strong ("
        + (f"caption-only z >= {args.strong_z:g}" if args.strong_z is not None else "none")
        + f"): first round {rules[STRONG].first_round}"
        + (", held until extracted, flagged or out of budget" if rules[STRONG].near_training == HOLD_ALWAYS else "")
        + f"; weak (other groups of {args.min_copies} or more): first round {rules[WEAK].first_round}"
        + ("" if rules[WEAK].stop_when_unlikely else ", no stop on an unlikely clique")
        + f"; detector clique >= {args.min_clique}"
        + ("; verified against each prompt's training images" if data is not None else "; no verification (no training images)")
    )
    print(f"{'':26s}{'(a) brute force':>18s}{'(b) screened':>18s}{'(b)/(a)':>10s}")
    for label, a, b in rows:
        ratio = b / a if a else float("nan")
        digits = 1 if "(s)" in label else 3
        print(f"{label:26s}{fmt(a, digits):>18s}{fmt(b, digits):>18s}{fmt(ratio):>10s}")
    if screened_budget["fewer_samples"]:
        print(
            f"verdicts of (b) taken on fewer samples than the budget (extracted or unlikely stops): {', '.join(screened_budget['fewer_samples'])}"
        )
    print(
        f"recall of (b) against (a)'s found (flagged or extracted) prompts: {found}/{len(brute['found'])} = {fmt(recall)}"
        + ("  (brute force found nothing: recall undefined)" if not brute["found"] else "")
    )
    if unknown_to_brute:
        print(f"(b) found {len(unknown_to_brute)} prompt(s) that (a) did not sample: {', '.join(unknown_to_brute)}")
    print(f"evaluation fraction (b)/(a): {fmt(fraction, 4)}   ((a)'s found prompts alone, at the full budget: {fmt(floor, 4)})")
    n_heavy, n_single = int((dup_counts >= args.heavy_dup_count).sum()), int((dup_counts <= 1).sum())
    print(
        f"prescreen ROC AUC, dup_count >= {args.heavy_dup_count} ({n_heavy} prompts) vs singletons ({n_single}): {fmt(auc)}"
        f"   (vs every other prompt: {fmt(aucs['heavy_vs_rest'])})"
    )
    print(
        "missed of (a)'s found prompts: "
        + ", ".join(
            f"{name} {'not measured' if args.brute_kept_only and name != 'adaptive' else missed[name]['n_missed']}"
            for name in ("prescreen", "adaptive", "both")
        )
        + " (adaptive alone replayed on (a)'s samples"
        + (
            f"; unlikely stops among them: "
            f"{sorted(set(missed['adaptive']['missed']) & set(replay.loc[replay.stop_reason == 'unlikely', 'prompt_id']))})"
            if rule.stop_when_unlikely
            else ")"
        )
    )
    by_band = band_aucs(scores)
    for column, aucs_of in by_band.items():
        print(
            f"prescreen ROC AUC of the {AUC_COLUMNS[column]} vs singletons, by dup_count: "
            + ", ".join(f"{count} copies {fmt(value)}" for count, value in aucs_of.items())
        )
    z_columns = [c for c in ("z_text", "z_own_images", "z_both") if c in scores.columns]
    found_rows = scores[scores.prompt_id.isin(brute["found"])].sort_values("prompt_id")
    print(
        "(a)'s found prompts in the prescreen (z: "
        + ("/".join(z_columns) if z_columns else "score")
        + "; * not kept): "
        + ", ".join(
            f"{r.prompt_id} ({r.dup_count}) "
            + "/".join(fmt(float(getattr(r, c)), 1) for c in (z_columns or ["robust_z"]))
            + ("" if r.kept else "*")
            for r in found_rows.itertuples()
        )
    )
    limit = args.max_fraction
    targets = {  # None: undefined on this run (no heavy prompt, or nothing found by brute force)
        "roc_auc>=0.95": None if math.isnan(auc) else bool(auc >= 0.95),
        # --brute-kept-only measures adaptive sampling's recall alone: the target is left undecided.
        "recall>=0.95": None if math.isnan(recall) or args.brute_kept_only else bool(recall >= 0.95),
        f"fraction<={limit:.2f}": bool(fraction <= limit),
    }
    print("targets: " + ", ".join(f"{k} {'undefined' if v is None else 'met' if v else 'NOT met'}" for k, v in targets.items()))
    print(f"outputs in {out}")
    return {
        "seed": seed,
        "prompts": n,
        "n_samples": args.n_samples,
        "steps": args.steps,
        "guidance": args.guidance,
        "device": device.type,
        "brute_force": {
            "unet_evaluations": brute_evaluations,
            "seconds": brute_s,
            "seconds_measured": brute_measured_s,
            "prompts_sampled": len(sampled),
            "singletons_sampled": len(singles_sampled),
            "singletons_found": singles_found,
            "samples": brute_budget["samples"],
            "samples_reused": brute["reused"],
            "flagged": sorted(brute["flagged"]),
            "extracted": sorted(brute["extracted"]),
            "found": sorted(brute["found"]),
        },
        "screened": {
            "unet_evaluations": screened_budget["unet_evaluations"],
            "seconds": screened_s,
            "samples": screened_budget["samples"],
            "prescreen_evaluations": screened_budget["prescreen_evaluations"],
            "prescreen_images": int(scores.own_images.fillna(0).sum()),
            "kept": sorted(kept),
            "tiers": tiers,
            "n_generated": dict(zip(screened["table"].prompt_id, screened["table"].n_generated.astype(int))),
            "stopped_early": screened_budget["prompts_stopped_early"],
            "stopped_flagged": screened_budget["prompts_stopped_flagged"],
            "stopped_out_of_reach": screened_budget["prompts_stopped_out_of_reach"],
            "stopped_extracted": screened_budget["prompts_stopped_extracted"],
            "stopped_unlikely": screened_budget["prompts_stopped_unlikely"],
            "fewer_samples": screened_budget["fewer_samples"],
            "flagged": sorted(screened["flagged"]),
            "extracted": sorted(screened["extracted"]),
            "found": sorted(screened["found"]),
            "found_not_sampled_by_brute_force": unknown_to_brute,
        },
        "recall": recall,
        "recall_scope": "kept prompts only (prescreen misses not measured)"
        if args.brute_kept_only
        else "every prompt sampled by (a)",
        "evaluation_fraction": fraction,
        "time_fraction": screened_s / brute_s if brute_s else float("nan"),
        "floor_fraction": floor,
        "roc_auc_heavy_vs_singletons": auc,
        "roc_auc_heavy_vs_rest": aucs["heavy_vs_rest"],
        "roc_auc_by_dup_count": by_band,
        "prescreen_score": ps.score,
        "missed": {name: missed[name]["missed"] for name in ("prescreen", "adaptive", "both")},
        "targets": targets,
        "out": str(out),
    }


def prescreen_figures(scores: pd.DataFrame, ps: PrescreenSettings, seed: int, seconds: float) -> dict:
    """``--prescreen-only``: print and return one seed's prescreen figures (no sampling): the
    prompts kept, the evaluations (and their share of brute force's), the ROC AUCs by dup_count
    (:func:`band_aucs`) and each duplicated prompt's z values, kept or not."""
    evaluations = table_evaluations(scores, ps)
    kept = sorted(scores.loc[scores.kept, "prompt_id"])
    z_columns = [c for c in ("z_text", "z_own_images", "z_both") if c in scores.columns] or ["robust_z"]
    duplicated = scores[scores.dup_count.fillna(0) > 1].sort_values("prompt_id")
    singles = scores[scores.dup_count.fillna(0) <= 1]
    print(
        f"prescreen seed {seed}: {len(scores)} prompts, {len(kept)} kept ({int(singles.kept.sum())} of {len(singles)} "
        f"singletons), {evaluations:,} evaluations in {seconds:.1f} s"
    )
    by_band = band_aucs(scores)
    for column, aucs_of in by_band.items():
        print(
            f"  ROC AUC of the {AUC_COLUMNS[column]} vs singletons: "
            + ", ".join(f"{c} copies {fmt(v)}" for c, v in aucs_of.items())
        )
    print(
        f"  duplicated prompts ({'/'.join(z_columns)}; * not kept): "
        + ", ".join(
            f"{r.prompt_id[-2:]}({r.dup_count}) "
            + "/".join(fmt(float(getattr(r, c)), 1) for c in z_columns)
            + ("" if r.kept else "*")
            for r in duplicated.itertuples()
        )
    )
    return {
        "seed": seed,
        "prompts": len(scores),
        "kept": kept,
        "prescreen_evaluations": evaluations,
        "roc_auc_by_dup_count": by_band,
    }


# The score columns of a ranked prescreen table whose band AUCs are printed, and their names.
AUC_COLUMNS = {"score": "ranked score", "z_text": "text-only part", "z_own_images": "own_images part"}


def band_aucs(scores: pd.DataFrame) -> dict[str, dict[str, float]]:
    """ROC AUC of each score column (:data:`AUC_COLUMNS`, those the table has) for telling the
    prompts of each ``dup_count`` above 1 from the singletons (``dup_count`` 1): ``{column:
    {str(dup_count): auc}}``, taken over the prompts with a finite score (NaN where a side is empty)."""
    dup = scores.dup_count.to_numpy(dtype=float, na_value=math.nan)
    out = {}
    for column in AUC_COLUMNS:
        if column not in scores.columns:
            continue
        values = scores[column].to_numpy(dtype=float)
        finite = np.isfinite(values) & np.isfinite(dup)
        out[column] = {}
        for count in sorted({int(d) for d in dup[finite] if d > 1}):
            band, single = finite & (dup == count), finite & (dup <= 1)
            both = band | single
            out[column][str(count)] = roc_auc(values[both], band[both]) if band.any() and single.any() else float("nan")
    return out


def worst_of(runs: list[dict]) -> dict:
    """The worst figures over seeds: lowest recall (NaN, undefined, left out), highest evaluation
    fraction, and whether every seed met each target (None where no seed defined it)."""
    recalls = [r["recall"] for r in runs if not math.isnan(r["recall"])]
    targets = {}
    for name in runs[0]["targets"]:
        verdicts = [r["targets"][name] for r in runs if r["targets"][name] is not None]
        targets[name] = all(verdicts) if verdicts else None
    return {
        "recall": min(recalls) if recalls else float("nan"),
        "evaluation_fraction": max(r["evaluation_fraction"] for r in runs),
        "seed_lowest_recall": min(runs, key=lambda r: r["recall"] if not math.isnan(r["recall"]) else math.inf)["seed"],
        "seed_highest_fraction": max(runs, key=lambda r: r["evaluation_fraction"])["seed"],
        "targets": targets,
    }


def float_or_none(value: str) -> float | None:
    """An option's value: a float, or None for "none" (any case)."""
    return None if value.lower() == "none" else float(value)


def main(argv=None) -> dict:
    """Run the benchmark; returns the run's figures (one seed), or ``{"runs": [...], "worst": {...}}``
    over ``--seeds``; a single seed's figures also carry ``worst`` (its own)."""
    args = parse_args(argv)
    seeds = args.seeds if args.seeds else [args.seed]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="screen_bench_"))
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out: {out} is not empty; both runs must start from nothing (their timings would be skips)")
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        # With --brute-cache the tiny model lives in the cache, so that later runs are made by the same model path.
        home = Path(args.brute_cache) if args.brute_cache else out
        built = (home / "tiny_model" / "model_index.json").is_file() and (home / "tiny_data" / "ground_truth.parquet").is_file()
        args.model, args.data = (home / "tiny_model", home / "tiny_data") if built else build_tiny(home)
    images = Path(args.data) / "images"
    # The demo set's files layout: training images by key, for verification and stop_when_extracted.
    data = {"format": "files", "path": str(images)} if images.is_dir() else None

    def prompts_for(seed: int) -> list[Prompt]:
        if args.selected:
            return read_prompts(args.selected, limit=args.prompts)
        return demo_prompts(pd.read_parquet(Path(args.data) / "ground_truth.parquet"), args.prompts, seed)

    first = prompts_for(seeds[0])
    if len(first) < args.prompts:
        print(
            f"note: --prompts {args.prompts} asked, but the prompt source has {len(first)} originals: all {len(first)} are used"
        )
    device = resolve_device(args.device)
    # Channels-last and fused QKV help GPUs; on a CPU they cost ~25% with the demo model.
    on_gpu = device.type == "cuda"
    runtime = Runtime(device=device.type, dtype="float32", channels_last=on_gpu, fuse_qkv=on_gpu)
    # Loaded once, as generation and the prescreen load a model: both runs see the same weights.
    pipe = load_model({"path": str(args.model)}, runtime, device=device)
    # Warm-up (first-call allocations, kernel choices) outside both timings, so neither run pays it.
    pipe(
        prompt=[first[0].caption],
        num_inference_steps=2,
        guidance_scale=args.guidance,
        height=args.size,
        width=args.size,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )

    runs = []
    for seed in seeds:
        folder = out if len(seeds) == 1 else out / f"seed_{seed}"
        runs.append(one_seed(pipe, first if seed == seeds[0] else prompts_for(seed), folder, args, runtime, device, data, seed))
    if args.prescreen_only or args.screened_only:
        result = {"runs": runs}
        print("RESULT " + json.dumps(_plain(result)))
        return result
    worst = worst_of(runs)
    if len(runs) > 1:
        print(
            f"{'seed':>6s}{'prompts':>9s}{'kept':>6s}{'(a) found':>11s}{'(b) found':>11s}{'recall':>8s}{'(b) UNet':>12s}{'(a) UNet':>12s}{'(b)/(a)':>9s}"
        )
        for r in runs:
            print(
                f"{r['seed']:>6d}{r['prompts']:>9d}{len(r['screened']['kept']):>6d}{len(r['brute_force']['found']):>11d}"
                f"{len(set(r['screened']['found']) & set(r['brute_force']['found'])):>11d}{fmt(r['recall']):>8s}"
                f"{r['screened']['unet_evaluations']:>12,}{r['brute_force']['unet_evaluations']:>12,}{fmt(r['evaluation_fraction'], 4):>9s}"
            )
        print(
            f"{'worst':>6s}{'':>48s}{fmt(worst['recall']):>8s}{'':>24s}{fmt(worst['evaluation_fraction'], 4):>9s}"
            f"   (recall: seed {worst['seed_lowest_recall']}, fraction: seed {worst['seed_highest_fraction']})"
        )
        print(
            "targets on every seed: "
            + ", ".join(f"{k} {'undefined' if v is None else 'met' if v else 'NOT met'}" for k, v in worst["targets"].items())
        )
        result = {"runs": runs, "worst": worst}
    else:
        result = {**runs[0], "worst": worst}
    print("RESULT " + json.dumps(_plain(result)))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
