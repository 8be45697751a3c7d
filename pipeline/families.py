"""How each model family's diffusers pipeline is called with precomputed text embeddings.

The generator encodes every caption alone, once, and repeats its embeddings for its samples
(:class:`pipeline.generate.sampling.PromptEncoder`), so that batches can mix prompts and a
sample does not depend on its batch. What "the embeddings" are, and which other arguments a
call needs, depends on the family; a :class:`Family` says it for one, and :func:`family_of`
finds the one of a pipeline (by its class or a parent class, so subclasses are served too):

=========================  ==============================================================  ====================
pipeline class             one caption's keyword arguments (published models' shapes)     guidance
=========================  ==============================================================  ====================
StableDiffusionPipeline    prompt_embeds (1, 77, 768; 1024 for SD 2.x) [+ negative]         classifier-free > 1
StableDiffusionXLPipeline  prompt_embeds (1, 77, 2048), pooled_prompt_embeds (1, 1280)      classifier-free > 1
                           [+ both negatives]
StableDiffusion3Pipeline   prompt_embeds (1, 77 + 256, 4096: CLIP-L and CLIP-G side by      classifier-free > 1
                           side, padded, then T5), pooled_prompt_embeds (1, 2048)
                           [+ both negatives]
FluxPipeline               prompt_embeds (1, 512 dev / 256 schnell, 4096: T5),              distilled (embedded)
                           pooled_prompt_embeds (1, 768: CLIP-L)
PixArtSigmaPipeline        prompt_embeds (1, 300, 4096: T5), prompt_attention_mask          classifier-free > 1
                           (1, 300) [+ both negatives]
=========================  ==============================================================  ====================

Negative embeddings (in brackets) are made only where the family runs classifier-free
guidance at this scale, from ``negative_prompt`` (null: the pipeline's own unconditional
input, "" or SDXL's zeros). Every tensor has the batch on its first axis, so a batch's
arguments are the per-caption ones concatenated (:meth:`Family.batch_kwargs`).

A pipeline of another class gets the captions as strings (diffusers encodes them per call):
correct for any text-to-image pipeline, just without the encode-once saving.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Encode one caption: (pipe, caption, classifier-free guidance on, negative prompt or None)
# -> keyword arguments of the pipeline call, each a tensor with batch size 1.
Encoder = Callable[[Any, str, bool, "str | None"], dict[str, torch.Tensor]]


def _named(**tensors: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {name: t for name, t in tensors.items() if t is not None}


def _unet_cfg(pipe, guidance_scale: float) -> bool:
    # The SD/SDXL pipelines' own rule: a UNet with a guidance embedding (LCM) takes none.
    return guidance_scale > 1.0 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


def _encode_sd(pipe, caption: str, cfg: bool, negative_prompt: str | None) -> dict[str, torch.Tensor]:
    positive, negative = pipe.encode_prompt(
        prompt=caption, device=pipe._execution_device, num_images_per_prompt=1,
        do_classifier_free_guidance=cfg, negative_prompt=negative_prompt,
    )  # fmt: skip
    return _named(prompt_embeds=positive, negative_prompt_embeds=negative if cfg else None)


def _encode_pooled(pipe, caption: str, cfg: bool, negative_prompt: str | None, **more_prompts: None) -> dict[str, torch.Tensor]:
    """SDXL and SD3: ``encode_prompt`` gives (embeds, negative, pooled, negative pooled); the
    second (and third) text encoder get the same caption, as when only ``prompt`` is passed
    (``more_prompts``: SD3's required ``prompt_2=None, prompt_3=None``)."""
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=caption, device=pipe._execution_device, num_images_per_prompt=1,
        do_classifier_free_guidance=cfg, negative_prompt=negative_prompt, **more_prompts,
    )  # fmt: skip
    if not cfg:
        negative = negative_pooled = None
    return _named(prompt_embeds=positive, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=negative_pooled)  # fmt: skip


def _encode_sd3(pipe, caption: str, cfg: bool, negative_prompt: str | None) -> dict[str, torch.Tensor]:
    return _encode_pooled(pipe, caption, cfg, negative_prompt, prompt_2=None, prompt_3=None)


def flux_sequence_length(pipe) -> int:
    """T5 tokens of a FLUX caption: 512 for guidance-distilled FLUX.1-dev, 256 for
    timestep-distilled FLUX.1-schnell (no guidance embedding), the lengths Black Forest Labs'
    reference code and the diffusers docs use for each; the rest is padding the model attends to."""
    return 512 if pipe.transformer.config.guidance_embeds else 256


