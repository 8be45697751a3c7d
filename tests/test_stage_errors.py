"""Every stage ends a config or input mistake with one line naming the key or file, and exit status 2."""

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from pipeline.cli import ConfigError, config_int, config_number, stage_main

from .conftest import REPO, stage_env


def run_stage(module: str, *overrides: str, cwd=REPO) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *overrides]
    return subprocess.run(command, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "module, override, last_line",
    [
        ("pipeline.dedup", "threshold=abc", r"dedup: threshold: expected a number, got 'abc'"),
        ("pipeline.dedup", "world_size=0", r"dedup: world_size: must be at least 1, got 0"),
        ("pipeline.prescreen", "prescreen.seeds=-1", r"prescreen: prescreen\.seeds: must be at least 1, got -1"),
        ("pipeline.generate", "n_samples=abc", r"generate: n_samples: expected an integer, got 'abc'"),
        ("pipeline.detect", "rule.threshold=abc", r"detect: rule\.threshold: expected a number, got 'abc'"),
        ("pipeline.detect", "metric.grid=abc", r"detect: metric\.grid: expected an integer, got 'abc'"),
        # An input mistake: the run directory has no detect/ yet.
        ("pipeline.report", "thumbnails=2", r"report: .*/detect/memorized\.parquet does not exist: run .*"),
    ],
)
def test_a_mistake_ends_the_stage_with_one_line(module, override, last_line, tmp_path):
    done = run_stage(module, override, f"run_dir={tmp_path}")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.fullmatch(last_line, lines[-1]), lines[-1]
    assert "Traceback" not in done.stdout + done.stderr and "Error executing job" not in done.stderr


def test_dedup_on_precomputed_embeddings_needs_no_ground_truth(tmp_path):
    """``embedder=precomputed embeddings_dir=...`` with the default data group (data=demo, whose
    ground truth does not exist from this cwd): dedup groups, and says why it does not evaluate."""
    folder = tmp_path / "embeddings"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    vectors = np.eye(4, dtype=np.float16)[[0, 0, 1, 2, 3, 3]]
    np.save(folder / "img_emb" / "img_emb_0.npy", vectors)
    pd.DataFrame({"key": [f"k{i}" for i in range(6)], "caption": list("aabcdd")}).to_parquet(
        folder / "metadata" / "metadata_0.parquet"
    )
    done = run_stage(
        "pipeline.dedup",
        "embedder=precomputed",
        f"embeddings_dir={folder}",
        f"run_dir={tmp_path / 'run'}",
        "progress=false",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    selected = pd.read_parquet(tmp_path / "run" / "dedup" / "selected.parquet")
    assert sorted(selected["caption"]) == ["a", "d"] and selected["dup_count"].tolist() == [2, 2]
    assert "not evaluated" in done.stdout + done.stderr


def test_config_numbers_name_their_key():
    cfg = OmegaConf.create({"a": "abc", "b": 1.5, "c": "3", "d": None, "e": True, "f": 4.0, "g": {"h": -1}})
    with pytest.raises(ConfigError, match=r"^a: expected a number, got 'abc'$"):
        config_number(cfg, "a")
    with pytest.raises(ConfigError, match=r"^e: expected a number, got True$"):
        config_number(cfg, "e")
    with pytest.raises(ConfigError, match=r"^b: expected an integer, got 1.5$"):
        config_int(cfg, "b")
    with pytest.raises(ConfigError, match=r"^d: must be set, got null$"):
        config_int(cfg, "d")
    with pytest.raises(ConfigError, match=r"^g.h: must be at least 0, got -1$"):
        config_int(cfg, "g.h", minimum=0)
    with pytest.raises(ConfigError, match=r"^b: must be at most 1, got 1.5$"):
        config_number(cfg, "b", maximum=1)
    assert config_number(cfg, "c") == 3.0 and config_int(cfg, "c") == 3 and config_int(cfg, "f") == 4
    assert config_number(cfg, "d", optional=True) is None


def test_stage_main_turns_mistakes_into_one_line_and_keeps_bugs(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    @stage_main("demo")
    def mistake(cfg):
        raise FileNotFoundError(f"{cfg}: no such file")

    with pytest.raises(SystemExit) as stop:
        mistake("data.path")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "demo: data.path: no such file\n"

    @stage_main("demo")
    def bug(cfg):
        raise KeyError(cfg)

    with pytest.raises(KeyError):
        bug("x")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(FileNotFoundError):
        mistake("data.path")


def test_adaptive_settings_name_their_key():
    from pipeline.generate.adaptive import adaptive_settings
    from pipeline.rule import rule_from_config

    # The near-copy rule adaptive sampling uses is the one every stage reads (conf/rule.yaml).
    cfg = OmegaConf.create(
        {
            "metric": {"_target_": "pipeline.metrics.TiledL2"},
            "rule": {"threshold": "abc", "min_clique": 10, "max_clique_steps": 10},
        }
    )
    with pytest.raises(ConfigError, match=r"^rule\.threshold: expected a number, got 'abc'"):
        rule_from_config(cfg)
    with pytest.raises(ConfigError, match=r"^adaptive\.threshold: moved"):
        adaptive_settings({"threshold": 0.1})
    with pytest.raises(ConfigError, match=r"^adaptive\.enabled: expected true or false"):
        adaptive_settings({"enabled": "yes"})
    assert adaptive_settings({"first_round": 8, "growth": 1.5, "enabled": True}).first_round == 8
