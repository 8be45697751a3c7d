"""Stable Diffusion 1.x and 2.x (``StableDiffusionPipeline``; ``conf/model/sd14.yaml``, ``sd21.yaml``, ``demo.yaml``).

Call arguments of one caption: ``prompt_embeds`` (1, 77, 768; 1024 for SD 2.x), with
``negative_prompt_embeds`` of the same shape under classifier-free guidance (guidance scale > 1
and a UNet without a guidance embedding). First step: the UNet on (C, H/f, W/f) noise scaled by
the scheduler's ``init_noise_sigma`` and ``scale_model_input``, the caption's embeddings as
context; its output is the noise (or velocity, for v-prediction) prediction.
"""

from __future__ import annotations

import torch

from pipeline.families.denoiser import Denoiser, pipeline_name
from pipeline.families.family import Family, named


def unet_uses_cfg(pipe, guidance_scale: float) -> bool:
    """The SD/SDXL pipelines' own rule: guidance above 1, unless the UNet has a guidance embedding (LCM)."""
    return guidance_scale > 1.0 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


def refuse_guidance_embedding(pipe) -> None:
    """Raises a one-line ValueError naming ``model.path`` for a UNet with a guidance embedding."""
    if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
        raise ValueError(
            f"model.path={pipeline_name(pipe)}: the prescreen cannot score a UNet with a guidance "
            "embedding (time_cond_proj_dim, e.g. LCM): it has no unconditional prediction to compare with"
        )


def encode(pipe, caption: str, cfg: bool, negative_prompt: str | None) -> dict[str, torch.Tensor]:
    positive, negative = pipe.encode_prompt(
        prompt=caption,
        device=pipe._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=negative_prompt,
    )
    return named(prompt_embeds=positive, negative_prompt_embeds=negative if cfg else None)


class StableDiffusionDenoiser(Denoiser):
    """SD 1.x/2.x (epsilon or v-prediction, as the scheduler says; the output is the UNet's either way)."""

    encoder = staticmethod(encode)

    def __init__(self, pipe, height, width, steps, guidance_scale):
        refuse_guidance_embedding(pipe)
        super().__init__(pipe, height, width, steps, guidance_scale)

    def predict(self, x, t, conditioning):
        return self.pipe.unet(x, t, encoder_hidden_states=conditioning["prompt_embeds"]).sample.float()


SD = Family("sd", encode, uses_cfg=unet_uses_cfg, denoiser=StableDiffusionDenoiser)
