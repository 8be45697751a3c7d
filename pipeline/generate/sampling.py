"""Batched, seeded sampling: the generator's core, free of files and config.

A sample is named by ``(prompt_id, index)`` and made from its own seed (:func:`sample_seed`)
with its own ``torch.Generator``: diffusers draws each image's initial noise (and, for
stochastic samplers, each step's noise) from that image's generator, so a sample does not
depend on which other samples shared its batch. Regenerating sample ``i`` alone gives the
same noise and the same pixels as the batched run up to rounding: convolution kernels
(oneDNN on the CPU, cuDNN on a GPU) sum in an order that depends on the batch size, which can
move a rare pixel by one grey level (the tests allow at most 1 level on 1% of values), far
below the detector's threshold. Regenerating the same batch gives identical pixels.

Batches mix prompts freely: each caption is encoded by the text encoder(s) once (alone, so its
embedding does not depend on its batch either) and its embeddings are repeated for its
samples, then one pipeline call denoises the whole batch and the batch is turned into uint8
arrays in one operation. What a caption's embeddings are, and what else a call needs, is the
model family's (:mod:`pipeline.families`: Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX,
PixArt-Sigma; other pipelines get the captions as strings).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.cli import setting
from pipeline.families import Family, family_of

# How a sample's seed follows from the run's base seed, the prompt id and the sample index.
# Recorded with every prompt row; change the name if the rule ever changes.
SEED_RULE = "blake2b8(f'{base_seed}:{prompt_id}:{index}') >> 1"


def sample_seed(base_seed: int, prompt_id: str, index: int) -> int:
    """The seed of sample ``index`` of prompt ``prompt_id``: a 63-bit integer.

    ``int.from_bytes(blake2b(f"{base_seed}:{prompt_id}:{index}", digest_size=8), "little") >> 1``.
    A hash rather than ``base_seed + offset + index`` so that seeds never collide across
    prompts or base seeds, whatever the number of samples; 63 bits so it fits parquet's int64.
    """
    digest = hashlib.blake2b(f"{int(base_seed)}:{prompt_id}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class SamplingSettings:
    """What, with the model and the seed, decides a sample.

    ``height``/``width`` of ``None`` mean the pipeline's default (see :func:`resolve_size`).
    ``generator_device`` is where the per-sample generators live: ``"cpu"`` (the default)
    gives the same initial noise on any machine, so a GPU run can be checked on a CPU.
    """

    # The config keys, read by :func:`pipeline.cli.settings_from` (the generator's ``run``).
    steps: int = setting(key="model.steps", minimum=1, default=50)
    guidance_scale: float = setting(key="model.guidance_scale", default=7.5)
    height: int | None = setting(key="model.height", minimum=1, default=None)
    width: int | None = setting(key="model.width", minimum=1, default=None)
    negative_prompt: str | None = setting(key="negative_prompt", default=None)
    generator_device: str = setting(key="generator_device", default="cpu")


@dataclass(frozen=True)
class SampleTask:
    """One image to make: sample ``index`` of caption ``caption`` (prompt ``prompt_id``), from ``seed``."""

    prompt_id: str
    caption: str
    index: int
    seed: int


def resolve_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """The output resolution in pixels: the config's, or the pipeline's default (its
    ``default_sample_size``, else the UNet's or transformer's ``sample_size``, times the VAE factor)."""
    if height and width:
        return int(height), int(width)
    default = getattr(pipe, "default_sample_size", None)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if default is None and denoiser is not None:
        default = getattr(denoiser.config, "sample_size", None)
    factor = getattr(pipe, "vae_scale_factor", None)
    if default is None or factor is None:
        raise ValueError("model.height/model.width: this pipeline has no default resolution; set both")
    size = int(default) * int(factor)
    return int(height or size), int(width or size)


class PromptEncoder:
    """Text embeddings per caption, computed once each and kept until :meth:`forget`.

    How a caption is encoded is its pipeline's family's (:func:`pipeline.families.family_of`):
    e.g. ``prompt_embeds`` (1, 77, 768) and ``negative_prompt_embeds`` for Stable Diffusion
    1.x; plus pooled embeddings for SDXL, SD3 and FLUX; T5 embeddings with their attention
    masks for PixArt. Negative embeddings are made only under classifier-free guidance
    (``guidance_scale`` > 1 for the families that use it). A pipeline of no known family gets
    the captions as strings (encoded per call, as diffusers does).
    """

    def __init__(self, pipe, guidance_scale: float, negative_prompt: str | None = None):
        self.pipe = pipe
        self.family: Family = family_of(pipe)
        self.cfg = self.family.uses_cfg(pipe, float(guidance_scale))
        self.negative_prompt = negative_prompt
        self.cache: dict[str, dict[str, torch.Tensor]] = {}
        self.supported = self.family.encode is not None and hasattr(pipe, "encode_prompt")

    @torch.no_grad()
    def encode(self, caption: str) -> dict[str, torch.Tensor] | None:
        """Keyword arguments for the pipeline, each a tensor with batch size 1; None if unsupported."""
        if not self.supported:
            return None
        if caption not in self.cache:
            self.cache[caption] = self.family.encode(self.pipe, caption, self.cfg, self.negative_prompt)
        return self.cache[caption]

    def batch_kwargs(self, captions: Sequence[str]) -> dict[str, Any]:
        """Pipeline keyword arguments for a batch with these captions (one entry per image)."""
        if not self.supported:
            kwargs: dict[str, Any] = {"prompt": list(captions)}
            if self.negative_prompt is not None:
                kwargs["negative_prompt"] = [self.negative_prompt] * len(captions)
            return kwargs
        return self.family.batch_kwargs([self.encode(c) for c in captions])

    def forget(self, captions: Iterable[str]) -> None:
        for caption in captions:
            self.cache.pop(caption, None)


def check_sampling(pipe, settings: SamplingSettings) -> None:
    """Raise a ValueError naming the config key of a setting ``pipe``'s family cannot honour
    (a negative prompt for FLUX, which runs no classifier-free guidance)."""
    family_of(pipe).check(pipe, settings)


def to_uint8(images) -> np.ndarray:
    """Pipeline output (torch (B, C, H, W) or numpy (B, H, W, C) in [0, 1], or PIL images)
    to one uint8 array (B, H, W, 3), rounding like diffusers' own ``numpy_to_pil``."""
    if isinstance(images, torch.Tensor):
        x = torch.nan_to_num(images.float(), nan=0.0).clamp_(0.0, 1.0)
        x = (x * 255.0).round_().to(torch.uint8)
        return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    if isinstance(images, np.ndarray):
        x = np.nan_to_num(images.astype(np.float32, copy=False), nan=0.0).clip(0.0, 1.0)
        return (x * 255.0).round().astype(np.uint8)
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


