"""SimCLR's NT-Xent loss (Chen et al. 2020, Eq. 1) and the HVS score of every
candidate pair (HVS paper Appendix I.1), over the *global* batch.

For M images with views a and b, the 2M views are L2-normalised; the loss of
anchor view i with positive view p(i) (the other view of the same image) is

    l_i = -log( exp(s(i, p(i)) / T) / sum_{k != i} exp(s(i, k) / T) ),

where s is the cosine similarity and the sum runs over the 2M - 1 other views:
the positive and the 2M - 2 views of the other images (the negatives).  Across
ranks the candidate views are gathered (:func:`common.gather.gather_with_grad`),
so each rank's anchors see the negatives of the whole global batch.

Computed in float32 (or float64 for float64 inputs), outside autocast."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.engine import dist
from common.gather import gather_with_grad
from common.numerics import precise as _precise


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, gather: bool = True,
            reduce: bool = True) -> torch.Tensor:
    """NT-Xent of this rank's B images with views ``z_a``, ``z_b`` [B, D].

    Anchors are the 2B local views; candidates are all 2M views of the global
    batch (M = ranks x B) if ``gather``, else the 2B local ones.  Returns the
    mean over the 2B local anchors (``reduce``; the loss of the SimCLR paper,
    which DDP's gradient averaging turns into the mean over all 2M anchors), or
    per image [B] the sum of its two anchor losses, l(a_i -> b_i) + l(b_i -> a_i)
    (so the reduced loss is half the mean of the per-image loss)."""
    with torch.autocast(z_a.device.type, enabled=False):
        z_a, z_b = F.normalize(_precise(z_a), dim=-1), F.normalize(_precise(z_b), dim=-1)
        B = z_a.shape[0]
        anchors = torch.cat([z_a, z_b])                                   # [2B, D]
        if gather:
            views = torch.cat([gather_with_grad(z_a), gather_with_grad(z_b)])  # [2M, D]
        else:
            views = anchors
        M = views.shape[0] // 2
        own = (dist.rank() * B if gather else 0) + torch.arange(B, device=z_a.device)  # global index
        self_col = torch.cat([own, M + own])    # where each anchor itself sits among the views
        pos_col = torch.cat([M + own, own])     # where its positive sits
        logits = anchors @ views.T / temperature  # [2B, 2M]
        rows = torch.arange(2 * B, device=z_a.device)
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[rows, self_col] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        per_anchor = F.cross_entropy(logits, pos_col, reduction="none")  # [2B]
    if reduce:
        return per_anchor.mean()
    return per_anchor[:B] + per_anchor[B:]


def pair_scores(z: torch.Tensor, pairs: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """HVS score of every candidate pair, vectorised (Appendix I.1).

    z: projections of V candidate views of this rank's B images, [V, B, D];
    pairs: [C, 2] candidate indices (k, l).  Entry (i, c) of the result [B, C]
    is image i's NT-Xent for pair (k, l) = pairs[c] with both directions
    summed, l(z_i^k -> z_i^l) + l(z_i^l -> z_i^k), whose negatives are the
    views k and l of the other images of the global batch: exactly
    ``nt_xent(z[k], z[l], T, reduce=False)``, for every pair at once.

    One similarity table between the local candidates and all (gathered)
    candidates is enough: the denominator of anchor z_i^k in pair (k, l) splits
    into the sum over view k's column (minus itself) and over view l's column,
    two log-sum-exps computed once per (view, view) and combined per pair.
    The table has B x V x V x M entries (M = ranks x B): 128 MiB in float32 for
    V = 4 and the paper's 4096 images on 8 GPUs."""
    with torch.autocast(z.device.type, enabled=False):
        V, B, _ = z.shape
        z = F.normalize(_precise(z), dim=-1)
        Z = gather_with_grad(z.transpose(0, 1).contiguous()).transpose(0, 1) if gather else z  # [V, M, D]
        own = (dist.rank() * B if gather else 0) + torch.arange(B, device=z.device)
        sim = torch.einsum("vbd,wmd->bvwm", z, Z) / temperature   # [B, V, V, M]
        b, v = torch.arange(B, device=z.device)[:, None], torch.arange(V, device=z.device)[None, :]
        sim[b, v, v, own[:, None]] = float("-inf")                # no anchor is its own candidate
        lse = sim.logsumexp(dim=-1)                              # [B, V, V]: over view w's column
        pos = sim[torch.arange(B, device=z.device), :, :, own]   # [B, V, V]: s(z_i^v, z_i^w) / T
        # loss of anchor view v with positive view w: its candidates are columns v and w
        loss = torch.logaddexp(lse.diagonal(dim1=1, dim2=2)[:, :, None], lse) - pos  # [B, V, V]
        k, l = pairs[:, 0].to(z.device), pairs[:, 1].to(z.device)
        return loss[:, k, l] + loss[:, l, k]
