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
pointing along the unconditional score. The definition here is read
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

**wen_levels** (ours, beyond both papers): Wen's norm taken on the same pure-noise x_T at several
noise levels of the schedule (``prescreen.levels``, fractions of its length: 0 is the first,
noisiest timestep, where Wen et al. take it; 0.125 the timestep an eighth of the way; default
0.125 alone: on the demo model, 0.25 added never raised the score of a weakly memorized prompt,
at twice the cost), each level's norms standardised over the audit's prompts
(:func:`pipeline.prescreen.keep.robust_z`, against its singleton prompts when it has enough),
and the largest of those z values kept: a prompt
that is an outlier at any one level ranks high. Why: on the demo model some prompts that brute
force extracts (10 and 40 training copies, 4 to 10 of 24 samples) have an ordinary first-step
norm (robust z 0 to 1) but stand out an eighth of the way into the schedule (z 4 to 10 over 16
noise draws), where every heavily duplicated prompt stands out too (see docs/screening.md).
Each level costs ``(prompts + 1) x seeds`` evaluations. Set-dependent by construction (like the
robust z the keep rule already uses): scores of one audit's prompts are comparable, not across
audits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The prescreen.score values and the table column each ranks by; the first three read the
# caption alone (TEXT_SCORES), own_images also each prompt's own training images
# (:mod:`pipeline.prescreen.own_images`), with one of them beside it.
TEXT_SCORES = ("wen", "anisotropy", "wen_levels")
SCORES = (*TEXT_SCORES, "own_images")


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


def level_indexes(n_timesteps: int, levels) -> list[int]:
    """The schedule positions of ``levels`` (fractions in [0, 1] of a schedule of ``n_timesteps``,
    0 the first timestep), ``round(level * (n_timesteps - 1))`` each, in the order given."""
    out = []
    for level in levels:
        if not 0.0 <= float(level) <= 1.0:
            raise ValueError(f"prescreen.levels: each level must be in [0, 1] (a fraction of the schedule), got {level}")
        out.append(int(round(float(level) * (n_timesteps - 1))))
    return out


def strongest_outlier(norms, standardise):
    """(prompts,) the largest over levels of ``standardise`` (a robust z over prompts) applied to
    each level's column of ``norms`` (prompts, levels)."""
    import numpy as np

    norms = np.asarray(norms, dtype=np.float64)
    if norms.ndim != 2 or norms.shape[1] == 0:
        raise ValueError(f"norms: expected (prompts, levels) with at least one level, got shape {norms.shape}")
    if norms.shape[0] == 0:
        return np.zeros(0)
    return np.max(np.stack([standardise(norms[:, j]) for j in range(norms.shape[1])], axis=1), axis=1)
