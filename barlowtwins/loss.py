"""Barlow Twins' loss (Zbontar et al. 2021, Eq. 1-2) over the global batch, and
its HVS scores.

The embeddings z, z' of the M images of the global batch are standardised
along the batch, dimension by dimension (the official code's BatchNorm without
affine parameters, in training mode: biased variance, eps 1e-5; synchronised
across GPUs), and

    C_ij = 1/M sum_b a_bi b_bj,
    L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2,   lambda = 5e-3.

Across ranks the embeddings are gathered (:func:`common.gather.gather_with_grad`)
and every rank computes the loss of the whole batch, whose gradient after
DDP's averaging is exactly the single-process gradient of L.  (The official
code all-reduces each GPU's share of C outside autograd, which yields 1/world
of that gradient: the same LARS step for the adapted weights, up to the
balance with weight decay, and a smaller one for biases and BatchNorm.)

Computed in float32 (float64 for float64 inputs), outside autocast.
"""
from __future__ import annotations

import torch

from common.batch_scores import candidate_columns, first_order_scores
from common.gather import gather_with_grad
from common.numerics import precise

EPS = 1e-5  # BatchNorm1d's eps: the official code standardises with a BatchNorm layer


def standardise(z: torch.Tensor, dims=(0,), eps: float = EPS) -> torch.Tensor:
    """(z - mean) / sqrt(var + eps) over ``dims`` (the batch), biased variance."""
    mean = z.mean(dims, keepdim=True)
    var = (z - mean).pow(2).mean(dims, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def redundancy_loss(c: torch.Tensor, lambd: float):
    """(L, terms) of a cross-correlation matrix C [D, D]: the invariance term
    sum_i (1 - C_ii)^2 and the redundancy-reduction term sum_{i != j} C_ij^2."""
    diag = c.diagonal()
    on_diag = (1 - diag).pow(2).sum()
    off_diag = (c - torch.diag_embed(diag)).pow(2).sum()
    return on_diag + lambd * off_diag, {"on_diag": on_diag, "off_diag": off_diag}


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """C [D, D] of this rank's embeddings [B, D] and, with ``gather``, every
    other rank's: standardised over the M images of the global batch."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = precise(z1), precise(z2)
        if gather:
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        return standardise(z1).T @ standardise(z2) / z1.shape[0]


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3, gather: bool = True):
    """(L, {"on_diag", "off_diag"}) of the two views' embeddings [B, D]."""
    return redundancy_loss(cross_correlation(z1, z2, gather), lambd)


def pair_scores(z: torch.Tensor, pairs: torch.Tensor, n1: int, lambd: float = 5e-3, score: str = "contribution",
                gather: bool = True) -> torch.Tensor:
    """HVS score of every candidate pair, vectorised; [B, C].

    z: embeddings of this rank's candidates [V, B, D], the ``n1`` candidates of
    view 1 first, then those of view 2; pairs: [C, 2], (k, l) with k < n1 <= l.
    Every candidate is standardised with its view's reference statistics (mean
    and variance over all candidates of that view and all M images of the
    global batch; see :mod:`common.batch_scores`): a^k, b^l.  Entry (b, c):

    - ``invariance``: 1/2 ||a_b^k - b_b^l||^2, the sample's share of
      sum_i (1 - C_ii), the deficit the on-diagonal term squares (for rows
      standardised with their own batch's statistics the batch mean of
      1/2 ||a_b - b_b||^2 is that sum, up to eps);
    - ``contribution``: a_b^k . G b_b^l, G = dL/dC at the reference
      C_ref = mean over (k, l) of the pair's C = A_mean^T B_mean / M, the
      sample's term in L(C) ~ L(C_ref) + <G, C - C_ref>, so that the batch
      mean of the scores of the chosen pairs is <G, C> of the chosen batch."""
    with torch.autocast(z.device.type, enabled=False):
        z = precise(z)
        Z, own = candidate_columns(z, gather)
        M = Z.shape[1]
        ref = torch.cat([standardise(Z[:n1], dims=(0, 1)), standardise(Z[n1:], dims=(0, 1))])  # [V, M, D]
        mine = ref[:, own]                                                                   # [V, B, D]
        k, l = pairs[:, 0].to(z.device), pairs[:, 1].to(z.device)
        if score == "invariance":
            return 0.5 * (mine[k] - mine[l]).pow(2).sum(-1).T
        if score != "contribution":
            raise ValueError(f"hvs.score={score!r} is not invariance or contribution")
        table = first_order_scores(mine[:n1], mine[n1:], ref[:n1].mean(0), ref[n1:].mean(0), M,
                                   lambda c: -2 * (1 - c), lambd)                            # [B, n1, n2]
        return table[:, k, l - n1]
