"""The duplicate finder's phases, each a step of the stage executor (:mod:`pipeline.executor`).

1. :class:`Embed`, one unit per rank (none with precomputed embeddings): embeds shard ``rank``
   of the data set into ``embeddings/`` (clip-retrieval layout) and writes its records'
   locations into ``locations/`` (:mod:`pipeline.data.locations`); with precomputed
   embeddings and ``locate=true``, :class:`Locate` writes the locations alone;
2. :class:`Train`, one unit (rank 0): for IVF, the cells by spherical k-means on a sample of the
   rows, ``index/centroids.npy`` (exact search: only the marker, saying so);
3. :class:`Index`, one unit per rank: rows ``shard_bounds(N, rank, world_size)`` assigned to the
   cells and written to bucket files by cell (:mod:`pipeline.dedup.buckets`; exact: nothing);
4. :class:`Search`, one unit per rank: IVF, the pairs of the cells rank ``rank`` owns; exact,
   query rows of shard ``rank`` against all rows; ``pairs/pairs_<rank>.npy``;
5. :class:`Verify`, one unit per rank when verifying (none otherwise): the candidate pairs
   whose smaller row is in shard ``rank``, each decided from both images
   (:mod:`pipeline.dedup.verification`); ``verified/pairs_<rank>.npy``;
6. :class:`Group`, one unit (rank 0): connected components over the pair files (the verified
   ones when verifying), ``groups.parquet``, ``selected.parquet`` and ``summary.json``.

Each phase times its work with ``ctx.track_time(<phase>)`` (merged into ``stats.json``) and
records what it did in its units' markers. A phase run before the one it reads refuses with
one line naming the phase to run first (:class:`~pipeline.dedup.units.DedupRun`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.embeddings_store import metadata_path, unit_rows, write_shard
from pipeline.data.locations import MANIFEST, RANK_FILE, location_table, write_manifest, write_rank_file
from pipeline.dedup.buckets import centroids_digest, join_buckets, train_centroids, write_buckets, write_pairs
from pipeline.dedup.embedding import embed_records
from pipeline.dedup.grouping import stream_components
from pipeline.dedup.index import DATABASE_BLOCK, Pairs, assign_cells, exact_pairs_blocked, training_sample
from pipeline.dedup.records import write_groups
from pipeline.dedup.scratch import scratch_folder
from pipeline.dedup.summary import OUTPUTS, build_summary, evaluation, phase_seconds
from pipeline.dedup.units import DedupRun, shard_bounds
from pipeline.dedup.verification import AMBIGUOUS, best_for_grey, keys_of_rows, owned_candidates, verify_candidates
from pipeline.executor import StepContext, Unit
from pipeline.io import write_json, write_npy, write_parquet
from pipeline.layout import EMBEDDINGS, GROUPS, LOCATIONS, REJECTS, SELECTED, SUMMARY

log = logging.getLogger(__name__)


def load_centroids(out_dir: Path) -> np.ndarray:
    """``<dedup>/index/centroids.npy``, as phase=train wrote it: float32 (nlist, dim)."""
    return np.load(Path(out_dir) / "index" / "centroids.npy")


class UnitView:
    """Stored rows seen as float32 unit rows, a slice at a time (for :func:`assign_cells`)."""

    def __init__(self, stored: np.ndarray):
        self.stored = stored

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, part: slice) -> np.ndarray:
        return unit_rows(self.stored[part])


class Phase:
    """What every phase shares: its run's :class:`DedupRun`, and rejects listed per rank (the
    embed units are per rank: a rank file beyond ``world_size`` is stale)."""

    name = ""
    rejects_per_world_size = True

    def __init__(self, dedup: DedupRun):
        self.dedup = dedup


class Embed(Phase):
    """Phase 1, one unit per rank (none with precomputed embeddings): embed shard ``rank``."""

    name = "embed"

    def units(self) -> list[Unit]:
        if self.dedup.precomputed is not None:
            log.info("embed: using the precomputed embeddings in %s", self.dedup.precomputed)
        return self.dedup.embed_units()

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        dedup = self.dedup
        if dedup.embedder is None:
            raise ValueError(
                "embedder: none configured; pick one (embedder=thumbnail, embedder=open_clip) or pass embeddings_dir=..."
            )
        if dedup.data is None:
            raise ValueError("data: no data set configured; pick a conf/data/*.yaml (data=files data.path=...)")
        from pipeline.data import open_dataset

        for unit in units:
            with ctx.track_time("embed"):
                records = open_dataset(
                    dedup.data, rank=ctx.rank, world_size=ctx.world_size, rejects=ctx.rejects, progress=ctx.progress
                )
                located: list[tuple[str, Any]] = []
                embeddings, metadata = embed_records(
                    noting_locations(records, located), dedup.embedder, dedup.settings.batch_size
                )
                write_shard(dedup.out / EMBEDDINGS, ctx.rank, embeddings, metadata)
                write_rank_file(dedup.out / LOCATIONS, ctx.rank, location_table(located))
            ctx.stat("rows", len(metadata))
            ctx.done(
                unit,
                {
                    "rows": len(metadata),
                    "rejected": len(ctx.rejects),
                    "rejects_by_reason": dict(ctx.rejects.reasons),
                    "embedder": dedup.embedder.name,
                    "dim": int(dedup.embedder.dim),
                    "seconds": ctx.seconds["embed"],
                },
            )
            log.info(
                "embed: shard %d: %d images embedded in %.1f s; %s",
                ctx.rank,
                len(metadata),
                ctx.seconds["embed"],
                ctx.rejects.summary(),
            )

    def is_complete(self, unit: Unit, marker: dict) -> bool:
        """The same settings, and the shard's location file is there (an older run's shard without one is redone)."""
        rank = int(unit.settings["rank"])
        return marker.get("digest") == unit.digest and (self.dedup.out / LOCATIONS / RANK_FILE.format(rank=rank)).is_file()

    def locates(self) -> bool:
        """Whether this phase writes the location index (the embed phase does unless the
        embeddings are precomputed)."""
        return self.dedup.precomputed is None

    def outputs(self) -> list[Path]:
        return [self.dedup.out / LOCATIONS / MANIFEST] if self.locates() else []

    def finish(self, ctx: StepContext) -> None:
        """Every rank's locations are written: the index's manifest (:mod:`pipeline.data.locations`)."""
        if self.locates():
            write_manifest(self.dedup.out / LOCATIONS, self.dedup.data, ctx.world_size)


def noting_locations(records: Iterable[Any], located: list[tuple[str, Any]]) -> Iterator[Any]:
    """``records`` as they come, each one's key and location appended to ``located``."""
    for record in records:
        located.append((record.key, record.location))
        yield record


