"""What every stage's command line shares: one-line errors, and config numbers read with checks.

A config or input mistake (a wrong value, a missing file, an empty data set) ends a stage with
one line on stderr, ``<stage>: <key or file>: <what is wrong>``, and exit status 2; any other
exception is a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows the traceback of a
mistake too, as it does for Hydra's own errors.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline.data.errors import EmptyDatasetError
from pipeline.text import display_text

# The exit status of a usage mistake, as argparse and most shells' builtins use.
USAGE_ERROR = 2
MESSAGE_LIMIT = 2000  # characters of an error message shown
# The config tree, for every ``@hydra.main`` (an absolute path: Hydra resolves a relative one
# against the module's package when the entry point is not ``__main__``).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class ConfigError(ValueError):
    """A config value is wrong; the message starts with its key, e.g. ``threshold: ...``."""


def stage_main(stage: str, *errors: type[BaseException]) -> Callable[[Callable], Callable]:
    """Decorate a stage's Hydra task function (place it under ``@hydra.main``).

    ``ValueError`` (ConfigError, DataConfigError, PromptsError, ...), ``FileNotFoundError``,
    ``EmptyDatasetError`` and the extra ``errors`` (e.g. ModelLoadError) are mistakes: they print
    ``<stage>: <message>`` to stderr and exit with status 2.
    """
    mistakes = (ValueError, FileNotFoundError, EmptyDatasetError, *errors)

    def decorate(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
        @functools.wraps(task)  # Hydra finds the stage's module (job name) through __wrapped__
        def run(cfg):
            try:
                return task(cfg)
            except mistakes as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                # Messages quote input (keys, paths, ids): one bounded line, controls escaped.
                print(f"{stage}: {display_text(err, MESSAGE_LIMIT)}", file=sys.stderr)
                # SystemExit passes through Hydra, which prints any Exception as "Error executing
                # job" with a traceback.
                raise SystemExit(USAGE_ERROR) from None

        return run

    return decorate


def config_number(cfg, key: str, *, minimum: float | None = None, maximum: float | None = None, optional: bool = False) -> float | None:
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
