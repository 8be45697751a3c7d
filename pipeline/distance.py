"""Distances between images: the paper's tiled L2 and a CLIP-style cosine distance.

Tiled L2 (Carlini et al. 2023, section 4.1): bring both images to a common size, cut them
into a ``grid`` x ``grid`` array of non-overlapping tiles (4 x 4 of 128 x 128 pixels at 512 x 512),
take the root-mean-square pixel difference of each tile with pixels in [0, 1], and keep the
largest. A single tile that differs is enough to make two images different, which is what
makes the measure stricter than a whole-image L2.

:func:`tiled_l2` computes it for every pair of two batches at once. Per tile,
``||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b``; the ``a.b`` of all pairs is one batched matrix
product over the tiles, so the cost is that of a matrix multiplication (BLAS, or the GPU),
never a Python loop over pairs.

Precision: the default float32 products run at twice the speed of float64. Two things keep
them accurate: the tiles are centred on the mean tile of the batch first (differences are
unchanged, but the norms, and with them the cancellation in the formula above, shrink), and
pairs closer than ``refine_below`` (where the square root magnifies rounding) are recomputed
in float64. The result agrees with a per-pair float64 computation to about 1e-7.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.embedders.base import Embedder

ImageBatch = np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor | Image.Image]

# Pairs with a float32 distance below this are recomputed in float64: near zero the square
# root turns a rounding error of 1e-8 in the squared distance into 1e-4 in the distance.
REFINE_BELOW = 0.02
# Largest number of float32 elements in one chunk of the (tiles, rows, columns) product.
MAX_CHUNK_ELEMENTS = 2**25


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when there is a GPU, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_tensor(array) -> torch.Tensor:
    """A torch view of an array; read-only numpy arrays (e.g. from PIL) are copied first."""
    if isinstance(array, torch.Tensor):
        return array
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _as_hwc_float(image: np.ndarray | torch.Tensor | Image.Image) -> torch.Tensor:
    """One image to a float32 (H, W, 3) tensor with values in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    tensor = _as_tensor(image)
    if tensor.ndim == 2:
        tensor = tensor[:, :, None]
    if tensor.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, C), got {tuple(tensor.shape)}")
    return _channels_to_rgb(_to_unit_float(tensor))


def _to_unit_float(tensor: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 1]."""
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32) / 255.0
    if not tensor.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {tensor.dtype}")
    tensor = tensor.to(torch.float32)
    if tensor.numel() and (tensor.min() < -1e-6 or tensor.max() > 1 + 1e-6):
        raise ValueError(
            f"float images must have values in [0, 1], got [{float(tensor.min()):.3g}, {float(tensor.max()):.3g}]"
        )
    return tensor


def _channels_to_rgb(tensor: torch.Tensor) -> torch.Tensor:
    """(..., C) with C in {1, 3, 4} -> (..., 3): grey is repeated, alpha dropped."""
    channels = tensor.shape[-1]
    if channels == 1:
        return tensor.expand(*tensor.shape[:-1], 3)
    if channels == 4:
        return tensor[..., :3]
    if channels != 3:
        raise ValueError(f"expected 1, 3 or 4 channels (HWC layout), got {channels}")
    return tensor


def _resize(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, *size), antialiased bilinear."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    return F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


def to_batch(images: ImageBatch, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Images to a float32 (N, 3, H, W) tensor in [0, 1], all of one size.

    Args:
        images: a (N, H, W, C) or (H, W, C) array or tensor (uint8 in [0, 255] or float in
            [0, 1]; C is 1, 3 or 4), or a sequence of such images or of PIL images, possibly
            of different sizes.
        size: (height, width) to resize to; ``None`` keeps the size of the first image.
    """
    if isinstance(images, np.ndarray | torch.Tensor) and np.ndim(images) == 4:
        tensor = _as_tensor(images)
        batch = _channels_to_rgb(_to_unit_float(tensor)).permute(0, 3, 1, 2)
        return _resize(batch, size or tuple(batch.shape[-2:]))
    if isinstance(images, np.ndarray | torch.Tensor) and np.ndim(images) in (2, 3):
        images = [images]
    images = list(images)
    if not images:
        height, width = size or (0, 0)
        return torch.zeros((0, 3, height, width), dtype=torch.float32)
    converted = [_as_hwc_float(image).permute(2, 0, 1)[None] for image in images]
    size = size or tuple(converted[0].shape[-2:])
    return torch.cat([_resize(image, size) for image in converted])


