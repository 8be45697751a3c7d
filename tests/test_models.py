"""One model loader (pipeline.models.load_model) for every stage: the same `model=` config gives
generation and the prescreen the same weights, revision, variant and scheduler."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from .conftest import REPO, compose_config

SIZE = 16
VARIANT = "shifted"
# Overrides of the `model` group that both stages get: another scheduler than the model's own
# (DDPM), options over its config, a revision and a variant.
MODEL_OVERRIDES = [
    "model.scheduler=DDIMScheduler",
    "+model.scheduler_kwargs.timestep_spacing=trailing",
    "+model.scheduler_kwargs.clip_sample=false",
    "model.revision=memaudit-test-revision",
    f"model.variant={VARIANT}",
    "model.steps=2",
    f"model.height={SIZE}",
    f"model.width={SIZE}",
]


@pytest.fixture(scope="module")
def variant_model_dir(tmp_path_factory) -> Path:
    """A tiny random demo-architecture pipeline, saved twice into one folder: the plain files,
    and the files of variant VARIANT whose UNet input convolution is shifted by 1 (so that which
    files were loaded shows in the weights)."""
    from pipeline.demo.model import DemoModelConfig, build_pipeline

    config = DemoModelConfig(unet_channels=(16, 32), cross_attention_levels=(False, True), norm_num_groups=8, resolution=SIZE)
    out = tmp_path_factory.mktemp("variant_model")
    build_pipeline(config).save_pretrained(out)
    shifted = build_pipeline(config)
    with torch.no_grad():
        shifted.unet.conv_in.weight += 1.0
    shifted.save_pretrained(out, variant=VARIANT)
    return out


@pytest.fixture
def loads(monkeypatch):
    """Every ``DiffusionPipeline.from_pretrained`` call of the test: (its keyword arguments, the pipeline)."""
    from diffusers import DiffusionPipeline

    original = DiffusionPipeline.from_pretrained.__func__
    calls: list[tuple[dict, object]] = []

    def spy(cls, *args, **kwargs):
        pipe = original(cls, *args, **kwargs)
        calls.append((kwargs, pipe))
        return pipe

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(spy))
    return calls


def scheduler_config(pipe) -> dict:
    return {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}


@pytest.mark.slow
def test_prescreen_and_generation_load_the_same_model_from_one_config(variant_model_dir, tmp_path, loads):
    """The prescreen once dropped model.scheduler, scheduler_kwargs, revision and variant: it scored
    with the model's own DDPM scheduler (another first timestep and noise scale) on the plain weights."""
    from pipeline import generate, prescreen

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red barn in a snowy field\nportrait of an astronaut cat\n", encoding="utf-8")
    common = [
        f"run_dir={tmp_path / 'run'}",
        f"prompts={prompts}",
        f"model.path={variant_model_dir}",
        "device=cpu",
        *MODEL_OVERRIDES,
    ]
    generate.run(compose_config("generate", [*common, "n_samples=1", "batch_size=2", "progress=false", "png_workers=1"]))
    table = prescreen.run(compose_config("prescreen", [*common, "prescreen.seeds=2", "prescreen.batch_size=4"])).table

    assert len(loads) == 2, "each stage loads the model once"
    (generation_kwargs, generation_pipe), (prescreen_kwargs, prescreen_pipe) = loads
    for kwargs in (generation_kwargs, prescreen_kwargs):
        assert kwargs["revision"] == "memaudit-test-revision" and kwargs["variant"] == VARIANT
    for pipe in (generation_pipe, prescreen_pipe):
        assert type(pipe.scheduler).__name__ == "DDIMScheduler"
        assert pipe.scheduler.config.timestep_spacing == "trailing" and pipe.scheduler.config.clip_sample is False
        assert float(pipe.unet.conv_in.weight.detach().min()) > 0.5, "the variant's (shifted) weights"
    assert scheduler_config(prescreen_pipe) == scheduler_config(generation_pipe)
    torch.testing.assert_close(prescreen_pipe.unet.conv_in.weight, generation_pipe.unet.conv_in.weight, rtol=0, atol=0)

    recorded = pd.read_parquet(tmp_path / "run" / "generations" / "prompts.parquet").iloc[0]
    assert recorded["scheduler"] == "DDIMScheduler"
    assert json.loads(recorded["scheduler_config"]) == json.loads(json.dumps(scheduler_config(prescreen_pipe)))
    # The prescreen scored with that scheduler: its first timestep, on the variant's weights.
    from pipeline.prescreen import PrescreenSettings
    from pipeline.prescreen import prescreen as score
    from pipeline.prompts import Prompt

    direct = score(
        generation_pipe,
        [Prompt(r.prompt_id, r.caption) for r in table.itertuples()],
        PrescreenSettings(seeds=2, steps=2, keep_top=1, height=SIZE, width=SIZE),
        progress=False,
    )
    pd.testing.assert_series_equal(table.set_index("prompt_id").score, direct.set_index("prompt_id").score, rtol=1e-4)

    # Regeneration from the recorded row loads (through load_model) the scheduler it records.
    from pipeline.generate.regenerate import pipeline_for

    again = pipeline_for(recorded)
    assert type(again.scheduler).__name__ == "DDIMScheduler"
    assert json.loads(json.dumps(scheduler_config(again))) == json.loads(recorded["scheduler_config"])


