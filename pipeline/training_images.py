"""Training images for comparison with samples: fetched by key, fitted to the samples' size.

Shared by verification (:mod:`pipeline.detect.verify`, every sample of every screened prompt)
and adaptive sampling's ``stop_when_extracted`` (:mod:`pipeline.generate.adaptive`, each
round's new samples as they come), so that both compare alike: training images are
center-cropped to the sample's aspect ratio and resized to its size, the way Stable
Diffusion's training data was prepared, then measured with the near-copy rule's metric.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pipeline.data import open_dataset
from pipeline.data.files import IMAGE_SUFFIXES
from pipeline.data.images import BadImage, decode_image
from pipeline.data.locations import MANIFEST, LocationIndex, read_located
from pipeline.data.paths import UnsafePath, path_under
from pipeline.data.rejects import RejectLog
from pipeline.identity import digest_of, tree_identity
from pipeline.layout import LOCATIONS
from pipeline.metrics import Metric

log = logging.getLogger(__name__)


def fit_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Center-crop ``image`` to the aspect ratio of ``size`` = (height, width) and resize to it."""
    height, width = size
    return ImageOps.fit(image.convert("RGB"), (width, height), method=Image.Resampling.BICUBIC)


def _decoded_bytes(image: Image.Image | None) -> int:
    """Bytes a decoded image holds (0 for None)."""
    return 0 if image is None else image.width * image.height * len(image.getbands())


def fetch_training_images(
    data: Mapping[str, Any], keys: Iterable[str], rejects: RejectLog | None = None, progress: bool = False
) -> dict[str, Image.Image]:
    """Decode the training images with the given keys from the data set ``data`` (a ``data`` config).

    With a location index (``data.locations``: the folder the duplicate finder's embed or locate
    phase wrote, describing this data set; :mod:`pipeline.data.locations`) exactly the wanted
    records are read, a seek, a row group or a file each: the time grows with the number of
    keys, not with the training set. A key the index does not hold is not in the set (or was
    rejected when it was read), and one whose bytes changed since indexing is rejected. Without
    an index, the ``files`` layout is opened by key directly (``<path>/<key>.jpg``) and other
    formats are streamed once to collect the keys; a log line says so, once per data set. Keys
    not found at all, or that do not decode, go to ``rejects``.

    Keys come from another tool's prompt table and are not trusted: in the ``files`` layout a
    key whose file would lie outside ``data.path`` (see :func:`pipeline.data.paths.path_under`:
    absolute, a ``..`` component, a NUL or backslash, or a symlink leading out) is rejected as
    ``unsafe training key: ...``, never read, and not looked for in the stream. Other formats
    only compare keys with the records' own.
    """
    rejects = rejects if rejects is not None else RejectLog()
    wanted = set(keys)
    if not wanted:
        return {}
    index, why_not = LocationIndex.open(data.get("locations"), data)
    if index is not None:
        located = index.lookup(wanted)
        for key in sorted(wanted - located.keys()):
            rejects.add(key, str(index.folder), "missing training image: no record with this key in the location index")
        found = read_located(data, {k: loc for k, loc in located.items() if loc is not None}, rejects)
        unlocated = {k for k, loc in located.items() if loc is None}  # a compressed tar's: streamed
        return {**found, **(_fetch_streaming(data, unlocated, rejects, progress) if unlocated else {})}
    if data.get("format") != "files":
        _say_streaming(data, why_not)
    return _fetch_streaming(data, wanted, rejects, progress)


def with_location_index(data: Mapping[str, Any], dedup_dir: str | Path | None) -> dict[str, Any]:
    """``data`` with ``locations`` set to the duplicate finder's index in ``dedup_dir`` when it
    has one and ``data`` names none (an explicit ``data.locations`` is kept)."""
    data = dict(data)
    if not data.get("locations") and dedup_dir is not None and (Path(dedup_dir) / LOCATIONS / MANIFEST).is_file():
        data["locations"] = str(Path(dedup_dir) / LOCATIONS)
    return data


