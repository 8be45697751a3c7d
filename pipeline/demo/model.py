"""The demo model: Stable Diffusion's structure, small enough to train on a CPU.

A stock :class:`diffusers.StableDiffusionPipeline` whose parts are

- a frozen, randomly initialised ``CLIPTextModel`` with a real CLIP BPE tokenizer (the BPE
  merges file that open_clip ships, truncated to the most frequent merges);
- a small pixel-space ``UNet2DConditionModel`` with cross-attention;
- an ``AutoencoderTiny`` whose decoder is set to the identity map, so "latents" are pixels
  (``vae_scale_factor`` is 1) and the pipeline needs no custom code;
- a DDPM (ancestral) scheduler with the cosine noise schedule the UNet was trained with.

``DiffusionPipeline.from_pretrained(path)`` loads the saved model offline, and the generator
runs exactly the same code on it as on Stable Diffusion v1.x.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The decoder computes image = (tanh(z / 3) * 3 + 1) / 2 (see ``identity_vae``). Training data
# in [-1, 1] is mapped through the inverse, so that decoding gives the pixels back exactly.
VAE_TANH_SCALE = 3.0


@dataclass
class DemoModelConfig:
    """Sizes of the demo model. The defaults give about 4.5M parameters (18 MB in float32)."""

    resolution: int = 32
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_layers_per_block: int = 1
    # Which UNet levels have cross-attention to the caption (the first has none, as in SD).
    cross_attention_levels: tuple[bool, ...] = (False, True, True)
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 24
    bpe_merges: int = 4000
    seed: int = 0
    extra: dict = field(default_factory=dict)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE alphabet: each byte as a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def open_clip_bpe_path() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def build_tokenizer(n_merges: int, max_tokens: int) -> CLIPTokenizer:
    """A CLIP tokenizer built from open_clip's BPE file, keeping its first ``n_merges`` merges.

    The vocabulary is CLIP's: the 256 byte symbols, the same with ``</w>``, one entry per
    merge, then the start and end tokens. Fewer merges only split rare words into more pieces.
    """
    with gzip.open(open_clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_tokens)


def build_text_encoder(config: DemoModelConfig, vocab_size: int) -> CLIPTextModel:
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=config.text_width,
        intermediate_size=config.text_width * 4,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_tokens,
        projection_dim=config.text_width,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    encoder = CLIPTextModel(text_config)
    encoder.requires_grad_(False)
    return encoder.eval()


def build_unet(config: DemoModelConfig) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if attn else "DownBlock2D" for attn in config.cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(config.cross_attention_levels))
    return UNet2DConditionModel(
        sample_size=config.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(config.unet_channels),
        layers_per_block=config.unet_layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
    )


def identity_vae() -> AutoencoderTiny:
    """An ``AutoencoderTiny`` whose decoder maps latents to pixels with no learned part.

    Decoder: ``tanh(z/3)*3`` (built in), a 3x3 conv that copies each channel and adds 3 (so the
    ReLU after it passes everything), a 3x3 conv that halves and subtracts 1, then the built-in
    ``*2 - 1``: image = tanh(z/3)*3 in [-1, 1]. The encoder is the linear map back to
    [-1, 1] (exact up to the tanh's curvature, under 4% at the extremes); text-to-image never uses it.
    """
    vae = AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(3,),
        decoder_block_out_channels=(3,),
        num_encoder_blocks=(0,),
        num_decoder_blocks=(0,),
        latent_channels=3,
        act_fn="relu",
        scaling_factor=1.0,
    )
    with torch.no_grad():
        for conv in [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]:
            conv.weight.zero_()
            if conv.bias is not None:
                conv.bias.zero_()
        dec_in, dec_out = vae.decoder.layers[0], vae.decoder.layers[2]
        enc_in, enc_out = vae.encoder.layers[0], vae.encoder.layers[1]
        for c in range(3):
            dec_in.weight[c, c, 1, 1] = 1.0
            dec_out.weight[c, c, 1, 1] = 0.5
            enc_in.weight[c, c, 1, 1] = 1.0
            enc_out.weight[c, c, 1, 1] = 2.0
        dec_in.bias.fill_(VAE_TANH_SCALE)
        dec_out.bias.fill_(-1.0)  # 0.5 * (x + 3) - 1 = (x + 1) / 2, in [0, 1]
        enc_out.bias.fill_(-1.0)  # encoder input is (x + 1) / 2; 2 * that - 1 = x
    vae.requires_grad_(False)
    return vae.eval()


def pixels_to_latents(pixels: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] to the latents that ``identity_vae`` decodes back to them exactly."""
    clipped = pixels.clamp(-1.0, 1.0)
    return VAE_TANH_SCALE * torch.atanh(clipped / VAE_TANH_SCALE)


def build_scheduler() -> DDPMScheduler:
    """Ancestral DDPM sampling over the cosine schedule ("squaredcos_cap_v2"), epsilon
    prediction, 1000 training steps (any number of sampling steps, "trailing" spacing).

    Why DDPM and not DDIM: a small, CPU-trained model predicts epsilon with errors that
    deterministic DDIM carries to the end as colour casts and speckle; the fresh noise of each
    ancestral step washes them out. At step 8,000 of the shipped model's training (25 steps,
    guidance 3, 4 seeds of each 150-copy and 40-copy original), samples within 0.15 tiled L2 of
    a training copy: DDPM 54% and 42%, DDIM 29% and 8%, DPM-Solver++ 25% and 13%. Every step's
    noise comes from the sample's own generator, so a sample is still fixed by its seed.

    The predicted clean image is clipped to [-1, 1] at every step: near t = 1000 the cosine
    schedule leaves almost no signal, and dividing by its tiny sqrt(alpha_bar) blows small
    epsilon errors up into saturated pixels (pixel-space models clip for this reason).
    ``StableDiffusionPipeline`` resets ``clip_sample`` to False (right for SD's latents), so
    the clip is expressed as dynamic thresholding with its ceiling at 1, which is the same
    thing and which the pipeline leaves alone. Latents of 1.0 decode to pixel 250 of 255.
    """
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,
        thresholding=True,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
        steps_offset=1,
        timestep_spacing="trailing",
    )


def build_pipeline(config: DemoModelConfig | None = None, **overrides) -> StableDiffusionPipeline:
    """A randomly initialised demo pipeline (seeded by ``config.seed``); for training and tests."""
    config = config or DemoModelConfig(**overrides)
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config.bpe_merges, config.max_tokens)
    text_encoder = build_text_encoder(config, vocab_size=len(tokenizer))
    pipe = StableDiffusionPipeline(
        vae=identity_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=build_unet(config),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe: StableDiffusionPipeline, directory: str | Path) -> None:
    """``save_pretrained``, minus the one config entry diffusers would warn about on loading.

    ``AutoencoderTiny`` records ``block_out_channels`` in its config (for the pipeline's
    ``vae_scale_factor``) but does not take it as an argument, so loading the saved config
    warns; it is rebuilt from ``decoder_block_out_channels`` anyway.
    """
    pipe.save_pretrained(directory, safe_serialization=True)
    strip_vae_config(Path(directory))


def strip_vae_config(directory: Path) -> None:
    config_path = directory / "vae" / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("_class_name") == "AutoencoderTiny" and config.pop("block_out_channels", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def config_dict(config: DemoModelConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
