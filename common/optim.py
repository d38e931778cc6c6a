"""The LARS optimizer of SimCLR, BYOL, MoCo v3 (ResNet), Barlow Twins and VICReg.

``timm.optim.Lars`` (timm 1.0), read from its source: the update is
g' = trust * (g + wd * w) with trust = eta * |w| / (|g| + wd * |w| + eps)
(eta = ``trust_coeff``; 1 where |w| or |g| is 0; clipped at 1 with
``trust_clip``, LARC), then PyTorch-SGD momentum.  The adaptation and the
weight decay apply only to a group whose ``weight_decay`` is non-zero or whose
``always_adapt`` is set; other groups take plain momentum SGD.  Excluding the
BatchNorm and bias parameters (the 1-d ones) from both, as these methods do, is
one group with ``weight_decay=0, always_adapt=False``."""
from __future__ import annotations

from timm.optim import Lars


def lars_groups(params, weight_decay: float, bias_lr: float | None = None) -> list:
    """Two parameter groups: the weights (decay and adaptation) and the biases
    and BatchNorm parameters (neither; with their own ``lr`` if ``bias_lr``).
    Parameters without gradient are left out."""
    params = [p for p in params if p.requires_grad]
    norms_and_biases = {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False}
    if bias_lr is not None:
        norms_and_biases["lr"] = bias_lr
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "always_adapt": True},
            norms_and_biases]


def lars(params, lr: float, weight_decay: float, momentum: float = 0.9, trust_coeff: float = 0.001,
         trust_clip: bool = False, bias_lr: float | None = None) -> Lars:
    """timm's LARS over :func:`lars_groups`."""
    return Lars(lars_groups(params, weight_decay, bias_lr), lr=lr, momentum=momentum, trust_coeff=trust_coeff,
                trust_clip=trust_clip)
