"""Stable Diffusion 3 and 3.5 (``StableDiffusion3Pipeline``, MMDiT, rectified flow; ``conf/model/sd3.yaml``).

Call arguments of one caption: ``prompt_embeds`` (1, 77 + 256, 4096: CLIP-L and CLIP-G side by
side, padded to T5's width, then T5) and ``pooled_prompt_embeds`` (1, 2048), with both
negatives under classifier-free guidance (guidance scale > 1). First step: the transformer on
unscaled N(0, I) latents (16, H/f, W/f) at the first timestep of the scheduler's schedule
(shifted with the image's token count where the scheduler shifts dynamically); it predicts
the velocity.
"""

from __future__ import annotations

import torch

from pipeline.families.denoiser import Denoiser, flow_noised
from pipeline.families.family import Family
from pipeline.families.sdxl import encode_pooled


def encode(pipe, caption: str, cfg: bool, negative_prompt: str | None) -> dict[str, torch.Tensor]:
    return encode_pooled(pipe, caption, cfg, negative_prompt, prompt_2=None, prompt_3=None)


class StableDiffusion3Denoiser(Denoiser):
    """SD3/SD3.5 (MMDiT, rectified flow): the transformer predicts the velocity."""

    encoder = staticmethod(encode)

    @property
    def module(self):
        return self.pipe.transformer

    def schedule(self):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

        scheduler, kwargs = self.pipe.scheduler, {}
        if scheduler.config.get("use_dynamic_shifting", None):
            _, h, w = self.latent_shape()
            patch = self.module.config.patch_size
            kwargs["mu"] = calculate_shift(
                (h // patch) * (w // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(scheduler, self.steps, self.device, **kwargs)
        return timesteps

    def noised(self, latents, noise, t):
        """Rectified flow: input ``(1 - s) x0 + s noise`` with ``s = t / num_train_timesteps`` (the
        scheduler's ``scale_noise``), target the velocity ``noise - x0``."""
        return flow_noised(self, latents, noise, t)

    def initial_noise(self, seeds):
        # prepare_latents draws plain N(0, I) latents (sigma 1 at the first step); no scaling.
        return self.draw(seeds).to(self.device, self.dtype)

    def predict(self, x, t, conditioning):
        out = self.module(
            hidden_states=x,
            timestep=t.expand(len(x)),
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
        return out.float()


SD3 = Family("sd3", encode, denoiser=StableDiffusion3Denoiser)