class Locate(Embed):
    """Phase 1b, one unit per rank with precomputed embeddings and ``locate=true`` (none
    otherwise): the location index of shard ``rank`` of the data set, its images not decoded."""

    name = "locate"

    def units(self) -> list[Unit]:
        return self.dedup.locate_units()

    def locates(self) -> bool:
        return self.dedup.precomputed is not None and self.dedup.locate

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        dedup = self.dedup
        if dedup.data is None or not dedup.data.get("path"):
            raise ValueError("data.path: locate=true indexes a data set; pick a conf/data/*.yaml and data.path=...")
        from pipeline.data import open_dataset

        for unit in units:
            with ctx.track_time("locate"):
                records = open_dataset(
                    dedup.data,
                    rank=ctx.rank,
                    world_size=ctx.world_size,
                    rejects=ctx.rejects,
                    progress=ctx.progress,
                    decode=False,
                    require_nonempty=False,
                )
                table = location_table((record.key, record.location) for record in records)
                write_rank_file(dedup.out / LOCATIONS, ctx.rank, table)
            ctx.stat("rows", table.num_rows)
            ctx.done(unit, {"rows": table.num_rows, "rejected": len(ctx.rejects), "seconds": ctx.seconds["locate"]})
            log.info("locate: shard %d: %d records located in %.1f s", ctx.rank, table.num_rows, ctx.seconds["locate"])


