"""The demo audit as SLURM arrays on a real single-node SLURM cluster, not a mock.

A module fixture starts the cluster with ``scripts/slurm_cluster.sh`` (Debian's slurm-wlm and
munge; ``.ci/run`` starts it before ``make test-all``) and skips, saying why, where it cannot. The
demo audit then runs twice on a small demo data set, into two run directories:

* locally, every stage with ``world_size=1``, as ``make demo`` runs them (``pipeline.demo.run``);
* as SLURM arrays, every stage with ``-m hydra/launcher=slurm world_size=2`` (one array task per
  rank); the duplicate finder phase by phase (``phase=embed``, ``train``, ``index``, ``search``,
  ``group``, each array after the previous one; ``train`` and ``group`` work on rank 0 only),
  then prescreen, generate, detect and report.

A test of the duplicate finder alone submits its five phases from one command (``phase=all
submit=slurm``): one array per phase, each depending (afterok) on the previous one.

Each stage's test checks that its SLURM arrays ran and that their outputs match the local
run's: the same prompts, the same sample files with pixels within the one grey level the README
documents, the same verdicts. A SLURM stage that fails is reported with the failing tasks'
stderr (submitit's logs under the stage's sweep dir). A stage that fails or differs is refilled
with the local run's outputs, so that each later stage starts from the same inputs in both runs
and is judged on its own.

The whole module takes about 6.5 minutes on 2 shared cores: the local run about 2.5, the SLURM
run about 4 (each array pays for Python, torch and model start-up in every task).

Settings: ``MEMAUDIT_SLURM_PARTITION`` (default ``debug``, the test cluster's);
``MEMAUDIT_SLURM_INSTALL=1`` lets the fixture install slurm-wlm and munge with apt-get when they
are missing (``.ci/run`` does that itself); ``MEMAUDIT_SLURM_STAGE_TIMEOUT`` (seconds per array,
default 900).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SETUP = REPO / "scripts" / "slurm_cluster.sh"
WORLD_SIZE = 2
PARTITION = os.environ.get("MEMAUDIT_SLURM_PARTITION", "debug")
STAGE_TIMEOUT = int(os.environ.get("MEMAUDIT_SLURM_STAGE_TIMEOUT", "900"))

# A small demo set: 4 originals copied 12 times (the shipped model's most memorized photographs,
# the same originals and captions as in the full set), 4 copied 4 times, 40 singletons.
BANDS = {"heavy": (4, 12), "mid": (4, 4), "single": (40, 1)}
# The demo audit (experiment=demo) on small settings, given to every stage as `make demo ARGS=...`
# would: 6 prompts, 8 samples of 4 steps each; a clique of 3 flags a prompt, so that the verdicts
# hold both flagged and unflagged prompts.
SMALL = ["top_k=6", "n_samples=8", "model.steps=4", "rule.min_clique=3"]
LAUNCHER = [
    "hydra/launcher=slurm",
    f"world_size={WORLD_SIZE}",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=4",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.timeout_min=30",
]
DEDUP_PHASES = ["embed", "train", "index", "search", "verify", "group"]
# What each stage leaves in the run directory when it has finished (detect runs with data=demo,
# so it verifies too); the folder is what gets copied from the local run when a stage fails.
OUTPUTS = {
    "pipeline.dedup": ("dedup", ["selected.parquet", "groups.parquet"]),
    "pipeline.prescreen": ("prescreen", ["prescreen.parquet", "selected.parquet"]),
    "pipeline.generate": ("generations", ["prompts.parquet"]),
    "pipeline.detect": ("detect", ["memorized.parquet", "extracted.parquet"]),
    "pipeline.report": ("report", ["index.html"]),
}
GREY_LEVEL = 1  # of 255: the README's bound on a regenerated or re-batched sample


# --- the cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """A single-node cluster that answers `sinfo` and `srun -N1 true`, or a skip saying why not."""
    if shutil.which("bash") is None:
        pytest.skip("SLURM: no bash to run scripts/slurm_cluster.sh")
    command = ["bash", str(SETUP), "start"]
    if os.environ.get("MEMAUDIT_SLURM_INSTALL") != "1":
        command.append("--no-install")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("SLURM: scripts/slurm_cluster.sh start did not finish within 600 s")
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = (
            lines[-1].removeprefix("slurm_cluster: ").removeprefix("cannot start SLURM: ")
            if lines
            else f"scripts/slurm_cluster.sh exited {done.returncode}"
        )
        pytest.skip(f"SLURM: no single-node cluster could start: {why}")


# --- comparing a stage's outputs, SLURM run against local run --------------------------------


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def sample_files(generations: Path) -> list[str]:
    return sorted(str(p.relative_to(generations)) for p in generations.glob("*/*.png") if not p.name.startswith("."))


def by_prompt(table: pd.DataFrame) -> pd.DataFrame:
    return table.astype({"prompt_id": str}).sort_values("prompt_id").reset_index(drop=True)


def expect(condition: bool, message: str) -> None:
    """A comparison's failure, reported as its message alone (no assertion rewriting)."""
    if not condition:
        raise AssertionError(message)


