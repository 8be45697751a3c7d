"""PixArt-Sigma (``PixArtSigmaPipeline``, a DiT with T5 cross-attention; ``conf/model/pixart_sigma.yaml``).

Call arguments of one caption: ``prompt_embeds`` (1, 300, 4096: T5) and
``prompt_attention_mask`` (1, 300), with both negatives under classifier-free guidance
(guidance scale > 1). Every call: no resolution binning, no caption cleaning, 300 tokens.
First step: as SD's UNet pipelines (scaled noise, the scheduler's first timestep), the
transformer taking the T5 embeddings with their mask; of its noise-and-variance output only
the noise channels are kept.
"""

from __future__ import annotations

import torch

from pipeline.families.denoiser import Denoiser
from pipeline.families.family import Family, named

# PixArt's T5 context: 300 tokens (the pipeline's default and PixArt-Sigma's training length).
PIXART_TOKENS = 300


def encode(pipe, caption: str, cfg: bool, negative_prompt: str | None) -> dict[str, torch.Tensor]:
    """T5 embeddings padded to 300 tokens with their attention masks (padding is masked out).
    ``clean_caption=False``: the caption is encoded exactly as written, the training caption
    the audit asks about; diffusers' default cleaning rewrites it only where the optional
    packages bs4 and ftfy are installed, which would make the pixels depend on them."""
    positive, mask, negative, negative_mask = pipe.encode_prompt(
        caption,
        do_classifier_free_guidance=cfg,
        negative_prompt=negative_prompt or "",
        num_images_per_prompt=1,
        device=pipe._execution_device,
        clean_caption=False,
        max_sequence_length=PIXART_TOKENS,
    )
    return named(
        prompt_embeds=positive,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
    )


class PixArtDenoiser(Denoiser):
    """PixArt-Sigma: a DiT with T5 cross-attention (padding masked); predicts noise and a variance."""

    encoder = staticmethod(encode)

    @property
    def module(self):
        return self.pipe.transformer

    def predict(self, x, t, conditioning):
        timestep = (t[None] if t.dim() == 0 else t).to(self.device).expand(len(x))
        out = self.module(
            x,
            encoder_hidden_states=conditioning["prompt_embeds"],
            encoder_attention_mask=conditioning["prompt_attention_mask"],
            timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        channels = self.module.config.in_channels
        if self.module.config.out_channels // 2 == channels:  # learned sigma: the sampler uses the first half
            out = out[:, :channels]
        return out.float()


# No resolution binning. With binning (the pipeline's default) the image is rendered at the
# nearest of its trained aspect-ratio sizes and then resized and cropped to the asked size: the
# sample would be an interpolation, not the model's output, at any size not in the table (at the
# default 1024x1024, binning changes nothing). negative_prompt=None because the pipeline
# refuses its default "" together with negative embeddings.
PIXART = Family(
    "pixart",
    encode,
    call_options=lambda pipe: {
        "use_resolution_binning": False,
        "negative_prompt": None,
        "clean_caption": False,
        "max_sequence_length": PIXART_TOKENS,
    },
    denoiser=PixArtDenoiser,
)
