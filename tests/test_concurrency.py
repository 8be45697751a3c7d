"""One writer per stage, output folder and rank: a second process refuses at once, in one line.

Two runs of a stage on the same output folder and shard would interleave their writes (two
dedup runs, two detect runs with different thresholds). The first holds the folder's writer
lock for its rank; the second exits with status 2 before it writes anything. Shards of an array
(other ranks) run side by side, and a lock whose holder died blocks nobody.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.io import FolderBusyError, lock_path, writer_lock

from .conftest import REPO, stage_env
from .test_detect import build_run

# Runs `python -m <module> <overrides>` and, at its first atomic write (when it holds its lock),
# creates the file <ready> and waits until the file <go> exists.
HOLD = r"""
import os, runpy, sys, time
module, ready, go = sys.argv[1:4]
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if not os.path.exists(ready):
        open(ready, "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.05)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = [module, *sys.argv[4:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_stage(module: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *overrides]
    return subprocess.run(command, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder``, hidden ones included: (size, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def busy_line(stage: str, folder: Path, pid: int, rank: int = 0) -> str:
    return (
        f"{stage}: {folder} is being written by another process (pid {pid}, rank {rank}); "
        "wait for it to finish or use another run_name"
    )


@pytest.fixture
def run(tmp_path):
    return build_run(tmp_path)


# Every stage, and the folder it writes in a run directory (the report: the folder of its page).
STAGES = [
    ("pipeline.dedup", "dedup"),
    ("pipeline.prescreen", "prescreen"),
    ("pipeline.generate", "generations"),
    ("pipeline.detect", "detect"),
    ("pipeline.report", "report"),
]


@pytest.mark.slow
@pytest.mark.parametrize("module, folder", STAGES)
def test_a_second_process_on_a_stage_folder_refuses_in_one_line(module, folder, tmp_path):
    run_dir = tmp_path / "run"
    out = run_dir / folder
    out.mkdir(parents=True)
    (out / "output.txt").write_text("written by the first process", encoding="utf-8")
    with writer_lock(out, 0):
        before = snapshot(out)
        done = run_stage(module, f"run_dir={run_dir}")
        after = snapshot(out)
    assert done.returncode == 2, done.stderr[-3000:]
    assert error_lines(done) == [busy_line(module.split(".")[-1], out, os.getpid())]
    assert after == before  # nothing read-modified, nothing written


@pytest.mark.slow
def test_two_detect_runs_with_different_thresholds_one_refuses(run, tmp_path):
    """The second run starts while the first is writing: it refuses, and the first one's
    results are whole and its own."""
    run_dir = run["run_dir"]
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLD,
            "pipeline.detect",
            str(ready),
            str(go),
            f"run_dir={run_dir}",
            "rule.threshold=0.15",
            "progress=false",
        ],
        cwd=REPO,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), first.communicate()[1][-3000:]
        second = run_stage("pipeline.detect", f"run_dir={run_dir}", "rule.threshold=0.3", "progress=false")
    finally:
        go.touch()
        out, err = first.communicate(timeout=300)
    assert second.returncode == 2 and error_lines(second) == [busy_line("detect", run_dir / "detect", first.pid)]
    assert first.returncode == 0, err[-3000:]
    memorized = pd.read_parquet(run_dir / "detect" / "memorized.parquet")
    assert memorized["flagged"].tolist() == [True, False, False]
    assert not (run_dir / "detect" / ".lock").exists()  # released and removed


@pytest.mark.slow
def test_array_tasks_of_one_stage_do_not_block_each_other(run):
    run_dir = run["run_dir"]
    with writer_lock(run_dir / "detect", 1):
        done = run_stage("pipeline.detect", f"run_dir={run_dir}", "rank=0", "world_size=1", "progress=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "detect" / "memorized.parquet").is_file()


def test_locks_are_per_rank_and_exclusive(tmp_path):
    with writer_lock(tmp_path, 0), writer_lock(tmp_path, 1):
        # flock excludes any other open file, in this process as in another one.
        expected = rf"^{re.escape(str(tmp_path))} is being written by another process \(pid {os.getpid()}, rank 0\)"
        with pytest.raises(FolderBusyError, match=expected):
            with writer_lock(tmp_path, 0):
                pass
        assert lock_path(tmp_path, 0).read_text(encoding="utf-8").startswith(f"pid={os.getpid()}\n")
    with writer_lock(tmp_path, 0):  # released: free again
        pass


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_does_not_block(run):
    run_dir = run["run_dir"]
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pipeline.io import writer_lock\n"
            f"with writer_lock({str(run_dir / 'detect')!r}, 0):\n    print('held', flush=True)\n    time.sleep(120)\n",
        ],
        cwd=REPO,
        env=stage_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert lock_path(run_dir / "detect", 0).is_file()  # left behind, its holder gone
    done = run_stage("pipeline.detect", f"run_dir={run_dir}", "progress=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "detect" / "memorized.parquet").is_file()


def test_the_lock_leaves_no_folder_a_stage_did_not_write(tmp_path):
    out = tmp_path / "run" / "detect"
    with writer_lock(out, 0):
        assert lock_path(out, 0).is_file() and lock_path(out, 0).parent.name.startswith(".")
    assert not (tmp_path / "run").exists()  # made for the lock, removed with it
    with writer_lock(out, 0):
        (out / "memorized.parquet").write_bytes(b"x")
    assert sorted(p.name for p in out.iterdir()) == ["memorized.parquet"]
