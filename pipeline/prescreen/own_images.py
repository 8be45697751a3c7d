"""The ``own_images`` score: how much a caption lowers the denoising error on its own training images.

A prompt from the duplicate finder comes with its duplicate group's training records (its
``keys``). Noise one of those images to timestep ``t`` and ask the denoiser to undo it, once
with the caption and once with the empty caption: the squared error of the caption's prediction
against the training target, ``E_c``, and of the empty caption's, ``E_u``, are the denoising loss
that loss-based membership inference on diffusion models reads (Carlini et al., USENIX Security
2023, on their CIFAR-10 models; SecMI, ICML 2023; PIA, ICLR 2024). A caption the model has
memorized together with that image predicts its noise far better than the empty caption does;
an ordinary pair gains little. The score of a prompt is::

    own_images(level) = log( sum E_u / sum E_c )

at each noise level of ``prescreen.image_levels`` (fractions of the sampling schedule, 0 its
first, noisiest timestep), the sums over up to ``prescreen.images`` of its group's images (the
first ones of its ``keys`` that the training set holds) and ``prescreen.image_draws`` noise
draws each. Range: any real number; 0 when the caption predicts no better than the empty
caption, higher when it predicts better. The ranking standardises each level's scores over the
prompts that have one (robust z, :func:`pipeline.prescreen.keep.robust_z`, against the singleton
prompts among them when there are ``prescreen.reference_singletons`` of them) and keeps the
largest over levels, as ``wen_levels`` does with its levels; a prompt's keep score is the
largest of that, the caption-only score's robust z and the robust z of their sum
(:func:`pipeline.prescreen.ranking.rank_scores`).

What the denoiser sees is each family's training objective (:meth:`pipeline.families.denoiser.Denoiser.noised`:
noise, velocity or sample prediction on a DDPM schedule; the velocity of rectified flow), on the
image fitted to the model's resolution (:func:`pipeline.training_images.fit_to`) and encoded by its
VAE (:meth:`pipeline.families.denoiser.Denoiser.encode_images`). The noise of draw ``d`` is
drawn from ``torch.Generator().manual_seed(base_seed + d)``, the same for every image of every
prompt: how hard a noise draw makes the task shifts every prompt's errors alike, so a prompt
scored on several images is compared with one scored on one on equal terms, and scores differ
through the caption and the images only.

Cost, in denoiser evaluations (one image each): 2 (caption and empty caption) per image, level
and draw, ``2 * images_used * levels * draws`` per prompt (:func:`image_evaluations`); a prompt
with no image (no ``keys``, or none found) costs nothing here and is ranked by the text score
alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.families.denoiser import Conditioning, Denoiser
from pipeline.prescreen.scores import level_indexes


def chosen_keys(keys: Sequence[str] | None, available: Mapping[str, object] | None, limit: int) -> list[str]:
    """The training images a prompt is scored on: the first ``limit`` distinct ``keys``, in their
    order, that ``available`` holds (all of the first ``limit`` when ``available`` is None)."""
    out: list[str] = []
    for key in keys or ():
        key = str(key)
        if key in out or (available is not None and key not in available):
            continue
        out.append(key)
        if len(out) == limit:
            break
    return out


def keys_to_fetch(prompts_keys: Sequence[Sequence[str] | None], limit: int) -> set[str]:
    """Every key some prompt may be scored on: the first ``limit`` distinct keys of each."""
    return {key for keys in prompts_keys for key in chosen_keys(keys, None, limit)}


def image_evaluations(images_used: Sequence[int] | np.ndarray, levels: int, draws: int) -> int:
    """Denoiser evaluations of the own_images score: ``2 * levels * draws`` per image scored."""
    return int(2 * levels * draws * int(np.sum(np.asarray(images_used, dtype=np.int64))))


def pixels_of(images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
    """float32 (B, 3, height, width) in [-1, 1]: each image center-cropped to the aspect ratio and
    resized (:func:`pipeline.training_images.fit_to`)."""
    from pipeline.training_images import fit_to

    arrays = [np.asarray(fit_to(image, (height, width)), dtype=np.float32) / 127.5 - 1.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def own_image_errors(
    denoiser: Denoiser,
    conditions: Sequence[Conditioning],
    images: Sequence[Sequence[Image.Image]],
    levels: Sequence[float],
    draws: int,
    base_seed: int,
    slots: int,
    batch_size: int,
) -> np.ndarray:
    """The summed squared errors of each prompt's predictions on its images, per noise level.

    ``conditions[i]``: prompt ``i``'s conditioning (batch 1); ``images[i]``: its training images
    (at most ``slots``; none: zeros). Returns float64 (prompts, len(levels), 2): at each level,
    the sum over its images and ``draws`` of the mean squared error of the caption's prediction
    ([..., 0]) and of the empty caption's ([..., 1]) against the training target.
    """
    if any(len(group) > slots for group in images):
        raise ValueError(f"prescreen.images: a prompt has more than {slots} images")
    steps = [denoiser.timesteps[i] for i in level_indexes(len(denoiser.timesteps), levels)]
    empty = denoiser.unconditional()
    noises = denoiser.draw([base_seed + d for d in range(int(draws))])  # float32 (draws, C, h, w) on the CPU
    errors = np.zeros((len(images), len(steps), 2))
    rows: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int]] = []  # (prompt, input, target, t, level)

    def flush():
        if not rows:
            return
        x = torch.cat([r[1] for r in rows])
        target = torch.cat([r[2] for r in rows])
        cond = {name: torch.cat([conditions[r[0]][name] for r in rows]) for name in conditions[rows[0][0]]}
        uncond = {name: t.expand(len(rows), *t.shape[1:]) for name, t in empty.items()}
        for column, conditioning in ((0, cond), (1, uncond)):
            # One timestep per call: the adapters take a scalar (or a batch-wide) timestep.
            for t in sorted({float(r[3]) for r in rows}, reverse=True):
                at = [k for k, r in enumerate(rows) if float(r[3]) == t]
                index = torch.tensor(at)
                part = {name: v[index] for name, v in conditioning.items()}
                predicted = denoiser.predict(x[index], rows[at[0]][3], part)
                mse = (predicted - target[index]).pow(2).flatten(1).mean(dim=1).double().cpu().numpy()
                np.add.at(errors[:, :, column], ([rows[k][0] for k in at], [rows[k][4] for k in at]), mse)
        rows.clear()

    for i, group in enumerate(images):
        if not group:
            continue
        latents = denoiser.encode_images(pixels_of(group, denoiser.height, denoiser.width)).cpu()
        for clean in latents:
            for level, t in enumerate(steps):
                for d in range(int(draws)):
                    x, target = denoiser.noised(clean[None], noises[d][None], t)
                    rows.append((i, x, target, t, level))
                    if len(rows) >= batch_size:
                        flush()
    flush()
    return errors


def own_image_score(errors: np.ndarray) -> np.ndarray:
    """``log(E_u / E_c)`` from sums of errors (..., 2) (:func:`own_image_errors`' (prompts, levels,
    2)), shape (...); NaN where there was no image (both sums 0)."""
    errors = np.asarray(errors, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.log(errors[..., 1]) - np.log(errors[..., 0])
    score[(errors[..., 0] == 0) & (errors[..., 1] == 0)] = np.nan
    return score