class Train(Phase):
    """Phase 2, one unit on rank 0: the IVF cells, trained once by spherical k-means on a sample
    of the rows (``index.train_size``, default 32 x nlist), written atomically to
    ``index/centroids.npy`` before the marker that holds their digest."""

    name = "train"

    def units(self) -> list[Unit]:
        return [self.dedup.train_unit()]

    def is_complete(self, unit: Unit, marker: dict) -> bool:
        """The same settings, and the centroids it wrote are still there, unchanged."""
        if marker.get("digest") != unit.digest:
            return False
        if marker.get("kind") != "ivf":
            return True
        try:
            return centroids_digest(load_centroids(self.dedup.out)) == marker.get("centroids")
        except (OSError, ValueError):
            return False

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        dedup, index = self.dedup, self.dedup.settings.index
        (unit,) = units
        with ctx.track_time("train"):
            rows = dedup.rows("train")
            kind = index.resolved_kind(rows.n)
            info: dict[str, Any] = {"kind": kind, "rows": rows.n, "dim": rows.dim}
            if kind == "ivf":
                # Only the sample is held: train_size (default 32 x nlist) rows of float32.
                centroids = train_centroids(rows, index)
                path = dedup.out / "index" / "centroids.npy"
                write_npy(centroids, path)
                info.update(
                    nlist=len(centroids),
                    nprobe=min(index.nprobe, len(centroids)),
                    centroids=centroids_digest(centroids),
                    sample_rows=len(training_sample(rows.n, index)),
                    path=str(path),
                )
        info["seconds"] = info["train_seconds"] = ctx.seconds["train"]
        ctx.done(unit, info)  # after the centroids: the marker holds their digest
        log.info(
            "train: %s on %d rows (%.1f s)",
            f"{info['nlist']} cells" if kind == "ivf" else "exact search, no cells",
            rows.n,
            info["seconds"],
        )


class Index(Phase):
    """Phase 3, one unit per rank: rank ``rank``'s rows assigned to the cells phase=train wrote and
    bucketed by cell (exact: nothing to build). Holds its rows (float16) and the cells."""

    name = "index"

    def units(self) -> list[Unit]:
        return self.dedup.index_units()

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        dedup = self.dedup
        (unit,) = units
        with ctx.track_time("index"):
            rows = dedup.rows("index")
            train = dedup.require_cells("index")
            kind = train["kind"]
            start, stop = shard_bounds(rows.n, ctx.rank, ctx.world_size)
            info: dict[str, Any] = {"kind": kind, "rows": rows.n, "dim": rows.dim, "first_row": start, "stop_row": stop}
            if kind == "ivf":
                info.update(self._bucket(rows, train, start, stop, ctx))
        info["seconds"] = ctx.seconds["index"]
        ctx.done(unit, info)
        log.info("index: %s, rank %d: rows %d-%d of %d (%.1f s)", kind, ctx.rank, start, stop, rows.n, info["seconds"])

    def _bucket(self, rows, train: dict, start: int, stop: int, ctx: StepContext) -> dict[str, Any]:
        """Rows ``[start, stop)`` assigned to their ``nprobe`` nearest cells and written by cell."""
        dedup = self.dedup
        index_dir = dedup.out / "index"
        try:
            centroids = load_centroids(dedup.out)
        except (OSError, ValueError) as err:
            raise RuntimeError(
                f"phase=index: {index_dir / 'centroids.npy'} is unreadable ({err}); run phase=train again"
            ) from err
        if centroids_digest(centroids) != train["centroids"] or centroids.shape[1] != rows.dim:
            raise RuntimeError(
                f"phase=index: {index_dir / 'centroids.npy'} is not what phase=train recorded; run phase=train again"
            )
        nlist, nprobe = len(centroids), min(dedup.settings.index.nprobe, len(centroids))
        stored = rows.read(start, stop)  # this rank's rows, float16: N / world_size x dim x 2 bytes
        assign = assign_cells(centroids, UnitView(stored), nprobe, progress=ctx.progress)
        write_npy(assign, index_dir / f"assign_{ctx.rank}.npy")
        entries = write_buckets(index_dir, ctx.rank, ctx.world_size, stored, start, assign, nlist)
        return {"nlist": nlist, "nprobe": nprobe, "centroids": centroids_digest(centroids), "bucket_entries": entries}


