"""What every stage's command line shares: one writer per output folder, one-line errors, and
config numbers read with checks.

A config or input mistake (a wrong value, a missing file, an empty data set) or a fault of the
file system (a full disk, a denied permission: any ``OSError``) ends a stage with one line on
stderr, ``<stage>: <key or file>: <what is wrong>``, and exit status 2; any other exception is a
bug and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows the traceback of a mistake too, as it
does for Hydra's own errors. A second process started on a stage's output folder and shard
while one is writing it refuses the same way, before it reads or writes anything.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.data.errors import EmptyDatasetError
from pipeline.io import FolderBusyError, writer_lock
from pipeline.layout import register_resolver
from pipeline.text import display_text

# The exit status of a usage mistake, as argparse and most shells' builtins use.
USAGE_ERROR = 2
MESSAGE_LIMIT = 2000  # characters of an error message shown
# The config tree, for every ``@hydra.main`` (an absolute path: Hydra resolves a relative one
# against the module's package when the entry point is not ``__main__``).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_resolver()  # ${layout:...} in the configs every stage composes


class ConfigError(ValueError):
    """A config value is wrong; the message starts with its key, e.g. ``threshold: ...``."""


def stage_main(stage: str, *errors: type[BaseException]) -> Callable[[Callable], Callable]:
    """Decorate a stage's Hydra task function (place it under ``@hydra.main``).

    ``ValueError`` (ConfigError, DataConfigError, PromptsError, ...), ``OSError``
    (FileNotFoundError, a full disk, a denied permission), ``EmptyDatasetError`` and the extra
    ``errors`` (e.g. ModelLoadError) are mistakes: they print ``<stage>: <message>`` (an OS error
    as ``<stage>: <path>: <reason>``) to stderr and exit with status 2.

    A pipeline stage (a config with ``rank``) holds the writer lock of its output folder
    (:func:`output_folder`) for its ``rank`` while it runs; when another live process holds it,
    the stage prints ``<stage>: <folder> is being written by another process (pid N, rank R);
    ...`` and exits with status 2 at once.
    """
    mistakes = (ValueError, OSError, EmptyDatasetError, FolderBusyError, *errors)

    def decorate(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
        @functools.wraps(task)  # Hydra finds the stage's module (job name) through __wrapped__
        def run(cfg):
            try:
                folder = output_folder(stage, cfg)
                rank = None if folder is None else shard_rank(cfg)
                if rank is None:
                    return task(cfg)
                with writer_lock(folder, rank):
                    return task(cfg)
            except mistakes as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                # Messages quote input (keys, paths, ids): one bounded line, controls escaped.
                print(f"{stage}: {display_text(error_message(err), MESSAGE_LIMIT)}", file=sys.stderr)
                # SystemExit passes through Hydra, which prints any Exception as "Error executing
                # job" with a traceback.
                raise SystemExit(USAGE_ERROR) from None

        return run

    return decorate


def error_message(err: BaseException) -> str:
    """What follows ``<stage>: `` for a mistake: an OS error as ``<path>: <reason>`` (the path
    alone is what a user acts on; ``[Errno 28]`` is not), anything else as its message."""
    if isinstance(err, FolderBusyError):
        return f"{err}; wait for it to finish or use another run_name"
    if isinstance(err, OSError) and err.strerror:
        if err.filename is None:
            return err.strerror
        if err.filename2 is not None:
            return f"{err.filename} -> {err.filename2}: {err.strerror}"
        return f"{err.filename}: {err.strerror}"
    return str(err)


def output_folder(stage: str, cfg: Any) -> Path | None:
    """The folder a pipeline stage writes: ``out_dir``; the report's, the folder of its file
    ``out``; the prescreen's (no ``out_dir`` key), ``<run_dir>/<stage>``. None for a config
    without ``rank`` (the demo's builders: one process each, no shards) or without any of these."""
    if not isinstance(cfg, DictConfig) or "rank" not in cfg:
        return None
    if cfg.get("out_dir") is not None:
        return Path(str(cfg.out_dir))
    if cfg.get("out") is not None:
        return Path(str(cfg.out)).parent
    if cfg.get("run_dir") is not None:
        return Path(str(cfg.run_dir)) / stage
    return None


def shard_rank(cfg: DictConfig) -> int | None:
    """``cfg.rank`` when it is a whole number of at least 0, else None (the stage names the mistake)."""
    rank = _parse(cfg.get("rank"), int)
    return rank if rank is not None and rank >= 0 else None


def config_number(
    cfg, key: str, *, minimum: float | None = None, maximum: float | None = None, optional: bool = False
) -> float | None:
    """The finite number at dotted ``key`` of ``cfg`` (a numeric string counts), as a float.

    Raises :class:`ConfigError` naming ``key`` for anything else, a value outside
    ``[minimum, maximum]``, or null unless ``optional`` (then None is returned).
    """
    return _config(cfg, key, float, "a number", minimum, maximum, optional)


def config_int(cfg, key: str, *, minimum: int | None = None, maximum: int | None = None, optional: bool = False) -> int | None:
    """The integer at dotted ``key`` of ``cfg`` (an integral float or a numeric string counts).

    Raises :class:`ConfigError` naming ``key`` for anything else, a value outside
    ``[minimum, maximum]``, or null unless ``optional`` (then None is returned).
    """
    return _config(cfg, key, int, "an integer", minimum, maximum, optional)


def _config(cfg, key: str, kind: type, what: str, minimum, maximum, optional: bool) -> Any:
    """``kind`` at ``key`` (see :func:`config_number`), its range checked; None when null and optional."""
    value = _value(cfg, key, optional)
    if value is None:
        return None
    number = _parse(value, kind)
    if number is None or (kind is float and not math.isfinite(number)):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    _check_range(key, number, minimum, maximum)
    return number


def _value(cfg, key: str, optional: bool) -> Any:
    value = OmegaConf.select(cfg, key, throw_on_missing=True)
    if value is None and not optional:
        raise ConfigError(f"{key}: must be set, got null")
    return value


def _parse(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (float or int) when it is a number or a numeric string, else None.

    A bool is no number here (though it is an int), and a float with a fraction no int.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if kind is int and isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return kind(value)
    except ValueError:
        return None


def _check_range(key: str, number: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and number < minimum:
        raise ConfigError(f"{key}: must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{key}: must be at most {maximum}, got {number}")


# Validated settings dataclasses ---------------------------------------------------------------


def setting(
    *,
    key: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple = (),
    default: Any = dataclasses.MISSING,
) -> Any:
    """A field of a settings dataclass read by :func:`settings_from`: its config ``key``
    (default: the field's name under the prefix), the range of a number, the ``choices`` of a
    value. ``default``: used when the key is absent from the config (not when it is null)."""
    metadata = {"key": key, "minimum": minimum, "maximum": maximum, "choices": tuple(choices)}
    return dataclasses.field(default=default, metadata=metadata)


def settings_from(cls: type, cfg: Any, prefix: str = "") -> Any:
    """An instance of the settings dataclass ``cls`` from ``cfg``, every field checked once.

    Each field is read at ``<prefix><name>`` (or its :func:`setting` ``key``) by its annotation:
    ``int`` and ``float`` with :func:`config_int`/:func:`config_number` (``| None`` makes null
    allowed), ``bool`` must be true or false, ``str`` text, a ``tuple`` a list; other types are
    taken as plain containers. A wrong value raises :class:`ConfigError` naming the key.
    """
    import typing

    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        key = meta.get("key") or f"{prefix}{f.name}"
        present = OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT
        if not present:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: must be set")
            continue
        values[f.name] = _typed(cfg, key, hints[f.name], meta)
    return cls(**values)


_ABSENT = object()


def _typed(cfg: Any, key: str, hint: Any, meta: dict) -> Any:
    import typing

    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    low, high = meta.get("minimum"), meta.get("maximum")
    if hint is int:
        value = config_int(cfg, key, minimum=low, maximum=high, optional=optional)
    elif hint is float:
        value = config_number(cfg, key, minimum=low, maximum=high, optional=optional)
    else:
        raw = _value(cfg, key, optional)
        value = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, (DictConfig, ListConfig)) else raw
        origin = typing.get_origin(hint) or hint
        if value is None:
            pass
        elif hint is bool and not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        elif hint is str and not isinstance(value, str):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        elif origin is tuple:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: expected a list, got {value!r}")
            value = tuple(value)
    choices = meta.get("choices") or ()
    if choices and value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value
