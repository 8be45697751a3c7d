"""notebooks/inspect_matches: in sync with its .ipynb, and runs on a small audited run.

The notebook runs in a kernel started from this interpreter through a kernelspec written to a
temporary folder, so nothing needs installing (``python -m ipykernel install``) beforehand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jupytext
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from tests.test_report import audited_run

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inspect_matches.py"


def sources(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_ipynb_is_generated_from_the_py_file():
    paired = nbformat.read(NOTEBOOK.with_suffix(".ipynb"), as_version=4)
    assert sources(paired) == sources(jupytext.read(NOTEBOOK)), "run: jupytext --sync notebooks/inspect_matches.py"


def test_notebook_runs_on_a_small_run(tmp_path, monkeypatch):
    run_dir = audited_run(tmp_path, other=True)
    kernels = tmp_path / "kernels"
    (kernels / "memaudit-test").mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "memaudit test",
        "language": "python",
    }
    (kernels / "memaudit-test" / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("MEMAUDIT_RUN_DIR", str(run_dir))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel picks its inline backend

    notebook = jupytext.read(NOTEBOOK)
    manager = KernelManager(kernel_name="memaudit-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    NotebookClient(notebook, km=manager, timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "3 prompts screened, 1 flagged, 1 extracted" in text
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert tables and "00000" in tables[0]["data"]["text/html"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    # One extracted prompt (its sample and training match beside its clique) and one whose samples
    # reproduce another caption's image.
    assert len(figures) == 2
    assert "00001: 2 of 30 samples within 0.15 of another caption's image" in text
