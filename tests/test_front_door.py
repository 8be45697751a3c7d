"""What a newcomer meets first: `make demo`'s commands compose, outputs are readable by others,
and a training checkpoint from elsewhere cannot run code."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from pipeline.demo.run import demo_commands
from pipeline.demo.train import load_checkpoint
from pipeline.io import atomic_write, write_json

from .conftest import compose_config

# `python -m <module>` -> the config its @hydra.main composes.
CONFIG_OF = {
    "pipeline.demo.dataset": "demo_data",
    "pipeline.dedup": "dedup",
    "pipeline.prescreen": "prescreen",
    "pipeline.generate": "generate",
    "pipeline.detect": "detect",
    "pipeline.report": "report",
}


@pytest.mark.parametrize("build_data", [True, False])
def test_every_command_of_make_demo_composes(build_data):
    """`make demo` on a fresh machine builds the data set first: each command it runs, with
    its overrides, must compose with that stage's real config (it once passed experiment=demo
    to the data-set builder, which has no such group, and failed at once)."""
    commands = demo_commands(["n_samples=16"], build_data)
    assert [module for module, _ in commands][0] == ("pipeline.demo.dataset" if build_data else "pipeline.dedup")
    for module, overrides in commands:
        if module == "pipeline.generate":
            assert "n_samples=16" in overrides  # the user's overrides reach the audit stages
        cfg = compose_config(CONFIG_OF[module], overrides)
        if module != "pipeline.demo.dataset":
            assert cfg.run_name == "demo"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    """A temporary file is created 0600; the output must get the mode any new file gets."""
    saved = os.umask(umask)
    try:
        out = atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
        json_out = write_json({"a": 1}, tmp_path / "sub" / "b.json")
    finally:
        os.umask(saved)
    for path in (out, json_out):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


class _Planted:
    """An object whose unpickling runs code: here it only leaves a file behind."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (self.flag,))


def test_a_planted_checkpoint_is_refused_without_running_it(tmp_path):
    flag = tmp_path / "code-ran"
    state = tmp_path / "state.pt"
    torch.save({"unet": {"w": torch.zeros(2)}, "step": 3, "payload": _Planted(flag)}, state)
    with pytest.raises(ValueError, match="state.pt: not a training state this trainer wrote"):
        load_checkpoint(state)
    assert not flag.exists()
    # What the trainer writes (tensors, numbers, containers, a generator's state) still loads.
    good = tmp_path / "good.pt"
    torch.save(
        {
            "unet": {"w": torch.ones(2)},
            "generator": torch.Generator().get_state(),
            "step": 3,
            "history": [{"step": 1, "loss": 0.5}],
        },
        good,
    )
    assert load_checkpoint(good)["step"] == 3
