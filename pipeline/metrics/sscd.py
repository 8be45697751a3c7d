"""SSCD copy detection: 1 - cosine similarity of SSCD descriptors.

SSCD (Pizzi et al. 2022, "A Self-Supervised Descriptor for Image Copy Detection", CVPR;
https://github.com/facebookresearch/sscd-copy-detection) is a ResNet-50 trunk with GeM
pooling and a linear projection to 512 dimensions, trained so that an image and its edited
copies (crops, colour changes, overlays, blends) get nearby L2-normalised descriptors. It is
the copy detector of Somepalli et al. 2023, and it judges "the same picture" where tiled L2
sees pixels: a shifted or recoloured copy is far in tiled L2, close in SSCD.

The model is never downloaded: ``metric=sscd metric.path=/path/to/sscd_disc_mixup.torchscript.pt``
names a TorchScript file the user fetched (the authors recommend ``sscd_disc_mixup``; any of
their ``.torchscript.pt`` files loads). The file's SHA-256 is part of :meth:`SSCDDistance.describe`,
so a run that stored verdicts under one model file tells they were made under another.

Preprocessing follows the authors' README for their TorchScript models, which recommends
either resizing the small edge to 288 or resizing straight to a square tensor (skewing the
aspect ratio, which suits copy detection and batches well), then ImageNet mean/std
normalisation. Here every image is resized to a ``size`` x ``size`` square (default 288):
for square images, such as every generated sample, that is the geometry of their
``Resize(288)``; other images (training images in verification) get their square-resize
variant, and every batch is one tensor. Resizing is bilinear with antialiasing on [0, 1]
floats (:func:`pipeline.distance.to_batch`), the filter of torchvision's ``Resize`` of a PIL
image, without its rounding to uint8. The network sees float32 (N, 3, size, size) tensors,
``(pixel - mean) / std`` per channel (in about [-2.12, 2.64]), and returns (N, D) descriptors
(D = 512 for the ResNet-50 models, 1024 for ``sscd_disc_large``).

Threshold: ``default_threshold`` 0.5 (similarity above 0.5) is the cut of Somepalli et al.
2023, "Diffusion Art or Digital Forgery? Investigating Data Replication in Diffusion Models"
(CVPR 2023, arXiv:2212.03860): in their Stable Diffusion study (9,000 generations searched
against the 12M images of LAION-Aesthetics v2 6+) a generation whose top SSCD similarity to a
training image exceeds 0.5 is counted as a replication. That cut was set for a generation against a training image; the
near-copy rule here also applies it between samples of one prompt. For a stricter cut, the
SSCD README gives, for ``sscd_disc_mixup``, that DISC image pairs with similarity above 0.75
are copies with 90% precision (``rule.threshold=0.25``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.cli import ConfigError
from pipeline.distance import ImageBatch, cosine_distance, to_batch
from pipeline.metrics.base import Metric, checked_int, checked_number
from pipeline.models import resolve_device

# ImageNet channel statistics, the normalisation SSCD was trained with (RGB order, [0, 1] pixels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Named in describe(): a change to the preprocessing below must change this, so that verdicts
# stored under the old one are told apart.
PREPROCESSING = "square-resize-bilinear-antialias/imagenet-mean-std"
# The ResNet-50 trunk downsamples 32 times; a smaller input leaves no spatial cell to pool.
MIN_SIZE = 32
PATH_HINT = "pass metric.path=/path/to/sscd_disc_mixup.torchscript.pt (a local file; nothing is downloaded)"


@dataclass(frozen=True)
class SSCDDistance(Metric):
    """1 - cosine similarity of SSCD descriptors, in [0, 2] (see the module doc).

    Args:
        path: the SSCD TorchScript file (required). Read once: its SHA-256 is the model's
            identity in :meth:`describe`, and the model is loaded from those same bytes.
        size: side of the square input, pixels (default 288, the authors' small edge).
        batch_size: images per forward pass.
        device: ``"auto"`` (the GPU when there is one), ``"cpu"``, ``"cuda"``, ...; it changes
            descriptors by float32 rounding only, so it is not part of :meth:`describe`.
        cache_size: descriptors kept between calls, keyed by the image's content (about 2 KB
            each for 512 dimensions): repeated calls on the same images (adaptive sampling's
            rounds, the representatives verification compares batch after batch) run the
            network once per image. 0 keeps none between calls.
        default_threshold: the near-copy threshold when ``rule.threshold`` is null (0.5; see
            the module doc for its source).
    """

    name: ClassVar[str] = "sscd"
    label: ClassVar[str] = "SSCD cosine distance"

    path: str | None = None
    size: int = 288
    batch_size: int = 32
    device: str = "auto"
    cache_size: int = 16384
    default_threshold: float = 0.5
    model_sha256: str = field(init=False, default="")
    _model: Any = field(init=False, default=None, repr=False, compare=False)
    _torch_device: Any = field(init=False, default=None, repr=False, compare=False)
    _cache: OrderedDict = field(init=False, default_factory=OrderedDict, repr=False, compare=False)

    def __post_init__(self):
        # Frozen: checked values are stored with object.__setattr__, as TiledL2 does.
        object.__setattr__(self, "size", checked_int("size", self.size, minimum=MIN_SIZE))
        object.__setattr__(self, "batch_size", checked_int("batch_size", self.batch_size, minimum=1))
        object.__setattr__(self, "cache_size", checked_int("cache_size", self.cache_size, minimum=0))
        object.__setattr__(self, "default_threshold", checked_number("default_threshold", self.default_threshold))
        object.__setattr__(self, "device", str(self.device))
        try:
            torch_device = resolve_device(self.device)
        except ValueError as err:  # its message starts with "device: "
            raise ConfigError(f"metric.{err}") from None
        path, data = _read_model_file(self.path)
        object.__setattr__(self, "path", str(path))
        object.__setattr__(self, "model_sha256", hashlib.sha256(data).hexdigest())
        object.__setattr__(self, "_torch_device", torch_device)
        object.__setattr__(self, "_model", _load_torchscript(data, path, torch_device))

    # --- distances ------------------------------------------------------------------------

    def distances(self, x: ImageBatch, y: ImageBatch | None = None) -> np.ndarray:
        """1 - cosine similarity between the descriptors of every image of ``x`` and of ``y``.

        Each distinct image's descriptor is computed once per call (and kept for later calls,
        up to ``cache_size``). Returns float64 (len(x), len(y)) in [0, 2]; with ``y`` None,
        all pairs within ``x``: symmetric with a zero diagonal.
        """
        ex = self.descriptors(x)
        ey = None if y is None else self.descriptors(y)
        n, m = len(ex), len(ex) if ey is None else len(ey)
        if n == 0 or m == 0:
            return np.zeros((n, m), dtype=np.float64)
        return cosine_distance(ex, ey)

    def descriptors(self, images: ImageBatch) -> np.ndarray:
        """SSCD descriptors of ``images`` (any form :func:`pipeline.distance.to_batch` takes:
        uint8 HWC in [0, 255], float HWC in [0, 1], stacked or a list, PIL images).

        Returns float64 (N, D) with unit rows (D = 512 for the ResNet-50 models), normalised
        again in float64 so that identical images are at distance 0 up to float64 rounding.
        """
        items = _image_list(images)
        if not items:
            return np.zeros((0, 0), dtype=np.float64)
        keys = [_content_key(item) for item in items]
        first_of: dict[bytes, int] = {}  # each distinct image's first position
        for index, key in enumerate(keys):
            first_of.setdefault(key, index)
        found: dict[bytes, np.ndarray] = {}
        for key in first_of:
            if key in self._cache:
                found[key] = self._cache[key]
                self._cache.move_to_end(key)  # recently used: evicted last
        missing = [key for key in first_of if key not in found]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            outputs = self._forward([items[first_of[key]] for key in chunk])
            for key, output in zip(chunk, outputs, strict=True):
                found[key] = output
                self._remember(key, output)
        raw = np.stack([found[key] for key in keys]).astype(np.float64)
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        return raw / np.maximum(norms, np.finfo(np.float64).tiny)

    def _forward(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        """The network on (H, W, 3) images: resized to ``size`` x ``size``, normalised, one
        batch. Returns one float32 (D,) array per image."""
        batch = to_batch(images, size=(self.size, self.size))  # (n, size, size, 3) uint8 or [0, 1] float
        pixels = batch.to(torch.float32).div_(255.0) if batch.dtype == torch.uint8 else batch.to(torch.float32)
        device = self._torch_device
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # On the CPU, TorchScript's optimising executor spends a second or two profiling each new
        # input shape of each loaded model and then runs no faster (measured on a ResNet-50):
        # plain execution there. On the GPU its fusions are kept.
        optimise = device.type != "cpu"
        with torch.inference_mode(), torch.jit.optimized_execution(optimise), _full_float32(device):
            nchw = pixels.to(device).permute(0, 3, 1, 2)
            output = self._model((nchw - mean) / std)
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != len(images):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ConfigError(
                f"metric.path: {self.path} gives {shape} for {len(images)} images, "
                "expected (images, dim) descriptors; is it an SSCD TorchScript model?"
            )
        return [row.copy() for row in output.to(torch.float32).cpu().numpy()]  # copies: a cached row holds no batch

    def _remember(self, key: bytes, descriptor: np.ndarray) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = descriptor
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # least recently used first

    def describe(self) -> dict[str, Any]:
        """``name``, the model file's SHA-256 (not its path: a replaced file must not pass for
        the old one, a moved one may), the input ``size`` and the preprocessing."""
        return {"name": self.name, "model_sha256": self.model_sha256, "size": self.size, "preprocessing": PREPROCESSING}


def _read_model_file(path: Any) -> tuple[Path, bytes]:
    """The bytes of the TorchScript file at ``path``; a one-line ConfigError naming metric.path."""
    if path is None or str(path).strip() == "":
        raise ConfigError(f"metric.path: metric=sscd needs the SSCD model file; {PATH_HINT}")
    file = Path(str(path)).expanduser()
    if not file.is_file():
        what = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise ConfigError(f"metric.path: {file} {what}; {PATH_HINT}")
    try:
        return file, file.read_bytes()
    except OSError as err:
        raise ConfigError(f"metric.path: cannot read {file}: {err.strerror or err}") from None


def _load_torchscript(data: bytes, path: Path, device: torch.device) -> torch.jit.ScriptModule:
    """The TorchScript model in ``data`` (the file's bytes, read once), on ``device``, in eval mode."""
    try:
        with warnings.catch_warnings():
            # The SSCD models ship as TorchScript; torch's notice that it is deprecated (a
            # FutureWarning on every load) says nothing the user can act on.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
            model = torch.jit.load(io.BytesIO(data), map_location=device)
    except Exception as err:  # noqa: BLE001 (torch raises RuntimeError, ValueError, zipfile errors...)
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"metric.path: {path} is not a TorchScript model ({first_line}); {PATH_HINT}") from None
    # Inference behaviour (batch norm on its running statistics): a descriptor must not depend
    # on the other images of its batch.
    return model.eval()


def _image_list(images: ImageBatch) -> list[torch.Tensor]:
    """Images to a list of (H, W, 3) tensors, uint8 or float32 in [0, 1] (checked by to_batch)."""
    if isinstance(images, np.ndarray | torch.Tensor) and np.ndim(images) == 4:
        return list(to_batch(images).unbind(0))
    if isinstance(images, np.ndarray | torch.Tensor) and np.ndim(images) in (2, 3):
        images = [images]
    return [to_batch([image])[0] for image in images]


def _content_key(image: torch.Tensor) -> bytes:
    """A digest of an image's dtype, shape and pixels: equal exactly for equal images."""
    array = np.ascontiguousarray(image.detach().cpu().numpy())
    digest = hashlib.blake2b(f"{array.dtype}{array.shape}".encode(), digest_size=20)
    digest.update(memoryview(array).cast("B"))
    return digest.digest()


@contextlib.contextmanager
def _full_float32(device: torch.device) -> Iterator[None]:
    """TF32 (on by default for cuDNN convolutions) would keep 10 mantissa bits; keep float32 here."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
