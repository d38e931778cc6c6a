"""BYOL's loss (Grill et al. 2020, Eq. 2): the online prediction q of one view
regresses the target projection z' of the other view, both L2-normalised,

    l(q, z') = || q/|q| - z'/|z'| ||^2 = 2 - 2 cos(q, z'),

with no gradient into the target; symmetrised over the two views (the paper's
L + L~), per image ``l(q1, z2') + l(q2, z1')`` in [0, 8].

Computed in float32 (float64 stays float64), also under autocast."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.numerics import precise


def normalized_mse(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """l(q, sg(z)) = 2 - 2 cos(q, z) per sample: [B]."""
    return 2.0 - 2.0 * F.cosine_similarity(precise(q), precise(z.detach()), dim=-1)


def byol_loss(q1, q2, z1, z2, reduce: bool = True) -> torch.Tensor:
    """l(q1, z2) + l(q2, z1): online predictions q of views 1 and 2, target
    projections z of views 1 and 2.  The batch mean, or per sample if not ``reduce``."""
    per_sample = normalized_mse(q1, z2) + normalized_mse(q2, z1)
    return per_sample.mean() if reduce else per_sample


def cosine_table(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """cos[b, v, w] = cos(q_v, z_w) of sample b, for online predictions q and
    target projections z of V candidates, [V, B, D] each: [B, V, V]."""
    q, z = F.normalize(precise(q), dim=-1), F.normalize(precise(z), dim=-1)
    return torch.einsum("vbd,wbd->bvw", q, z)


def pair_scores(q: torch.Tensor, z: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Per-sample BYOL loss of every candidate pair, from one table of cosines.

    q, z: online predictions and target projections of V candidates, [V, B, D];
    pairs: [C, 2] candidate indices (k, l), k a view-1 and l a view-2 candidate.
    Entry (b, c) of the result [B, C] is ``byol_loss(q[k], q[l], z[k], z[l],
    reduce=False)[b]`` = 4 - 2 cos(q_k, z'_l) - 2 cos(q_l, z'_k)."""
    with torch.autocast(q.device.type, enabled=False):
        cos = cosine_table(q, z)
    k, l = pairs[:, 0].to(q.device), pairs[:, 1].to(q.device)
    return 4.0 - 2.0 * (cos[:, k, l] + cos[:, l, k])
