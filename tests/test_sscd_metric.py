"""The SSCD copy-detection metric (pipeline/metrics/sscd.py) on a random-weight model of SSCD's
architecture: its distances, its preprocessing, its descriptor cache, and its config entry
(``metric=sscd metric.path=<file>``) through the real configs. No weights are downloaded."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from pipeline.cli import ConfigError
from pipeline.metrics import REGISTRY, SSCDDistance, metric_named
from pipeline.metrics.sscd import IMAGENET_MEAN, IMAGENET_STD
from pipeline.rule import NearCopyRule, rule_from_config

from .conftest import compose_config

SMALL = 64  # input side for most tests: a ResNet-50 forward at 64 x 64 costs 1/20 of one at 288
# Two descriptors of one image computed in different batches differ by float32 rounding in the
# network, a relative ~1e-6 per component. Renormalised in float64, they are unit vectors a and
# a + d with d orthogonal to a to first order, so 1 - cos = |d|^2 / 2 ~ 1e-12, plus ~1e-15 from
# the float64 dot product: 1e-5 is far above that, and far below the distance of two different
# images under the random model (> 1e-4, asserted below).
SAME_IMAGE_TOLERANCE = 1e-5


class GeneralizedMeanPool(nn.Module):
    """GeM pooling, (mean over H, W of x^p)^(1/p) with p = 3 as in SSCD: (N, C, H, W) -> (N, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class RandomSSCD(nn.Module):
    """SSCD's architecture with random weights: ResNet-50 trunk, GeM pooling, a 2048 -> 512
    linear projection, L2 normalisation. (N, 3, H, W) -> (N, 512) unit rows."""

    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None)
        self.trunk = nn.Sequential(*list(resnet.children())[:-2])  # without its pooling and classifier
        self.pool = GeneralizedMeanPool()
        self.projection = nn.Linear(2048, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.projection(self.pool(self.trunk(x))), dim=1)


