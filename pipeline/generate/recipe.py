"""A generator run's recipe: what decides every sample's pixels, recorded so that a run
directory holds samples of one recipe only and any sample can be remade.

:func:`recipe` gives the per-run columns of ``prompts.parquet`` (model, scheduler, steps,
guidance, size, dtype, seed rule, runtime, the model's identity); :func:`check_settings` records
the pixel-deciding ones (:data:`PIXEL_KEYS`) in the generations folder on the first run and
refuses a later run that differs.

Recipe columns of ``prompts.parquet`` (:func:`prompt_rows`), enough for
:func:`pipeline.generate.regenerate.regenerate` to remake any sample: ``prompt_id``,
``prompt_index`` (position in the prompt list), ``caption``, ``dup_count`` and ``keys`` (carried
from the prompt list: the duplicate group's training records, or null), ``n_samples``, ``seeds``
(list, one per sample: :func:`pipeline.generate.sampling.sample_seed` of ``base_seed``, prompt id
and index, see ``seed_rule``), ``model`` (``model.path`` as given), ``pipeline_class``,
``scheduler`` (class name), ``scheduler_config`` (JSON), ``steps``, ``guidance_scale``,
``height``, ``width``, ``negative_prompt``, ``dtype``, ``generator_device`` and ``runtime``
(JSON: device and speed options, see :class:`pipeline.models.Runtime`); then ``adaptive`` (JSON
of :meth:`pipeline.generate.adaptive.AdaptiveSettings.describe`: the settings and, under
``rule``, the near-copy rule; null when off), ``n_generated`` (samples made so far, of
``n_samples``), ``stopped_early`` (stopped with no near-copy pair) and ``stop_reason``
(:mod:`pipeline.generate.adaptive`'s ``no_close_pairs``, ``flagged``, ``out_of_reach``,
``extracted`` or ``unlikely``; null when sampled in full): the last three are the executor
step's (:meth:`pipeline.generate.step.GenerateStep.write_shard_file`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.families import family_of
from pipeline.generate.adaptive import AdaptiveSettings
from pipeline.generate.sampling import SEED_RULE, SamplingSettings, check_sampling, resolve_size, sample_seed
from pipeline.identity import model_identity
from pipeline.io import write_json
from pipeline.layout import GENERATION_SETTINGS
from pipeline.models import Runtime
from pipeline.prompts import Prompt

# The pixel-deciding settings of a generations folder, as its first run recorded them.
SETTINGS_FILE = GENERATION_SETTINGS
# Recipe fields that change what a sample looks like: a run directory holds one value of each.
PIXEL_KEYS = (
    "model",
    "pipeline_class",
    "scheduler",
    "scheduler_config",
    "steps",
    "guidance_scale",
    "height",
    "width",
    "negative_prompt",
    "dtype",
    "generator_device",
    "base_seed",
    "seed_rule",
    "model_identity",
)


def recipe_json(obj: Any) -> str:
    """``obj`` as JSON text with sorted keys (arrays as lists, anything else as its str): how
    the recipe's structured columns (``scheduler_config``, ``runtime``, ``adaptive``) are stored."""
    return json.dumps(obj, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def recipe(
    pipe, model: str, settings: SamplingSettings, runtime: Runtime, base_seed: int, revision: str | None = None
) -> dict[str, Any]:
    """The per-run part of a prompt row: everything but the prompt and its seeds, with the
    model's identity (:func:`pipeline.identity.model_identity`: its weight files' names, sizes
    and modification times, so weights replaced at the same path are another model). Raises a
    ValueError naming the config key of a setting the model's family cannot honour."""
    check_sampling(pipe, settings)
    height, width = resolve_size(pipe, settings.height, settings.width)
    return {
        "model": str(model),
        "pipeline_class": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": recipe_json({k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}),
        "steps": int(settings.steps),
        "guidance_scale": float(settings.guidance_scale),
        # Denoiser evaluations per image and step (2 under classifier-free guidance; FLUX: 1),
        # what the budget report counts.
        "evaluations_per_step": family_of(pipe).evaluations_per_step(pipe, settings.guidance_scale),
        "height": height,
        "width": width,
        "negative_prompt": settings.negative_prompt,
        "dtype": runtime.dtype,
        "generator_device": settings.generator_device,
        "base_seed": int(base_seed),
        "seed_rule": SEED_RULE,
        "runtime": recipe_json(runtime.as_dict()),
        "model_identity": recipe_json(model_identity(model, revision)),
    }


def pixel_settings(run_recipe: dict[str, Any]) -> dict[str, Any]:
    """The :data:`PIXEL_KEYS` of ``run_recipe``."""
    return {k: run_recipe[k] for k in PIXEL_KEYS}


def check_settings(out_dir: Path, run_recipe: dict[str, Any]) -> None:
    """Refuse to add samples made differently to an existing generations folder.

    Samples of one run directory must be comparable (and a resumed prompt must get the same
    images), so the first run records its pixel-deciding settings and later runs must match.
    """
    wanted = pixel_settings(run_recipe)
    path = out_dir / SETTINGS_FILE
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        diffs = [k for k in PIXEL_KEYS if recorded.get(k) != wanted[k]]
        if diffs:
            detail = "; ".join(f"{k}: {recorded.get(k)!r} then, {wanted[k]!r} now" for k in diffs)
            raise ValueError(
                f"run_dir: {out_dir} holds samples made with other settings ({detail}). "
                "Use another run_name, or delete that folder to start over."
            )
    else:
        write_json(wanted, path)


def prompt_rows(
    prompts: Sequence[Prompt],
    index_of: dict[str, int],
    run_recipe: dict[str, Any],
    *,
    n_samples: int,
    base_seed: int,
    adaptive: AdaptiveSettings | None,
    digests: dict[str, str],
) -> list[dict[str, Any]]:
    """The recipe row of each of ``prompts`` (a shard's ``prompts.parquet`` rows before their
    sampling state): the prompt (``prompt_index``: its position in ``index_of``, the whole
    list), its ``n_samples`` seeds (:func:`pipeline.generate.sampling.sample_seed`), the run's
    recipe, adaptive sampling's settings (JSON, or None when off) and its ``prompt_digest``."""
    return [
        {
            "prompt_id": p.prompt_id,
            "prompt_index": index_of[p.prompt_id],
            "caption": p.caption,
            "dup_count": p.dup_count,
            "keys": None if p.keys is None else list(p.keys),
            "n_samples": n_samples,
            "seeds": [sample_seed(base_seed, p.prompt_id, i) for i in range(n_samples)],
            **run_recipe,
            "adaptive": recipe_json(adaptive.describe()) if adaptive is not None else None,
            "prompt_digest": digests[p.prompt_id],
        }
        for p in prompts
    ]
