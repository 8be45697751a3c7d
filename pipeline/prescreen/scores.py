"""The two prescreen scores, from a denoiser's conditional and unconditional predictions.

Both take predictions in latent layout, float (B, C, *spatial) (see :mod:`pipeline.prescreen.denoisers`),
row ``i`` of ``cond`` and ``uncond`` made from the same noisy input; higher means "more likely
memorized".

**wen** (Wen et al., ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in
Diffusion Models"): the magnitude of the text-conditional part of the first step's prediction,
``|| f(x_T, t_1, c) - f(x_T, t_1, "") ||_2`` over the whole latent, where ``f`` is what the
denoiser predicts (noise for SD 1.x, velocity for SD 2.x-v and the flow-matching transformers)
and ``t_1`` the scheduler's first timestep. Range [0, inf).

**anisotropy** (Asthana & Belagiannis, ICLR 2026, "Detecting and Mitigating Memorization in
Diffusion Models through Anisotropy of the Log-Probability", arXiv 2601.20642): the norm above
plus ``weight`` times the alignment of the guidance direction with the unconditional
prediction at a *low-noise* timestep ``t_low``, both evaluated on the same pure-noise input x_T
(no denoising steps run)::

    anisotropy = || f(x_T, t_1, c) - f(x_T, t_1, "") ||_2 + weight * alignment
    alignment  = mean over latent positions p of cos( f(x_T, t_low, "")_p , f(x_T, t_low, c)_p - f(x_T, t_low, "")_p )

with the cosine taken over the latent channels at each position (range [-1, 1]). Their
argument: at high noise the log-density is near-isotropic and the norm measures its curvature
well, while at low noise it is anisotropic and a memorized prompt shows as a guidance vector
pointing along the unconditional score. The paper text was not at hand; the definition is read
off the authors' code (github.com/rohanasthana/memorization-anisotropy: ``local_model/pipe.py``,
mode ``"x,c|x"``: ``cosine_similarity(uncond, cond - uncond, dim=1)`` averaged over positions,
at ``timesteps[-3]`` of the 50-step schedule, and ``||cond - uncond||`` at ``timesteps[0]``;
``detect_eval.py``: ``gamma_1 * norm + gamma_2 * cosine`` with (1, 2) for SD 1.4 and (1, 0.1) for
SD 2). Here ``weight`` is ``prescreen.anisotropy_weight`` (default 2, their SD 1.4 value) and
``t_low`` the third-last timestep of the prescreen's schedule (:func:`low_noise_timestep`).
Differences from their code: the norm is that of the raw prediction difference for every
prediction type (their SD 2 branch converts v to a score first, a constant factor per timestep
that changes the balance with ``weight`` but not the norm's ranking), and the low-noise pass
gets the first step's model input unchanged (for SD's DDIM/PNDM/DDPM schedulers
``scale_model_input`` is the identity, so this is their input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The prescreen.score values and the table column each ranks by.
SCORES = ("wen", "anisotropy")


def conditional_difference_norm(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Wen's score: (B,) L2 norm of ``cond - uncond`` over every latent element; range [0, inf)."""
    return (cond - uncond).flatten(1).norm(dim=1)


def guidance_alignment(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """(B,) mean over positions of the cosine (over channels, axis 1) between ``uncond`` and the
    guidance vector ``cond - uncond``; range [-1, 1] (0 where either vector is zero)."""
    cosine = F.cosine_similarity(uncond, cond - uncond, dim=1)  # (B, *spatial)
    return cosine.flatten(1).mean(dim=1)


def anisotropy_score(norm, alignment, weight: float):
    """``norm + weight * alignment`` (tensors or arrays of the same shape)."""
    return norm + weight * alignment


def low_noise_timestep(timesteps: torch.Tensor) -> torch.Tensor:
    """The anisotropy's low-noise timestep: the third-last of the schedule (the authors'
    ``timesteps[-3]``), or the last when the schedule has fewer than three."""
    return timesteps[-3] if len(timesteps) >= 3 else timesteps[-1]
