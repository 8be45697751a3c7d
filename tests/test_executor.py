"""The executor runs a step's whole life: sharding, markers, the finish once every rank is
done, merged stats and rejects, and dependent steps in order."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.executor import Unit, read_marker, round_robin, run_step, run_steps

REPO = Path(__file__).resolve().parents[1]


class Count:
    """Five units; each writes its name into ``out/<name>.txt``; the finish joins them."""

    def __init__(self, name: str = "count", n: int = 5):
        self.name, self.n = name, n
        self.finishes = 0
        self.ran: list[str] = []

    def units(self):
        # Markers live in one folder per stage: steps sharing it name their units apart.
        prefix = "" if self.name == "count" else f"{self.name}_"
        return [Unit(f"{prefix}u{i}", {"i": i}) for i in range(self.n)]

    def run(self, units, ctx):
        for unit in units:
            with ctx.track_time("work"):
                (ctx.out_dir / f"{unit.name}.txt").write_text(unit.name)
            ctx.stat("items", 2)
            ctx.rejects.add(f"bad-{unit.name}", "here", "rejected for the test")
            self.ran.append(unit.name)
            ctx.done(unit)

    def outputs(self):
        return [self.out / "joined.txt"]

    def finish(self, ctx):
        self.finishes += 1
        names = sorted(p.stem for p in ctx.out_dir.glob("*u*.txt"))
        (ctx.out_dir / "joined.txt").write_text(",".join(names))


def attach(step: Count, out: Path) -> Count:
    step.out = out
    return step


def test_units_are_sharded_round_robin_and_every_unit_runs_once(tmp_path):
    step = attach(Count(), tmp_path)
    ranks = [run_step(step, tmp_path, rank=r, world_size=2, progress=False) for r in (0, 1)]
    assert step.ran == ["u0", "u2", "u4", "u1", "u3"]  # rank 0's share, then rank 1's
    assert [u.name for u in round_robin(step.units(), 1, 2)] == ["u1", "u3"]
    assert [ctx.all_done for ctx in ranks] == [False, True]


def test_the_finish_runs_once_when_every_rank_is_done_with_merged_stats_and_rejects(tmp_path):
    step = attach(Count(), tmp_path)
    first = run_step(step, tmp_path, rank=0, world_size=2, progress=False)
    assert step.finishes == 0 and not first.finished and not (tmp_path / "joined.txt").exists()
    last = run_step(step, tmp_path, rank=1, world_size=2, progress=False)
    assert step.finishes == 1 and last.finished
    assert (tmp_path / "joined.txt").read_text() == "u0,u1,u2,u3,u4"

    stats = json.loads((tmp_path / "stats.json").read_text())["count"]
    assert (stats["units"], stats["done"], stats["skipped"], stats["rejected"]) == (5, 5, 0, 5)
    assert stats["counts"] == {"items": 10} and stats["timers"]["work"] >= 0
    assert stats["rejected_by_reason"] == {"rejected for the test": 5}
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in rejects) == [f"bad-u{i}" for i in range(5)]

    # A rerun over the same units: nothing to do, no second finish.
    for rank in (0, 1):
        assert run_step(step, tmp_path, rank=rank, world_size=2, progress=False).skipped == len(
            round_robin(step.units(), rank, 2)
        )
    assert step.finishes == 1

    # An output gone (or changed since the finish wrote it): the finish runs again.
    (tmp_path / "joined.txt").unlink()
    run_step(step, tmp_path, rank=0, world_size=2, progress=False)
    assert step.finishes == 2 and (tmp_path / "joined.txt").exists()
    (tmp_path / "joined.txt").write_text("changed by someone else")
    run_step(step, tmp_path, rank=0, world_size=2, progress=False)
    assert step.finishes == 3 and (tmp_path / "joined.txt").read_text() == "u0,u1,u2,u3,u4"


def test_a_changed_unit_runs_the_finish_again(tmp_path):
    step = attach(Count(), tmp_path)
    run_step(step, tmp_path, progress=False)
    marker = read_marker(tmp_path, ".finish_count")
    more = attach(Count(n=6), tmp_path)
    run_step(more, tmp_path, progress=False)
    assert more.ran == ["u5"] and more.finishes == 1
    assert read_marker(tmp_path, ".finish_count")["digest"] != marker["digest"]


def test_dependent_steps_run_in_order_and_wait_for_every_rank(tmp_path):
    first, second = attach(Count("first"), tmp_path / "a"), attach(Count("second"), tmp_path / "b")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    contexts = run_steps([first], tmp_path / "a", rank=0, world_size=2, progress=False)
    assert len(contexts) == 1 and not contexts[0].all_done
    # The second step's rank 0 would only start once every rank of the first is done.
    contexts = run_steps([first, second], tmp_path / "a", rank=0, world_size=2, progress=False)
    assert [c.step for c in contexts] == ["first"] and second.ran == []
    contexts = run_steps([first, second], tmp_path / "a", rank=1, world_size=2, progress=False)
    assert [c.step for c in contexts] == ["first", "second"] and second.ran == ["second_u1", "second_u3"]
    assert first.finishes == 1


RACE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pipeline.executor import Unit, run_step

    class Slow:
        name = "race"
        def units(self):
            return [Unit("a", {}), Unit("b", {})]
        def run(self, units, ctx):
            start = float(sys.argv[3])
            while time.time() < start:  # both ranks finish their unit at the same moment
                time.sleep(0.001)
            for unit in units:
                ctx.done(unit)
        def finish(self, ctx):
            with open(ctx.out_dir / "finishes.txt", "a") as out:
                out.write(f"{ctx.rank}\\n")
            time.sleep(0.5)

    run_step(Slow(), Path(sys.argv[1]), rank=int(sys.argv[2]), world_size=2, progress=False)
    """
)


def test_two_ranks_completing_together_run_the_finish_once(tmp_path):
    import time

    start = str(time.time() + 3)
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(rank), start], cwd=REPO, env={"PYTHONPATH": str(REPO)})
        for rank in (0, 1)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len((tmp_path / "finishes.txt").read_text().splitlines()) == 1
