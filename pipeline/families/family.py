"""What one model family says about its pipeline: how a caption becomes call arguments, what
else a call needs, and how its first denoising step is taken (:class:`Family`).

Each family's module (:mod:`pipeline.families.stable_diffusion`, ``sdxl``, ``sd3``, ``flux``,
``pixart``) builds its :class:`Family`; :mod:`pipeline.families` registers them by pipeline class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Encode one caption: (pipe, caption, classifier-free guidance on, negative prompt or None)
# -> keyword arguments of the pipeline call, each a tensor with batch size 1.
Encoder = Callable[[Any, str, bool, "str | None"], dict[str, torch.Tensor]]


def named(**tensors: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The given keyword tensors less the None ones."""
    return {name: t for name, t in tensors.items() if t is not None}


@dataclass(frozen=True)
class Family:
    """One model family: how a caption becomes call arguments, and what else a call needs.

    ``encode(pipe, caption, cfg, negative_prompt)``: keyword arguments for one caption, each a
    tensor with batch size 1 (None: pass the captions as strings). ``uses_cfg(pipe, scale)``:
    whether the pipeline runs classifier-free guidance at that scale (two denoiser
    evaluations per step). ``call_options(pipe)``: fixed keyword arguments of every call.
    ``check(pipe, settings)``: raises a ValueError naming the config key a setting the
    family cannot honour. ``denoiser``: the :class:`pipeline.families.denoiser.Denoiser`
    subclass that takes the family's first denoising step (None: the prescreen cannot score it).
    """

    name: str
    encode: Encoder | None
    uses_cfg: Callable[[Any, float], bool] = lambda pipe, scale: scale > 1.0
    call_options: Callable[[Any], dict[str, Any]] = lambda pipe: {}
    check: Callable[[Any, Any], None] = lambda pipe, settings: None
    denoiser: type | None = None

    def batch_kwargs(self, per_caption: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One call's arguments from per-image ones (one mapping per image, in batch order):
        each tensor concatenated on its first (batch) axis."""
        return {name: torch.cat([e[name] for e in per_caption]) for name in per_caption[0]}

    def evaluations_per_step(self, pipe, guidance_scale: float) -> int:
        """Denoiser evaluations per image and step: 2 under classifier-free guidance, else 1."""
        return 2 if self.uses_cfg(pipe, guidance_scale) else 1