def same_dedup(local: Path, slurm: Path) -> None:
    """The same selected groups, in the same order, so the same prompt ids and captions."""
    columns = ["prompt_id", "caption", "dup_count"]
    expected = pd.read_parquet(local / "dedup" / "selected.parquet")[columns]
    got = pd.read_parquet(slurm / "dedup" / "selected.parquet")[columns]
    expect(
        got.equals(expected),
        f"dedup/selected.parquet differs:\nlocal (world_size=1):\n{expected}\nSLURM (world_size={WORLD_SIZE}):\n{got}",
    )


def same_prescreen(local: Path, slurm: Path) -> None:
    """One prescreen table over every prompt, the same scores, the same kept prompts."""
    expected = by_prompt(pd.read_parquet(local / "prescreen" / "prescreen.parquet"))
    got = by_prompt(pd.read_parquet(slurm / "prescreen" / "prescreen.parquet"))
    expect(got["prompt_id"].tolist() == expected["prompt_id"].tolist(), "prescreen.parquet holds other prompts")
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-4, err_msg="prescreen scores differ")
    expect(
        got["kept"].tolist() == expected["kept"].tolist(),
        f"other prompts kept:\n{expected[['prompt_id', 'kept']]}\n{got[['prompt_id', 'kept']]}",
    )
    kept = [pd.read_parquet(run / "prescreen" / "selected.parquet")["prompt_id"].astype(str).tolist() for run in (local, slurm)]
    expect(kept[1] == kept[0], f"prescreen/selected.parquet: {kept[1]} under SLURM, {kept[0]} locally")


def same_generations(local: Path, slurm: Path) -> None:
    """The same prompts, the same sample files, every pixel within one grey level."""
    local_dir, slurm_dir = local / "generations", slurm / "generations"
    columns = ["prompt_id", "caption", "n_samples", "n_generated", "stop_reason"]
    expected, got = (by_prompt(pd.read_parquet(d / "prompts.parquet")) for d in (local_dir, slurm_dir))
    columns = [c for c in columns if c in expected]
    expect(
        got[columns].equals(expected[columns]),
        f"generations/prompts.parquet differs:\nlocal:\n{expected[columns]}\nSLURM:\n{got[columns]}",
    )
    files = sample_files(local_dir)
    expect(bool(files), f"the local run made no samples in {local_dir}")
    got_files = sample_files(slurm_dir)
    expect(
        got_files == files,
        f"sample files differ: only local {sorted(set(files) - set(got_files))}, only SLURM {sorted(set(got_files) - set(files))}",
    )
    beyond = {}
    for name in files:
        worst = int(np.abs(read_png(slurm_dir / name) - read_png(local_dir / name)).max())
        if worst > GREY_LEVEL:
            beyond[name] = worst
    expect(
        not beyond,
        f"{len(beyond)} of {len(files)} samples differ by more than {GREY_LEVEL} grey level (largest difference): {beyond}",
    )


