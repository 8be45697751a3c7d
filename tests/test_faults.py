"""Faults of the file system and of a run directory end a stage with one line, and a rerun recovers.

A full disk, a denied permission or a read-only file system, at any write of a stage, ends it
with ``<stage>: <path>: <reason>`` and exit status 2; rerun once the fault is gone, the stage
leaves exactly what a run that never failed leaves. A marker file that is not what the
executor writes (not a JSON object) reads as absent: its unit is redone.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.executor import Unit, read_marker, run_step
from pipeline.generations import marker_info, prompt_done, sample_path
from pipeline.io import marker_path

from .conftest import REPO, stage_env
from .test_detect import build_run

# Runs `python -m <module> <overrides>` with os.replace (the last step of every atomic write)
# failing with errno <code> from its <after + 1>-th call on, without naming a file, as a
# write() on a full disk fails.
FAULTY = r"""
import os, runpy, sys
module, after, code = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
real_replace, calls = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    calls[0] += 1
    if calls[0] > after:
        raise OSError(code, os.strerror(code))
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = [module, *sys.argv[4:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_stage(module: str, *overrides: str, fault: tuple[int, int] | None = None) -> subprocess.CompletedProcess:
    """``python -m module overrides``; ``fault``: (after, errno) for :data:`FAULTY`."""
    if fault is None:
        command = [sys.executable, "-m", module, *overrides]
    else:
        command = [sys.executable, "-c", FAULTY, module, str(fault[0]), str(fault[1]), *overrides]
    return subprocess.run(command, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


def tree(root: Path) -> dict[str, object]:
    """Every file under ``root`` but the stats (they hold timings) and lock files: parquet as
    records, JSON as values, anything else as bytes."""
    contents = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        parts = path.relative_to(root).parts
        # A step's finish marker records its outputs' modification times: it differs by design.
        if "stats" in parts or ".lock" in parts or path.name == "stats.json" or path.name.startswith(".finish_"):
            continue
        if path.suffix == ".parquet":
            contents[name] = pd.read_parquet(path).to_json(orient="records")
        elif path.suffix == ".json":
            contents[name] = json.loads(path.read_text(encoding="utf-8"))
        else:
            contents[name] = path.read_bytes()
    return contents


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """A run directory with generations and a training set, and what detect (with
    verification) leaves in ``<run_dir>/detect`` when nothing fails."""
    made = build_run(tmp_path_factory.mktemp("faults"))
    overrides = [f"run_dir={made['run_dir']}", "data=files", f"data.path={made['train']}", "progress=false"]
    done = run_stage("pipeline.detect", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    clean = tree(made["run_dir"] / "detect")
    assert {"memorized.parquet", "extracted.parquet", "summary.json"} <= set(clean)
    return {"overrides": overrides, "out": made["run_dir"] / "detect", "clean": clean}


# detect with verification makes 25 atomic writes on this run directory: faults at the first,
# inside the detection's units, between detection and verification, inside verification, the last.
@pytest.mark.slow
@pytest.mark.parametrize(
    "after, code",
    [(0, errno.ENOSPC), (3, errno.ENOSPC), (9, errno.ENOSPC), (15, errno.EACCES), (19, errno.EROFS), (24, errno.ENOSPC)],
)
def test_a_failed_write_ends_detect_with_one_line_and_a_rerun_recovers(audit, after, code):
    out = audit["out"]
    shutil.rmtree(out, ignore_errors=True)
    failed = run_stage("pipeline.detect", *audit["overrides"], fault=(after, code))
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr + failed.stdout and "Error executing job" not in failed.stderr
    lines = error_lines(failed)
    assert len(lines) == 1, lines
    # The file meant, not the temporary file it was written to.
    assert re.fullmatch(rf"detect: {re.escape(str(out))}/[^ ]+: {re.escape(os.strerror(code))}", lines[0]), lines[0]
    assert ".tmp" not in lines[0]
    again = run_stage("pipeline.detect", *audit["overrides"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert tree(out) == audit["clean"]


def test_hydra_full_error_shows_the_traceback_of_a_fault(audit, tmp_path):
    command = [
        sys.executable,
        "-c",
        FAULTY,
        "pipeline.detect",
        "0",
        str(errno.ENOSPC),
        *audit["overrides"],
        f"out_dir={tmp_path / 'd'}",
    ]
    env = {**stage_env(), "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" in done.stderr and "No space left on device" in done.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder whatever its mode")
def test_an_output_folder_that_cannot_be_made_ends_with_one_line(audit, tmp_path):
    locked = tmp_path / "read_only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        done = run_stage("pipeline.detect", *audit["overrides"], f"out_dir={locked / 'detect'}")
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert error_lines(done) == [f"detect: {locked / 'detect'}: Permission denied"]


class _Count:
    """A step of one unit that counts its runs."""

    name = "count"

    def __init__(self):
        self.runs = 0

    def units(self):
        return [Unit("only", {"a": 1})]

    def run(self, units, ctx):
        self.runs += 1
        for unit in units:
            ctx.done(unit, {"rows": 1})


HOSTILE_MARKERS = ["[]", '"x"', "5", "null", '{"digest": 5}', "{not json", "\xff\xfe", ""]


@pytest.mark.parametrize("content", HOSTILE_MARKERS)
def test_a_marker_that_is_not_the_executors_is_redone(tmp_path, content):
    step = _Count()
    path = marker_path(tmp_path, "only")
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode("latin-1"))
    assert read_marker(tmp_path, "only") is None or read_marker(tmp_path, "only") == {"digest": 5}
    ctx = run_step(step, tmp_path)
    assert step.runs == 1 and ctx.completed == 1 and ctx.skipped == 0
    assert read_marker(tmp_path, "only")["digest"] == Unit("only", {"a": 1}).digest
    run_step(step, tmp_path)
    assert step.runs == 1  # now done


def test_a_marker_that_is_a_folder_reads_as_absent_and_its_write_names_it(tmp_path):
    marker_path(tmp_path, "only").mkdir(parents=True)
    assert read_marker(tmp_path, "only") is None
    with pytest.raises(OSError) as failed:
        run_step(_Count(), tmp_path)
    assert failed.value.filename == str(marker_path(tmp_path, "only")) and failed.value.filename2 is None


@pytest.mark.parametrize("content", ["[]", '"x"', "5", "{not json", "\xff\xfe", "folder"])
def test_a_generator_marker_that_is_not_an_object_means_not_done(tmp_path, content):
    path = marker_path(tmp_path, "p")
    path.parent.mkdir(parents=True)
    if content == "folder":
        path.mkdir()
    else:
        path.write_bytes(content.encode("latin-1"))
    assert marker_info(tmp_path, "p") is None
    assert prompt_done(tmp_path, "p", 1) is False
    path.unlink() if path.is_file() else path.rmdir()
    path.write_text(json.dumps({"n_samples": 4}), encoding="utf-8")
    for index in range(4):  # a marker counts only while its samples are on disk
        sample_path(tmp_path, "p", index).parent.mkdir(exist_ok=True)
        sample_path(tmp_path, "p", index).write_bytes(b"png")
    assert marker_info(tmp_path, "p") == {"n_samples": 4} and prompt_done(tmp_path, "p", 4)


@pytest.mark.parametrize("name", ["SchedulerMixin", "UNet2DConditionModel", "ConfigMixin", "no.such"])
def test_a_class_that_is_no_concrete_scheduler_names_model_scheduler(name):
    from pipeline.models import build_scheduler

    expected = rf"^model\.scheduler: '{re.escape(name)}' is not a diffusers scheduler class \(e\.g\. DDIMScheduler"
    with pytest.raises(ValueError, match=expected):
        build_scheduler(name, {"num_train_timesteps": 1000})
    assert type(build_scheduler("DDIMScheduler", {"num_train_timesteps": 1000})).__name__ == "DDIMScheduler"


def test_a_scheduler_the_config_cannot_build_names_model_scheduler():
    from pipeline.models import build_scheduler

    # VQ-diffusion's scheduler needs num_vec_classes, which no SD scheduler config has.
    with pytest.raises(ValueError, match=r"^model\.scheduler: VQDiffusionScheduler cannot be built .*model\.scheduler_kwargs"):
        build_scheduler("VQDiffusionScheduler", {"num_train_timesteps": 1000})


@pytest.mark.slow
def test_generate_with_a_scheduler_mixin_ends_with_one_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    done = run_stage(
        "pipeline.generate",
        f"run_dir={tmp_path / 'run'}",
        f"prompts={prompts}",
        "model.scheduler=SchedulerMixin",
        "n_samples=1",
        "progress=false",
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    expected = r"generate: model\.scheduler: 'SchedulerMixin' is not a diffusers scheduler class .*"
    assert re.fullmatch(expected, error_lines(done)[-1])
    # The generator failed before writing: it leaves no generations folder behind.
    assert not (tmp_path / "run" / "generations").exists()