class Search(Phase):
    """Phase 4, one unit per rank: IVF, the pairs of the cells rank ``rank`` owns (its buckets,
    memory-mapped); exact, the pairs of query rows of shard ``rank`` against all rows."""

    name = "search"

    def units(self) -> list[Unit]:
        return self.dedup.search_units()

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        dedup, settings = self.dedup, self.dedup.settings
        (unit,) = units
        dedup.require(dedup.index_units(), "search")
        with ctx.track_time("search"):
            index = [dedup.marker(f"index_{r}") for r in range(ctx.world_size)]
            if index[0]["kind"] == "ivf":
                digests = sorted({m.get("centroids") for m in index})
                if digests != [dedup.cells_digest()]:
                    raise RuntimeError(
                        f"phase=index: its {ctx.world_size} tasks bucketed rows by cells {digests}, phase=train's are "
                        f"{dedup.cells_digest()}; run phase=index again"
                    )
                pairs = join_buckets(
                    dedup.out / "index",
                    ctx.rank,
                    ctx.world_size,
                    index[0]["nlist"],
                    dedup.search_threshold,
                    settings.k,
                    settings.index.threads,
                    ctx.progress,
                )
                queries = sum(m["bucket_entries"][ctx.rank] for m in index)
            else:
                rows = dedup.rows("search")
                start, stop = shard_bounds(rows.n, ctx.rank, ctx.world_size)
                pairs = exact_pairs_blocked(
                    lambda lo, hi: unit_rows(rows.read(lo, hi)),
                    rows.n,
                    dedup.search_threshold,
                    settings.k,
                    start,
                    stop,
                    settings.index.query_batch,
                    DATABASE_BLOCK,
                    ctx.progress,
                )
                queries = stop - start
            write_pairs(dedup.out / "pairs" / f"pairs_{ctx.rank}.npy", pairs)
        ctx.stat("pairs", len(pairs))
        ctx.done(unit, {"queries": int(queries), "pairs": len(pairs), "seconds": ctx.seconds["search"]})
        log.info("search: rank %d: %d queries, %d pairs (%.1f s)", ctx.rank, queries, len(pairs), ctx.seconds["search"])