def save_torchscript(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's TorchScript deprecation notice
        torch.jit.script(model).save(str(path))
    return path


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """``a``: a random SSCD-shaped model, saved in training mode on purpose (the metric must
    switch batch norm to its running statistics, or descriptors would depend on their batch);
    ``b``: the same model with one projection bias changed: other bytes, other distances."""
    root = tmp_path_factory.mktemp("sscd")
    torch.manual_seed(0)
    model = RandomSSCD().train()
    files = {"a": save_torchscript(model, root / "sscd_a.torchscript.pt")}
    with torch.no_grad():
        model.projection.bias[0] += 100.0  # a third of the projection's typical norm here
    files["b"] = save_torchscript(model, root / "sscd_b.torchscript.pt")
    return files


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Six random (48, 48, 3) uint8 images: smooth (upsampled 6 x 6 noise), as photos are."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (6, 6, 6, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((48, 48), Image.Resampling.BICUBIC)) for s in small])


# --- distances -----------------------------------------------------------------------------


def test_identical_images_are_at_zero_distance(model_files, images):
    metric = SSCDDistance(path=str(model_files["a"]), size=SMALL, batch_size=2, device="cpu", cache_size=0)
    # The same pixels as uint8 and as float32 in [0, 1] are different inputs to the cache, so
    # each is run through the network, in a batch of another composition.
    as_float = images.astype(np.float32) / 255
    across = metric.distances(images, as_float[::-1].copy())[:, ::-1]
    assert np.abs(np.diagonal(across)).max() < SAME_IMAGE_TOLERANCE
    # A batch of one against a batch of six: batch norm runs in inference mode.
    alone = metric.descriptors(images[:1])
    assert 1 - float(alone[0] @ metric.descriptors(images)[0]) < SAME_IMAGE_TOLERANCE
    # Different images are not: the zeros above say something.
    off_diagonal = across[~np.eye(len(images), dtype=bool)]
    assert off_diagonal.min() > 1e-4


def test_distances_are_a_symmetric_float64_matrix_consistent_between_calls(model_files, images):
    metric = SSCDDistance(path=str(model_files["a"]), size=SMALL, batch_size=4, device="cpu")
    x, y = images[:4], images[3:]  # image 3 in both
    within = metric.distances(x)
    assert within.shape == (4, 4) and within.dtype == np.float64
    assert np.array_equal(within, within.T) and np.all(np.diagonal(within) == 0)
    assert within.min() >= 0 and within.max() <= 2
    between = metric.distances(x, y)
    assert between.shape == (4, 3) and between.dtype == np.float64
    assert between[3, 0] < SAME_IMAGE_TOLERANCE  # the shared image
    # distances(x, y) is the off-diagonal block of distances(x + y), distances(x) its corner.
    both = metric.distances(np.concatenate([x, y]))
    np.testing.assert_allclose(both[:4, 4:], between, atol=1e-12)
    np.testing.assert_allclose(both[:4, :4], within, atol=1e-12)
    # Other forms of the same images: a list of PIL images, one (H, W, 3) image.
    pil = [Image.fromarray(image) for image in x]
    np.testing.assert_allclose(metric.distances(pil, y), between, atol=1e-12)
    np.testing.assert_allclose(metric.distances(x[0], y), between[:1], atol=1e-12)
    # Nothing to compare: empty matrices of the right shape.
    assert metric.distances(x, []).shape == (4, 0) and metric.distances([]).shape == (0, 0)


def test_preprocessing_is_a_square_resize_and_imagenet_normalisation(model_files):
    metric = SSCDDistance(path=str(model_files["a"]), size=SMALL, device="cpu")
    seen: list[torch.Tensor] = []
    network = metric._model
    object.__setattr__(metric, "_model", lambda batch: (seen.append(batch.clone()), network(batch))[1])
    white_wide = np.full((30, 90, 3), 255, dtype=np.uint8)  # not square: skewed to a square
    grey = np.full((40, 40, 3), 0.5, dtype=np.float32)
    metric.descriptors([white_wide, grey])
    (batch,) = seen
    assert batch.shape == (2, 3, SMALL, SMALL) and batch.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(batch[0], ((1 - mean) / std).expand(3, SMALL, SMALL))
    torch.testing.assert_close(batch[1], ((0.5 - mean) / std).expand(3, SMALL, SMALL))


def test_the_default_size_is_288(model_files, images):
    metric = SSCDDistance(path=str(model_files["a"]), device="cpu")
    sizes: list[tuple[int, ...]] = []
    network = metric._model
    object.__setattr__(metric, "_model", lambda batch: (sizes.append(tuple(batch.shape)), network(batch))[1])
    distances = metric.distances(images[:2])
    assert sizes == [(2, 3, 288, 288)] and metric.describe()["size"] == 288
    assert distances.shape == (2, 2) and distances[0, 1] > 0 and np.all(np.diagonal(distances) == 0)


def test_each_image_is_described_once(model_files, images, monkeypatch):
    forwarded: list[int] = []
    forward = SSCDDistance._forward

    def counting(self, batch):
        forwarded.append(len(batch))
        return forward(self, batch)

    monkeypatch.setattr(SSCDDistance, "_forward", counting)
    metric = SSCDDistance(path=str(model_files["a"]), size=SMALL, batch_size=2, device="cpu", cache_size=4)
    x = np.stack([images[0], images[1], images[0]])  # a duplicate within x
    y = images[1:4]  # image 1 also in x
    metric.distances(x, y)
    assert sum(forwarded) == 4  # images 0, 1, 2, 3, each once
    forwarded.clear()
    metric.distances(y)  # kept from the last call
    assert forwarded == []
    metric.distances(images)  # six distinct images, four kept at most: the oldest are evicted
    assert sum(forwarded) == 2 and len(metric._cache) == 4
    forwarded.clear()
    keep_none = SSCDDistance(path=str(model_files["a"]), size=SMALL, device="cpu", cache_size=0)
    keep_none.distances(x)
    keep_none.distances(x)
    assert forwarded == [2, 2] and len(keep_none._cache) == 0


def test_nothing_is_downloaded(model_files, images, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the SSCD metric tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    metric = SSCDDistance(path=str(model_files["a"]), size=SMALL, device="cpu")
    assert metric.distances(images[:2]).shape == (2, 2)


# --- the config entry and the rule ---------------------------------------------------------


def sscd_rule(stage: str, path: Path, *overrides: str) -> NearCopyRule:
    """The rule of ``stage`` composed with ``metric=sscd metric.path=<path>`` and ``overrides``."""
    return rule_from_config(compose_config(stage, ["metric=sscd", f"metric.path={path}", *overrides]))


def test_metric_sscd_in_the_configs_gives_the_rule_with_threshold_half(model_files, tmp_path):
    assert REGISTRY["sscd"] is SSCDDistance
    model = tmp_path / "sscd.torchscript.pt"
    shutil.copyfile(model_files["a"], model)
    small = f"metric.size={SMALL}"
    rules = {stage: sscd_rule(stage, model, small) for stage in ("generate", "detect", "evaluate_demo")}
    for rule in rules.values():
        assert isinstance(rule.metric, SSCDDistance) and rule.threshold == 0.5
        assert (rule.metric.batch_size, rule.metric.cache_size) == (32, 16384)
    described = rules["detect"].describe()
    assert described["metric"] == "sscd" and described["threshold"] == 0.5
    assert described["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert str(model) not in json.dumps(described)  # the file's bytes name the model, not its path
    assert all(rule.matches(described) for rule in rules.values())
    assert sscd_rule("detect", model, small, "rule.threshold=0.25").threshold == 0.25

    # The same bytes elsewhere judge alike; other bytes at the same path do not, and measure otherwise.
    moved = tmp_path / "moved" / "renamed.pt"
    moved.parent.mkdir()
    shutil.copyfile(model, moved)
    assert sscd_rule("detect", moved, small).matches(described)
    shutil.copyfile(model_files["b"], model)
    replaced = sscd_rule("detect", model, small)
    assert not replaced.matches(described) and replaced.describe()["model_sha256"] != described["model_sha256"]
    black, grey = np.zeros((1, 8, 8, 3), np.uint8), np.full((1, 8, 8, 3), 200, np.uint8)
    assert not np.allclose(replaced.distances(black, grey), rules["detect"].distances(black, grey))
    # The input size changes distances, so it is part of the description; the device and the
    # batch size do not.
    assert not sscd_rule("detect", moved).matches(described)
    assert NearCopyRule(metric_named("sscd", path=str(moved), size=SMALL, device="cpu", batch_size=3)).matches(described)


def test_a_missing_or_wrong_model_file_is_a_one_line_error_naming_metric_path(tmp_path):
    hint = r"pass metric\.path=/path/to/sscd_disc_mixup\.torchscript\.pt"
    cases = {
        "missing": (["metric=sscd"], rf"metric=sscd needs the SSCD model file; {hint}"),
        "absent": (["metric=sscd", f"metric.path={tmp_path / 'nowhere.pt'}"], rf".*nowhere\.pt does not exist; {hint}"),
        "directory": (["metric=sscd", f"metric.path={tmp_path}"], r".* is a directory, not a file"),
        "not a model": (["metric=sscd", f"metric.path={tmp_path / 'notes.pt'}"], r".*notes\.pt is not a TorchScript model \("),
    }
    (tmp_path / "notes.pt").write_text("not a model\nsecond line\n", encoding="utf-8")
    for case, (overrides, message) in cases.items():
        with pytest.raises(ConfigError, match=rf"^metric\.path: {message}") as caught:
            rule_from_config(compose_config("detect", overrides))
        assert "\n" not in str(caught.value), case
    with pytest.raises(ConfigError, match=r"^metric\.path: "):
        SSCDDistance()
    with pytest.raises(ConfigError, match=r"^metric\.size: must be at least 32"):
        SSCDDistance(path=str(tmp_path / "notes.pt"), size=8)
    with pytest.raises(ConfigError, match=re.escape("metric.default_threshold: must be positive")):
        SSCDDistance(path=str(tmp_path / "notes.pt"), default_threshold=0)
    with pytest.raises(ConfigError, match=r"^metric\.device: 'nonsense' is not a torch device"):
        SSCDDistance(path=str(tmp_path / "notes.pt"), device="nonsense")
