"""The folders show the architecture: a sub-package per stage over shared core modules, and
no stage imports another (they share only core modules and the artifacts the run layout names)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

# A stage is what ``python -m pipeline.<stage>`` runs; its modules live in pipeline/<stage>/.
STAGES = ("dedup", "prescreen", "generate", "detect", "report")


def modules_of(stage: str) -> dict[str, ast.Module]:
    """Every module of the stage's package, parsed."""
    folder = REPO / "pipeline" / stage
    return {
        f"pipeline.{stage}." + path.relative_to(folder).with_suffix("").as_posix().replace("/", "."): ast.parse(
            path.read_text(encoding="utf-8")
        )
        for path in sorted(folder.rglob("*.py"))
    }


def imported(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_every_stage_is_a_package_with_an_entry_point():
    for stage in STAGES:
        assert (REPO / "pipeline" / stage / "__init__.py").is_file(), stage
        assert (REPO / "pipeline" / stage / "__main__.py").is_file(), stage


def test_no_stage_imports_another_stage():
    crossings = []
    for stage in STAGES:
        others = [s for s in STAGES if s != stage]
        for module, tree in modules_of(stage).items():
            for name in sorted(imported(tree)):
                crossings += [
                    f"{module} imports {name}"
                    for other in others
                    if name == f"pipeline.{other}" or name.startswith(f"pipeline.{other}.")
                ]
    assert not crossings, crossings


def test_core_modules_import_no_stage():
    """The shared modules under the stages (data, layout, rule and metrics, executor, models,
    generations folder ...) know none of them."""
    crossings = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        relative = path.relative_to(REPO / "pipeline")
        if relative.parts[0] in STAGES or relative.parts[0] == "demo":
            continue
        for name in imported(ast.parse(path.read_text(encoding="utf-8"))):
            crossings += [
                f"{relative} imports {name}"
                for stage in STAGES
                if name == f"pipeline.{stage}" or name.startswith(f"pipeline.{stage}.")
            ]
    assert not crossings, crossings


@pytest.mark.parametrize("stage", STAGES)
def test_python_m_stage_still_runs(stage):
    """``python -m pipeline.<stage>`` is the stage's command (the make targets call it)."""
    done = subprocess.run(
        [sys.executable, "-m", f"pipeline.{stage}", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{stage} is powered by Hydra" in done.stdout


@pytest.mark.parametrize("stage", ["dedup", "prescreen", "generate", "detect", "report"])
def test_a_stage_module_is_a_thin_entry_point(stage):
    """Each stage.py reads top to bottom: at most 300 lines, its domain code in named modules."""
    lines = (Path(__file__).resolve().parents[1] / "pipeline" / stage / "stage.py").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"pipeline/{stage}/stage.py has {len(lines)} lines"