def _fetch_streaming(data: Mapping[str, Any], wanted: set[str], rejects: RejectLog, progress: bool) -> dict[str, Image.Image]:
    """``wanted`` from the ``files`` layout by path, the rest by streaming the data set once."""
    found: dict[str, Image.Image] = {}
    refused: set[str] = set()
    if data.get("format") == "files" and data.get("path") and not data.get("key_table"):  # keys are paths
        root = Path(data["path"])
        for key in sorted(wanted):
            try:
                path = _files_image(root, key)
            except UnsafePath as err:
                rejects.add(str(key), str(root), f"unsafe training key: {err}")
                refused.add(key)
                continue
            if path is not None:
                try:
                    found[key] = decode_image(path.read_bytes())
                except (BadImage, OSError) as err:
                    rejects.add(key, str(path), str(err))
    remaining = wanted - found.keys() - refused - {entry["key"] for entry in rejects.entries}
    if remaining:
        # Records that do not decode are not ours to report unless we wanted them.
        stream_rejects = RejectLog()
        for record in open_dataset(data, rejects=stream_rejects, progress=progress, require_nonempty=False):
            if record.key in remaining:
                found[record.key] = record.image
                remaining.discard(record.key)
                if not remaining:
                    break
        for entry in stream_rejects.entries:
            if entry["key"] in remaining:
                rejects.add(entry["key"], entry["source"], entry["reason"])
                remaining.discard(entry["key"])
    for key in sorted(remaining):
        rejects.add(key, str(data.get("path")), "missing training image: no record with this key in the data set")
    return found


_STREAMING_SAID: set[tuple[str, str]] = set()


def _say_streaming(data: Mapping[str, Any], why_not: str) -> None:
    """One log line per data set and reason: training images are found by reading the whole set."""
    said = (str(data.get("path")), why_not)
    if said not in _STREAMING_SAID:
        _STREAMING_SAID.add(said)
        log.info(
            "training images: %s, so %s is streamed to find them (the time grows with the set; the duplicate "
            "finder's embed or locate phase writes an index: data.locations=<dedup>/locations)",
            why_not,
            data.get("path"),
        )


def _files_image(root: Path, key: str) -> Path | None:
    """The image file of ``key`` in a ``files`` data set at ``root``, or None when there is none.

    Raises :class:`UnsafePath` for a key that, or whose file, would lie outside ``root``.
    """
    path_under(root, key)
    for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
        path = path_under(root, f"{key}{suffix}")
        try:
            if path.is_file():
                return path
        except OSError:  # a name too long for the file system names no file
            return None
    return None


def fit_batch(images: Sequence[Image.Image], size: tuple[int, int]) -> np.ndarray:
    """Training images fitted (:func:`fit_to`) to ``size`` = (height, width): uint8 (M, H, W, 3)."""
    height, width = size
    if not images:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.stack([np.asarray(fit_to(image, size)) for image in images])


def sample_distances(samples: np.ndarray, training: Sequence[Image.Image], metric: Metric, chunk: int = 256) -> np.ndarray:
    """``metric`` from every sample to every training image: float64 (N, M).

    ``samples``: uint8 (N, H, W, 3), one prompt's samples (one size). ``training``: M training
    images, each fitted to the samples' size first (center crop to their aspect ratio, then
    resize, as Stable Diffusion's training data was prepared). The training images go through
    the metric ``chunk`` at a time, each chunk against all samples in one batched call (for
    tiled L2, matrix products), so memory stays bounded and no Python loop runs over pairs.
    """
    samples = np.asarray(samples)
    if samples.ndim != 4 or samples.shape[-1] != 3:
        raise ValueError(f"samples: expected (N, H, W, 3), got {samples.shape}")
    out = np.empty((len(samples), len(training)), dtype=np.float64)
    if not len(samples) or not len(training):
        return out
    size = samples.shape[1:3]
    for start in range(0, len(training), max(1, int(chunk))):
        fitted = fit_batch(training[start : start + chunk], size)
        out[:, start : start + len(fitted)] = np.asarray(metric.distances(samples, fitted), dtype=np.float64)
    return out