class Verify(Phase):
    """Phase 5, one unit per rank when verifying (none otherwise): the candidate pairs whose
    smaller row is in shard ``rank``, each decided from both images, fetched by key a chunk at a
    time (:mod:`pipeline.dedup.verification`); ``verified/pairs_<rank>.npy``."""

    name = "verify"

    def units(self) -> list[Unit]:
        dedup = self.dedup
        if not dedup.verifying:
            why = "precomputed embeddings and no images" if dedup.precomputed is not None else "verify.enabled=false"
            log.info("verify: off (%s); groups join the embedder's pairs at threshold %.3f", why, dedup.search_threshold)
        return dedup.verify_units()

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        from pipeline.data.rejects import RejectLog
        from pipeline.training_images import fetch_training_images, with_location_index

        dedup, verify = self.dedup, self.dedup.settings.verify
        (unit,) = units
        dedup.require(dedup.search_units(), "verify")
        with ctx.track_time("verify"):
            rows = dedup.rows("verify")
            start, stop = shard_bounds(rows.n, ctx.rank, ctx.world_size)
            search_files = [dedup.out / "pairs" / f"pairs_{r}.npy" for r in range(dedup.world_size)]
            candidates = owned_candidates(
                search_files,
                rows.n,
                start,
                stop,
                dedup.settings.k,
                dedup.group_chunk_rows,
                dedup.candidate_threshold if verify.neighbours else None,
                verify.neighbours,
            )
            metadata = [metadata_path(dedup.embeddings_root, shard) for shard in dedup.shards()]
            missing = RejectLog()

            def fetch(keys: list[str]) -> dict:
                # The embed phase's location index: each chunk's images read by key, not by streaming the set.
                return fetch_training_images(with_location_index(dedup.data, dedup.out), keys, rejects=missing)

            verified, unsure, counts = verify_candidates(
                candidates,
                lambda part: keys_of_rows(metadata, rows.offsets, part),
                fetch,
                verify.pair,
                verify.chunk_images,
                ctx.progress,
            )
            write_pairs(dedup.out / "verified" / f"pairs_{ctx.rank}.npy", verified)
            write_npy(unsure, dedup.out / "verified" / f"ambiguous_{ctx.rank}.npy")
        ctx.stat("candidates", counts.candidates)
        ctx.stat("verified", counts.verified)
        info = {
            "rows": stop - start,
            "candidates": counts.candidates,
            "verified": counts.verified,
            "unfetched": counts.unfetched,
            "skipped": counts.skipped,
            "ambiguous": counts.ambiguous,
            "compared": counts.candidates - counts.unfetched - counts.skipped,
            "images": counts.images,
            "chunks": counts.chunks,
            "candidates_per_record": counts.candidates / max(stop - start, 1),
            "seconds_per_pair": counts.seconds_per_pair,
            "compare_seconds": counts.compare_seconds,
            "seconds": ctx.seconds["verify"],
        }
        ctx.done(unit, info)
        if counts.unfetched:
            log.warning(
                "verify: rank %d: %d candidate pairs left unverified: an image could not be fetched", ctx.rank, counts.unfetched
            )
        log.info(
            "verify: rank %d: %d of %d candidate pairs verified (%.2f candidates per record, %.1f ms per pair, %.1f s)",
            ctx.rank,
            counts.verified,
            counts.candidates,
            info["candidates_per_record"],
            1000 * counts.seconds_per_pair,
            info["seconds"],
        )