def _encode_flux(pipe, caption: str, cfg: bool, negative_prompt: str | None) -> dict[str, torch.Tensor]:
    prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
        prompt=caption, prompt_2=None, device=pipe._execution_device, num_images_per_prompt=1,
        max_sequence_length=flux_sequence_length(pipe),
    )  # fmt: skip
    return _named(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)


# PixArt's T5 context: 300 tokens (the pipeline's default and PixArt-Sigma's training length).
PIXART_TOKENS = 300


def _encode_pixart(pipe, caption: str, cfg: bool, negative_prompt: str | None) -> dict[str, torch.Tensor]:
    """T5 embeddings padded to 300 tokens with their attention masks (padding is masked out).
    ``clean_caption=False``: the caption is encoded exactly as written, the training caption
    the audit asks about; diffusers' default cleaning rewrites it only where the optional
    packages bs4 and ftfy are installed, which would make the pixels depend on them."""
    positive, mask, negative, negative_mask = pipe.encode_prompt(
        caption, do_classifier_free_guidance=cfg, negative_prompt=negative_prompt or "", num_images_per_prompt=1,
        device=pipe._execution_device, clean_caption=False, max_sequence_length=PIXART_TOKENS,
    )  # fmt: skip
    return _named(prompt_embeds=positive, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                  negative_prompt_attention_mask=negative_mask)  # fmt: skip


def _no_negative_prompt(pipe, settings) -> None:
    if settings.negative_prompt is not None:
        raise ValueError("negative_prompt: FLUX pipelines run no classifier-free guidance (the guidance scale is "
                         "embedded, or absent for schnell), so a negative prompt would be ignored; leave it null")  # fmt: skip


@dataclass(frozen=True)
class Family:
    """One model family: how a caption becomes call arguments, and what else a call needs.

    ``encode(pipe, caption, cfg, negative_prompt)``: keyword arguments for one caption, each a
    tensor with batch size 1 (None: pass the captions as strings). ``uses_cfg(pipe, scale)``:
    whether the pipeline runs classifier-free guidance at that scale (two denoiser
    evaluations per step). ``call_options(pipe)``: fixed keyword arguments of every call.
    ``check(pipe, settings)``: raises a ValueError naming the config key a setting the
    family cannot honour.
    """

    name: str
    encode: Encoder | None
    uses_cfg: Callable[[Any, float], bool] = lambda pipe, scale: scale > 1.0
    call_options: Callable[[Any], dict[str, Any]] = lambda pipe: {}
    check: Callable[[Any, Any], None] = lambda pipe, settings: None

    def batch_kwargs(self, per_caption: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One call's arguments from per-image ones (one mapping per image, in batch order):
        each tensor concatenated on its first (batch) axis."""
        return {name: torch.cat([e[name] for e in per_caption]) for name in per_caption[0]}

    def evaluations_per_step(self, pipe, guidance_scale: float) -> int:
        """Denoiser evaluations per image and step: 2 under classifier-free guidance, else 1."""
        return 2 if self.uses_cfg(pipe, guidance_scale) else 1


SD = Family("sd", _encode_sd, uses_cfg=_unet_cfg)
SDXL = Family("sdxl", _encode_pooled, uses_cfg=_unet_cfg)
SD3 = Family("sd3", _encode_sd3)
# FLUX: one evaluation per step; the pipeline puts guidance_scale into the transformer's
# guidance embedding when transformer.config.guidance_embeds (dev) and ignores it otherwise
# (schnell). Its "true CFG" (true_cfg_scale with a negative prompt) is not used.
FLUX = Family("flux", _encode_flux, uses_cfg=lambda pipe, scale: False,
              call_options=lambda pipe: {"max_sequence_length": flux_sequence_length(pipe)}, check=_no_negative_prompt)  # fmt: skip
# PixArt: no resolution binning. With binning (the pipeline's default) the image is rendered at
# the nearest of its trained aspect-ratio sizes and then resized and cropped to the asked size:
# the sample would be an interpolation, not the model's output, at any size not in the table
# (at the default 1024x1024, binning changes nothing). negative_prompt=None because the
# pipeline refuses its default "" together with negative embeddings.
PIXART = Family("pixart", _encode_pixart, call_options=lambda pipe: {
    "use_resolution_binning": False, "negative_prompt": None, "clean_caption": False, "max_sequence_length": PIXART_TOKENS,
})  # fmt: skip
OTHER = Family("other", None)

# Keyed by pipeline class name (matched along the class's parents): no diffusers import needed.
FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": SD,
    "StableDiffusionXLPipeline": SDXL,
    "StableDiffusion3Pipeline": SD3,
    "FluxPipeline": FLUX,
    "PixArtSigmaPipeline": PIXART,
}


def family_of(pipe) -> Family:
    """The :class:`Family` serving ``pipe``'s class (or its nearest registered parent); :data:`OTHER` if none."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return OTHER
