"""MoCo v3's networks (Chen, Xie & He 2021, Section 3 and Appendix; the
released code's ``moco/builder.py`` for the head shapes).

The base encoder f_q is a backbone, a projection MLP and a prediction MLP; the
momentum encoder f_k is a backbone and a projection MLP (no predictor), an
exponential moving average of f_q's and never trained by gradient.

Every MLP block is Linear (no bias) - BN - ReLU with hidden width 4096; the
last Linear (output 256) is followed by a BN without affine parameters (the
"BN at the end" of SimCLR, without its scale), except in the ResNet
predictor.  Layer counts of the released code: projector 2 layers (ResNet) or
3 (ViT), predictor 2.  The paper's appendix describes a 3-layer projector
throughout; ``model.proj_layers`` sets it."""
from __future__ import annotations

import torch
from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int, last_bn: bool) -> nn.Sequential:
    """``layers`` Linear layers without bias, BN + ReLU after every hidden one,
    and a BN without affine parameters after the last one if ``last_bn``."""
    if layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got {layers}")
    blocks, width = [], in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    blocks.append(nn.Linear(width, out_dim, bias=False))
    if last_bn:
        blocks.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*blocks)


class Encoder(nn.Module):
    """Backbone followed by the projection MLP: z = g(f(x))."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class MoCoV3(nn.Module):
    """``base`` (f_q without its predictor), ``predictor`` and ``momentum``
    (f_k).  The momentum encoder starts as a copy of ``base`` and is updated
    only by :func:`common.multicrop.ema_update`."""

    def __init__(self, backbone: nn.Module, momentum_backbone: nn.Module, dim: int = 256, hidden: int = 4096,
                 proj_layers: int = 2, pred_layers: int = 2, pred_last_bn: bool = False):
        super().__init__()
        f = backbone.num_features
        self.base = Encoder(backbone, mlp(f, hidden, dim, proj_layers, last_bn=True))
        self.predictor = mlp(dim, hidden, dim, pred_layers, last_bn=pred_last_bn)
        self.momentum = Encoder(momentum_backbone, mlp(f, hidden, dim, proj_layers, last_bn=True))
        self.momentum.load_state_dict(self.base.state_dict())
        for p in self.momentum.parameters():
            p.requires_grad_(False)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """q = predictor(projector(backbone(x))) of the base encoder."""
        return self.predictor(self.base(x))

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """k = the momentum encoder's projection, without gradient."""
        return self.momentum(x)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """q1, q2, k1, k2 of two batches of views.  Each view batch goes through
        each encoder on its own, as in MoCo v3's code, so BatchNorm normalises
        over one view of every image."""
        return self.queries(x1), self.queries(x2), self.keys(x1), self.keys(x2)
