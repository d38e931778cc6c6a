"""The LARS optimizer of SimCLR, BYOL, MoCo v3 (ResNet), Barlow Twins and VICReg.

The update of the official implementations (SimCLR's TensorFlow
``LARSOptimizer``, BYOL's optax ``lars``, Barlow Twins' and MoCo v3's PyTorch
``LARS``), for a parameter w with gradient g, weight decay wd, trust
coefficient eta, momentum m and learning rate lr:

    d     = g + wd * w                        (weight decay added to the gradient)
    trust = eta * |w| / |d|                   (1 where |w| or |d| is 0)
    mu    = m * mu + trust * d                (the momentum buffer, zero at first)
    w     = w - lr * mu

BatchNorm and bias parameters (the 1-d ones: MoCo v3's and Barlow Twins'
test, BYOL's bias-and-norm filter, SimCLR's name filter) take neither the
weight decay nor the trust ratio: d = g, trust = 1.

SimCLR's optimizer ("classic momentum") keeps the learning rate inside the
buffer, mu = m * mu + lr * trust * d and w = w - mu; the group option
``lr_in_momentum`` does that.  The two forms are equal while the learning rate
is constant and differ during warm-up and decay.

``timm.optim.Lars`` is not used: it divides by |g| + wd * |w| (the
triangle-inequality bound of |g + wd * w|), which makes its steps smaller,
by about 0.1 % usually and by up to 29 % where |g| is close to wd * |w|.

``trust_clip`` (LARC, solo-learn's ``clip_lr``; off in every official recipe)
caps trust / lr at 1, as timm does.
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """LARS as the official SimCLR, BYOL, Barlow Twins and MoCo v3 code (see
    the module docstring).  Group options: ``lr``, ``weight_decay``,
    ``momentum``, ``trust_coeff``, ``adapt`` (weight decay and trust ratio:
    False for BatchNorm and bias parameters), ``trust_clip`` and
    ``lr_in_momentum`` (SimCLR's classic momentum).  The buffer is the state's
    ``momentum_buffer``."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coeff: float = 0.001, trust_clip: bool = False, lr_in_momentum: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coeff=trust_coeff,
                        adapt=True, trust_clip=trust_clip, lr_in_momentum=lr_in_momentum)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                scale = lr if group["lr_in_momentum"] else 1.0
                if group["adapt"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["trust_coeff"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    if group["trust_clip"]:
                        trust = torch.clamp(trust / lr, max=1.0) if lr > 0 else torch.ones_like(trust)
                    d = d.mul(trust * scale)
                elif scale != 1.0:
                    d = d.mul(scale)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(d)
                p.sub_(buf if group["lr_in_momentum"] else buf * lr)
        return loss


def lars_groups(params, weight_decay: float, bias_lr: float | None = None) -> list:
    """Two parameter groups: the weights (decay and adaptation) and the biases
    and BatchNorm parameters, the 1-d ones (neither; with their own ``lr`` if
    ``bias_lr``).  Parameters without gradient are left out."""
    params = [p for p in params if p.requires_grad]
    norms_and_biases = {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "adapt": False}
    if bias_lr is not None:
        norms_and_biases["lr"] = bias_lr
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "adapt": True},
            norms_and_biases]


def lars(params, lr: float, weight_decay: float, momentum: float = 0.9, trust_coeff: float = 0.001,
         trust_clip: bool = False, bias_lr: float | None = None, lr_in_momentum: bool = False) -> LARS:
    """:class:`LARS` over :func:`lars_groups`."""
    return LARS(lars_groups(params, weight_decay, bias_lr), lr=lr, momentum=momentum, trust_coeff=trust_coeff,
                trust_clip=trust_clip, lr_in_momentum=lr_in_momentum)