class Group(Phase):
    """Phase 6, one unit on rank 0: connected components, ``groups.parquet``, the selection and
    ``summary.json`` (evaluated against ``ground_truth`` when given).

    Bounded: one int64 per row (the union-find), a chunk of pairs, a bucket of records of the
    out-of-core sort by key and caption (:mod:`pipeline.dedup.records`), the groups with
    duplicates (a few ints each) and the selected groups' members."""

    name = "group"

    def __init__(self, dedup: DedupRun, ground_truth: str | Path | None):
        super().__init__(dedup)
        self.ground_truth = ground_truth
        self.summary: dict | None = None  # set when this process grouped

    def units(self) -> list[Unit]:
        return [self.dedup.group_unit()]

    def is_complete(self, unit: Unit, marker: dict) -> bool:
        """The same settings, and its summary is still there (else it groups again)."""
        return marker.get("digest") == unit.digest and (self.dedup.out / SUMMARY).exists()

    def outputs(self) -> list[Path]:
        return [self.dedup.out / name for name in OUTPUTS]

    def run(self, units: list[Unit], ctx: StepContext) -> None:
        dedup = self.dedup
        (unit,) = units
        out, chunk = dedup.out, dedup.group_chunk_rows
        dedup.require(dedup.search_units(), "group")
        dedup.require(dedup.verify_units(), "group")
        # Verified pairs were capped to each query's k best already (phase=verify).
        k = None if dedup.verifying else dedup.settings.k
        with ctx.track_time("group"):
            rows = dedup.rows("group")  # the row count (and the shards' shapes checked), no rows read
            with scratch_folder(out) as scratch:
                pair_files = dedup.pair_files()
                if dedup.verifying:  # each grey smooth image's best ambiguous matches join too
                    pair_files.append(scratch / "ambiguous.npy")
                    write_pairs(pair_files[-1], self._chosen_ambiguous())
                labels, n_pairs = stream_components(rows.n, pair_files, k, scratch / "pairs", chunk)
                selected, counts, sort = write_groups(
                    dedup.embeddings_root,
                    dedup.shards(),
                    labels,
                    dedup.settings.top_k,
                    dedup.settings.min_group_size,
                    out / GROUPS,
                    scratch / "records",
                    chunk,
                )
            del labels
            if sort.duplicate_keys:
                log.warning(
                    "embeddings_dir: %d keys occur more than once (e.g. %r); groups.parquet will repeat them",
                    sort.duplicate_keys,
                    sort.example,
                )
            write_parquet(selected, out / SELECTED)
        summary = build_summary(
            out,
            dedup.settings,
            counts,
            selected,
            n_pairs,
            self._rejects(),
            self._embedder(),
            dedup.marker("index_0"),
            dedup.world_size,
            phase_seconds(out, dedup.precomputed is not None, ctx.seconds["group"]),
        )
        summary["verification"] = self._verification(rows.n)
        if self.ground_truth is not None:  # a labelled sample: reads the groups' keys and ids back
            summary["evaluation"] = evaluation(out, self.ground_truth, selected)
        write_json(summary, out / SUMMARY)
        ctx.stat("pairs", n_pairs)
        ctx.done(
            unit,
            {
                "seconds": ctx.seconds["group"],
                "chunk_rows": chunk,
                "record_buckets": sort.buckets,
                "records_held_max": sort.max_bucket,
                "duplicate_keys": sort.duplicate_keys,
            },
        )
        self.summary = summary

    def _chosen_ambiguous(self) -> Pairs:
        """The ambiguous matches of every verify task that are a grey image's best
        (:func:`~pipeline.dedup.verification.best_for_grey`); held whole (a few per grey smooth image)."""
        files = [self.dedup.out / "verified" / f"ambiguous_{r}.npy" for r in range(self.dedup.world_size)]
        table = np.concatenate([np.load(path) for path in files]) if files else np.zeros(0, AMBIGUOUS)
        chosen = table[best_for_grey(table)]
        return Pairs(chosen["i"], chosen["j"], chosen["score"])

    def _verification(self, n: int) -> dict:
        """The verify phase's counts over its tasks (``enabled: false`` and the pairs' threshold when off)."""
        dedup = self.dedup
        if not dedup.verifying:
            return {"enabled": False, "threshold": dedup.search_threshold}
        markers = [dedup.marker(u.name) for u in dedup.verify_units()]
        total = {
            key: sum(int(m.get(key, 0)) for m in markers)
            for key in ("candidates", "verified", "compared", "skipped", "unfetched")
        }
        seconds = sum(float(m.get("seconds_per_pair", 0.0)) * int(m.get("compared", 0)) for m in markers)
        return {
            "enabled": True,
            "candidate_threshold": dedup.candidate_threshold,
            "candidate_neighbours": dedup.settings.verify.neighbours,
            "candidate_floor": dedup.search_threshold,
            **total,
            "candidates_per_record": total["candidates"] / max(n, 1),
            "seconds_per_pair": seconds / total["compared"] if total["compared"] else 0.0,
        }

    def _rejects(self) -> list[dict]:
        """The records the embed phase rejected: its merged rejects (none read from precomputed embeddings)."""
        if self.dedup.precomputed is not None:
            return []
        try:
            lines = (self.dedup.out / REJECTS).read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a line the merge copied but could not parse
        return [e for e in entries if isinstance(e, dict)]

    def _embedder(self) -> dict:
        dedup = self.dedup
        if dedup.precomputed is not None:
            return {"name": "precomputed", "embeddings_dir": str(dedup.precomputed)}
        embed = dedup.marker("embed_0")
        return {"name": embed.get("embedder"), "dim": embed.get("dim")}
