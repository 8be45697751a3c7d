"""The duplicate finder's settings, read from ``conf/dedup.yaml`` and checked once.

* :class:`DedupSettings`: what decides the groups (threshold, k, selection, the index);
* :class:`RunSettings`: how this command runs the stage (phase, shard, launcher, inputs);
* :func:`embedder_identity`: what identifies the embedding in the embed units' markers.

A wrong value raises :class:`~pipeline.cli.ConfigError` (or ``ValueError``) naming its key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cli import ConfigError, setting, settings_from
from pipeline.dedup.index import IndexSettings
from pipeline.dedup.pair_verify import VerifySettings
from pipeline.identity import digest_of, tree_identity

# The phases in order; ``all`` runs them one after the other.
PHASES = ("embed", "locate", "train", "index", "search", "verify", "group")
# Phases that run on rank 0 only (one task); the other ranks of an array do nothing.
SINGLE_TASK_PHASES = ("train", "group")
# How a command runs its phases: this process (null), every rank as processes here (local),
# or one SLURM array per phase, each after the previous one (slurm).
SUBMIT = (None, "local", "slurm")


@dataclass
class VerifyStage:
    """Whether and how candidate pairs are verified from both images (``verify:`` in ``conf/dedup.yaml``).

    Attributes:
        enabled: True, False, or None (on when the stage embeds the images itself; off with
            precomputed embeddings, whose images it may not have).
        candidate_threshold: the cosine similarity in [-1, 1] at or above which the search
            proposes a candidate pair when verifying (chosen for recall: the verifier restores
            precision); None: ``threshold``.
        candidate_neighbours: each image's this many most similar images are candidates too,
            however similar, down to ``candidate_floor`` (>= 0): a copy the embedder places far
            (a texture it cannot describe) is still its copies' nearest.
        candidate_floor: the cosine similarity in [-1, 1] below which no neighbour is a
            candidate; None: no neighbour candidates (only ``candidate_threshold``).
        chunk_images: images a verify task holds at once, >= 2 (its memory, not its result).
        pair: the verifier's own settings (:class:`~pipeline.dedup.pair_verify.VerifySettings`).
    """

    enabled: bool | None = None
    candidate_threshold: float | None = None
    chunk_images: int = 2048
    pair: VerifySettings = field(default_factory=VerifySettings)
    candidate_neighbours: int = 16
    candidate_floor: float | None = None

    def __post_init__(self):
        if self.candidate_threshold is not None and not -1.0 <= float(self.candidate_threshold) <= 1.0:
            raise ValueError(
                f"verify.candidate_threshold: must be a cosine similarity in [-1, 1], got {self.candidate_threshold}"
            )
        if self.chunk_images < 2:
            raise ValueError(f"verify.chunk_images: must be >= 2 (a pair's two images), got {self.chunk_images}")
        if self.candidate_neighbours < 0:
            raise ValueError(f"verify.candidate_neighbours: must be >= 0, got {self.candidate_neighbours}")
        if self.candidate_floor is not None and not -1.0 <= float(self.candidate_floor) <= 1.0:
            raise ValueError(f"verify.candidate_floor: must be a cosine similarity in [-1, 1], got {self.candidate_floor}")

    @property
    def neighbours(self) -> int:
        """Neighbours per image proposed below ``candidate_threshold`` (0 without a floor)."""
        return self.candidate_neighbours if self.candidate_floor is not None else 0

    def decides(self) -> dict:
        """What decides a verified pair (the verify units' settings; not ``chunk_images``)."""
        return {
            "candidate_threshold": self.candidate_threshold,
            "candidate_neighbours": self.neighbours,
            "candidate_floor": self.candidate_floor if self.neighbours else None,
            "pair": self.pair.to_dict(),
        }


@dataclass
class DedupSettings:
    """What decides the groups (the top level of ``conf/dedup.yaml``).

    Attributes:
        threshold: cosine similarity in [-1, 1] at or above which two images are near-duplicates.
        k: neighbours kept per image (its k most similar above the threshold), >= 1; None: all.
        top_k: groups selected for the generator, >= 0.
        min_group_size: a group needs this many members (>= 1) to be selected.
        batch_size: images per embedding call, >= 1.
        index: how pairs are searched.
        verify: whether and how candidate pairs are verified from both images.
    """

    threshold: float | None
    k: int | None = 32
    top_k: int = 20
    min_group_size: int = 2
    batch_size: int = 256
    index: IndexSettings = field(default_factory=IndexSettings)
    verify: VerifyStage = field(default_factory=VerifyStage)

    def __post_init__(self):
        if self.threshold is None or not -1.0 <= float(self.threshold) <= 1.0:
            raise ValueError(
                f"threshold: must be a cosine similarity in [-1, 1], got {self.threshold!r} "
                "(the embedder has no default threshold; pass threshold=...)"
            )
        if self.k is not None and self.k < 1:
            raise ValueError(f"k: must be >= 1 or null (keep every neighbour above the threshold), got {self.k}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if self.min_group_size < 1:
            raise ValueError(f"min_group_size: must be >= 1, got {self.min_group_size}")


@dataclass
class GroupSettings:
    """The top-level keys of :class:`DedupSettings` (its ``index`` is read on its own)."""

    threshold: float | None
    k: int | None
    top_k: int
    min_group_size: int
    batch_size: int


@dataclass
class RunSettings:
    """How this command runs the stage.

    Attributes:
        phase: ``all`` or one of :data:`PHASES`.
        rank, world_size: this process's shard (``0 <= rank < world_size``).
        submit: None (this process runs ``phase`` for ``rank``), ``local`` or ``slurm`` (every
            rank of every phase, chained; see :mod:`pipeline.dedup.launch`).
        embeddings_dir: precomputed embeddings (clip-retrieval layout), or None.
        locate: with ``embeddings_dir``, also write the location index of ``data`` (phase
            ``locate``; the embed phase writes it otherwise).
        group_chunk_rows: the group phase's queries per step and records per sort bucket.
        evaluate: score the groups against ``data.ground_truth`` when there is one.
        progress: progress bars.
    """

    phase: str = setting(choices=("all", *PHASES))
    rank: int = setting(minimum=0)
    world_size: int = setting(minimum=1)
    submit: str | None = setting(choices=SUBMIT, default=None)
    embeddings_dir: str | None = None
    locate: bool = False
    group_chunk_rows: int = setting(minimum=1, default=1 << 18)
    evaluate: bool = True
    progress: bool = True


def settings_from_config(cfg) -> DedupSettings:
    """:class:`DedupSettings` from the stage's config; a value of the wrong type raises a ConfigError naming its key."""
    known = {f.name for f in dataclasses.fields(IndexSettings)}
    unknown = set(cfg.index) - known
    if unknown:
        raise ConfigError(f"index: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    index = settings_from(IndexSettings, cfg, "index.")
    if "seed" not in cfg.index:
        index = dataclasses.replace(index, seed=cfg.get("seed", 0))
    # The ranges are DedupSettings' to check; a null threshold gets its hint there.
    return DedupSettings(**dataclasses.asdict(settings_from(GroupSettings, cfg)), index=index, verify=verify_from_config(cfg))


@dataclass
class VerifyKeys:
    """The keys of ``verify:`` besides the verifier's own (read apart: :class:`VerifyStage`)."""

    enabled: bool | None = None
    candidate_threshold: float | None = setting(minimum=-1.0, maximum=1.0, default=None)
    chunk_images: int = setting(minimum=2, default=2048)
    candidate_neighbours: int = setting(minimum=0, default=16)
    candidate_floor: float | None = setting(minimum=-1.0, maximum=1.0, default=None)


def verify_from_config(cfg) -> VerifyStage:
    """:class:`VerifyStage` from the config's ``verify:`` (absent: the defaults); an unknown key
    or a wrong value raises a ConfigError naming its key."""
    block = cfg.get("verify") if hasattr(cfg, "get") else None
    if block is None:
        return VerifyStage()
    own = {f.name for f in dataclasses.fields(VerifyKeys)}
    known = own | {f.name for f in dataclasses.fields(VerifySettings)}
    unknown = set(block) - known
    if unknown:
        raise ConfigError(f"verify: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    keys = settings_from(VerifyKeys, cfg, "verify.")
    try:
        pair = settings_from(VerifySettings, cfg, "verify.")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return VerifyStage(
        keys.enabled, keys.candidate_threshold, keys.chunk_images, pair, keys.candidate_neighbours, keys.candidate_floor
    )


def embedder_identity(embedder_cfg) -> dict:
    """The embedder's config minus what does not change the vectors (device, batching, thresholds),
    plus, under ``local_files``, the identity of each value naming a local file or folder (e.g.
    ``pretrained=/weights/ViT-L-14.pt``): its files' names, sizes and modification times, so
    weights replaced in place redo the embedding."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(embedder_cfg, resolve=True)
    identity = {
        k: v
        for k, v in values.items()
        if k not in ("device", "batch_size", "num_workers", "threshold", "candidate_threshold", "candidate_floor", "cache_dir")
    }
    local = {
        k: digest_of(tree_identity(Path(v).expanduser()))
        for k, v in identity.items()
        if isinstance(v, str) and v and Path(v).expanduser().exists()
    }
    if local:
        identity["local_files"] = local
    return identity
