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
in float64, those at the float64 products' rounding residue from their differences (so that
identical images are at exactly 0). The result agrees with a per-pair float64 computation to
about 1e-7 for unrelated images; the float32 error grows as pairs get closer (it scales with
the tiles, not the distance), up to about 1e-6 just above ``refine_below`` at 512 x 512
(``benchmarks/verify_bench.py`` measures it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.embedders.base import Embedder
from pipeline.models import resolve_device

ImageBatch = np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor | Image.Image]

# Pairs with a float32 distance below this are recomputed in float64: near zero the square
# root turns a rounding error of 1e-8 in the squared distance into 1e-4 in the distance.
REFINE_BELOW = 0.02
# Largest number of float32 elements in one chunk of the (tiles, rows, columns) product.
MAX_CHUNK_ELEMENTS = 2**25


def _as_tensor(array) -> torch.Tensor:
    """A torch view of an array; read-only numpy arrays (e.g. from PIL) are copied first."""
    if isinstance(array, torch.Tensor):
        return array
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _as_hwc(image: np.ndarray | torch.Tensor | Image.Image) -> torch.Tensor:
    """One image to an (H, W, 3) tensor: uint8 as is, float checked to be in [0, 1] (float32)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    tensor = _as_tensor(image)
    if tensor.ndim == 2:
        tensor = tensor[:, :, None]
    if tensor.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, C), got {tuple(tensor.shape)}")
    tensor = _channels_to_rgb(tensor)
    return tensor if tensor.dtype == torch.uint8 else _to_unit_float(tensor)


def _as_hwc_float(image: np.ndarray | torch.Tensor | Image.Image) -> torch.Tensor:
    """One image to a float32 (H, W, 3) tensor with values in [0, 1]."""
    return _unit(_as_hwc(image)[None])[0]


def _to_unit_float(tensor: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 1]."""
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32) / 255.0
    if not tensor.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {tensor.dtype}")
    tensor = tensor.to(torch.float32)
    if tensor.numel() and (tensor.min() < -1e-6 or tensor.max() > 1 + 1e-6):
        raise ValueError(f"float images must have values in [0, 1], got [{float(tensor.min()):.3g}, {float(tensor.max()):.3g}]")
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
    """(N, H, W, 3) -> float32 (N, *size, 3) in [0, 1], antialiased bilinear; as is if already that size."""
    if tuple(batch.shape[1:3]) == tuple(size):
        return batch
    if len(batch) == 0:
        return torch.zeros((0, *size, 3), dtype=batch.dtype)
    nchw = _unit(batch).permute(0, 3, 1, 2)
    resized = F.interpolate(nchw, size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp_(0, 1).permute(0, 2, 3, 1)


def _unit(batch: torch.Tensor) -> torch.Tensor:
    """uint8 or float (N, H, W, 3) -> float32 in [0, 1]."""
    return batch.to(torch.float32).div_(255.0) if batch.dtype == torch.uint8 else batch.to(torch.float32)


def to_batch(images: ImageBatch, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Images to one (N, H, W, 3) tensor, all of one size.

    Args:
        images: a (N, H, W, C) or (H, W, C) array or tensor (uint8 in [0, 255] or float in
            [0, 1]; C is 1, 3 or 4), or a sequence of such images or of PIL images, possibly
            of different sizes.
        size: (height, width) to resize to; ``None`` keeps the size of the first image.

    Returns:
        uint8 values in [0, 255] when the input was uint8 (or PIL) and needed no resizing
        (four times less memory than float), else float32 values in [0, 1].
    """
    if isinstance(images, np.ndarray | torch.Tensor) and np.ndim(images) == 4:
        batch = _channels_to_rgb(_as_tensor(images))
        if batch.dtype != torch.uint8:
            batch = _to_unit_float(batch)
        return _resize(batch, size or tuple(batch.shape[1:3]))
    if isinstance(images, np.ndarray | torch.Tensor) and np.ndim(images) in (2, 3):
        images = [images]
    images = [_as_hwc(image) for image in images]
    if not images:
        height, width = size or (0, 0)
        return torch.zeros((0, height, width, 3), dtype=torch.uint8)
    size = size or tuple(images[0].shape[:2])
    if all(image.dtype == torch.uint8 and tuple(image.shape[:2]) == tuple(size) for image in images):
        return torch.stack(images)
    return torch.cat([_resize(_unit(image)[None], size) for image in images])


def common_size(height: int, width: int, grid: int) -> tuple[int, int]:
    """(H, W) rounded to the nearest multiple of ``grid`` (so that all tiles are equal)."""
    return (max(grid, round(height / grid) * grid), max(grid, round(width / grid) * grid))


def _tile_view(batch: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, H, W, C) -> a (grid, grid, N, H/grid, W/grid, C) view: tile (i, j) of every image."""
    n, height, width, channels = batch.shape
    return batch.reshape(n, grid, height // grid, grid, width // grid, channels).permute(1, 3, 0, 2, 4, 5)


def to_tiles(batch: torch.Tensor, grid: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, H, W, C) with H, W multiples of ``grid`` -> (grid * grid, N, H/grid * W/grid * C) in ``dtype``.

    Converts while copying, in one pass: at 500 x 512 x 512 these are gigabytes.
    """
    n, height, width, channels = batch.shape
    th, tw = height // grid, width // grid
    tiles = torch.empty((grid * grid, n, th * tw * channels), dtype=dtype, device=batch.device)
    tiles.view(grid, grid, n, th, tw, channels).copy_(_tile_view(batch, grid))
    return tiles


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


def _squared_norms(tiles: torch.Tensor) -> torch.Tensor:
    """(T, N, D) -> (T, N): ||tile||^2 (vector_norm reduces without a squared temporary)."""
    return torch.linalg.vector_norm(tiles, dim=-1).square_()


def _max_tile_ssd(a: torch.Tensor, b: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> torch.Tensor:
    """(T, n, D), (T, m, D) and their squared norms -> (n, m): max over tiles of ||a - b||^2."""
    ssd = torch.baddbmm(sq_a[:, :, None] + sq_b[:, None, :], a, b.transpose(1, 2), alpha=-2)
    return ssd.clamp_(min=0).amax(0)


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
        refine_below: pairs closer than this are recomputed in float64.
        max_chunk_elements: rows are processed in chunks so that the (tiles, rows, columns)
            intermediate stays below this many elements.

    Returns:
        float64 array of shape (N, M), values in [0, 1].
    """
    device = resolve_device(device)
    if isinstance(size, int):
        size = (size, size)
    xb = to_batch(x)
    target = tuple(size) if size is not None else common_size(*xb.shape[1:3], grid)
    if target[0] % grid or target[1] % grid:
        raise ValueError(f"size {target} must be a multiple of grid={grid} on both sides")
    xb = _resize(xb, target)
    yb = None if y is None else _resize(to_batch(y), target)
    if yb is not None and xb.dtype != yb.dtype:  # one uint8, one float: compare in [0, 1]
        xb, yb = _unit(xb), _unit(yb)
    n = len(xb)
    m = n if yb is None else len(yb)
    if n == 0 or m == 0:
        return np.zeros((n, m), dtype=np.float64)
    # uint8 images are compared in [0, 255] (no scaling pass) and the result divided by 255.
    scale = 255.0 if xb.dtype == torch.uint8 else 1.0

    with torch.no_grad(), _exact_float32_matmul(device):
        xb = xb.to(device)
        yb = None if yb is None else yb.to(device)
        x_tiles = to_tiles(xb, grid, dtype)
        y_tiles = x_tiles if yb is None else to_tiles(yb, grid, dtype)
        del xb, yb
        # Centre every tile on the mean tile of both batches: differences are unchanged, and the
        # norms that cancel in ||a||^2 + ||b||^2 - 2ab get small. (Any constant would be exact.)
        total = x_tiles.sum(dim=1, keepdim=True)
        if y is not None:
            total += y_tiles.sum(dim=1, keepdim=True)
        mean = total / (n if y is None else n + m)
        x_tiles.sub_(mean)
        if y is not None:
            y_tiles.sub_(mean)
        sq_x = _squared_norms(x_tiles)
        sq_y = sq_x if y is None else _squared_norms(y_tiles)
        normaliser = x_tiles.shape[-1] * scale**2  # sum of squares -> mean square in [0, 1] units
        # Compare squared sums, not distances, when choosing pairs to refine. Float64 products
        # are refined too: they also leave a rounding residue where the distance is 0.
        refine_ssd = refine_below**2 * normaliser

        tiles = x_tiles.shape[0]
        rows = max(1, min(n, max_chunk_elements // max(1, tiles * m)))
        symmetric = y is None
        if symmetric:
            # Several row chunks, each against the columns from its start on, skip about
            # half the products: 8 chunks compute ~56% of the matrix.
            rows = min(rows, max(32, -(-n // 8)))
        out = torch.zeros((n, m), dtype=torch.float64, device=device)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            # All pairs within x: a row chunk only needs the columns from its own start on.
            cols = slice(start if symmetric else 0, m)
            a, b = x_tiles[:, start:stop], y_tiles[:, cols]
            block = _max_tile_ssd(a, b, sq_x[:, start:stop], sq_y[:, cols]).to(torch.float64)
            if refine_ssd > 0:
                close = block < refine_ssd
                if symmetric:  # the diagonal and what lies below it are not used
                    close = torch.triu(close, diagonal=1)
                _refine(block, close, a, b, max_chunk_elements)
            out[start:stop, cols] = block
        out = out.div_(normaliser).sqrt_()
        if symmetric:
            upper = torch.triu(out, diagonal=1)
            out = upper + upper.T
    return out.cpu().numpy()


def _refine(block: torch.Tensor, close: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_chunk_elements: int) -> None:
    """Recompute in float64, in place, the entries of ``block`` (rows of ``a``, columns of
    ``b``) where ``close`` is set; only the rows and columns involved are multiplied.

    Float64 products still leave a residue of about ``dim * eps * (|a|^2 + |b|^2)``, so a pair
    whose product is below that bound may be identical: such pairs (rare: near-identical
    images) are recomputed from their differences, which gives exactly 0 for identical images.
    """
    if not close.any():
        return
    rows = close.any(dim=1).nonzero().squeeze(1)
    cols = close.any(dim=0).nonzero().squeeze(1)
    a64, b64 = a[:, rows].to(torch.float64), b[:, cols].to(torch.float64)
    sq_a, sq_b = (a64 * a64).sum(-1), (b64 * b64).sum(-1)
    exact = _max_tile_ssd(a64, b64, sq_a, sq_b)
    sub_close = close[rows[:, None], cols[None, :]]
    residue = 4 * a64.shape[-1] * torch.finfo(torch.float64).eps * (sq_a.amax(0)[:, None] + sq_b.amax(0)[None, :])
    pairs = (sub_close & (exact <= residue)).nonzero()
    step = max(1, max_chunk_elements // max(1, a64.shape[0] * a64.shape[-1]))
    for start in range(0, len(pairs), step):
        i, j = pairs[start : start + step].unbind(1)
        exact[i, j] = (a64[:, i] - b64[:, j]).square_().sum(-1).amax(0)
    sub = block[rows[:, None], cols[None, :]]
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
