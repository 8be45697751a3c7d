"""The units of the duplicate finder's six phases and what decides each one's result.

Every phase is a step of the stage executor (:mod:`pipeline.executor`); its units' markers
(``<dedup>/.done/<unit>.json``) hold the settings below, so that a rerun redoes exactly what a
change decides:

* ``embed_<rank>``: the data set's config and files (names, sizes, modification times), the
  embedder's identity, ``rank`` and ``world_size``;
* ``locate_<rank>`` (precomputed embeddings, ``locate=true``): the same without the embedder;
* ``train``: the embeddings (the embed units' digests, or the precomputed files) and the index
  settings, not ``world_size``;
* ``index_<rank>``: the train unit and the centroids' own digest, the embeddings, the index
  settings, ``rank`` and ``world_size``;
* ``search_<rank>``: every index unit, the search threshold (``verify.candidate_threshold``,
  or ``verify.candidate_floor`` where lower, when verifying; else ``threshold``), ``k``,
  ``rank`` and ``world_size``;
* ``verify_<rank>`` (when verifying): every search unit, the verifier's settings, ``rank`` and
  ``world_size`` (the images are those the embed units read: their digests are in the search units');
* ``group``: every search unit and verify unit, ``top_k``, ``min_group_size`` (and, precomputed,
  the metadata files).

:class:`DedupRun` holds what the phases of one run share and checks their order: a phase run
before the one it reads refuses with one line naming the phase to run first.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.data.embeddings_store import EmbeddingRows, list_shards
from pipeline.dedup.inputs import data_identity, embedding_files_identity, metadata_identity
from pipeline.dedup.settings import DedupSettings
from pipeline.embedders.base import Embedder
from pipeline.executor import Unit, all_done, read_marker
from pipeline.io import marker_path
from pipeline.layout import EMBEDDINGS


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Query rows ``[start, stop)`` of rank ``rank``: contiguous, sizes differing by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


class DedupRun:
    """What the phases of one run share: where things are, the settings that decide each
    phase's units (stored in their markers), the embeddings once read, and the order checks.

    Args:
        out: the stage's folder, ``<run_dir>/dedup``.
        data: the ``data`` config (the embed phase's input); None with ``embeddings_dir``.
        embedder_id: what identifies the embedding (a changed id redoes it).
        embeddings_dir: a clip-retrieval folder of precomputed embeddings, or None.
        group_chunk_rows: the group phase's queries per step and records per sort bucket (>= 1).
        locate: with ``embeddings_dir``, write the location index of ``data`` (phase locate).
    """

    def __init__(
        self,
        out: Path,
        settings: DedupSettings,
        data: Mapping[str, Any] | None,
        embedder: Embedder | None,
        embedder_id: Any,
        embeddings_dir: str | Path | None,
        world_size: int,
        group_chunk_rows: int,
        locate: bool = False,
    ):
        self.out = out
        self.settings = settings
        self.data = data
        self.embedder = embedder
        self.embedder_id = embedder_id if embedder_id is not None else getattr(embedder, "name", None)
        self.precomputed = Path(embeddings_dir) if embeddings_dir else None
        self.world_size = world_size
        self.group_chunk_rows = group_chunk_rows
        self.locate = bool(locate)
        self._rows: EmbeddingRows | None = None
        self._data_identity: dict | None = None
        self._embeddings_settings: dict | None = None
        enabled = settings.verify.enabled
        # Verifying needs the images: the stage's own data set, or one named beside precomputed embeddings.
        self.verifying = (self.precomputed is None) if enabled is None else bool(enabled)
        if self.verifying and self.precomputed is not None and not (data or {}).get("path"):
            raise ValueError(
                "verify.enabled: verifying pairs needs their images; name the data set the embeddings come from "
                "(data=... data.path=...) or pass verify.enabled=false"
            )

    @property
    def candidate_threshold(self) -> float:
        """The similarity at or above which every pair found is a candidate when verifying."""
        verify = self.settings.verify
        return float(verify.candidate_threshold if verify.candidate_threshold is not None else self.settings.threshold)

    @property
    def search_threshold(self) -> float:
        """The search's threshold: when verifying, the loose candidate threshold (or the
        neighbours' floor, where lower); else ``threshold``."""
        verify = self.settings.verify
        if not self.verifying:
            return float(self.settings.threshold)
        threshold = self.candidate_threshold
        return min(threshold, float(verify.candidate_floor)) if verify.neighbours else threshold

    # Where things are ---------------------------------------------------------------------

    @property
    def embeddings_root(self) -> Path:
        return self.precomputed if self.precomputed is not None else self.out / EMBEDDINGS

    def shards(self) -> list[int]:
        """The embedding shards: one per rank, or the precomputed folder's ``img_emb_<n>.npy``."""
        if self.precomputed is None:
            return list(range(self.world_size))
        if not self.precomputed.is_dir():
            raise FileNotFoundError(f"embeddings_dir: {self.precomputed} is not a folder")
        shards = list_shards(self.precomputed)
        if not shards:
            raise FileNotFoundError(f"embeddings_dir: no img_emb/img_emb_<n>.npy files in {self.precomputed}")
        return shards

    # Units: each phase's, with the settings that decide its result -----------------------

    def data_identity(self) -> dict:
        """The data set's files (:func:`pipeline.dedup.inputs.data_identity`), walked once per
        process, on first use: before the embed step reads a record."""
        if self._data_identity is None:
            self._data_identity = data_identity(dict(self.data or {}))
        return self._data_identity

    def embed_unit(self, rank: int) -> Unit:
        data = {k: v for k, v in dict(self.data or {}).items() if k not in ("ground_truth", "locations")}
        return Unit(
            f"embed_{rank}",
            {
                "data": data,
                "data_files": self.data_identity(),
                "embedder": self.embedder_id,
                "rank": rank,
                "world_size": self.world_size,
            },
        )

    def embed_units(self) -> list[Unit]:
        """One per rank; none with precomputed embeddings."""
        return [] if self.precomputed is not None else [self.embed_unit(r) for r in range(self.world_size)]

    def locate_units(self) -> list[Unit]:
        """One per rank with precomputed embeddings and ``locate``; none otherwise (the embed
        units write the locations of the records they read)."""
        if self.precomputed is None or not self.locate:
            return []
        return [Unit(f"locate_{r}", {**self.embed_unit(r).settings, "embedder": None}) for r in range(self.world_size)]

    def embeddings_settings(self) -> dict:
        """What identifies the embeddings the later phases read: the embed units' digests, or
        the precomputed vectors' files (names, sizes, modification times). Computed once per
        process: every later unit's settings hold it, some for every rank."""
        if self._embeddings_settings is None:
            if self.precomputed is None:
                self._embeddings_settings = {"embed": [u.digest for u in self.embed_units()]}
            else:
                self._embeddings_settings = {
                    "embeddings_dir": str(self.precomputed.resolve()),
                    "files": embedding_files_identity(self.precomputed, self.shards()),
                }
        return self._embeddings_settings

    def train_unit(self) -> Unit:
        """The cells, trained once for every rank: they depend on the embeddings and the index
        settings, not on ``world_size`` (the same sample of the same rows)."""
        return Unit("train", {"embeddings": self.embeddings_settings(), "index": self.settings.index.to_dict()})

    def cells_digest(self) -> str | None:
        """The digest of the centroids phase=train wrote (None before it ran, or for exact search)."""
        return (read_marker(self.out, "train") or {}).get("centroids")

    def index_unit(self, rank: int) -> Unit:
        # The train unit's digest and the centroids' own: retraining (new settings, or cells
        # trained again on another kind of CPU) redoes every index task.
        settings = {
            "train": self.train_unit().digest,
            "cells": self.cells_digest(),
            "embeddings": self.embeddings_settings(),
            "index": self.settings.index.to_dict(),
            "rank": rank,
            "world_size": self.world_size,
        }
        return Unit(f"index_{rank}", settings)

    def index_units(self) -> list[Unit]:
        return [self.index_unit(r) for r in range(self.world_size)]

    def search_unit(self, rank: int) -> Unit:
        s = self.settings
        index = [u.digest for u in self.index_units()]
        return Unit(
            f"search_{rank}",
            {"index": index, "threshold": self.search_threshold, "k": s.k, "rank": rank, "world_size": self.world_size},
        )

    def search_units(self) -> list[Unit]:
        return [self.search_unit(r) for r in range(self.world_size)]

    def verify_unit(self, rank: int) -> Unit:
        searches = [u.digest for u in self.search_units()]
        settings = {"search": searches, "verify": self.settings.verify.decides(), "rank": rank, "world_size": self.world_size}
        if self.precomputed is not None:  # the images come from a data set the embed units do not cover
            settings["data_files"] = self.data_identity()
        return Unit(f"verify_{rank}", settings)

    def verify_units(self) -> list[Unit]:
        """One per rank when verifying; none otherwise."""
        return [self.verify_unit(r) for r in range(self.world_size)] if self.verifying else []

    def pair_files(self) -> list[Path]:
        """The pairs the group phase joins: the verified pairs when verifying, else the search's."""
        folder = "verified" if self.verifying else "pairs"
        return [self.out / folder / f"pairs_{r}.npy" for r in range(self.world_size)]

    def group_unit(self) -> Unit:
        searches = [u.digest for u in self.search_units()]
        settings = {"search": searches, "top_k": self.settings.top_k, "min_group_size": self.settings.min_group_size}
        if self.verifying:
            settings["verify"] = [u.digest for u in self.verify_units()]
        if self.precomputed is not None:  # the keys and captions listed; the embed units cover the stage's own
            settings["metadata"] = metadata_identity(self.precomputed, self.shards())
        return Unit("group", settings)

    # Phase order --------------------------------------------------------------------------

    def require(self, units: list[Unit], phase: str) -> None:
        """Raise unless every one of ``units`` (an earlier phase's) is done with the current settings."""
        stale = [u.name for u in units if not all_done(self.out, [u])]
        if stale:
            # A marker of other settings: for embed units, the data set's files may have changed since.
            other = [name for name in stale if read_marker(self.out, name) is not None]
            why = f"; {', '.join(other)} done with other settings or input files" if other else ""
            names = ", ".join(stale)
            raise RuntimeError(f"phase={phase} needs {names} done first (in {self.out}{why}); run the earlier phase(s)")

    def require_cells(self, phase: str) -> dict:
        """The train marker, or one line saying to run phase=train first."""
        unit = self.train_unit()
        if not all_done(self.out, [unit]):
            state = (
                "is missing" if read_marker(self.out, "train") is None else "was written with other embeddings or index settings"
            )
            raise RuntimeError(
                f"phase={phase} needs the IVF cells trained once: run phase=train first (one task, rank 0; "
                f"{marker_path(self.out, 'train')} {state})"
            )
        return self.marker("train")

    def marker(self, name: str) -> dict:
        """A done unit's marker (its settings and what its phase recorded), or one line to rerun it."""
        info = read_marker(self.out, name)
        if info is None:
            raise RuntimeError(f"{marker_path(self.out, name)}: missing or unreadable; run the phase that writes it again")
        return info

    def rows(self, phase: str) -> EmbeddingRows:
        """The embeddings, read a slice at a time (after every embed unit is done)."""
        self.require(self.embed_units(), phase)
        if self._rows is None:
            self._rows = EmbeddingRows(self.embeddings_root, self.shards())
        return self._rows
