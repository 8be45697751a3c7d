"""tiled_l2 against the definition, computed pair by pair in numpy; clip_distance through an embedder."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.distance import clip_distance, tiled_l2, tiled_l2_pair
from pipeline.embedders.base import Embedder


def reference(x: np.ndarray, y: np.ndarray, grid: int = 4) -> np.ndarray:
    """The paper's definition, one pair and one tile at a time, float64 pixels in [0, 1]."""
    x = x.astype(np.float64) / 255 if x.dtype == np.uint8 else x.astype(np.float64)
    y = y.astype(np.float64) / 255 if y.dtype == np.uint8 else y.astype(np.float64)
    _, height, width, _ = x.shape
    th, tw = height // grid, width // grid
    out = np.zeros((len(x), len(y)))
    for i in range(len(x)):
        for j in range(len(y)):
            tiles = []
            for r in range(grid):
                for c in range(grid):
                    diff = x[i, r * th : (r + 1) * th, c * tw : (c + 1) * tw] - y[j, r * th : (r + 1) * th, c * tw : (c + 1) * tw]
                    tiles.append(np.sqrt(np.mean(diff**2)))
            out[i, j] = max(tiles)
    return out


@pytest.fixture
def images():
    """Random images plus a cluster of near-copies and one exact duplicate (uint8, 48 x 48)."""
    rng = np.random.default_rng(0)
    random = rng.integers(0, 256, size=(10, 48, 48, 3), dtype=np.uint8)
    base = rng.integers(0, 256, size=(48, 48, 3))
    near = np.clip(base + rng.normal(0, 2, size=(5, 48, 48, 3)), 0, 255).astype(np.uint8)
    near[1] = near[0]
    return np.concatenate([random, near])


def test_all_pairs_match_the_per_pair_definition(images):
    distances = tiled_l2(images)
    expected = reference(images, images)
    assert distances.shape == (15, 15) and distances.dtype == np.float64
    np.testing.assert_allclose(distances, expected, atol=1e-5, rtol=0)
    # Much closer than the required 1e-5 in fact, near-copies included.
    assert np.abs(distances - expected).max() < 1e-6
    assert np.array_equal(distances, distances.T)
    assert np.all(np.diag(distances) == 0)
    assert distances[10, 11] < 1e-6  # the exact duplicate
    assert 0.005 < distances[10, 12] < 0.05 and distances[:10, :10][~np.eye(10, dtype=bool)].min() > 0.3


