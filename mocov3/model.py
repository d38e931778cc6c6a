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
throughout; ``model.proj_layers`` sets it.

A ViT backbone takes MoCo v3's own definitions (the released ``vits.py``,
:func:`mocov3_vit`): a fixed, untrained 2-D sin-cos position embedding and
MoCo v3's initialisation."""
from __future__ import annotations

import math

import torch
from torch import nn


def sincos_position_embedding(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed position embedding, [1, 1 + grid_h * grid_w, dim]: zeros
    for the [CLS] token, then for the patch in row r and column c (row-major, the
    patch tokens' order) the four quarters sin(r w), cos(r w), sin(c w), cos(c w)
    with w_k = temperature^(-k / (dim / 4)), k = 0 .. dim / 4 - 1.  (The released
    code builds its grid with ``meshgrid`` in ij order, which is this on the square
    grids it is used with.)"""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    index = torch.arange(grid_h * grid_w)
    rows = torch.outer((index // grid_w).float(), omega)
    cols = torch.outer((index % grid_w).float(), omega)
    patches = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), patches])[None]


@torch.no_grad()
def mocov3_vit(vit: nn.Module) -> nn.Module:
    """Give a timm ViT (:func:`common.backbones.build_vit`) MoCo v3's
    definitions, in place: the fixed sin-cos position embedding
    (``requires_grad`` off: never trained), and its initialisation, in this
    order: every Linear xavier-uniform with zero bias, the qkv projection's
    bound computed for one of its three parts, U(+-sqrt(6 / (out / 3 + in)));
    the class token N(0, 1e-6^2); the patch projection U(+-sqrt(6 / (3 p^2 +
    dim))), its fan-in that of the p x p x 3 patch, zero bias."""
    h, w = vit.patch_embed.grid_size
    dim = vit.embed_dim
    if vit.pos_embed is None or vit.pos_embed.shape[1] != 1 + h * w or getattr(vit, "num_prefix_tokens", 1) != 1:
        raise ValueError("MoCo v3's position embedding needs a ViT with one [CLS] token and an embedding per patch")
    vit.pos_embed.copy_(sincos_position_embedding(h, w, dim))
    vit.pos_embed.requires_grad_(False)
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj
    bound = math.sqrt(6.0 / (proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] + dim))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    return vit


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
    only by :func:`common.engine.teacher.ema_update`."""

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
