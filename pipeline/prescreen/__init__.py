"""The first-step prescreen (Wen et al., ICLR 2024; the anisotropy score of Asthana et al., ICLR
2026), for every model family: ``python -m pipeline.prescreen`` (see
:mod:`pipeline.prescreen.stage`, the stage; :mod:`pipeline.prescreen.step`, its executor step;
:mod:`pipeline.prescreen.settings`, its config group; :mod:`pipeline.prescreen.denoisers`, each
family's first step; :mod:`pipeline.prescreen.scores`, the scores' formulas;
:mod:`pipeline.prescreen.scoring`, scoring prompts with the denoiser;
:mod:`pipeline.prescreen.own_images`, the score of each caption against its own training images; :mod:`pipeline.prescreen.keep`,
the keep rule; :mod:`pipeline.prescreen.ranking`, ranking every prompt;
:mod:`pipeline.prescreen.evaluation`, the ROC AUCs).
"""

from pipeline.prescreen.evaluation import heavy_prompt_aucs, roc_auc
from pipeline.prescreen.keep import choose_kept, robust_z
from pipeline.prescreen.ranking import prescreen, rank_scores
from pipeline.prescreen.scoring import (
    denoiser_scores,
    latent_shape,
    score_prompts,
    text_conditional_noise_norm,
    unet_evaluations,
)
from pipeline.prescreen.settings import PrescreenSettings
from pipeline.prescreen.stage import PrescreenSummary, run

__all__ = [
    "PrescreenSettings",
    "PrescreenSummary",
    "choose_kept",
    "denoiser_scores",
    "heavy_prompt_aucs",
    "latent_shape",
    "prescreen",
    "rank_scores",
    "robust_z",
    "roc_auc",
    "run",
    "score_prompts",
    "text_conditional_noise_norm",
    "unet_evaluations",
]
