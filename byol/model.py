"""BYOL's networks (Grill et al. 2020, Section 3.1 and Appendix A).

Online network: encoder f (a ResNet to its pooled features y), projector g
(MLP: Linear to 4096, BatchNorm, ReLU, Linear to 256; unlike SimCLR's, its
output is not batch-normalised) and predictor q of the same shape, from 256
to 256.  Target network: f and g only, an exponential moving average of the
online f and g (initialised equal to them), never trained by gradient."""
from __future__ import annotations

import copy

import torch
from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear - BatchNorm - ReLU - Linear (both linear layers with a bias)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class Encoder(nn.Module):
    """Backbone and projector: z = g(f(x))."""

    def __init__(self, backbone: nn.Module, hidden: int, dim: int):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone.num_features, hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class BYOL(nn.Module):
    """``online`` (backbone + projector), ``predictor`` and ``target`` (a frozen
    copy of ``online``, moved by :func:`common.engine.teacher.ema_update`)."""

    def __init__(self, backbone: nn.Module, dim: int = 256, proj_hidden: int = 4096, pred_hidden: int = 4096):
        super().__init__()
        self.online = Encoder(backbone, proj_hidden, dim)
        self.predictor = mlp(dim, pred_hidden, dim)
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad_(False)

    def predict(self, x: torch.Tensor):
        """(online prediction q, online projection z) of a batch of views."""
        z = self.online(x)
        return self.predictor(z), z

    @torch.no_grad()
    def project_target(self, x: torch.Tensor) -> torch.Tensor:
        """Target projection z' of a batch of views (no gradient)."""
        return self.target(x)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, target_out=None):
        """Online predictions q1, q2, target projections z1', z2' and the online
        projection z1 (logged) of two views.  Each view is a forward of its own,
        as in BYOL's code (BatchNorm statistics per view).  ``target_out``:
        (z1', z2') computed already (the selection's), to skip the target."""
        q1, z1 = self.predict(x1)
        q2, _ = self.predict(x2)
        if target_out is None:
            target_out = (self.project_target(x1), self.project_target(x2))
        return q1, q2, target_out[0], target_out[1], z1
