"""CLIP image embeddings through open_clip: any architecture, weights from a file or a tag.

Images are preprocessed exactly as the model expects: the evaluation transform that
``open_clip.create_model_and_transforms`` returns for that model (resize, centre crop,
the model's mean/std). Nothing is downloaded unless ``pretrained`` names a tag and the
machine is online; a local checkpoint (``.pt``, ``.bin``, ``.safetensors``) always works.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.embedders.base import Embedder

log = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class OpenClipEmbedder(Embedder):
    """The image tower of an open_clip model, embeddings L2-normalised.

    Args:
        model_name: an open_clip architecture (``ViT-B-32``, ``ViT-L-14``, ...; see
            ``open_clip.list_models()``), or ``local-dir:<folder>`` / ``hf-hub:<repo>``.
        pretrained: weights: a local checkpoint file, a pretrained tag such as
            ``laion2b_s34b_b79k`` (downloads when online), or None for random weights
            (tests, smoke runs).
        device: ``auto`` (CUDA when there is a GPU), ``cpu``, ``cuda``, ``cuda:1``...
        precision: ``auto`` (fp16 on CUDA, fp32 on the CPU), ``fp32``, ``fp16``, ``bf16``.
        batch_size: images per forward pass.
        num_workers: threads that preprocess images (resize, crop) while the model runs;
            0 preprocesses in the calling thread.
        threshold: cosine similarity at or above which two images count as near-duplicates.
        cache_dir: where open_clip keeps downloaded weights.

    ``embed`` returns float32 ``(N, embed_dim)`` rows of unit norm.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 64,
        num_workers: int = 0,
        threshold: float | None = 0.95,
        cache_dir: str | None = None,
    ):
        import open_clip
        import torch

        from pipeline.models import resolve_device

        if batch_size < 1:
            raise ValueError(f"embedder.batch_size: must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        precision = ("fp16" if self.device.type == "cuda" else "fp32") if precision == "auto" else precision
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"embedder.precision: must be auto, fp32, fp16 or bf16; got {precision!r}")
        pretrained = _check_pretrained(pretrained)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=self.device, precision=precision, cache_dir=cache_dir
            )
        except Exception as err:
            hint = ""
            if pretrained and not Path(pretrained).is_file() and os.environ.get("HF_HUB_OFFLINE") == "1":
                hint = " (HF_HUB_OFFLINE=1: a pretrained tag needs a download; give a local checkpoint file instead)"
            raise RuntimeError(
                f"embedder: could not create open_clip model {model_name!r} with pretrained={pretrained!r}: "
                f"{type(err).__name__}: {err}{hint}"
            ) from err
        model.eval()
        self.model = model
        self.preprocess = preprocess
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.threshold = threshold
        weights = Path(pretrained).name if pretrained and Path(pretrained).is_file() else (pretrained or "random")
        self.name = f"open_clip:{model_name}:{weights}"
        self.dim = self._output_dim()
        if pretrained is None:
            log.warning(
                "embedder: open_clip %s has random weights (pretrained=null): fine for tests, useless for an audit", model_name
            )

    def _output_dim(self) -> int:
        dim = getattr(self.model.visual, "output_dim", None)
        if isinstance(dim, int):
            return dim
        return int(self._forward([Image.new("RGB", (32, 32))]).shape[1])

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = [self._forward(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        out = np.concatenate(chunks).astype(np.float32)
        # Re-normalise in float32: rows normalised in fp16 are off unit length by ~1e-3.
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def _forward(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        rgb = [im.convert("RGB") for im in images]
        if self.num_workers > 0 and len(rgb) > 1:
            with ThreadPoolExecutor(self.num_workers) as pool:  # Pillow releases the GIL while resizing
                tensors = list(pool.map(self.preprocess, rgb))
        else:
            tensors = [self.preprocess(im) for im in rgb]
        batch = torch.stack(tensors).to(self.device, dtype=self.dtype)
        with torch.inference_mode():
            features = self.model.encode_image(batch, normalize=True)
        return features.float().cpu().numpy()


def _check_pretrained(pretrained: str | None) -> str | None:
    """A path-looking ``pretrained`` must exist: a clear error beats open_clip's 'unknown tag'."""
    if pretrained in (None, "", "null", "none", "None"):
        return None
    pretrained = str(pretrained)
    looks_like_path = pretrained.endswith(_CHECKPOINT_SUFFIXES) or "/" in pretrained or os.sep in pretrained
    if looks_like_path and not Path(pretrained).expanduser().is_file():
        raise FileNotFoundError(f"embedder.pretrained: no checkpoint file at {pretrained}")
    return str(Path(pretrained).expanduser()) if looks_like_path else pretrained
