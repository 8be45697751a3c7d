"""The first denoising step of every model family, one denoiser evaluation at a time.

The prescreen compares the denoiser's prediction for a caption with its prediction for the
pipeline's unconditional input, at the initial noise of a sampling run. What the denoiser
takes besides the noisy latents differs per family; a :class:`Denoiser` prepares it the way the
family's stock diffusers pipeline prepares its first step (read off its ``__call__``), so that
the prescreen sees the very input sampling would:

================  =====================================  =========================================  ===================
family            initial noise (model input)            conditioning (one caption)                 unconditional input
================  =====================================  =========================================  ===================
SD 1.x / 2.x      (C, H/f, W/f) x init_noise_sigma,      prompt_embeds                              "" encoded
                  scale_model_input at the first t
SDXL              as SD                                  prompt_embeds, pooled embeds (text_embeds)  the pipeline's
                                                         and the six size/crop ids (time_ids)       zeros (or "")
SD3 / SD3.5       (16, H/f, W/f), unscaled (sigma 1)     prompt_embeds, pooled_projections          "" encoded
FLUX dev/schnell  (16, H/f, W/f) packed into 2x2         T5 prompt_embeds, CLIP pooled, text ids;   "" (the same
                  patches (tokens, 64) + image ids        dev: guidance embedding at the config's    guidance)
                                                         guidance scale, schnell: none
PixArt-Sigma      as SD                                  T5 prompt_embeds and attention mask        "" encoded
================  =====================================  =========================================  ===================

(f: the VAE's downsampling factor; C: the denoiser's latent channels.) Timesteps follow the
pipeline too: the scheduler's ``set_timesteps(steps)``, with FLUX's sigmas and its
resolution-dependent shift ``mu`` (``calculate_shift`` of the image's token count), SD3's
where its scheduler shifts dynamically; the transformer gets FLUX's timestep divided by 1000,
SD3's and PixArt's as a batch vector, the UNets' as a scalar.

The unconditional input is what each pipeline uses under classifier-free guidance with no
negative prompt ("" encoded, or SDXL's zeros when ``force_zeros_for_empty_prompt``); FLUX runs
no classifier-free guidance, so its caption is compared with the empty caption "" at the same
guidance embedding. Captions are encoded by :mod:`pipeline.families` (the generator's
encoders), each alone, so a caption's score does not depend on the captions beside it.

Every prediction comes back as float32 in latent layout (B, C, H/f, W/f): FLUX's packed tokens
unpacked, PixArt's learned-variance channels dropped (the pipeline samples with the first C),
so that the prescreen's scores mean the same for every family.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.families import family_of

Conditioning = dict[str, torch.Tensor]


def pipeline_name(pipe) -> str:
    """What error messages call the model: the folder or hub id it was loaded from, else its class."""
    return str(getattr(pipe, "name_or_path", None) or type(pipe).__name__)


def _positive(encoded: Conditioning) -> Conditioning:
    return {name: t for name, t in encoded.items() if not name.startswith("negative_")}


def _negative(encoded: Conditioning) -> Conditioning:
    """The pipeline's unconditional tensors, under the names of the conditional ones."""
    return {name[len("negative_") :]: t for name, t in encoded.items() if name.startswith("negative_")}


def _refuse_guidance_embedding(pipe) -> None:
    if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
        raise ValueError(f"model.path={pipeline_name(pipe)}: the prescreen cannot score a UNet with a guidance "
                         "embedding (time_cond_proj_dim, e.g. LCM): it has no unconditional prediction to compare with")  # fmt: skip


class Denoiser:
    """The first step of one pipeline at one image size and step count.

    ``timesteps``: the scheduler's schedule (1-D, first = the noisiest). ``initial_noise(seeds)``:
    the first step's model input for each seed, (len(seeds), ...) in the denoiser's dtype, drawn
    from ``torch.Generator().manual_seed(seed)`` on the CPU (the same on any device).
    ``condition(caption)`` / ``unconditional()``: the conditioning tensors of one caption, each
    with batch size 1. ``predict(x, t, conditioning)``: the denoiser's output for a batch, float32
    (B, C, H/f, W/f), ``conditioning`` holding one row per image.
    """

    def __init__(self, pipe, height: int | None, width: int | None, steps: int, guidance_scale: float | None):
        self.pipe = pipe
        self.steps = int(steps)
        self.guidance_scale = guidance_scale
        self.height, self.width = self.image_size(height, width)
        self.device = pipe._execution_device
        self.timesteps = self.schedule()

    # --- what every family shares ---------------------------------------------------------

    @property
    def module(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Pixels: the asked size, else the pipeline's default (its denoiser's sample size x the VAE factor)."""
        default = getattr(self.pipe, "default_sample_size", None) or self.module.config.sample_size
        side = int(default) * int(self.pipe.vae_scale_factor)
        return int(height or side), int(width or side)

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H/f, W/f) of one image's initial latents."""
        factor = self.pipe.vae_scale_factor
        return self.module.config.in_channels, self.height // factor, self.width // factor

    def draw(self, seeds: list[int]) -> torch.Tensor:
        """Standard normal latents (len(seeds), C, H/f, W/f), float32 on the CPU, one generator per seed."""
        shape = self.latent_shape()
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def schedule(self) -> torch.Tensor:
        self.pipe.scheduler.set_timesteps(self.steps, device=self.device)
        return self.pipe.scheduler.timesteps

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """x_T scaled as the pipeline's prepare_latents and the scheduler's first scale_model_input do."""
        scheduler = self.pipe.scheduler
        noise = self.draw(seeds).to(self.device, self.dtype) * scheduler.init_noise_sigma
        # Euler-type schedulers index their sigmas by a step counter that set_timesteps resets:
        # reset it so that the scaling is the first step's, however often this is called.
        self.pipe.scheduler.set_timesteps(self.steps, device=self.device)
        return scheduler.scale_model_input(noise, self.timesteps[0])

    def encode(self, caption: str, unconditional: bool) -> Conditioning:
        """One caption's conditioning through the family's encoder (:mod:`pipeline.families`).

        ``unconditional``: encode as under classifier-free guidance with no negative prompt
        and return the pipeline's negative tensors, renamed as the conditional ones: "" encoded
        (SD, SD3, PixArt) or SDXL's zeros under ``force_zeros_for_empty_prompt``. A family with
        no negative input (FLUX) gets the empty caption itself.
        """
        encoded = family_of(self.pipe).encode(self.pipe, caption, unconditional, None)
        negative = _negative(encoded)
        return negative if unconditional and negative else _positive(encoded)

    def condition(self, caption: str) -> Conditioning:
        return self.encode(caption, unconditional=False)

    def unconditional(self) -> Conditioning:
        return self.encode("", unconditional=True)

    def predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        raise NotImplementedError


