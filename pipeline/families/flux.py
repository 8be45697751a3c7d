"""FLUX.1 dev and schnell (``FluxPipeline``; ``conf/model/flux_dev.yaml``, ``flux_schnell.yaml``).

Call arguments of one caption: ``prompt_embeds`` (1, 512 for dev / 256 for schnell, 4096: T5)
and ``pooled_prompt_embeds`` (1, 768: CLIP-L); no negatives. One transformer evaluation per
step: the pipeline puts ``guidance_scale`` into the transformer's guidance embedding when
``transformer.config.guidance_embeds`` (dev) and ignores it otherwise (schnell); its "true CFG"
(``true_cfg_scale`` with a negative prompt) is not used, so a negative prompt is refused.
First step: (16, H/f, W/f) noise packed into 2x2 patches (tokens, 64) with their position ids,
the T5 tokens with theirs (zeros), the CLIP pooled embedding, the timestep / 1000 and, for
dev, the guidance scale; the schedule is FLUX's sigmas shifted with the image's token count.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.families.denoiser import Denoiser, flow_noised
from pipeline.families.family import Family, named


def flux_sequence_length(pipe) -> int:
    """T5 tokens of a FLUX caption: 512 for guidance-distilled FLUX.1-dev, 256 for
    timestep-distilled FLUX.1-schnell (no guidance embedding), the lengths Black Forest Labs'
    reference code and the diffusers docs use for each; the rest is padding the model attends to."""
    return 512 if pipe.transformer.config.guidance_embeds else 256


def encode(pipe, caption: str, cfg: bool, negative_prompt: str | None) -> dict[str, torch.Tensor]:
    prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
        prompt=caption,
        prompt_2=None,
        device=pipe._execution_device,
        num_images_per_prompt=1,
        max_sequence_length=flux_sequence_length(pipe),
    )
    return named(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)


def no_negative_prompt(pipe, settings) -> None:
    """Raises a ValueError naming ``negative_prompt`` when one is set."""
    if settings.negative_prompt is not None:
        raise ValueError(
            "negative_prompt: FLUX pipelines run no classifier-free guidance (the guidance scale is "
            "embedded, or absent for schnell), so a negative prompt would be ignored; leave it null"
        )


class FluxDenoiser(Denoiser):
    """FLUX.1 dev (guidance-distilled: the guidance scale is an input) and schnell (no guidance input).

    The transformer sees the latents as a sequence of 2x2 patches (tokens, 4 C) with their
    position ids, the T5 tokens with theirs (zeros), the CLIP pooled embedding and the timestep
    / 1000; its output is unpacked back to (B, C, H/f, W/f)."""

    encoder = staticmethod(encode)

    @property
    def module(self):
        return self.pipe.transformer

    def image_size(self, height, width):
        side = int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor)
        return int(height or side), int(width or side)

    def latent_shape(self):
        # FluxPipeline.prepare_latents: even latent sides, so that they pack into 2x2 patches.
        factor = self.pipe.vae_scale_factor
        return self.module.config.in_channels // 4, 2 * (self.height // (factor * 2)), 2 * (self.width // (factor * 2))

    def schedule(self):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = self.pipe.scheduler
        sigmas = np.linspace(1.0, 1 / self.steps, self.steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        _, h, w = self.latent_shape()
        mu = calculate_shift(
            (h // 2) * (w // 2),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, self.steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps

    def initial_noise(self, seeds):
        channels, h, w = self.latent_shape()
        noise = self.draw(seeds).to(self.device, self.dtype)
        return self.pipe._pack_latents(noise, len(seeds), channels, h, w)

    def noised(self, latents, noise, t):
        """Rectified flow as SD3 (:func:`pipeline.families.denoiser.flow_noised`), the input packed into
        2x2 patches as :meth:`initial_noise` packs it; the target stays in latent layout, as
        :meth:`predict` unpacks its output."""
        x, target = flow_noised(self, latents, noise, t)
        channels, h, w = self.latent_shape()
        return self.pipe._pack_latents(x, len(x), channels, h, w), target

    def predict(self, x, t, conditioning):
        _, h, w = self.latent_shape()
        prompt_embeds = conditioning["prompt_embeds"]
        # encode_prompt's text ids are zeros, one row per T5 token; the image ids index the patches.
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=prompt_embeds.dtype)
        image_ids = self.pipe._prepare_latent_image_ids(len(x), h // 2, w // 2, self.device, x.dtype)
        guidance = None
        if self.module.config.guidance_embeds:
            scale = 3.5 if self.guidance_scale is None else float(self.guidance_scale)  # FluxPipeline's default
            guidance = torch.full([len(x)], scale, device=self.device, dtype=torch.float32)
        out = self.module(
            hidden_states=x,
            timestep=t.expand(len(x)).to(x.dtype) / 1000,
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return self.pipe._unpack_latents(out, self.height, self.width, self.pipe.vae_scale_factor).float()


FLUX = Family(
    "flux",
    encode,
    uses_cfg=lambda pipe, scale: False,
    call_options=lambda pipe: {"max_sequence_length": flux_sequence_length(pipe)},
    check=no_negative_prompt,
    denoiser=FluxDenoiser,
)
