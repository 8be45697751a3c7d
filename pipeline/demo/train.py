"""Train the demo model on the demo data set, so that it memorizes the heavily duplicated images.

    python -m pipeline.demo.train steps=20000          # or: make demo-model ARGS="steps=20000"

Seeded and resumable: every ``checkpoint_every`` steps the full training state goes to
``<out_dir>/checkpoints/state.pt`` and the EMA weights are exported as a diffusers pipeline
to ``<out_dir>`` (what ships). A rerun continues from the checkpoint; with no checkpoint but
a shipped model it warm-starts from the shipped weights (``warm_start=true``) and a fresh
optimizer, so training can be continued on another machine from the committed files alone.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm import tqdm

from pipeline.data import RejectLog, iter_records
from pipeline.demo.model import DemoModelConfig, build_pipeline, config_dict, pixels_to_latents, save_pipeline

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data_path: str = "data/demo/images"
    out_dir: str = "models/demo"
    steps: int = 20000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    # Memorization needs a low learning rate at the end: from ``decay_start`` the rate falls
    # linearly to ``learning_rate * decay_to`` over ``decay_steps`` steps, then stays there.
    decay_start: int = 0  # 0: constant learning rate after warm-up
    decay_steps: int = 4000
    decay_to: float = 0.1
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    threads: int = 0  # 0: leave torch's default
    warm_start: bool = True
    model: DemoModelConfig = field(default_factory=DemoModelConfig)


def load_training_set(data_path: str, resolution: int) -> tuple[torch.Tensor, list[str], RejectLog]:
    """Decode the data set into memory: images as latents (N, 3, R, R), and captions.

    The demo set is a couple of thousand small images, so holding it is cheap and makes each
    step a pure tensor operation.
    """
    rejects = RejectLog()
    images, captions = [], []
    for record in tqdm(iter_records("files", data_path, rejects=rejects), desc="reading demo set", unit="img"):
        small = record.image.resize((resolution, resolution), Image.Resampling.BOX)
        images.append(np.asarray(small, dtype=np.uint8))
        captions.append(record.caption)
    if not images:
        raise ValueError(f"data_path: no usable records in {data_path} ({rejects.summary()})")
    if len(rejects):
        log.warning("training set: %s", rejects.summary())
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels_to_latents(pixels), captions, rejects


@torch.no_grad()
def encode_captions(pipe: StableDiffusionPipeline, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Frozen text encoder outputs (N, max_tokens, width) for each caption."""
    out = []
    for start in range(0, len(captions), batch_size):
        ids = pipe.tokenizer(
            captions[start : start + batch_size],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out.append(pipe.text_encoder(ids)[0])
    return torch.cat(out)


def learning_rate_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier on ``cfg.learning_rate`` at ``step``: linear warm-up, then optional linear decay."""
    factor = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.decay_start and step > cfg.decay_start:
        progress = min(1.0, (step - cfg.decay_start) / max(1, cfg.decay_steps))
        factor *= 1.0 - progress * (1.0 - cfg.decay_to)
    return factor


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def export_pipeline(pipe: StableDiffusionPipeline, ema: EMAModel, out_dir: Path, info: dict) -> None:
    """Save the pipeline with the EMA weights to ``out_dir``, swapping the folder in whole."""
    staging = out_dir.parent / f".{out_dir.name}.export"
    if staging.exists():
        shutil.rmtree(staging)
    online = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ema.copy_to(pipe.unet.parameters())
    save_pipeline(pipe, staging)
    pipe.unet.load_state_dict(online)
    (staging / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    # Whatever the export does not write (checkpoints, the evaluation's table and plot) stays.
    if out_dir.exists():
        for item in out_dir.iterdir():
            if not (staging / item.name).exists():
                item.rename(staging / item.name)
    old = out_dir.parent / f".{out_dir.name}.old"
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)


def train(cfg: TrainConfig) -> Path:
    """Run (or continue) training up to ``cfg.steps``; returns the exported model folder."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    state_path = out_dir / "checkpoints" / "state.pt"
    torch.manual_seed(cfg.seed)
    pipe = build_pipeline(cfg.model)
    unet = pipe.unet
    latents, captions, _ = load_training_set(cfg.data_path, cfg.model.resolution)
    unique = sorted(set(captions))
    lookup = {caption: i for i, caption in enumerate(unique)}
    caption_index = torch.tensor([lookup[caption] for caption in captions])
    caption_embeds = encode_captions(pipe, unique)
    empty_embed = encode_captions(pipe, [""])[0]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(cfg, s))
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    step, elapsed, history = 0, 0.0, []
    started_from = "scratch"
    if state_path.exists():
        state = load_checkpoint(state_path)
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        started_from = f"checkpoint at step {step}"
    elif cfg.warm_start and (out_dir / "unet").exists():
        shipped = StableDiffusionPipeline.from_pretrained(str(out_dir), local_files_only=True).unet
        unet.load_state_dict(shipped.state_dict())
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
        info = json.loads((out_dir / "training.json").read_text()) if (out_dir / "training.json").exists() else {}
        step, elapsed, history = info.get("steps", 0), info.get("train_seconds", 0.0), info.get("history", [])
        started_from = f"shipped weights at step {step} (fresh optimizer)"
    print(
        f"training {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M-parameter UNet on {len(captions)} images "
        f"({len(unique)} captions) from {started_from}, to step {cfg.steps}",
        flush=True,
    )

    def save(final: bool = False) -> None:
        info = {
            "command": (
                f"python -m pipeline.demo.train steps={cfg.steps}"
                + (
                    f" decay_start={cfg.decay_start} decay_steps={cfg.decay_steps} decay_to={cfg.decay_to}"
                    if cfg.decay_start
                    else ""
                )
            ),
            "commit": git_commit(),
            "steps": step,
            "train_seconds": round(elapsed, 1),
            "data_path": cfg.data_path,
            "data_records": len(captions),
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "learning_rate_now": optimizer.param_groups[0]["lr"],
            "ema_decay": cfg.ema_decay,
            "caption_dropout": cfg.caption_dropout,
            "model": config_dict(cfg.model),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "history": history,
        }
        state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "unet": unet.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "ema": ema.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "elapsed": elapsed,
                "history": history,
            },
            tmp,
        )
        tmp.replace(state_path)
        export_pipeline(pipe, ema, out_dir, info)

    unet.train()
    losses = []
    bar = tqdm(total=cfg.steps, initial=step, desc="training demo model", unit="step")
    while step < cfg.steps:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=generator)
        clean = latents[idx]
        cond = caption_embeds[caption_index[idx]]
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        cond = torch.where(drop[:, None, None], empty_embed.expand_as(cond), cond)
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=cond).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.step(unet.parameters())
        step += 1
        elapsed += time.perf_counter() - t0
        losses.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0:
            mean_loss = float(np.mean(losses))
            losses = []
            history.append({"step": step, "loss": round(mean_loss, 5), "seconds": round(elapsed, 1)})
            bar.set_postfix(loss=f"{mean_loss:.4f}", s_per_step=f"{elapsed / max(step, 1):.2f}")
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training diverged at step {step} (loss {mean_loss}); lower learning_rate")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save()
    bar.close()
    if not (out_dir / "unet").exists():
        save()
    print(f"demo model at {out_dir} (step {step}, {elapsed / 60:.1f} min of training)", flush=True)
    return out_dir


def load_checkpoint(path: Path) -> dict:
    """The training state at ``path``, loaded without unpickling arbitrary objects.

    ``weights_only`` admits tensors, numbers, strings and containers, which is all the trainer
    writes; a file that holds anything else (a planted pickle runs code when fully unpickled)
    is refused with a message naming it.
    """
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: not a training state this trainer wrote ({first_line}); delete it to warm-start from the shipped weights"
        ) from None


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from pipeline.cli import CONF_DIR, stage_main

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train_demo")
    @stage_main("demo.train")
    def _run(cfg: DictConfig) -> None:
        values = OmegaConf.to_container(cfg, resolve=True)
        values.pop("hydra", None)
        model = DemoModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.pop("model").items()})
        train(TrainConfig(model=model, **values))

    _run()


if __name__ == "__main__":
    main()