def test_load_model_takes_the_model_group_and_the_runtime(variant_model_dir):
    from pipeline.models import Runtime, load_model

    pipe = load_model(
        {
            "path": str(variant_model_dir),
            "scheduler": "PNDMScheduler",
            "scheduler_kwargs": {"skip_prk_steps": True},
            "steps": 50,
            "guidance_scale": 5.0,
            "height": None,
            "width": None,
        },
        Runtime(attention="default", fuse_qkv=False, channels_last=False),
    )
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.skip_prk_steps
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert float(pipe.unet.conv_in.weight.detach().min()) < 0.5, "no variant asked for: the plain weights"
    assert pipe.unet.conv_in.weight.is_contiguous() and not getattr(pipe.unet, "fused_projections", False)
    # A path alone, and the runtime's speed options applied.
    fast = load_model(str(variant_model_dir), Runtime(channels_last=True, fuse_qkv=True))
    assert type(fast.scheduler).__name__ == "DDPMScheduler", "no scheduler asked for: the model's own"
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_load_model_errors_are_one_line_naming_the_key(tmp_path, variant_model_dir):
    from pipeline.models import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match=r"^model\.path: no such directory"):
        load_model({"path": str(tmp_path / "nowhere" / "model")})
    with pytest.raises(ModelLoadError, match=r"^model\.path: must be set"):
        load_model({"path": None})
    with pytest.raises(ModelLoadError, match=r"^model_dir: no such directory"):
        load_model({"path": str(tmp_path / "nowhere" / "model")}, path_key="model_dir")
    with pytest.raises(ValueError, match=r"^model\.schedular: unknown key"):
        load_model({"path": str(variant_model_dir), "schedular": "DDIMScheduler"})
    with pytest.raises(ValueError, match=r"^model\.scheduler_kwargs: expected a mapping"):
        load_model({"path": str(variant_model_dir), "scheduler_kwargs": "trailing"})
    with pytest.raises(ValueError, match=r"^model\.scheduler: 'NoSuchScheduler'"):
        load_model({"path": str(variant_model_dir), "scheduler": "NoSuchScheduler"})
    assert issubclass(ModelLoadError, ValueError), "stage_main reports it as a mistake without being told"


def test_the_stages_report_a_model_mistake_in_one_line(tmp_path, capsys):
    """ModelLoadError is a ValueError: stage_main ends a stage with one line, no extra argument needed."""
    from pipeline.cli import USAGE_ERROR, stage_main
    from pipeline.prescreen import run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    overrides = [f"run_dir={tmp_path}", f"prompts={prompts}", f"model.path={tmp_path / 'no' / 'model'}", "device=cpu"]
    cfg = compose_config("prescreen", overrides)
    with pytest.raises(SystemExit) as stopped:
        stage_main("prescreen")(run)(cfg)
    assert stopped.value.code == USAGE_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("prescreen: model.path: no such directory") and "\n" not in err


def _pipeline_loads(path: Path) -> list[tuple[str, int]]:
    """Calls of ``<...Pipeline>.from_pretrained(...)`` in a Python file, and of ``load_pipeline``: (what, line)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name == "from_pretrained":
            receiver = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
            if receiver.endswith("Pipeline"):
                found.append((f"{receiver}.from_pretrained", node.lineno))
        elif name == "load_pipeline":
            found.append(("load_pipeline", node.lineno))
    return found


def test_a_pipeline_is_loaded_in_one_module_only():
    """``from_pretrained`` of a pipeline is called in pipeline/models.py alone (the demo trainer,
    checking its own export, aside), and everything else, the benchmarks and the notebook
    included, loads through load_model, not load_pipeline."""
    sources = [
        *sorted((REPO / "pipeline").rglob("*.py")),
        *sorted((REPO / "benchmarks").glob("*.py")),
        *sorted((REPO / "notebooks").glob("*.py")),
    ]
    loading = {}
    for path in sources:
        relative = path.relative_to(REPO).as_posix()
        calls = _pipeline_loads(path)
        if relative == "pipeline/demo/train.py":
            calls = [c for c in calls if c[0] != "StableDiffusionPipeline.from_pretrained"]
        if calls:
            loading[relative] = calls
    loaders = loading.pop("pipeline/models.py", [])
    assert not loading, f"pipelines loaded outside pipeline/models.load_model: {loading}"
    assert [what for what, _ in loaders if what != "load_pipeline"] == ["DiffusionPipeline.from_pretrained"]
