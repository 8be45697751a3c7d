"""The stages stand side by side: none imports another (they share only core modules and the
artifacts the run layout names)."""

from __future__ import annotations

import ast

from .conftest import REPO

# Stage -> the modules that belong to it alone.
STAGES = {
    "dedup": {"pipeline.dedup"},
    "prescreen": {"pipeline.prescreen"},
    "generate": {"pipeline.generate", "pipeline.adaptive", "pipeline.regenerate"},
    "detect": {"pipeline.detect", "pipeline.verify"},
    "report": {"pipeline.report"},
}


def imports_of(module: str) -> set[str]:
    path = REPO / (module.replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_stage_imports_another_stage():
    crossings = []
    for stage, modules in STAGES.items():
        others = set().union(*(m for s, m in STAGES.items() if s != stage))
        for module in modules:
            crossings += [f"{module} imports {other}" for other in sorted(imports_of(module) & others)]
    assert not crossings, crossings
