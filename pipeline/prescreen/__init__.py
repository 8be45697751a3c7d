"""The first-step prescreen (Wen et al., ICLR 2024; the anisotropy score of Asthana et al., ICLR
2026), for every model family: ``python -m pipeline.prescreen`` (see
:mod:`pipeline.prescreen.stage`, the stage; :mod:`pipeline.prescreen.denoisers`, each family's
first step; :mod:`pipeline.prescreen.scores`, the scores' formulas).
"""

from pipeline.prescreen.stage import (
    PrescreenSettings,
    choose_kept,
    denoiser_scores,
    heavy_prompt_aucs,
    latent_shape,
    prescreen,
    rank_scores,
    robust_z,
    roc_auc,
    run,
    score_prompts,
    text_conditional_noise_norm,
    unet_evaluations,
)

__all__ = ["PrescreenSettings", "choose_kept", "denoiser_scores", "heavy_prompt_aucs", "latent_shape", "prescreen", "rank_scores", "robust_z", "roc_auc",
           "run", "score_prompts", "text_conditional_noise_norm", "unet_evaluations"]  # fmt: skip