def common_size(batch: torch.Tensor, grid: int) -> tuple[int, int]:
    """The batch's (H, W) rounded to the nearest multiple of ``grid`` (so tiles are equal)."""
    height, width = batch.shape[-2:]
    return (max(grid, round(height / grid) * grid), max(grid, round(width / grid) * grid))


def to_tiles(batch: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, 3, H, W) with H, W multiples of ``grid`` -> (grid * grid, N, 3 * H/grid * W/grid)."""
    n, channels, height, width = batch.shape
    th, tw = height // grid, width // grid
    tiles = batch.reshape(n, channels, grid, th, grid, tw).permute(2, 4, 0, 1, 3, 5)
    return tiles.reshape(grid * grid, n, channels * th * tw)


@contextlib.contextmanager
def _exact_float32_matmul(device: torch.device):
    """TF32 would cut float32 products to 10 mantissa bits on recent GPUs; keep it off here."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _tile_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(T, n, D) and (T, m, D) -> (n, m): max over tiles of the RMS difference."""
    sq_a = (a * a).sum(-1)
    sq_b = (b * b).sum(-1)
    d2 = torch.baddbmm(sq_a[:, :, None] + sq_b[:, None, :], a, b.transpose(1, 2), alpha=-2)
    return d2.clamp_(min=0).div_(a.shape[-1]).amax(0).sqrt_()


