"""The first denoising step of a model family, one denoiser evaluation at a time (:class:`Denoiser`).

The prescreen compares the denoiser's prediction for a caption with its prediction for the
pipeline's unconditional input, at the initial noise of a sampling run. What the denoiser
takes besides the noisy latents differs per family; a :class:`Denoiser` prepares it the way the
family's stock diffusers pipeline prepares its first step (read off its ``__call__``), so that
the prescreen sees the very input sampling would (each row is a subclass in its family's
module of :mod:`pipeline.families`):

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
guidance embedding. Captions are encoded by the family's encoder (the generator's,
:attr:`pipeline.families.family.Family.encode`), each alone, so a caption's score does not
depend on the captions beside it.

Every prediction comes back as float32 in latent layout (B, C, H/f, W/f): FLUX's packed tokens
unpacked, PixArt's learned-variance channels dropped (the pipeline samples with the first C),
so that the prescreen's scores mean the same for every family.
"""

from __future__ import annotations

import torch

from pipeline.families.family import Encoder

Conditioning = dict[str, torch.Tensor]


def pipeline_name(pipe) -> str:
    """What error messages call the model: the folder or hub id it was loaded from, else its class."""
    return str(getattr(pipe, "name_or_path", None) or type(pipe).__name__)


def flow_noised(denoiser: Denoiser, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """(model input, target) of a rectified-flow model at timestep ``t`` (sigma ``t / num_train_timesteps``,
    the flow-matching schedulers' timesteps being sigmas x that): ``(1 - s) x0 + s noise`` and ``noise - x0``,
    in latent layout (B, C, H/f, W/f)."""
    sigma = float(t) / float(denoiser.pipe.scheduler.config.num_train_timesteps)
    x = (1.0 - sigma) * latents + sigma * noise
    return x.to(denoiser.device, denoiser.dtype), (noise - latents).to(denoiser.device)


def _positive(encoded: Conditioning) -> Conditioning:
    return {name: t for name, t in encoded.items() if not name.startswith("negative_")}


def _negative(encoded: Conditioning) -> Conditioning:
    """The pipeline's unconditional tensors, under the names of the conditional ones."""
    return {name[len("negative_") :]: t for name, t in encoded.items() if name.startswith("negative_")}


class Denoiser:
    """The first step of one pipeline at one image size and step count.

    ``timesteps``: the scheduler's schedule (1-D, first = the noisiest). ``initial_noise(seeds)``:
    the first step's model input for each seed, (len(seeds), ...) in the denoiser's dtype, drawn
    from ``torch.Generator().manual_seed(seed)`` on the CPU (the same on any device).
    ``condition(caption)`` / ``unconditional()``: the conditioning tensors of one caption, each
    with batch size 1. ``predict(x, t, conditioning)``: the denoiser's output for a batch, float32
    (B, C, H/f, W/f), ``conditioning`` holding one row per image.

    A family's subclass sets ``encoder`` (its :class:`pipeline.families.family.Family`'s encode),
    defines ``predict`` and overrides what else its pipeline does differently from a UNet
    pipeline's first step (the base class's module, schedule and initial noise).
    """

    encoder: Encoder

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
        """One caption's conditioning through the family's encoder (:attr:`encoder`).

        ``unconditional``: encode as under classifier-free guidance with no negative prompt
        and return the pipeline's negative tensors, renamed as the conditional ones: "" encoded
        (SD, SD3, PixArt) or SDXL's zeros under ``force_zeros_for_empty_prompt``. A family with
        no negative input (FLUX) gets the empty caption itself.
        """
        encoded = self.encoder(self.pipe, caption, unconditional, None)
        negative = _negative(encoded)
        return negative if unconditional and negative else _positive(encoded)

    def condition(self, caption: str) -> Conditioning:
        return self.encode(caption, unconditional=False)

    def unconditional(self) -> Conditioning:
        return self.encode("", unconditional=True)

    def predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    # --- training images: the denoising loss (the prescreen's own_images score) ------------

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Clean latents (B, C, H/f, W/f), float32, of images ``pixels`` (B, 3, H, W) in [-1, 1] at
        :attr:`height` x :attr:`width`, as the model was trained on them: the VAE encoder's mean
        (an ``AutoencoderTiny``'s latents), minus the VAE's ``shift_factor`` (where it has one),
        times its ``scaling_factor``; the pixels themselves for a pipeline with no VAE."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return pixels.float()
        out = vae.encode(pixels.to(self.device, vae.dtype))
        latents = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents.float() - shift) * float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)).float()

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training objective at timestep ``t``: (model input, target) for clean ``latents`` and
        ``noise`` (both float32 (B, C, H/f, W/f)); ``predict(input, t, c)`` is compared with the target.

        Here (the UNet families and PixArt, DDPM-type schedules with ``alphas_cumprod``): input
        ``sqrt(a) x0 + sqrt(1 - a) noise`` with ``a = alphas_cumprod[t]`` (the scheduler's
        ``add_noise``, or an Euler-type scheduler's ``x0 + sigma noise`` after its ``scale_model_input``,
        the same; a fractional timestep rounded to the nearest trained one), target the noise (``epsilon``), ``sqrt(a) noise - sqrt(1 - a) x0``
        (``v_prediction``) or ``x0`` (``sample``), as the scheduler's ``prediction_type`` says.
        """
        scheduler = self.pipe.scheduler
        alpha = scheduler.alphas_cumprod.to(torch.float32)[int(round(float(t)))]
        signal, sigma = alpha.sqrt(), (1 - alpha).sqrt()
        x = signal * latents + sigma * noise
        kind = scheduler.config.get("prediction_type", "epsilon")
        targets = {"epsilon": noise, "v_prediction": signal * noise - sigma * latents, "sample": latents}
        if kind not in targets:
            raise ValueError(f"model.path={pipeline_name(self.pipe)}: no denoising target for prediction_type {kind!r}")
        return x.to(self.device, self.dtype), targets[kind].to(self.device)