class StableDiffusionDenoiser(Denoiser):
    """SD 1.x/2.x (epsilon or v-prediction, as the scheduler says; the output is the UNet's either way)."""

    def __init__(self, pipe, height, width, steps, guidance_scale):
        _refuse_guidance_embedding(pipe)
        super().__init__(pipe, height, width, steps, guidance_scale)

    def predict(self, x, t, conditioning):
        return self.pipe.unet(x, t, encoder_hidden_states=conditioning["prompt_embeds"]).sample.float()


class StableDiffusionXLDenoiser(Denoiser):
    """SDXL: the UNet also takes the pooled text embedding and the size/crop ids (added conditions)."""

    def __init__(self, pipe, height, width, steps, guidance_scale):
        _refuse_guidance_embedding(pipe)
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


class StableDiffusion3Denoiser(Denoiser):
    """SD3/SD3.5 (MMDiT, rectified flow): the transformer predicts the velocity."""

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
                (h // patch) * (w // patch), scheduler.config.get("base_image_seq_len", 256), scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.16),
            )  # fmt: skip
        timesteps, _ = retrieve_timesteps(scheduler, self.steps, self.device, **kwargs)
        return timesteps

    def initial_noise(self, seeds):
        # prepare_latents draws plain N(0, I) latents (sigma 1 at the first step); no scaling.
        return self.draw(seeds).to(self.device, self.dtype)

    def predict(self, x, t, conditioning):
        out = self.module(hidden_states=x, timestep=t.expand(len(x)), encoder_hidden_states=conditioning["prompt_embeds"],
                          pooled_projections=conditioning["pooled_prompt_embeds"], return_dict=False)[0]  # fmt: skip
        return out.float()


class FluxDenoiser(Denoiser):
    """FLUX.1 dev (guidance-distilled: the guidance scale is an input) and schnell (no guidance input).

    The transformer sees the latents as a sequence of 2x2 patches (tokens, 4 C) with their
    position ids, the T5 tokens with theirs (zeros), the CLIP pooled embedding and the timestep
    / 1000; its output is unpacked back to (B, C, H/f, W/f)."""

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
            (h // 2) * (w // 2), scheduler.config.get("base_image_seq_len", 256), scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15),
        )  # fmt: skip
        timesteps, _ = retrieve_timesteps(scheduler, self.steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps

    def initial_noise(self, seeds):
        channels, h, w = self.latent_shape()
        noise = self.draw(seeds).to(self.device, self.dtype)
        return self.pipe._pack_latents(noise, len(seeds), channels, h, w)

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
            hidden_states=x, timestep=t.expand(len(x)).to(x.dtype) / 1000, guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"], encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]  # fmt: skip
        return self.pipe._unpack_latents(out, self.height, self.width, self.pipe.vae_scale_factor).float()


class PixArtDenoiser(Denoiser):
    """PixArt-Sigma: a DiT with T5 cross-attention (padding masked); predicts noise and a variance."""

    @property
    def module(self):
        return self.pipe.transformer

    def predict(self, x, t, conditioning):
        timestep = (t[None] if t.dim() == 0 else t).to(self.device).expand(len(x))
        out = self.module(x, encoder_hidden_states=conditioning["prompt_embeds"],
                          encoder_attention_mask=conditioning["prompt_attention_mask"], timestep=timestep,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]  # fmt: skip
        channels = self.module.config.in_channels
        if self.module.config.out_channels // 2 == channels:  # learned sigma: the sampler uses the first half
            out = out[:, :channels]
        return out.float()


# By pipeline.families' family name.
DENOISERS: dict[str, type[Denoiser]] = {
    "sd": StableDiffusionDenoiser,
    "sdxl": StableDiffusionXLDenoiser,
    "sd3": StableDiffusion3Denoiser,
    "flux": FluxDenoiser,
    "pixart": PixArtDenoiser,
}


def denoiser_for(pipe, height: int | None, width: int | None, steps: int, guidance_scale: float | None = None) -> Denoiser:
    """The :class:`Denoiser` of ``pipe``'s family (by its class or a parent class, :func:`pipeline.families.family_of`).

    Raises a one-line ValueError naming ``model.path`` for a pipeline of no family here.
    """
    family = family_of(pipe).name
    if family not in DENOISERS:
        raise ValueError(
            f"model.path={pipeline_name(pipe)}: the prescreen cannot score a {type(pipe).__name__}; it scores "
            "StableDiffusionPipeline (SD 1.x/2.x), StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline "
            "and PixArtSigmaPipeline models and their subclasses"
        )
    return DENOISERS[family](pipe, height, width, steps, guidance_scale)
