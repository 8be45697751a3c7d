"""Loading a diffusers text-to-image pipeline and making it fast, from config values.

:func:`load_model` is the one way a saved pipeline is loaded: generation (and regeneration
from a recorded row), the prescreen, the demo evaluation and the benchmarks all call it with
the ``model`` config group (``conf/model/*.yaml``: ``path``, ``allow_download``, ``revision``,
``variant``, ``scheduler``, ``scheduler_kwargs``) and a :class:`Runtime` (device, dtype and the
speed options), so that one ``model=`` gives every stage the same weights and the same
scheduler. It is the only module that calls a pipeline's ``from_pretrained`` (the demo trainer,
checking its own export, aside; ``tests/test_models.py`` holds it to that).

``load_pipeline``, its first half, takes any ``DiffusionPipeline.from_pretrained`` source: a
local directory (``models/demo``, a ``save_pretrained`` output) or a Hugging Face hub id
(``CompVis/stable-diffusion-v1-4``). It never downloads unless asked (``allow_download``):
an audit should run on exactly the weights the user put on disk, and the machines this runs
on are often offline. ``optimize_pipeline``, the second half, applies the speed options (SDPA
attention, fused QKV projections, channels-last, TF32, ``torch.compile``); the generator
records its :class:`Runtime`, so that ``regenerate`` can load the model the same way and get
the same pixels.

The safety checker is always removed: it replaces images it flags with black ones, and an
audit of memorization has to see the model's raw outputs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Spellings accepted in config, mapped to the names above.
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


# The keys of the `model` config group (conf/model/*.yaml). load_model reads the first six;
# the sampler reads the others (steps, guidance and image size are per call, not per pipeline).
LOAD_KEYS = ("path", "allow_download", "revision", "variant", "scheduler", "scheduler_kwargs")
SAMPLING_KEYS = ("steps", "guidance_scale", "height", "width")


class ModelLoadError(ValueError):
    """The model named by ``model.path`` could not be loaded; the message says why and what to do.

    A ``ValueError``, as every config or input mistake is: a stage's command line
    (:func:`pipeline.cli.stage_main`) ends with its one line, not a traceback.
    """


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``: the first CUDA GPU when there is one, else the CPU; otherwise ``torch.device(device)``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device: {device!r} is not a torch device ({err})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but torch sees no CUDA GPU")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"``: float16 on CUDA (what SD v1.x is run in; half the memory traffic of float32,
    full tensor-core speed), float32 elsewhere (CPUs have no fast half-precision path)."""
    name = _DTYPE_ALIASES.get(str(dtype), str(dtype))
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype: must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _looks_like_local_path(path: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else can only be a directory.
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path


def load_pipeline(
    path: str,
    *,
    allow_download: bool = False,
    torch_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    scheduler: str | None = None,
    scheduler_kwargs: dict[str, Any] | None = None,
    revision: str | None = None,
    variant: str | None = None,
    path_key: str = "model.path",
):
    """Load a diffusers pipeline from a directory or hub id, move it to ``device`` in ``torch_dtype``.

    The loading half of :func:`load_model` (which callers use: it takes the ``model`` config
    group and applies the speed options too). ``scheduler`` is a diffusers scheduler class name
    (``"DDIMScheduler"``, ``"PNDMScheduler"``...) built from the pipeline's own scheduler config
    plus ``scheduler_kwargs``; ``None`` keeps the pipeline's own. Raises :class:`ModelLoadError`
    naming ``path_key`` (``model.path``) when nothing is there, and ``ValueError`` naming
    ``model.scheduler`` for an unknown scheduler.
    """
    from diffusers import DiffusionPipeline

    path = str(path)
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ModelLoadError(f"{path_key}: {path!r} exists but is not a saved diffusers pipeline (no model_index.json in it)")
        source, local_only = str(local), True
    elif _looks_like_local_path(path):
        raise ModelLoadError(f"{path_key}: no such directory {path!r}")
    else:
        source, local_only = path, not allow_download
    options: dict[str, Any] = dict(torch_dtype=torch_dtype)
    if _has_safety_checker(source, local_only, revision):
        options.update(safety_checker=None, requires_safety_checker=False)
    if revision:
        options["revision"] = revision
    if variant:
        options["variant"] = variant
    try:
        with warnings.catch_warnings():
            # Newer diffusers renamed torch_dtype to dtype; older ones know only torch_dtype.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(source, local_files_only=local_only, **options)
    except (OSError, ValueError, TypeError) as err:
        # TypeError: e.g. a T5 tokenizer saved with a non-Unigram model, which transformers 5
        # cannot rebuild ("'dict' object is not an instance of 'Sequence'").
        if local.exists():
            raise ModelLoadError(f"{path_key}: could not load the pipeline in {path!r}: {err}") from err
        if local_only:
            raise ModelLoadError(
                f"{path_key}: {path!r} is neither a local directory nor a model in the Hugging Face cache. "
                f"Point {path_key} at a saved pipeline, or set model.allow_download=true to download it "
                "(and unset HF_HUB_OFFLINE)."
            ) from err
        raise ModelLoadError(f"{path_key}: could not download {path!r}: {err}") from err
    if scheduler:
        pipe.scheduler = build_scheduler(scheduler, dict(pipe.scheduler.config), scheduler_kwargs or {})
    elif scheduler_kwargs:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **scheduler_kwargs)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)  # the generator shows its own bar over samples
    return pipe.to(device)