def test_two_batches_and_input_forms_agree(images):
    x, y = images[:9], images[6:]
    expected = reference(x, y)
    np.testing.assert_allclose(tiled_l2(x, y), expected, atol=1e-5, rtol=0)
    floats = x.astype(np.float64) / 255
    np.testing.assert_allclose(tiled_l2(floats, y), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(tiled_l2(torch.from_numpy(x), torch.from_numpy(y).float() / 255), expected, atol=1e-5, rtol=0)
    pil = [Image.fromarray(image) for image in x]
    np.testing.assert_allclose(tiled_l2(pil, list(y)), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(tiled_l2(x[0], y)[0], expected[0], atol=1e-5, rtol=0)  # a single HWC image
    assert tiled_l2(x, []).shape == (9, 0)


def test_chunking_float64_and_grid(images):
    expected = tiled_l2(images)
    np.testing.assert_allclose(tiled_l2(images, max_chunk_elements=16 * 15 * 3), expected, atol=1e-7, rtol=0)
    np.testing.assert_allclose(tiled_l2(images[:7], images, max_chunk_elements=1), tiled_l2(images[:7], images), atol=1e-7)
    np.testing.assert_allclose(tiled_l2(images, dtype=torch.float64), expected, atol=1e-7, rtol=0)
    for grid in (1, 2, 3):
        np.testing.assert_allclose(tiled_l2(images, grid=grid), reference(images, images, grid), atol=1e-5, rtol=0)
    # One tile is the plain RMS distance; more tiles can only find a worse tile. Each side is
    # within the 1e-5 of the exact value that the tests above require, hence 2e-5.
    assert np.all(tiled_l2(images, grid=1) <= expected + 2e-5)


@pytest.mark.parametrize("grid", [1, 2, 3, 4])
def test_identical_images_are_at_exactly_zero(images, grid):
    """Identical images are at distance 0 exactly, not "close to 0": on every grid, within one
    batch and across two, for uint8 and float input (no rounding may leave a residue)."""
    within = tiled_l2(images, grid=grid)
    assert within[10, 11] == 0.0 and np.all(np.diag(within) == 0.0)
    across = tiled_l2(images[:12], images[9:], grid=grid)
    assert across[10, 1] == 0.0 and across[11, 2] == 0.0 and across[10, 2] == 0.0
    floats = images.astype(np.float32) / 255
    assert np.all(np.diag(tiled_l2(floats, floats, grid=grid)) == 0.0)


def test_one_changed_tile_decides(images):
    a = images[0].copy()
    b = a.copy()
    b[:12, :12] = 255 - b[:12, :12]  # invert one of the 16 tiles only
    d = tiled_l2(np.stack([a, b]))[0, 1]
    assert d == pytest.approx(tiled_l2_pair(a, b), abs=1e-6)
    assert d == pytest.approx(np.sqrt(np.mean(((255 - 2 * a[:12, :12].astype(float)) / 255) ** 2)), abs=1e-6)


def test_images_are_brought_to_a_common_size():
    rng = np.random.default_rng(1)
    # Smooth images, so that resampling changes them little.
    small = np.stack(
        [
            np.asarray(
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((48, 48), Image.Resampling.BICUBIC)
            )
            for _ in range(4)
        ]
    )
    big = np.stack([np.asarray(Image.fromarray(im).resize((96, 96), Image.Resampling.NEAREST)) for im in small])
    across = tiled_l2(small, big)  # big is resized to 48 x 48
    assert np.all(np.diag(across) < 0.05) and across[~np.eye(4, dtype=bool)].min() > 0.15
    odd = np.stack([np.asarray(Image.fromarray(im).resize((50, 47))) for im in small])
    assert tiled_l2(odd).shape == (4, 4)  # resized to 48 x 48 so that 4 x 4 tiles are equal
    assert tiled_l2(small, size=32).shape == (4, 4)
    with pytest.raises(ValueError, match="multiple of grid"):
        tiled_l2(small, size=30)


def test_bad_inputs_are_refused(images):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiled_l2(images.astype(np.float32))  # 0-255 floats are not in [0, 1]
    with pytest.raises(ValueError, match="channels"):
        tiled_l2(np.zeros((2, 8, 8, 5), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8 or floating"):
        tiled_l2(np.zeros((2, 8, 8, 3), dtype=np.int64))


class ThumbnailEmbedder(Embedder):
    """A small real embedder: the centred 4 x 4 thumbnail of an image as a unit vector."""

    name = "thumbnail-4"
    dim = 48

    def embed(self, images):
        vectors = np.stack(
            [np.asarray(im.resize((4, 4), Image.Resampling.BOX), dtype=np.float32).ravel() / 255 - 0.5 for im in images]
        )
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_clip_distance_is_the_cosine_distance_of_the_embeddings(images):
    embedder = ThumbnailEmbedder()
    distances = clip_distance(images, embedder=embedder, batch_size=4)
    vectors = embedder.embed([Image.fromarray(im) for im in images])
    expected = 1 - vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    np.fill_diagonal(expected, 0)
    np.testing.assert_allclose(distances, np.clip(expected, 0, 2), atol=1e-6)
    assert np.array_equal(distances, distances.T) and distances[10, 11] == pytest.approx(0, abs=1e-6)
    across = clip_distance(images[:3], [Image.fromarray(im) for im in images[:5]], embedder=embedder)
    np.testing.assert_allclose(across, distances[:3, :5], atol=1e-6)


def test_benchmark_runs_at_a_tiny_size(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "detect_bench.py"
    spec = importlib.util.spec_from_file_location("detect_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--n", "12", "--size", "32", "--loop-pairs", "20", "--cpu-only"])
    printed = capsys.readouterr().out
    assert "66 pairs" in printed and "per-pair numpy loop" in printed
    difference = float(re.search(r"max difference on the sampled pairs ([0-9.e+-]+)", printed).group(1))
    assert difference < 1e-5