def tiled_l2(
    x: ImageBatch,
    y: ImageBatch | None = None,
    grid: int = 4,
    size: int | tuple[int, int] | None = None,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype = torch.float32,
    refine_below: float = REFINE_BELOW,
    max_chunk_elements: int = MAX_CHUNK_ELEMENTS,
) -> np.ndarray:
    """The paper's tiled L2 distance between every image of ``x`` and every image of ``y``.

    Args:
        x: N images (see :func:`to_batch` for the accepted forms: uint8 HWC or float HWC in
            [0, 1], numpy or torch, a stacked batch or a list of images or PIL images).
        y: M images, or ``None`` for all pairs within ``x`` (then the result is symmetric
            with an exact zero diagonal, and only half of it is computed).
        grid: tiles per side (4 gives the paper's 4 x 4 grid).
        size: common (height, width) or side; ``None`` takes the size of ``x``'s first image,
            rounded to a multiple of ``grid``. ``y`` is resized to it.
        device: ``"auto"`` uses the GPU when there is one.
        dtype: precision of the matrix products; float32 (default) or float64.
        refine_below: pairs closer than this in float32 are recomputed in float64.
        max_chunk_elements: rows are processed in chunks so that the (tiles, rows, columns)
            intermediate stays below this many elements.

    Returns:
        float64 array of shape (N, M), values in [0, 1].
    """
    device = resolve_device(device)
    if isinstance(size, int):
        size = (size, size)
    xb = to_batch(x)
    target = tuple(size) if size is not None else common_size(xb, grid)
    if target[0] % grid or target[1] % grid:
        raise ValueError(f"size {target} must be a multiple of grid={grid} on both sides")
    xb = _resize(xb, target)
    yb = None if y is None else to_batch(y, size=target)
    n = len(xb)
    m = n if yb is None else len(yb)
    if n == 0 or m == 0:
        return np.zeros((n, m), dtype=np.float64)

    with torch.no_grad(), _exact_float32_matmul(device):
        xb = xb.to(device)
        yb = None if yb is None else yb.to(device)
        # Centre on the mean image of both batches: differences are unchanged, and the
        # norms that cancel in ||a||^2 + ||b||^2 - 2ab get small. Any constant would be exact.
        total = xb.sum(dim=0) if yb is None else xb.sum(dim=0) + yb.sum(dim=0)
        mean = (total / (n if yb is None else n + m)).to(dtype)
        x_tiles = to_tiles(xb.to(dtype) - mean, grid)
        del xb
        y_tiles = x_tiles if yb is None else to_tiles(yb.to(dtype) - mean, grid)
        del yb

        tiles = x_tiles.shape[0]
        rows = max(1, min(n, max_chunk_elements // max(1, tiles * m)))
        symmetric = y is None
        if symmetric:
            # Several row chunks, each against the columns from its start on, skip about
            # half the products: 8 chunks compute ~56% of the matrix.
            rows = min(rows, max(32, -(-n // 8)))
        out = torch.empty((n, m), dtype=torch.float64, device=device)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            # All pairs within x: a row chunk only needs the columns from its own start on.
            col_start = start if symmetric else 0
            block = _tile_distances(x_tiles[:, start:stop], y_tiles[:, col_start:]).to(torch.float64)
            if dtype != torch.float64 and refine_below > 0:
                close = block < refine_below
                if symmetric:  # the diagonal and what lies below it are not used
                    close = torch.triu(close, diagonal=1)
                _refine(block, close, x_tiles[:, start:stop], y_tiles[:, col_start:])
            out[start:stop, col_start:] = block
        if symmetric:
            upper = torch.triu(out)
            out = upper + upper.T
            out.fill_diagonal_(0.0)
    return out.cpu().numpy()


def _refine(block: torch.Tensor, close: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Recompute in float64, in place, the entries of ``block`` (rows of ``a``, columns of
    ``b``) where ``close`` is set; only the rows and columns involved are multiplied."""
    if not close.any():
        return
    rows = close.any(dim=1).nonzero().squeeze(1)
    cols = close.any(dim=0).nonzero().squeeze(1)
    exact = _tile_distances(a[:, rows].to(torch.float64), b[:, cols].to(torch.float64))
    sub = block[rows[:, None], cols[None, :]]
    sub_close = close[rows[:, None], cols[None, :]]
    block[rows[:, None], cols[None, :]] = torch.where(sub_close, exact, sub)


def tiled_l2_pair(a: np.ndarray, b: np.ndarray, grid: int = 4) -> float:
    """Tiled L2 of two same-sized (H, W, C) images, one pair at a time in numpy.

    The direct definition, for checking :func:`tiled_l2` and for one-off comparisons; far too
    slow for all pairs of hundreds of images.
    """
    a = _as_hwc_float(a).numpy().astype(np.float64)
    b = _as_hwc_float(b).numpy().astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} and {b.shape}")
    height, width, _ = a.shape
    th, tw = height // grid, width // grid
    worst = 0.0
    for i in range(grid):
        for j in range(grid):
            diff = a[i * th : (i + 1) * th, j * tw : (j + 1) * tw] - b[i * th : (i + 1) * th, j * tw : (j + 1) * tw]
            worst = max(worst, float(np.sqrt(np.mean(diff**2))))
    return worst


def _as_pil_list(images: ImageBatch) -> list[Image.Image]:
    if isinstance(images, np.ndarray | torch.Tensor) and np.ndim(images) in (2, 3):
        images = [images]
    pil = []
    for image in images:
        if isinstance(image, Image.Image):
            pil.append(image.convert("RGB"))
        else:
            array = (_as_hwc_float(image).numpy() * 255).round().astype(np.uint8)
            pil.append(Image.fromarray(array))
    return pil


def embed_images(images: ImageBatch, embedder: Embedder, batch_size: int = 64) -> np.ndarray:
    """Embed images in batches: float32 (N, dim), rows of unit length."""
    pil = _as_pil_list(images)
    if not pil:
        return np.zeros((0, getattr(embedder, "dim", 0)), dtype=np.float32)
    chunks = [embedder.embed(pil[i : i + batch_size]) for i in range(0, len(pil), batch_size)]
    return np.concatenate(chunks).astype(np.float32)


def cosine_distance(ex: np.ndarray, ey: np.ndarray | None = None) -> np.ndarray:
    """1 - cosine similarity of unit-length rows: (N, dim), (M, dim) -> (N, M) float64 in [0, 2]."""
    same = ey is None
    ex = np.asarray(ex, dtype=np.float64)
    ey = ex if same else np.asarray(ey, dtype=np.float64)
    distance = np.clip(1.0 - ex @ ey.T, 0.0, 2.0)
    if same:
        distance = (distance + distance.T) / 2
        np.fill_diagonal(distance, 0.0)
    return distance


def clip_distance(x: ImageBatch, y: ImageBatch | None = None, *, embedder: Embedder, batch_size: int = 64) -> np.ndarray:
    """Cosine distance (1 - cosine similarity) between embeddings of ``x`` and ``y``.

    ``embedder`` is any :class:`pipeline.embedders.base.Embedder` (CLIP for the paper's
    variant). Same input forms as :func:`tiled_l2`; ``y=None`` gives all pairs within ``x``.

    Returns:
        float64 array of shape (N, M), values in [0, 2].
    """
    ex = embed_images(x, embedder, batch_size)
    ey = None if y is None else embed_images(y, embedder, batch_size)
    return cosine_distance(ex, ey)