def _has_safety_checker(source: str, local_only: bool, revision: str | None) -> bool:
    """Whether the saved pipeline has a ``safety_checker`` slot (Stable Diffusion 1.x/2.x do;
    SDXL, SD3, FLUX and PixArt do not, and diffusers warns about options they do not take).
    True when its model_index.json cannot be read: loading then reports the real problem."""
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index = DiffusionPipeline.load_config(source, local_files_only=local_only, revision=revision)
    except Exception:  # noqa: BLE001 - any failure is reported by from_pretrained just after
        return True
    return "safety_checker" in index


# Named when model.scheduler is not a scheduler: the ones SD-style pipelines commonly run.
COMMON_SCHEDULERS = ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler")


def build_scheduler(name: str, config: dict[str, Any], overrides: dict[str, Any] | None = None):
    """A diffusers scheduler of class ``name`` from a (possibly other class's) scheduler config.

    Raises ValueError naming ``model.scheduler`` when ``name`` is not a concrete diffusers
    scheduler class (a model, ``SchedulerMixin`` itself, one whose library is not installed) or
    cannot be built from ``config`` plus ``overrides``.
    """
    import diffusers
    from diffusers import SchedulerMixin
    from diffusers.configuration_utils import ConfigMixin

    examples = ", ".join(COMMON_SCHEDULERS)
    cls = getattr(diffusers, str(name), None) if str(name).isidentifier() else None
    # diffusers stands in a placeholder for a class whose optional library is missing.
    if type(cls).__name__ == "DummyObject":
        needs = ", ".join(b for b in getattr(cls, "_backends", []) if b != "torch") or "a library"
        raise ValueError(f"model.scheduler: {name!r} needs {needs}, which is not installed (or pick another, e.g. {examples})")
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin) and issubclass(cls, ConfigMixin)):
        raise ValueError(f"model.scheduler: {name!r} is not a diffusers scheduler class (e.g. {examples})")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        return cls.from_config({**config, **(overrides or {})})
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"model.scheduler: {name} cannot be built from the pipeline's scheduler config ({err}); "
            f"set what it needs in model.scheduler_kwargs or pick another, e.g. {examples}"
        ) from None


