"""The first-step prescreen (Wen et al., ICLR 2024): ``python -m pipeline.prescreen``
(see :mod:`pipeline.prescreen.stage`, the whole stage).
"""

from pipeline.prescreen.stage import (
    PrescreenSettings,
    choose_kept,
    heavy_prompt_aucs,
    latent_shape,
    prescreen,
    robust_z,
    roc_auc,
    run,
    text_conditional_noise_norm,
    unet_evaluations,
)

__all__ = ["PrescreenSettings", "choose_kept", "heavy_prompt_aucs", "latent_shape", "prescreen", "robust_z", "roc_auc", "run", "text_conditional_noise_norm", "unet_evaluations"]