@torch.no_grad()
def sample_batch(pipe, tasks: Sequence[SampleTask], settings: SamplingSettings, encoder: PromptEncoder) -> np.ndarray:
    """Make the images of ``tasks`` in one pipeline call: uint8 array (len(tasks), H, W, 3)."""
    height, width = resolve_size(pipe, settings.height, settings.width)
    # One generator per image: each pipeline's prepare_latents draws image i's noise from
    # generators[i] (diffusers' randn_tensor), whatever the batch.
    generators = [torch.Generator(device=settings.generator_device).manual_seed(t.seed) for t in tasks]
    out = pipe(
        **encoder.batch_kwargs([t.caption for t in tasks]),
        **encoder.family.call_options(pipe),
        generator=generators,
        num_inference_steps=int(settings.steps),
        guidance_scale=float(settings.guidance_scale),
        height=height,
        width=width,
        output_type="pt",
        return_dict=True,
    )
    return to_uint8(out.images)


def iter_batches(
    pipe,
    tasks: Sequence[SampleTask],
    settings: SamplingSettings,
    batch_size: int,
    encoder: PromptEncoder | None = None,
) -> Iterator[tuple[list[SampleTask], np.ndarray]]:
    """Yield ``(batch_tasks, images)`` for consecutive batches of ``tasks``.

    ``images`` is uint8 (len(batch_tasks), H, W, 3). Embeddings of a caption are dropped once
    its last task has been sampled, so memory stays flat over long prompt lists.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    encoder = encoder or PromptEncoder(pipe, settings.guidance_scale, settings.negative_prompt)
    last_use = {t.caption: i for i, t in enumerate(tasks)}
    for start in range(0, len(tasks), int(batch_size)):
        batch = list(tasks[start : start + int(batch_size)])
        images = sample_batch(pipe, batch, settings, encoder)
        end = start + len(batch)
        encoder.forget({t.caption for t in batch if last_use[t.caption] < end})
        yield batch, images
