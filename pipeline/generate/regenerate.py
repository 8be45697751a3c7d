"""Regenerate any sample of a run from its recorded recipe (a row of ``generations/prompts.parquet``).

Every sample comes from its own seed (:func:`pipeline.generate.sampling.sample_seed`), whatever batch it
was made in, so one row and an index are enough to remake it: on the CPU within one grey level,
since convolutions round differently at other batch sizes.

    import pandas as pd
    from pipeline.generate.regenerate import regenerate
    row = pd.read_parquet("outputs/demo/generations/prompts.parquet").iloc[0]
    image = regenerate(row, 3)          # uint8 (height, width, 3)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.generate.sampling import PromptEncoder, SampleTask, SamplingSettings, sample_batch
from pipeline.models import Runtime, build_scheduler, load_model

_PIPELINES: dict[tuple, Any] = {}


def pipeline_for(row, device: str | None = None, model_path: str | None = None):
    """The pipeline a prompt row was made with, loaded once per process and kept.

    ``device`` overrides the recorded device (e.g. ``"cpu"`` to check GPU samples on a
    laptop: same noise, as generators live on ``generator_device``, but expect rounding
    differences); ``model_path`` overrides ``model`` (the model moved). Loaded by
    :func:`pipeline.models.load_model` as generation loaded it: the recorded scheduler class
    with the recorded ``scheduler_config`` (as ``scheduler_kwargs`` over the model's own),
    in the recorded dtype, with the recorded speed options.
    """
    runtime = Runtime(**json.loads(row["runtime"]))
    if device is not None:
        runtime = Runtime(**{**runtime.as_dict(), "device": str(device)})
    path = model_path or row["model"]
    key = (path, row["scheduler"], row["scheduler_config"], json.dumps(runtime.as_dict(), sort_keys=True))
    if key not in _PIPELINES:
        model = {"path": path, "scheduler": row["scheduler"], "scheduler_kwargs": json.loads(row["scheduler_config"])}
        _PIPELINES[key] = load_model(model, runtime)
    return _PIPELINES[key]


def regenerate(row, sample_index: int, pipe=None, *, device: str | None = None, model_path: str | None = None) -> np.ndarray:
    """Remake sample ``sample_index`` of a ``prompts.parquet`` row: uint8 array (height, width, 3).

    ``row`` is a row of the table (a pandas Series or a dict). The model is loaded as recorded
    (see :func:`pipeline_for`) unless ``pipe`` is given; a given ``pipe`` gets the row's
    scheduler. ``PIL.Image.fromarray`` of the result shows it.
    """
    if pipe is None:
        pipe = pipeline_for(row, device=device, model_path=model_path)
    else:
        pipe.scheduler = build_scheduler(row["scheduler"], json.loads(row["scheduler_config"]))
    seeds = row["seeds"]
    if not 0 <= int(sample_index) < len(seeds):
        raise IndexError(f"sample_index: {sample_index} is outside 0..{len(seeds) - 1} for prompt {row['prompt_id']}")
    settings = SamplingSettings(
        steps=int(row["steps"]),
        guidance_scale=float(row["guidance_scale"]),
        height=int(row["height"]),
        width=int(row["width"]),
        negative_prompt=row["negative_prompt"],
        generator_device=row["generator_device"],
    )
    task = SampleTask(row["prompt_id"], row["caption"], int(sample_index), int(seeds[int(sample_index)]))
    encoder = PromptEncoder(pipe, settings.guidance_scale, settings.negative_prompt)
    return sample_batch(pipe, [task], settings, encoder)[0]


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.generate.regenerate <generations_dir> <prompt_id> <index> --out sample.png``:
    remake one sample from the recipe its generations folder records (the report prints this
    command on every extraction card), and say how far it is from the stored sample."""
    import argparse
    import sys
    from pathlib import Path

    from PIL import Image

    from pipeline.generations import PROMPTS_FILE, load_prompts, sample_path
    from pipeline.text import display_text

    parser = argparse.ArgumentParser(prog="python -m pipeline.generate.regenerate", description=main.__doc__)
    parser.add_argument("generations_dir", type=Path, help="the generator's folder (holds prompts.parquet)")
    parser.add_argument("prompt_id")
    parser.add_argument("index", type=int, help="the sample's index within its prompt (00012.png is 12)")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the PNG (default: regenerated_<prompt_id>_<index>.png)"
    )
    parser.add_argument("--device", default=None, help="override the recorded device, e.g. cpu")
    parser.add_argument("--model-path", default=None, help="override the recorded model path (the model moved)")
    args = parser.parse_args(argv)

    def fail(message: str) -> None:
        print(f"regenerate: {display_text(message, 2000)}", file=sys.stderr)
        raise SystemExit(2)

    if not (args.generations_dir / PROMPTS_FILE).is_file():
        fail(f"generations_dir: {args.generations_dir} has no {PROMPTS_FILE}: only the generator's folders record recipes")
    table = load_prompts(args.generations_dir, write=False)  # an input: never written
    rows = table[table["prompt_id"].astype(str) == args.prompt_id]
    if rows.empty:
        fail(f"prompt_id: {args.prompt_id!r} is not in {args.generations_dir / PROMPTS_FILE}")
    try:
        image = regenerate(rows.iloc[0], args.index, device=args.device, model_path=args.model_path)
    except IndexError as err:
        fail(str(err))
    out = args.out or Path(f"regenerated_{args.prompt_id}_{args.index:05d}.png")
    Image.fromarray(image).save(out)
    print(f"wrote {out}")
    stored = sample_path(args.generations_dir, args.prompt_id, args.index)
    if stored.is_file():
        difference = np.abs(np.asarray(Image.open(stored).convert("RGB"), dtype=np.int16) - image.astype(np.int16))
        print(
            f"largest difference from the stored {stored}: {int(difference.max())} grey level(s) "
            f"({float((difference > 1).mean()):.2%} of values differ by more than one)"
        )


if __name__ == "__main__":
    main()
