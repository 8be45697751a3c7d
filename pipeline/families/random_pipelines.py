"""Random-weight pipelines of every model family the generator supports, built offline.

    from pipeline.families.random_pipelines import build_pipeline, save_tiny_pipeline
    pipe = build_pipeline("sd3", tiny=True)            # seconds on a CPU, a few MB
    pipe = build_pipeline("flux", device="cuda", dtype=torch.bfloat16)   # FLUX.1-dev's size

Each family is its stock diffusers pipeline class with stock diffusers and transformers
modules, at one of two scales:

* full: the published architecture (layer counts, widths, text encoders, latent channels,
  scheduler config) of the model named in :data:`MODELS`, so that speed and memory are those of
  the real model; the weights are random, nothing is downloaded;
* tiny: the same structure (same classes, same text encoders in the same roles, same
  scheduler) scaled down so that a 64x64 image takes well under a second on a CPU.

Tokenizers are built locally: CLIP's byte-level BPE from open_clip's merges file (as the demo
model builds it, :func:`pipeline.demo.model.build_tokenizer`), and a T5 Unigram tokenizer
trained with the ``tokenizers`` library on a few sentences. A full-size T5 gets T5's own
vocabulary size (32,128 embeddings), of which the small tokenizer uses the first few hundred:
speed does not depend on which ids are used.

``benchmarks/generate_bench.py --family`` (full or tiny) and the tests (tiny, ``tests/families.py``)
build their models here: the same seed and configs give the same weights, bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# family -> (pipeline class, the published model whose architecture "full" reproduces).
MODELS = {
    "sd": ("StableDiffusionPipeline", "CompVis/stable-diffusion-v1-4"),
    "sd2": ("StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1 (v-prediction)"),
    "sdxl": ("StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0"),
    "sd3": ("StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-medium"),
    "flux": ("FluxPipeline", "black-forest-labs/FLUX.1-dev"),
    "flux-schnell": ("FluxPipeline", "black-forest-labs/FLUX.1-schnell"),
    "pixart": ("PixArtSigmaPipeline", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"),
}
FAMILIES = tuple(MODELS)

# Published sampling defaults per family (conf/model/*.yaml cites where each comes from):
# steps, guidance scale, image side in pixels.
DEFAULTS = {
    "sd": (50, 7.5, 512),
    "sd2": (50, 7.5, 768),
    "sdxl": (50, 5.0, 1024),
    "sd3": (40, 4.5, 1024),
    "flux": (50, 3.5, 1024),
    "flux-schnell": (4, 0.0, 1024),
    "pixart": (20, 4.5, 1024),
}
# The tiny models' image side: the smallest the tests use (every family accepts it).
TINY_SIZE = 64

# --- text encoders -------------------------------------------------------------------------

CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
    hidden_act="quick_gelu",
)
OPENCLIP_H = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, projection_dim=512, hidden_act="gelu"
)
OPENCLIP_BIGG = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu"
)
T5_XXL = dict(
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    feed_forward_proj="gated-gelu",
    vocab_size=32128,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)
CLIP_MERGES = 49152 - 256 - 2  # CLIP's full vocabulary: 49,408 tokens

TINY_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32, hidden_act="quick_gelu"
)
TINY_T5 = dict(
    d_model=32,
    d_ff=64,
    d_kv=8,
    num_heads=4,
    num_layers=2,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
)
TINY_MERGES = 500

# --- autoencoders --------------------------------------------------------------------------

_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
)
VAES = {
    "sd": dict(_SD_VAE, sample_size=512, scaling_factor=0.18215),
    "sdxl": dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    # SD3 and FLUX: 16 latent channels, a shift as well as a scale, no quant convolutions.
    "sd3": dict(
        _SD_VAE,
        latent_channels=16,
        sample_size=1024,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    "flux": dict(
        _SD_VAE,
        latent_channels=16,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}
VAES["sd2"], VAES["pixart"], VAES["flux-schnell"] = VAES["sd"], VAES["sdxl"], VAES["flux"]
# Three levels: a latent is a quarter of the image's side, as few pixels as the UNets want.
TINY_VAE = dict(
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=TINY_SIZE,
)

# --- denoisers -----------------------------------------------------------------------------

DENOISERS = {
    "sd": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    # SD 2.x: OpenCLIP-H context (1024), heads of 64 channels, linear projections in attention.
    "sd2": dict(
        sample_size=96,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=32,
    ),
    # SDXL: three levels, 1/2/10 transformer layers, context CLIP-L + bigG (768 + 1280), and the
    # pooled bigG embedding plus six size/crop numbers as an added "text_time" embedding.
    "sdxl": dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1280 + 6 * 256,
        norm_num_groups=32,
    ),
    # SD3.5 Medium (MMDiT-X): 24 joint blocks, dual attention in the first 13, RMS-normed q/k.
    "sd3": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=768 + 1280,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    # FLUX.1: 19 double-stream and 38 single-stream blocks of width 3072; dev embeds the guidance scale.
    "flux": dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    # PixArt-Sigma XL/2 at 1024: 28 DiT blocks of width 1152 with T5 cross-attention.
    "pixart": dict(
        sample_size=128,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=28,
        attention_head_dim=72,
        num_attention_heads=16,
        cross_attention_dim=1152,
        caption_channels=4096,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        num_embeds_ada_norm=1000,
        use_additional_conditions=False,
        interpolation_scale=2,
    ),
}
DENOISERS["flux-schnell"] = dict(DENOISERS["flux"], guidance_embeds=False)

_TINY_UNET = dict(
    sample_size=TINY_SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8
)
TINY_DENOISERS = {
    "sd": dict(
        _TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
    "sd2": dict(
        _TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "sdxl": dict(
        _TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    ),
    "sd3": dict(
        sample_size=TINY_SIZE // 4,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ),
    "flux": dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    # sample_size 32 is one that PixArt's resolution binning knows (the plain loop may use it).
    "pixart": dict(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        cross_attention_dim=16,
        caption_channels=32,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        num_embeds_ada_norm=1000,
        use_additional_conditions=False,
    ),
}
TINY_DENOISERS["flux-schnell"] = dict(TINY_DENOISERS["flux"], guidance_embeds=False)
# SD3 pads the CLIP context (two encoders side by side) to T5's width: its T5 must be wider.
TINY_T5_WIDTH = {"sd3": 64}

# --- schedulers (the published scheduler_config.json of each model) ------------------------

_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULERS = {
    "sd": ("PNDMScheduler", dict(_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
    "sd2": (
        "DDIMScheduler",
        dict(_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction"),
    ),
    "sdxl": (
        "EulerDiscreteScheduler",
        dict(_SD_BETAS, steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon"),
    ),
    "sd3": ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
    # FLUX.1-dev shifts the schedule with the image's token count; schnell does not shift.
    "flux": (
        "FlowMatchEulerDiscreteScheduler",
        dict(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            base_shift=0.5,
            max_shift=1.15,
        ),
    ),
    "flux-schnell": ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)),
    "pixart": (
        "DPMSolverMultistepScheduler",
        dict(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            algorithm_type="dpmsolver++",
            solver_order=2,
            prediction_type="epsilon",
            lower_order_final=True,
        ),
    ),
}

# A few captions the T5 tokenizer is trained on: enough for every lowercase letter and the
# usual punctuation to be a piece of its own, and common caption words to be one piece.
T5_TRAINING_TEXT = [
    "a photograph of an astronaut riding a horse on the moon",
    "a bowl of fruit on a wooden table, oil painting by a famous artist",
    "the living room of a modern house, interior design catalogue",
    "portrait of a smiling woman in a red coat, studio lighting",
    "a lighthouse on a cliff at sunset; waves, rocks and quiet sky",
    "a golden retriever puppy sitting in the grass with a blue ball",
    "an old map of the world with sea monsters (engraving)",
    "a bottle of perfume on a marble counter - product photo, 4k",
    "the quick brown fox jumps over the lazy dog: 0123456789!?",
    "vintage poster of a jazz festival in new york city, 1950s",
    "watercolor of a snowy village with a church and a frozen lake",
    "close-up of a cat's green eyes; macro photography, high detail",
]


def t5_tokenizer(vocab_size: int = 300, max_length: int = 512):
    """A T5 tokenizer (transformers' ``T5Tokenizer``, a Unigram model of the ``tokenizers``
    library) trained on :data:`T5_TRAINING_TEXT`: ids 0, 1, 2 are ``<pad>``, ``</s>``,
    ``<unk>`` as in T5; every character of printable ASCII is in the vocabulary, so any English
    caption encodes without unknowns. Deterministic: the same vocabulary every time."""
    import json
    import string

    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5Tokenizer

    trainer_tokenizer = Tokenizer(Unigram())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation) + ["▁"],
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(T5_TRAINING_TEXT, trainer=trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(trainer_tokenizer.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def clip_tokenizer(n_merges: int):
    """CLIP's tokenizer with its first ``n_merges`` BPE merges, 77 tokens (the demo model's builder)."""
    from pipeline.demo.model import build_tokenizer

    return build_tokenizer(n_merges, 77)


def _clip(config: dict[str, Any], tokenizer, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(text_config)


def _t5(config: dict[str, Any], tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = {"vocab_size": len(tokenizer), **config}
    return T5EncoderModel(
        T5Config(
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            is_encoder_decoder=False,
            **config,
        )
    )


def _scheduler(family: str):
    import diffusers

    name, config = SCHEDULERS[family]
    return getattr(diffusers, name)(**config)


def build_pipeline(
    family: str, *, tiny: bool = False, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
):
    """The stock diffusers pipeline of ``family`` (one of :data:`FAMILIES`) with random weights.

    ``tiny``: the scaled-down structure (seconds on a CPU) instead of the published one.
    Modules are created on ``device`` (a full-size FLUX initialises in seconds on a GPU, in
    minutes on a CPU) from ``torch.manual_seed(seed)``, then cast to ``dtype``. The progress
    bar is off and there is no safety checker.
    """
    import diffusers
    from diffusers import AutoencoderKL

    if family not in MODELS:
        raise ValueError(f"family: must be one of {', '.join(FAMILIES)}; got {family!r}")
    pipeline_class = getattr(diffusers, MODELS[family][0])
    clip = TINY_CLIP if tiny else None
    clip_tok = clip_tokenizer(TINY_MERGES if tiny else CLIP_MERGES)
    t5_config = dict(TINY_T5, d_model=TINY_T5_WIDTH.get(family, TINY_T5["d_model"])) if tiny else T5_XXL
    torch.manual_seed(seed)
    parts: dict[str, Any] = {"scheduler": _scheduler(family)}
    with torch.device(device):
        vae_config = dict(VAES[family], **TINY_VAE) if tiny else VAES[family]
        parts["vae"] = AutoencoderKL(**vae_config)
        denoiser = (TINY_DENOISERS if tiny else DENOISERS)[family]
        if family in ("sd", "sd2"):
            parts.update(
                unet=diffusers.UNet2DConditionModel(**denoiser),
                tokenizer=clip_tok,
                text_encoder=_clip(clip or (CLIP_L if family == "sd" else OPENCLIP_H), clip_tok, False),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        elif family == "sdxl":
            parts.update(
                unet=diffusers.UNet2DConditionModel(**denoiser),
                tokenizer=clip_tok,
                tokenizer_2=clip_tok,
                text_encoder=_clip(clip or CLIP_L, clip_tok, False),
                text_encoder_2=_clip(clip or OPENCLIP_BIGG, clip_tok, True),
            )
        elif family == "sd3":
            t5_tok = t5_tokenizer(max_length=256)
            parts.update(
                transformer=diffusers.SD3Transformer2DModel(**denoiser),
                tokenizer=clip_tok,
                tokenizer_2=clip_tok,
                tokenizer_3=t5_tok,
                text_encoder=_clip(clip or CLIP_L, clip_tok, True),
                text_encoder_2=_clip(clip or OPENCLIP_BIGG, clip_tok, True),
                text_encoder_3=_t5(t5_config, t5_tok),
            )
        elif family in ("flux", "flux-schnell"):
            t5_tok = t5_tokenizer(max_length=512 if family == "flux" else 256)
            parts.update(
                transformer=diffusers.FluxTransformer2DModel(**denoiser),
                tokenizer=clip_tok,
                tokenizer_2=t5_tok,
                text_encoder=_clip(clip or CLIP_L, clip_tok, False),
                text_encoder_2=_t5(t5_config, t5_tok),
            )
        else:  # pixart
            t5_tok = t5_tokenizer(max_length=300)
            parts.update(
                transformer=diffusers.PixArtTransformer2DModel(**denoiser), tokenizer=t5_tok, text_encoder=_t5(t5_config, t5_tok)
            )
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False).eval()
            if dtype != torch.float32:  # modules are created in float32
                part.to(dtype)
    pipe = pipeline_class(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Build the tiny ``family`` pipeline and ``save_pretrained`` it into ``directory``: a
    folder ``model.path`` can name (loaded back by ``pipeline.models.load_model``)."""
    directory = Path(directory)
    build_pipeline(family, tiny=True, seed=seed).save_pretrained(directory, safe_serialization=True)
    return directory