class GroupMatcher:
    """Whether samples reproduce one of a prompt's own training images, fetching each key once
    while it is kept.

    ``data``: a ``data`` config (the training set); ``metric``: the near-copy rule's;
    ``threshold``: a sample within it of a training image reproduces that image (verification's
    ``delta``). Images are kept once fetched (a prompt's group is compared round after round)
    until :meth:`forget` drops them or, with ``max_bytes``, until the decoded images kept
    exceed it: then the least recently used ones are dropped first (never those of the current
    call) and fetched again when asked for. Keys that cannot be read are recorded in
    ``rejects`` once and count as no image.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        metric: Metric,
        threshold: float,
        rejects: RejectLog | None = None,
        max_bytes: int | None = None,
    ):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes: must be >= 0 or None, got {max_bytes}")
        self.data, self.metric, self.threshold = data, metric, float(threshold)
        self.rejects = rejects if rejects is not None else RejectLog()
        self.max_bytes = max_bytes
        self._images: OrderedDict[str, Image.Image | None] = OrderedDict()  # least recently used first
        self._bytes = 0

    @property
    def bytes_kept(self) -> int:
        """Decoded bytes of the training images kept now."""
        return self._bytes

    def images(self, keys: Iterable[str]) -> list[Image.Image]:
        """The readable training images of ``keys`` (fetched in one pass where not kept)."""
        keys = [str(k) for k in keys]
        new = [k for k in dict.fromkeys(keys) if k not in self._images]
        if new:
            found = fetch_training_images(self.data, new, self.rejects)
            for key in new:
                image = found.get(key)
                self._images[key] = image
                self._bytes += _decoded_bytes(image)
        for key in keys:
            self._images.move_to_end(key)
        wanted = [self._images[k] for k in keys if self._images[k] is not None]
        self._evict(set(keys))
        return wanted

    def forget(self, keys: Iterable[str]) -> None:
        """Drop the training images of ``keys`` (a finished prompt's group); unknown keys are ignored."""
        for key in keys:
            image = self._images.pop(str(key), None)
            self._bytes -= _decoded_bytes(image)

    def _evict(self, keep: set[str]) -> None:
        if self.max_bytes is None:
            return
        for key in [k for k, image in self._images.items() if image is not None and k not in keep]:
            if self._bytes <= self.max_bytes:
                break
            self._bytes -= _decoded_bytes(self._images.pop(key))

    def any_match(self, samples: np.ndarray | Sequence[np.ndarray], keys: Iterable[str], within: float | None = None) -> bool:
        """Whether one of ``samples`` (uint8 (N, H, W, 3), or a list of such images of any sizes)
        is within ``within`` (default: ``threshold``) of one of the training images of ``keys``."""
        limit = self.threshold if within is None else float(within)
        training = self.images(keys)
        if not training or not len(samples):
            return False
        by_size: dict[tuple[int, ...], list[np.ndarray]] = {}
        for sample in samples:
            by_size.setdefault(np.asarray(sample).shape, []).append(np.asarray(sample))
        return any(bool((sample_distances(np.stack(group), training, self.metric) <= limit).any()) for group in by_size.values())


def training_set_identity(data: Mapping[str, Any]) -> str | None:
    """The digest of the training set's files under ``data.path`` (names, sizes, modification
    times, :func:`pipeline.identity.tree_identity`): a changed, added or removed shard or image
    file changes it. None when the config names no path."""
    path = data.get("path")
    return None if not path else digest_of(tree_identity(Path(str(path))))
