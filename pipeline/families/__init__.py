"""Model families: how each family's diffusers pipeline is called with precomputed text
embeddings, and how its first denoising step is taken, one module per family.

The generator encodes every caption alone, once, and repeats its embeddings for its samples
(:class:`pipeline.generate.sampling.PromptEncoder`), so that batches can mix prompts and a
sample does not depend on its batch; the prescreen scores a caption at the first denoising
step (:func:`denoiser_for`). What "the embeddings" are, which other arguments a call needs and
what the denoiser takes depend on the family; a :class:`Family` says it for one, and
:func:`family_of` finds the one of a pipeline (by its class or a parent class, so subclasses
are served too):

=========================  ==============================================================  ====================
pipeline class (module)    one caption's keyword arguments (published models' shapes)     guidance
=========================  ==============================================================  ====================
StableDiffusionPipeline    prompt_embeds (1, 77, 768; 1024 for SD 2.x) [+ negative]         classifier-free > 1
(stable_diffusion)
StableDiffusionXLPipeline  prompt_embeds (1, 77, 2048), pooled_prompt_embeds (1, 1280)      classifier-free > 1
(sdxl)                     [+ both negatives]
StableDiffusion3Pipeline   prompt_embeds (1, 77 + 256, 4096: CLIP-L and CLIP-G side by      classifier-free > 1
(sd3)                      side, padded, then T5), pooled_prompt_embeds (1, 2048)
                           [+ both negatives]
FluxPipeline               prompt_embeds (1, 512 dev / 256 schnell, 4096: T5),              distilled (embedded)
(flux)                     pooled_prompt_embeds (1, 768: CLIP-L)
PixArtSigmaPipeline        prompt_embeds (1, 300, 4096: T5), prompt_attention_mask          classifier-free > 1
(pixart)                   (1, 300) [+ both negatives]
=========================  ==============================================================  ====================

Negative embeddings (in brackets) are made only where the family runs classifier-free
guidance at this scale, from ``negative_prompt`` (null: the pipeline's own unconditional
input, "" or SDXL's zeros). Every tensor has the batch on its first axis, so a batch's
arguments are the per-caption ones concatenated (:meth:`Family.batch_kwargs`).

A pipeline of another class gets the captions as strings (diffusers encodes them per call):
correct for any text-to-image pipeline, just without the encode-once saving; the prescreen
refuses it.

Besides the family modules: :mod:`pipeline.families.family` (the :class:`Family` record),
:mod:`pipeline.families.denoiser` (the first-step :class:`~pipeline.families.denoiser.Denoiser`
every family's adapter extends) and :mod:`pipeline.families.random_pipelines` (every family's
stock pipeline with random weights, tiny for the tests or at the published size for the
generator benchmark, built offline). Each family's published settings are in ``conf/model/``.
"""

from __future__ import annotations

from pipeline.families.denoiser import Conditioning, Denoiser, pipeline_name
from pipeline.families.family import Encoder, Family
from pipeline.families.flux import FLUX, FluxDenoiser, flux_sequence_length
from pipeline.families.pixart import PIXART, PIXART_TOKENS, PixArtDenoiser
from pipeline.families.sd3 import SD3, StableDiffusion3Denoiser
from pipeline.families.sdxl import SDXL, StableDiffusionXLDenoiser
from pipeline.families.stable_diffusion import SD, StableDiffusionDenoiser

OTHER = Family("other", None)

# Keyed by pipeline class name (matched along the class's parents): no diffusers import needed.
FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": SD,
    "StableDiffusionXLPipeline": SDXL,
    "StableDiffusion3Pipeline": SD3,
    "FluxPipeline": FLUX,
    "PixArtSigmaPipeline": PIXART,
}

# The first-step adapters, by family name.
DENOISERS: dict[str, type[Denoiser]] = {family.name: family.denoiser for family in FAMILIES.values()}


def family_of(pipe) -> Family:
    """The :class:`Family` serving ``pipe``'s class (or its nearest registered parent); :data:`OTHER` if none."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return OTHER


def denoiser_for(pipe, height: int | None, width: int | None, steps: int, guidance_scale: float | None = None) -> Denoiser:
    """The :class:`Denoiser` of ``pipe``'s family (by its class or a parent class, :func:`family_of`).

    Raises a one-line ValueError naming ``model.path`` for a pipeline of no family here.
    """
    denoiser = family_of(pipe).denoiser
    if denoiser is None:
        raise ValueError(
            f"model.path={pipeline_name(pipe)}: the prescreen cannot score a {type(pipe).__name__}; it scores "
            "StableDiffusionPipeline (SD 1.x/2.x), StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline "
            "and PixArtSigmaPipeline models and their subclasses"
        )
    return denoiser(pipe, height, width, steps, guidance_scale)


__all__ = [
    "DENOISERS",
    "FAMILIES",
    "FLUX",
    "OTHER",
    "PIXART",
    "PIXART_TOKENS",
    "SD",
    "SD3",
    "SDXL",
    "Conditioning",
    "Denoiser",
    "Encoder",
    "Family",
    "FluxDenoiser",
    "PixArtDenoiser",
    "StableDiffusion3Denoiser",
    "StableDiffusionDenoiser",
    "StableDiffusionXLDenoiser",
    "denoiser_for",
    "family_of",
    "flux_sequence_length",
    "pipeline_name",
]
