"""The embedders: the offline thumbnail embedder and open_clip (random and file weights)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from pipeline.demo.dataset import drawn_scene, skimage_photo
from pipeline.embedders.robust import RobustEmbedder
from pipeline.embedders.thumbnail import ThumbnailEmbedder

from .conftest import compose_config


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def copies_of(image: Image.Image) -> dict[str, Image.Image]:
    """The kinds of change the demo set plants (and web re-uploads go through)."""
    size = image.width
    side = int(size * 0.92)
    draw_copy = image.copy()
    ImageDraw.Draw(draw_copy).text((4, size - 10), "sale", fill=(255, 255, 0))
    return {
        "jpeg q40": jpeg(image, 40),
        "resized 0.7": image.resize((int(size * 0.7),) * 2, Image.Resampling.BILINEAR).resize((size, size)),
        "cropped 92%": image.crop((3, 2, 3 + side, 2 + side)).resize((size, size), Image.Resampling.BICUBIC),
        "shifted 3px": Image.fromarray(np.roll(np.asarray(image), (3, -2), axis=(0, 1))),
        "recoloured": ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(1.1)).enhance(0.88),
        "text": draw_copy,
        "larger": image.resize((size * 3, size * 3), Image.Resampling.BICUBIC),
    }


def test_thumbnail_embeddings_are_unit_float32_and_deterministic():
    embedder = ThumbnailEmbedder()
    images = [
        skimage_photo("astronaut", 64),
        drawn_scene(np.random.default_rng(0), 64),
        Image.new("RGB", (40, 70), (128, 128, 128)),
    ]
    vectors = embedder.embed(images)
    assert vectors.shape == (3, embedder.dim) == (3, 3 * (4 * 4 + 8 * 8) + 3)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(vectors).all()  # a flat grey image included
    np.testing.assert_array_equal(vectors, embedder.embed(images))


def test_thumbnail_finds_copies_and_separates_different_images():
    embedder = ThumbnailEmbedder()
    for name in ("coffee", "camera", "astronaut", "moon"):
        original = skimage_photo(name, 64)
        copies = copies_of(original)
        if name == "moon":
            del copies["text"]  # text on a nearly flat image: the known weak spot (see the module doc)
        vectors = embedder.embed([original, *copies.values()])
        sims = vectors[1:] @ vectors[0]
        for kind, sim in zip(copies, sims):
            assert sim >= embedder.threshold, f"{name}, {kind}: similarity {sim:.3f} below {embedder.threshold}"
    rng = np.random.default_rng(1)
    others = [skimage_photo(n, 64) for n in ("coffee", "camera", "rocket", "coins", "clock")]
    others += [drawn_scene(rng, 64) for _ in range(30)]
    vectors = embedder.embed(others)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -1)
    assert sims.max() < embedder.threshold, f"two different images at similarity {sims.max():.3f}"


@pytest.mark.parametrize("bad", [{"scales": []}, {"scales": [0]}, {"colour_weight": -1}, {"clip": 0}])
def test_thumbnail_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="embedder\\."):
        ThumbnailEmbedder(**bad)


# ----------------------------------------------------------------------------------------
# open_clip

TINY_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "patch_size": 8, "head_width": 24},
    "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory) -> str:
    """A tiny open_clip architecture registered the way users add their own configs."""
    import open_clip

    path = tmp_path_factory.mktemp("open_clip_config") / "memaudit-test-tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return "memaudit-test-tiny"


def some_images(n: int = 6) -> list[Image.Image]:
    rng = np.random.default_rng(2)
    return [drawn_scene(rng, 48).resize((48 + 8 * i, 40)) for i in range(n)]


def test_open_clip_random_tiny_model_embeds(tiny_clip_name):
    import torch

    from pipeline.embedders.openclip import OpenClipEmbedder

    torch.manual_seed(0)
    embedder = OpenClipEmbedder(tiny_clip_name, pretrained=None, device="cpu", batch_size=4, num_workers=2)
    assert embedder.dim == TINY_CONFIG["embed_dim"]
    assert embedder.name == f"open_clip:{tiny_clip_name}:random"
    # The model's own preprocessing: resized and centre-cropped to its input size.
    assert tuple(embedder.preprocess(some_images(1)[0]).shape) == (3, 32, 32)
    vectors = embedder.embed(some_images())  # 6 images in batches of 4
    assert vectors.shape == (6, TINY_CONFIG["embed_dim"]) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedder.embed(some_images()[:3]), vectors[:3], atol=1e-6)  # batching does not matter
    assert embedder.embed([]).shape == (0, TINY_CONFIG["embed_dim"])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_open_clip_loads_weights_from_a_local_file(tiny_clip_name, tmp_path, suffix):
    import torch

    from pipeline.embedders.openclip import OpenClipEmbedder

    torch.manual_seed(1)
    saved = OpenClipEmbedder(tiny_clip_name, device="cpu")
    state = {k: v.contiguous() for k, v in saved.model.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    torch.manual_seed(2)  # a different random init, which the file must overwrite
    loaded = OpenClipEmbedder(tiny_clip_name, pretrained=str(path), device="cpu")
    fresh = OpenClipEmbedder(tiny_clip_name, device="cpu")
    images = some_images(3)
    np.testing.assert_allclose(loaded.embed(images), saved.embed(images), atol=1e-6)
    assert np.abs(fresh.embed(images) - saved.embed(images)).max() > 1e-3
    assert loaded.name.endswith(path.name)


def test_open_clip_missing_weights_file_is_a_clear_error(tiny_clip_name, tmp_path):
    from pipeline.embedders.openclip import OpenClipEmbedder

    with pytest.raises(FileNotFoundError, match="embedder.pretrained"):
        OpenClipEmbedder(tiny_clip_name, pretrained=str(tmp_path / "missing.pt"), device="cpu")
    with pytest.raises(RuntimeError, match="embedder: could not create open_clip model"):
        OpenClipEmbedder("no-such-architecture", device="cpu")


def test_embedder_configs_instantiate_with_hydra():
    """conf/embedder/*.yaml build through hydra.utils.instantiate, as the stages do."""
    from hydra.utils import instantiate

    cfg = compose_config("dedup", ["embedder=open_clip", "device=cpu"])
    clip = instantiate(cfg.embedder)  # ViT-B-32 with random weights: the real architecture
    assert clip.dim == 512 and tuple(clip.preprocess(some_images(1)[0]).shape) == (3, 224, 224)
    vectors = clip.embed(some_images(2))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert cfg.threshold == clip.threshold == 0.95
    cfg = compose_config("dedup")
    robust = instantiate(cfg.embedder)  # the offline default
    assert isinstance(robust, RobustEmbedder) and cfg.threshold == robust.threshold
    cfg = compose_config("dedup", ["embedder=thumbnail"])
    thumb = instantiate(cfg.embedder)
    assert isinstance(thumb, ThumbnailEmbedder) and cfg.threshold == thumb.threshold
