"""Shared test setup. Nothing may download at test time: the Hugging Face libraries run offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import pipeline.layout  # noqa: E402,F401  (registers the configs' ${layout:...} resolver for composed configs)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHIPPED_DEMO_MODEL = REPO / "models" / "demo"


def compose_config(config_name: str, overrides=(), return_hydra_config: bool = False):
    """The stage config ``conf/<config_name>.yaml`` composed with these overrides, as the stage's
    command line would compose it (with the ``hydra`` node too where asked)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def stage_env() -> dict[str, str]:
    """The environment for running a stage as a subprocess: offline, the package importable from
    any working directory (installed or not), and Hydra's errors as a user sees them (without
    HYDRA_FULL_ERROR's traceback)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": path}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory) -> Path:
    """The full demo data set with the default settings: what the shipped demo model saw."""
    from pipeline.demo.dataset import build_demo_dataset

    out = tmp_path_factory.mktemp("demo_set")
    build_demo_dataset(out)
    return out


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (not a package) as a module, for tests of its pieces."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Every model family's tiny pipeline (tests/families.py), each saved once for the whole
    test run when first asked for, and shared by the generation and prescreen tests."""
    from .families import TinyModels

    return TinyModels(tmp_path_factory.mktemp("tiny_families"))
