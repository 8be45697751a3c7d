"""The README's worked example ("Auditing your own model") runs as written on tiny data.

Its four steps are read from the README itself, with the placeholder paths replaced by a tiny
img2dataset-style webdataset, a tiny random diffusers folder and a tiny open_clip weights
file, and with the sizes a CPU test can afford appended (samples, steps, image size); each
command is composed with the real configs and run in this process, in the README's order.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from pipeline.demo.dataset import build_demo_dataset

from .conftest import REPO, compose_config
from .test_dedup import SMALL_BANDS
from .test_embedders import TINY_CONFIG
from .test_generate import model_dir  # noqa: F401  (fixture: a tiny random diffusers folder)

# What a CPU test shrinks, per stage, after the README's own overrides (later ones win).
SHRINK = {
    "dedup": ["progress=false", "top_k=10"],
    "prescreen": ["prescreen.seeds=2", "prescreen.batch_size=4", "prescreen.min_robust_z=-1000", "model.height=16", "model.width=16",
                  "progress=false", "device=cpu"],
    "generate": ["n_samples=4", "batch_size=4", "model.steps=2", "model.height=16", "model.width=16", "progress=false",
                 "device=cpu"],
    "detect": ["progress=false", "device=cpu"],
    "report": [],
}  # fmt: skip


def worked_example() -> list[list[str]]:
    """The commands of the README's first code block under "Auditing your own model", as argument lists."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Auditing your own model") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [shlex.split(line) for line in lines]


def as_webdataset(images: Path, out: Path) -> Path:
    """img2dataset's webdataset layout: ``00000.tar`` holding ``<key>.jpg`` and ``<key>.txt`` per record."""
    out.mkdir(parents=True)
    with tarfile.open(out / "00000.tar", "w") as tar:
        for path in sorted(images.iterdir()):
            tar.add(path, arcname=path.name)
    return out


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> tuple[str, Path]:
    import open_clip
    import torch

    from pipeline.embedders.openclip import OpenClipEmbedder

    root = tmp_path_factory.mktemp("clip")
    (root / "memaudit-readme-tiny.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(root / "memaudit-readme-tiny.json")
    torch.manual_seed(0)
    model = OpenClipEmbedder("memaudit-readme-tiny", device="cpu").model
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, root / "weights.pt")
    return "memaudit-readme-tiny", root / "weights.pt"


def test_the_readme_worked_example_runs_on_tiny_data(tmp_path, model_dir, clip_weights):  # noqa: F811
    data = tmp_path / "data"
    build_demo_dataset(data, seed=3, bands=SMALL_BANDS)
    shards = as_webdataset(data / "images", tmp_path / "laion-shards")
    clip_name, clip_file = clip_weights
    run_dir = tmp_path / "mymodel"
    replace = {
        "/data/laion-shards": str(shards),
        "/weights/stable-diffusion-v1-4": str(model_dir),
        "/weights/vit-l-14.pt": str(clip_file),
        "ViT-L-14": clip_name,
        "outputs/mymodel": str(run_dir),
    }
    commands = worked_example()
    assert [c[2] for c in commands] == [
        "pipeline.dedup",
        "pipeline.prescreen",
        "pipeline.generate",
        "pipeline.detect",
        "pipeline.report",
    ]
    for command in commands:
        assert command[:2] == ["python", "-m"]
        stage = command[2].split(".")[1]
        overrides = []
        for word in command[3:]:
            for placeholder, real in replace.items():
                word = word.replace(placeholder, real)
            overrides.append(word)
        cfg = compose_config(stage, [*overrides, f"run_dir={run_dir}", *SHRINK[stage]])
        importlib.import_module(f"pipeline.{stage}.stage").run(cfg)

    memorized = pd.read_parquet(run_dir / "detect" / "memorized.parquet")
    assert len(memorized) == len(pd.read_parquet(run_dir / "prescreen" / "selected.parquet")) > 0
    assert {"flagged", "extracted", "reproduction_rate"} <= set(memorized.columns)
    assert (memorized["n_samples"] == 4).all()
    assert (run_dir / "report" / "index.html").stat().st_size > 0