def same_verdicts(local: Path, slurm: Path) -> None:
    """The same verdicts: flagged and clique size per prompt, and the same extractions."""
    columns = ["prompt_id", "flagged", "clique_size"]
    expected, got = (by_prompt(pd.read_parquet(run / "detect" / "memorized.parquet"))[columns] for run in (local, slurm))
    expect(got.equals(expected), f"detect/memorized.parquet verdicts differ:\nlocal:\n{expected}\nSLURM:\n{got}")
    # The same reproductions: a (sample, training image) pair matched in one run and not in the
    # other must lie within what one grey level can move a distance (1/255 of the RMS of a
    # tile) of the threshold; every other pair, and so every prompt's verdict, must agree.
    delta = json.loads((local / "detect" / "summary.json").read_text())["verification"]["delta"]
    pairs = {name: pd.read_parquet(run / "detect" / "extracted.parquet") for name, run in (("local", local), ("SLURM", slurm))}
    keyed = {name: {(r.prompt_id, int(r.sample), r.train_key): r.distance for r in t.itertuples()} for name, t in pairs.items()}
    unexplained = {
        pair: (name, distance)
        for name, other in (("local", "SLURM"), ("SLURM", "local"))
        for pair, distance in keyed[name].items()
        if pair not in keyed[other] and distance <= delta - GREY_LEVEL / 255
    }
    expect(not unexplained, f"pairs matched in one run only, farther than one grey level from the threshold: {unexplained}")
    borderline = {pair[0] for pair in set(keyed["local"]) ^ set(keyed["SLURM"])}
    columns = ["prompt_id", "extracted"]
    expected, got = (by_prompt(pd.read_parquet(run / "detect" / "memorized.parquet"))[columns] for run in (local, slurm))
    settled = ~expected["prompt_id"].isin(borderline)
    expect(got[settled].equals(expected[settled]), f"extracted prompts differ:\nlocal:\n{expected}\nSLURM:\n{got}")


def same_report(local: Path, slurm: Path) -> None:
    """A report that shows every flagged prompt the local run flagged."""
    html = (slurm / "report" / "index.html").read_text(encoding="utf-8")
    flagged = by_prompt(pd.read_parquet(local / "detect" / "memorized.parquet")).query("flagged")
    missing = [caption for caption in flagged["caption"] if caption not in html]
    expect(not missing, f"the report does not show the flagged prompts {missing}")


COMPARE = {
    "pipeline.dedup": same_dedup,
    "pipeline.prescreen": same_prescreen,
    "pipeline.generate": same_generations,
    "pipeline.detect": same_verdicts,
    "pipeline.report": same_report,
}


# --- running the two audits ----------------------------------------------------------------


@dataclass
class StageRun:
    """How one stage went under SLURM: its arrays' failures (with the tasks' stderr), and how
    its outputs differ from the local run's."""

    label: str
    failures: list[str] = field(default_factory=list)
    mismatch: str | None = None
    seconds: float = 0.0
    refilled: bool = False  # its outputs were replaced by the local run's, so later stages start alike

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class Audits:
    local: Path
    slurm: Path
    stages: dict[str, StageRun]  # by module
    timings: dict[str, float]

    def check(self, module: str) -> None:
        stage = self.stages[module]
        earlier = list(self.stages)[: list(self.stages).index(module)]
        refilled = [self.stages[m].label for m in earlier if self.stages[m].refilled]
        note = (
            (
                f"\n(stages refilled from the local run's outputs after failing or differing under SLURM: {', '.join(refilled)}; "
                "this stage started from the same inputs as locally)"
            )
            if refilled
            else ""
        )
        if not stage.ok:
            pytest.fail(f"SLURM stage {stage.label} failed:\n" + "\n\n".join(stage.failures) + note, pytrace=False)
        if stage.mismatch is not None:
            pytest.fail(
                f"SLURM stage {stage.label} ran, but its outputs differ from the local run's: {stage.mismatch}{note}",
                pytrace=False,
            )


def tail(text: str, chars: int = 4000) -> str:
    """The end of a log, without progress-bar lines."""
    text = "\n".join(line for line in text.replace("\r", "\n").splitlines() if "%|" not in line and line.strip())
    return text if len(text) <= chars else "...\n" + text[-chars:]


