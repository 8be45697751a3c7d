"""Stable Diffusion XL (``StableDiffusionXLPipeline``; ``conf/model/sdxl.yaml``).

Call arguments of one caption: ``prompt_embeds`` (1, 77, 2048: CLIP-L and OpenCLIP-bigG side by
side) and ``pooled_prompt_embeds`` (1, 1280), with both negatives under classifier-free guidance
(as SD's rule: :func:`pipeline.families.stable_diffusion.unet_uses_cfg`); the unconditional
input is zeros when the pipeline's ``force_zeros_for_empty_prompt``, else "" encoded. First
step: as SD's, the UNet also taking the pooled embedding and the six size/crop ids.
"""

from __future__ import annotations

import torch

from pipeline.families.denoiser import Denoiser
from pipeline.families.family import Family, named
from pipeline.families.stable_diffusion import refuse_guidance_embedding, unet_uses_cfg


def encode_pooled(pipe, caption: str, cfg: bool, negative_prompt: str | None, **more_prompts: None) -> dict[str, torch.Tensor]:
    """SDXL and SD3: ``encode_prompt`` gives (embeds, negative, pooled, negative pooled); the
    second (and third) text encoder get the same caption, as when only ``prompt`` is passed
    (``more_prompts``: SD3's required ``prompt_2=None, prompt_3=None``)."""
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=caption,
        device=pipe._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=negative_prompt,
        **more_prompts,
    )
    if not cfg:
        negative = negative_pooled = None
    return named(
        prompt_embeds=positive,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
    )


class StableDiffusionXLDenoiser(Denoiser):
    """SDXL: the UNet also takes the pooled text embedding and the size/crop ids (added conditions)."""

    encoder = staticmethod(encode_pooled)

    def __init__(self, pipe, height, width, steps, guidance_scale):
        refuse_guidance_embedding(pipe)
        super().__init__(pipe, height, width, steps, guidance_scale)

    def time_ids(self, batch: int, pooled_dim: int) -> torch.Tensor:
        """(batch, 6): original size, crop top-left (0, 0), target size: the pipeline's defaults for this size."""
        encoder_2 = self.pipe.text_encoder_2
        projection_dim = encoder_2.config.projection_dim if encoder_2 is not None else pooled_dim
        size = (self.height, self.width)
        ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=self.dtype, text_encoder_projection_dim=projection_dim)
        return ids.to(self.device).repeat(batch, 1)

    def predict(self, x, t, conditioning):
        pooled = conditioning["pooled_prompt_embeds"]
        added = {"text_embeds": pooled, "time_ids": self.time_ids(len(x), int(pooled.shape[-1]))}
        return self.pipe.unet(x, t, encoder_hidden_states=conditioning["prompt_embeds"], added_cond_kwargs=added).sample.float()


SDXL = Family("sdxl", encode_pooled, uses_cfg=unet_uses_cfg, denoiser=StableDiffusionXLDenoiser)
