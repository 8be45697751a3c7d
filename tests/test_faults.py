"""Faults of the file system and of a run directory end a stage with one line, and a rerun recovers.

A full disk, a denied permission or a read-only file system, at any write of a stage, ends it
with ``<stage>: <path>: <reason>`` and exit status 2; rerun once the fault is gone, the stage
leaves exactly what a run that never failed leaves. A marker file that is not what the
executor writes (not a JSON object) reads as absent: its unit is redone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.executor import Unit, read_marker, run_step
from pipeline.generations import marker_info, prompt_done
from pipeline.io import marker_path

from .conftest import REPO

def stage_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_stage(module: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


class _Count:
    """A step of one unit that counts its runs."""

    name = "count"

    def __init__(self):
        self.runs = 0

    def units(self, rank, world_size):
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
    assert str(marker_path(tmp_path, "only")) in (failed.value.filename, failed.value.filename2)


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
    assert marker_info(tmp_path, "p") == {"n_samples": 4} and prompt_done(tmp_path, "p", 4)


@pytest.mark.parametrize("name", ["SchedulerMixin", "UNet2DConditionModel", "ConfigMixin", "no.such"])
def test_a_class_that_is_no_concrete_scheduler_names_model_scheduler(name):
    from pipeline.models import build_scheduler

    with pytest.raises(ValueError, match=rf"^model\.scheduler: '{re.escape(name)}' is not a diffusers scheduler class \(e\.g\. DDIMScheduler"):
        build_scheduler(name, {"num_train_timesteps": 1000})
    assert type(build_scheduler("DDIMScheduler", {"num_train_timesteps": 1000})).__name__ == "DDIMScheduler"


def test_a_scheduler_the_config_cannot_build_names_model_scheduler():
    from pipeline.models import build_scheduler

    # VQ-diffusion's scheduler needs num_vec_classes, which no SD scheduler config has.
    with pytest.raises(ValueError, match=r"^model\.scheduler: VQDiffusionScheduler cannot be built .*model\.scheduler_kwargs"):
        build_scheduler("VQDiffusionScheduler", {"num_train_timesteps": 1000})


def test_generate_with_a_scheduler_mixin_ends_with_one_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    done = run_stage("pipeline.generate", f"run_dir={tmp_path / 'run'}", f"prompts={prompts}", "model.scheduler=SchedulerMixin",
                     "n_samples=1", "progress=false")  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.fullmatch(r"generate: model\.scheduler: 'SchedulerMixin' is not a diffusers scheduler class .*", error_lines(done)[-1])
    # The generator failed before writing: it leaves no generations folder behind.
    assert not (tmp_path / "run" / "generations").exists()
