"""Each model family's first denoising step: the adapters live in the family modules of
:mod:`pipeline.families` (base class :class:`pipeline.families.denoiser.Denoiser`); the
prescreen takes them from here."""

from pipeline.families import (  # noqa: F401
    DENOISERS,
    Conditioning,
    Denoiser,
    FluxDenoiser,
    PixArtDenoiser,
    StableDiffusion3Denoiser,
    StableDiffusionDenoiser,
    StableDiffusionXLDenoiser,
    denoiser_for,
    pipeline_name,
)
