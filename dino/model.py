"""DINO's networks (Caron et al. 2021, Section 3.1 and Appendix): a student and
a teacher of the same architecture, each a backbone (ViT or ResNet) followed by
the projection head; the teacher is an exponential moving average of the
student and receives no gradient."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from common.views.multicrop import MultiCropNet


class DINOHead(nn.Module):
    """MLP (``layers`` linear layers, hidden width ``hidden``, GELU, optional BN)
    to a ``bottleneck`` of 256, L2 normalisation, then a weight-normalised linear
    layer without bias to ``out_dim`` prototypes.  With ``norm_last_layer`` the
    norm of every prototype is fixed to 1 (the weight-norm gain is frozen)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256,
                 layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if layers < 1:
            raise ValueError(f"model.head_layers={layers} must be at least 1")
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mlp = []
        for k in range(layers):
            mlp.append(nn.Linear(dims[k], dims[k + 1]))
            if k < layers - 1:
                mlp += [nn.BatchNorm1d(dims[k + 1])] if use_bn else []
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINO(nn.Module):
    """Student and teacher.  ``forward(views, n_global)`` returns the student's
    outputs for all views (concatenated, globals first) and the teacher's for
    the first ``n_global`` views; pass ``teacher_out`` to skip the teacher."""

    def __init__(self, student: MultiCropNet, teacher: MultiCropNet):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.teacher.load_state_dict(student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def forward(self, views, n_global: int, teacher_out: torch.Tensor | None = None):
        student_out = self.student(views)
        if teacher_out is None:
            with torch.no_grad():
                teacher_out = self.teacher(views[:n_global])
        return student_out, teacher_out