def run_command(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def stage_overrides(module: str, overrides: list[str], run_dir: Path, data_dir: Path) -> list[str]:
    """``overrides`` (as ``make demo`` gives them) pointed at this test's run dir and data set."""
    extra = [f"run_dir={run_dir}"]
    if module in ("pipeline.dedup", "pipeline.detect"):  # the stages that read the training set
        extra += [f"data.path={data_dir / 'images'}", f"data.ground_truth={data_dir / 'ground_truth.parquet'}"]
    return [*overrides, *extra]


def missing_outputs(module: str, run_dir: Path) -> list[str]:
    folder, names = OUTPUTS[module]
    return [f"{folder}/{name}" for name in names if not (run_dir / folder / name).is_file()]


def submitit_logs(sweep_dir: Path) -> str:
    """The stderr of each array task under ``sweep_dir`` (and stdout of failing ones), failing tasks first."""
    logs = sorted(sweep_dir.glob(".submitit/**/*_log.err"))
    if not logs:
        return f"(no submitit task logs under {sweep_dir}/.submitit: the array may never have started)"

    def failed(path: Path) -> bool:
        text = path.read_text(encoding="utf-8", errors="replace")
        return "Traceback" in text or "Error" in text or "error:" in text

    parts = []
    for err in sorted(logs, key=lambda p: not failed(p)):
        task = err.name.removesuffix("_log.err")
        parts.append(f"--- task {task} stderr ({err}):\n{tail(err.read_text(encoding='utf-8', errors='replace'), 3000)}")
        out = err.with_name(f"{task}_log.out")
        if failed(err) and out.is_file():
            parts.append(f"--- task {task} stdout:\n{tail(out.read_text(encoding='utf-8', errors='replace'), 1500)}")
    return "\n".join(parts)


def job_logs(sweep_dir: Path) -> str:
    """The end of each task's log (Hydra's ``<sweep_dir>/<job number>/<stage>.log``) and stdout (submitit's)."""
    logs = sorted(sweep_dir.glob("*/*.log")) + sorted(sweep_dir.glob(".submitit/**/*_log.out"))
    if not logs:
        return f"(no task logs under {sweep_dir})"
    return "\n".join(f"--- {log}:\n{tail(log.read_text(encoding='utf-8', errors='replace'), 1200)}" for log in logs)


def cancel_arrays(sweep_dir: Path) -> None:
    """scancel the array jobs this stage submitted (their ids name submitit's folders)."""
    ids = {path.name.split("_")[0] for path in sweep_dir.glob(".submitit/*") if path.name.split("_")[0].isdigit()}
    for job_id in sorted(ids):
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def run_array(module: str, overrides: list[str], sweep_dir: Path, stage: StageRun) -> None:
    """One ``-m hydra/launcher=slurm`` multirun, an array of WORLD_SIZE tasks; failures go to ``stage``."""
    args = ["-m", module, "-m", *overrides, *LAUNCHER, f"hydra.sweep.dir={sweep_dir}"]
    command = f"$ python {' '.join(args)}"
    try:
        done = run_command(args, STAGE_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        cancel_arrays(sweep_dir)
        output = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else str(err.stderr or "")
        stage.failures.append(
            f"{command}\ntimed out after {STAGE_TIMEOUT} s; its stderr:\n{tail(output, 2000)}\n{submitit_logs(sweep_dir)}"
        )
        return
    if done.returncode != 0:
        stage.failures.append(
            f"{command}\nexit code {done.returncode}; its stderr:\n{tail(done.stderr, 3000)}\n"
            f"array tasks' logs:\n{submitit_logs(sweep_dir)}"
        )


@pytest.fixture(scope="module")
def audits(slurm_cluster, tmp_path_factory) -> Audits:
    """The small demo audit run locally, then as SLURM arrays, stage after stage.

    After each SLURM stage, its outputs are compared with the local run's; a stage that failed
    or differs is replaced by the local run's outputs, so that each later stage starts from the
    same inputs in both runs and is judged on its own.
    """
    from pipeline.demo.dataset import build_demo_dataset
    from pipeline.demo.run import demo_commands

    root = tmp_path_factory.mktemp("slurm_audit")
    data_dir = root / "data"
    build_demo_dataset(data_dir, bands=BANDS)
    local, slurm = root / "local", root / "slurm"
    commands = demo_commands(SMALL, build_data=False)  # [(module, overrides)], as `make demo` runs them
    assert [module for module, _ in commands] == list(OUTPUTS), "pipeline.demo.run's stages changed: update OUTPUTS here"
    timings: dict[str, float] = {}

    started = time.perf_counter()
    for module, overrides in commands:
        done = run_command(["-m", module, *stage_overrides(module, overrides, local, data_dir)], STAGE_TIMEOUT)
        assert done.returncode == 0, f"the local run (world_size=1) failed in {module}:\n{tail(done.stderr)}"
    timings["local"] = time.perf_counter() - started

    stages: dict[str, StageRun] = {}
    started = time.perf_counter()
    for module, overrides in commands:
        stage = stages[module] = StageRun(module.removeprefix("pipeline."))
        stage_started = time.perf_counter()
        overrides = stage_overrides(module, overrides, slurm, data_dir)
        logs = slurm / "logs" / "slurm" / stage.label
        if module == "pipeline.dedup":  # one array per phase, each after the previous one
            for phase in DEDUP_PHASES:
                run_array(module, [*overrides, f"phase={phase}"], logs / phase, stage)
                if not stage.ok:
                    break
        else:
            run_array(module, overrides, logs, stage)
        stage.seconds = timings[stage.label] = time.perf_counter() - stage_started
        folder = OUTPUTS[module][0]
        missing = missing_outputs(module, slurm)
        if stage.ok and missing:
            left = (
                sorted(str(p.relative_to(slurm / folder)) for p in (slurm / folder).rglob("*") if p.is_file())
                if (slurm / folder).is_dir()
                else []
            )
            stage.failures.append(
                f"every array exited 0, but {', '.join(missing)} is missing from {slurm} (a local run writes it); "
                f"the SLURM run left in {folder}/: {left[:40]}\nthe tasks' logs:\n"
                + job_logs(logs / DEDUP_PHASES[-1] if module == "pipeline.dedup" else logs)
            )
        if stage.ok:
            try:
                COMPARE[module](local, slurm)
            except AssertionError as err:
                stage.mismatch = str(err)
        if not stage.ok or stage.mismatch is not None:
            shutil.rmtree(slurm / folder, ignore_errors=True)
            shutil.copytree(local / folder, slurm / folder)
            stage.refilled = True
    timings["slurm"] = time.perf_counter() - started
    print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return Audits(local, slurm, stages, timings)


# --- the tests -------------------------------------------------------------------------------


def test_local_run_flags_some_prompts(audits):
    """The small settings give verdicts worth comparing: flagged and unflagged prompts."""
    memorized = pd.read_parquet(audits.local / "detect" / "memorized.parquet")
    assert 0 < int(memorized["flagged"].sum()) < len(memorized), memorized[["prompt_id", "flagged", "clique_size"]].to_string()


def test_dedup_phase_by_phase_as_arrays(audits):
    """embed, train, index, search, group, each an array after the previous: the same prompts as locally."""
    audits.check("pipeline.dedup")


def test_prescreen_as_array(audits):
    """One prescreen table and selection over every prompt, as from a local run."""
    audits.check("pipeline.prescreen")


def test_generate_as_array(audits):
    """The same prompts and sample files; pixels within one grey level."""
    audits.check("pipeline.generate")


def test_detect_as_array(audits):
    """The same verdicts (flagged, clique size) and extractions."""
    audits.check("pipeline.detect")


def test_report_as_array(audits):
    """The report is written and shows every prompt the local run flagged."""
    audits.check("pipeline.report")


def test_dedup_array_tasks_each_ran_their_rank(audits):
    """The train, index and search phases ran as one SLURM task per rank, each a process of its own
    that recorded its peak memory (``dedup/memory/<phase>_<rank>.json``); only rank 0
    of phase=train did the training."""
    stage = audits.stages["pipeline.dedup"]
    if stage.refilled:
        pytest.fail(
            "the dedup arrays failed or differed (see test_dedup_phase_by_phase_as_arrays); nothing to check", pytrace=False
        )
    stats = [json.loads((audits.slurm / "dedup" / "stats" / f"train_{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert [s["units"] for s in stats] == [1] + [0] * (WORLD_SIZE - 1)
    for phase in ("train", "index", "search"):
        records = [json.loads((audits.slurm / "dedup" / "memory" / f"{phase}_{r}.json").read_text()) for r in range(WORLD_SIZE)]
        assert [(r["phase"], r["rank"], r["world_size"]) for r in records] == [(phase, r, WORLD_SIZE) for r in range(WORLD_SIZE)]
        assert len({r["pid"] for r in records}) == WORLD_SIZE and all(r["peak_rss_mib"] > 0 for r in records)


# --- the duplicate finder's phases chained from one command (submit=slurm) -----------------------

CHAINED_BANDS = {"heavy": (3, 6), "mid": (3, 3), "single": (20, 1)}


def test_dedup_phases_chained_from_one_command(slurm_cluster, tmp_path):
    """`phase=all world_size=2 submit=slurm`: one array per phase, each pending on the previous
    one's with afterok (as `scontrol show job` lists it), and the groups and selection of one process."""
    import re

    from pipeline.demo.dataset import build_demo_dataset

    build_demo_dataset(tmp_path / "data", bands=CHAINED_BANDS)
    common = [
        "embedder=thumbnail",
        "top_k=5",
        "progress=false",
        f"data.path={tmp_path / 'data' / 'images'}",
        f"data.ground_truth={tmp_path / 'data' / 'ground_truth.parquet'}",
    ]
    local = run_command(["-m", "pipeline.dedup", *common, f"run_dir={tmp_path / 'local'}"], STAGE_TIMEOUT)
    assert local.returncode == 0, tail(local.stderr)
    launcher = [arg for arg in LAUNCHER if not arg.startswith("world_size=")]
    done = run_command(
        [
            "-m",
            "pipeline.dedup",
            *common,
            f"run_dir={tmp_path / 'slurm'}",
            "phase=all",
            f"world_size={WORLD_SIZE}",
            "submit=slurm",
            *launcher,
        ],
        120,
    )
    assert done.returncode == 0, tail(done.stderr)
    jobs = re.findall(r"^dedup: phase=(\w+): SLURM array job (\d+)", done.stdout, re.MULTILINE)
    assert [phase for phase, _ in jobs] == DEDUP_PHASES, done.stdout
    ids = [job for _, job in jobs]
    try:
        # While pending, each later array names the one before it; SLURM clears it once met.
        for previous, job in zip(ids, ids[1:]):
            shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
            dependency = re.search(r"Dependency=(\S+)", shown)
            assert dependency and dependency.group(1).startswith(f"afterok:{previous}"), f"job {job}: {shown[:600]}"
        deadline = time.monotonic() + STAGE_TIMEOUT
        while time.monotonic() < deadline:
            queued = subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True, timeout=30).stdout
            if not queued.strip():
                break
            time.sleep(3)
        else:
            pytest.fail(f"the chained arrays did not finish within {STAGE_TIMEOUT} s:\n{queued}", pytrace=False)
    finally:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)
    logs = "\n".join(tail(p.read_text(errors="replace"), 1500) for p in (tmp_path / "slurm").glob("logs/**/*_log.err"))
    for name in ("groups.parquet", "selected.parquet"):
        produced = tmp_path / "slurm" / "dedup" / name
        assert produced.is_file(), f"{name} missing after the arrays ran; their logs:\n{logs}"
        assert produced.read_bytes() == (tmp_path / "local" / "dedup" / name).read_bytes(), name
    stats = [json.loads((tmp_path / "slurm" / "dedup" / "stats" / f"search_{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert [s["done"] for s in stats] == [1] * WORLD_SIZE  # each rank searched in its own task