@dataclass(frozen=True)
class Runtime:
    """How a pipeline runs: what, besides the weights and the seed, decides the exact pixels.

    ``attention``: ``"sdpa"`` sets PyTorch's scaled-dot-product attention (diffusers'
    ``AttnProcessor2_0``, flash/memory-efficient kernels on GPU) on every attention layer that
    runs diffusers' plain (non-SDPA) ``AttnProcessor``; the transformer families' own
    processors (SD3's joint attention, FLUX's rotary attention) already run SDPA and are kept;
    ``"default"`` keeps whatever the pipeline has. ``fuse_qkv`` fuses the query/key/value
    projections into one matmul where the model supports it. ``channels_last`` stores the
    UNet's conv activations NHWC (what cuDNN's fast convolutions want). ``tf32`` lets float32
    matmuls use TF32 tensor cores on Ampere and newer (ignored elsewhere). ``compile`` wraps
    the UNet in ``torch.compile`` (minutes of warm-up; pays off on long GPU runs).
    """

    device: str = "cpu"
    dtype: str = "float32"
    attention: str = "sdpa"
    fuse_qkv: bool = True
    channels_last: bool = True
    tf32: bool = True
    compile: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def optimize_pipeline(pipe, runtime: Runtime):
    """Apply ``runtime``'s speed options to ``pipe`` in place; returns ``pipe``.

    Options a model does not support (fused QKV on a VAE without attention, say) are skipped
    with a log line rather than failing: they change speed, not what is computed.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if runtime.attention not in ("sdpa", "default"):
        raise ValueError(f"attention: must be sdpa or default, got {runtime.attention!r}")
    if runtime.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    models = [m for m in (denoiser, getattr(pipe, "vae", None)) if m is not None]
    if runtime.attention == "sdpa":
        for model in models:
            processors = getattr(model, "attn_processors", None) if hasattr(model, "set_attn_processor") else None
            # Only the plain processor is swapped: one processor for every layer would replace
            # SD3's joint or FLUX's rotary attention with one that ignores the text tokens.
            if processors and any(type(p) is AttnProcessor for p in processors.values()):
                try:
                    model.set_attn_processor(
                        {name: AttnProcessor2_0() if type(p) is AttnProcessor else p for name, p in processors.items()}
                    )
                except (ValueError, TypeError) as err:
                    log.info("attention: kept %s's own attention processors (%s)", type(model).__name__, err)
    if runtime.fuse_qkv:
        for model in models:
            if hasattr(model, "fuse_qkv_projections") and getattr(model, "attn_processors", None):
                original = dict(model.attn_processors)
                try:
                    model.fuse_qkv_projections()
                except (ValueError, NotImplementedError, AttributeError) as err:
                    log.info("fuse_qkv: not supported by %s (%s)", type(model).__name__, err)
                    continue
                _keep_self_attention_unfused(model, original)
    if runtime.channels_last and denoiser is not None:
        denoiser.to(memory_format=torch.channels_last)
    if runtime.compile and denoiser is not None:
        compiled = torch.compile(denoiser)
        if getattr(pipe, "unet", None) is not None:
            pipe.unet = compiled
        else:
            pipe.transformer = compiled
    return pipe


def _keep_self_attention_unfused(model, original: dict[str, Any]) -> None:
    """Undo fusion where diffusers' fused joint processor cannot run: SD3.5's dual-attention
    blocks have a second, image-only attention (no text projections) that
    ``SD3Transformer2DModel.fuse_qkv_projections`` gives the joint processor too, which then
    fails on the missing text tokens. Those layers get their own processor back."""
    modules = dict(model.named_modules())
    processors = dict(model.attn_processors)
    broken = [
        name
        for name, p in processors.items()
        if "JointAttnProcessor" in type(p).__name__
        and getattr(modules.get(name.removesuffix(".processor")), "add_k_proj", None) is None
    ]
    if broken:
        model.set_attn_processor({name: original[name] if name in broken else p for name, p in processors.items()})
        log.info("fuse_qkv: %d image-only attention layers of %s kept unfused", len(broken), type(model).__name__)


def make_runtime(device: str | torch.device | None = "auto", dtype: str | torch.dtype = "auto", **options: Any) -> Runtime:
    """A :class:`Runtime` with ``"auto"`` resolved: the device (:func:`resolve_device`) recorded by
    its type (``"cuda"``, not ``"cuda:1"``: a recorded recipe stays valid on another machine's
    GPU), the dtype (:func:`resolve_dtype`) by name. ``options``: the speed fields of Runtime."""
    resolved = resolve_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, resolved)
    return Runtime(device=resolved.type, dtype=dtype_name(torch_dtype), **options)


def model_options(model: Mapping[str, Any] | str) -> dict[str, Any]:
    """The ``model`` config group (or a path alone) as a plain dict with every key of
    :data:`LOAD_KEYS` (defaults filled in); a key the group does not have is a ConfigError."""
    from omegaconf import DictConfig, OmegaConf

    from pipeline.cli import ConfigError

    if isinstance(model, (str, Path)):
        model = {"path": str(model)}
    elif isinstance(model, DictConfig):
        model = OmegaConf.to_container(model, resolve=True)
    elif not isinstance(model, Mapping):
        raise ConfigError(f"model: expected the model config group (path, scheduler, ...), got {model!r}")
    unknown = sorted(str(k) for k in model if k not in LOAD_KEYS + SAMPLING_KEYS)
    if unknown:
        raise ConfigError(f"model.{unknown[0]}: unknown key; the model group takes {', '.join(LOAD_KEYS + SAMPLING_KEYS)}")
    options = {
        "path": None,
        "allow_download": False,
        "revision": None,
        "variant": None,
        "scheduler": None,
        "scheduler_kwargs": {},
    }
    options.update({k: model[k] for k in LOAD_KEYS if k in model})
    kwargs = options["scheduler_kwargs"]
    if kwargs is None:
        kwargs = {}
    elif isinstance(kwargs, DictConfig):
        kwargs = OmegaConf.to_container(kwargs, resolve=True)
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"model.scheduler_kwargs: expected a mapping of scheduler options, got {kwargs!r}")
    options["scheduler_kwargs"] = dict(kwargs)
    if not isinstance(options["allow_download"], bool):
        raise ConfigError(f"model.allow_download: expected true or false, got {options['allow_download']!r}")
    for key in ("revision", "variant", "scheduler"):
        if options[key] is not None:
            options[key] = str(options[key])
    return options


def load_model(
    model: Mapping[str, Any] | str,
    runtime: Runtime | None = None,
    *,
    device: str | torch.device | None = None,
    path_key: str = "model.path",
):
    """The pipeline that the ``model`` config group names, ready to sample: every caller's loader.

    ``model``: the ``model`` group (a DictConfig or a mapping; ``conf/model/*.yaml``) or a path
    alone. Its loading keys are all honoured: ``path`` (a saved pipeline's directory or a hub
    id), ``allow_download``, ``revision``, ``variant``, ``scheduler`` (a diffusers scheduler
    class built from the pipeline's own scheduler config) and ``scheduler_kwargs`` (overrides
    of that config; a recorded ``scheduler_config`` rebuilds the recorded scheduler). The
    sampling keys (``steps``, ``guidance_scale``, ``height``, ``width``) are the sampler's;
    any other key is a ConfigError.

    ``runtime`` (default :class:`Runtime`'s: the CPU, float32, every speed option but compile):
    the dtype and the speed options applied (:func:`optimize_pipeline`), and the device unless
    ``device`` is given (``"cuda:1"`` where the runtime records ``"cuda"``).

    Raises :class:`ModelLoadError` (a ValueError) naming ``path_key`` when the model cannot be
    loaded, and ValueError naming ``model.scheduler`` for an unknown scheduler: one line each.
    """
    options = model_options(model)
    if options["path"] in (None, ""):
        raise ModelLoadError(f"{path_key}: must be set to a saved pipeline's directory or a hub id")
    runtime = runtime or Runtime()
    torch_device = resolve_device(runtime.device if device is None else device)
    pipe = load_pipeline(
        options["path"],
        allow_download=options["allow_download"],
        torch_dtype=resolve_dtype(runtime.dtype, torch_device),
        device=torch_device,
        scheduler=options["scheduler"],
        scheduler_kwargs=options["scheduler_kwargs"],
        revision=options["revision"],
        variant=options["variant"],
        path_key=path_key,
    )
    return optimize_pipeline(pipe, runtime)
