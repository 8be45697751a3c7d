"""The stage's phases as chained arrays from one command (``submit=local`` or ``submit=slurm``).

Phase ``k`` of an array may start only when phase ``k - 1`` is complete on every rank:

* ``submit=local``: each phase's ``world_size`` ranks at once on this machine, rank 0 in the
  launching process (which holds rank 0's writer lock) and ranks ``1 .. world_size - 1`` in
  worker processes (spawned once, reused phase after phase); the next phase starts when every
  rank has returned, and the first failing rank's error ends the command.
* ``submit=slurm``: one SLURM array of ``world_size`` tasks per phase (submitit), each array
  submitted with ``--dependency=afterok:<previous array>`` (it starts once every task of the
  previous array has exited 0) and ``--kill-on-invalid-dep=yes`` (a failed phase cancels the
  later ones instead of leaving them pending). The command returns after submitting, with each
  phase's job id; the arrays' parameters (partition, cpus, memory, gpus, time) are those of the
  Hydra launcher config named on the command line (``hydra/launcher=slurm_cpu``,
  ``conf/hydra/launcher/``), its submitit logs beside the command's log.

Each task runs ``task(config, phase, rank)``: a module-level function (pickled by reference)
given the resolved config as plain containers.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.cli import ConfigError
from pipeline.io import FolderBusyError, writer_lock

log = logging.getLogger(__name__)

Task = Callable[[dict, str, int], Any]
# How long a SLURM task waits for its rank's writer lock: the submitting command holds rank 0's
# until it exits, moments after submitting.
LOCK_WAIT_S = 120
# Launcher keys that are submitit's own (not ``slurm_<key>``), as hydra-submitit-launcher reads them.
BASE_KEYS = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name", "stderr_to_stdout"}


def run_local(task: Task, config: dict, phases: Sequence[str], world_size: int) -> list[Any]:
    """Every phase's ranks as processes here, phase after phase; returns rank 0's result of each phase."""
    results = []
    context = multiprocessing.get_context("spawn")  # no forked copy of this process's threads (faiss, torch)
    with ProcessPoolExecutor(max_workers=max(1, world_size - 1), mp_context=context) as pool:
        for phase in phases:
            others = [pool.submit(locked_task, task, config, phase, rank) for rank in range(1, world_size)]
            try:
                results.append(task(config, phase, 0))
            finally:
                errors = [future.exception() for future in others]  # waits for every rank
            failed = next((err for err in errors if err is not None), None)
            if failed is not None:
                raise failed
            log.info("phase=%s: %d ranks done", phase, world_size)
    return results


def locked_task(task: Task, config: dict, phase: str, rank: int, wait_s: float = 0) -> Any:
    """``task`` for ``rank`` under its writer lock (waiting up to ``wait_s`` seconds for it)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with writer_lock(config["out_dir"], rank):
                return task(config, phase, rank)
        except FolderBusyError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2)


def submit_slurm(
    task: Task, config: dict, phases: Sequence[str], world_size: int, launcher: Mapping[str, Any], folder: Path
) -> dict[str, str]:
    """One array per phase, each after the previous one (afterok); returns ``{phase: job id}``."""
    import submitit

    if "partition" not in launcher:
        raise ConfigError("submit=slurm: name a SLURM launcher for the arrays' resources: hydra/launcher=slurm_cpu (or slurm)")
    params = {k: v for k, v in launcher.items() if k not in ("_target_", "submitit_folder", "max_num_timeout", "name")}
    extra = dict(params.pop("additional_parameters", None) or {})
    jobs: dict[str, str] = {}
    previous = None
    for phase in phases:
        executor = submitit.AutoExecutor(
            folder=folder / phase / "%j", cluster="slurm", slurm_max_num_timeout=launcher.get("max_num_timeout", 0)
        )
        dependency = {"dependency": f"afterok:{previous}", "kill-on-invalid-dep": "yes"} if previous else {}
        executor.update_parameters(
            **{k if k in BASE_KEYS else f"slurm_{k}": v for k, v in params.items()},
            name=f"dedup_{phase}",
            slurm_additional_parameters={**extra, **dependency},
        )
        ranks = list(range(world_size))
        array = executor.map_array(
            locked_task, [task] * world_size, [config] * world_size, [phase] * world_size, ranks, [LOCK_WAIT_S] * world_size
        )
        previous = jobs[phase] = str(array[0].job_id).split("_")[0]
        log.info(
            "phase=%s: SLURM array job %s (%d tasks)%s",
            phase,
            previous,
            world_size,
            f" after {jobs[phases[phases.index(phase) - 1]]}" if dependency else "",
        )
    return jobs


def hydra_launcher(run_dir: str | Path) -> tuple[dict, Path]:
    """The Hydra launcher config named on the command line (``hydra/launcher=slurm_cpu``), and
    the folder for the arrays' submitit logs: ``submitit/`` beside the command's own log."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return {}, Path(run_dir) / "logs" / "dedup" / "submitit"
    hydra = HydraConfig.get()
    launcher = OmegaConf.to_container(hydra.launcher, resolve=False)
    # Resolved key by key: submitit_folder refers to hydra.sweep.dir, not set outside a multirun.
    resolved = {k: OmegaConf.select(hydra.launcher, k) for k in launcher if k != "submitit_folder"}
    plain = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in resolved.items()}
    return plain, Path(hydra.runtime.output_dir) / "submitit"
