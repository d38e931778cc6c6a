"""VICReg's loss (Bardes et al. 2022, Eq. 1-6; official ``main_vicreg.py``) over
the global batch, and its HVS scores.

For the embeddings Z, Z' [n, d] of the two views of n images:

    s(Z, Z') = 1/(n d) sum_b ||z_b - z'_b||^2                 (invariance)
    v(Z)     = 1/d sum_j max(0, gamma - sqrt(Var(z^j) + eps))  (variance)
    c(Z)     = 1/d sum_{i != j} Cov(Z)_ij^2                    (covariance)
    L = lambda s(Z, Z') + mu/2 [v(Z) + v(Z')] + nu [c(Z) + c(Z')],

lambda = mu = 25, nu = 1, gamma = 1, eps = 1e-4; variance and covariance are
unbiased (1/(n-1)).  Two details follow the official code, with which the
published coefficients were chosen: s is a mean over the dimensions too
(``F.mse_loss``; Eq. 5 writes the sum), and the variance term is halved (Eq. 6
has mu [v(Z) + v(Z')]; facebookresearch/vicreg issue #8).

Global batch, as the official code: the invariance term is this rank's mean
(DDP's gradient averaging makes it the mean over the global batch); variance
and covariance are taken over the embeddings gathered across ranks
(:func:`common.gather.gather_with_grad`, the code's ``FullGatherLayer``), the
same on every rank: the gradient is exactly that of the whole batch's loss.

Computed in float32 (float64 for float64 inputs), outside autocast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.batch_scores import candidate_columns, first_order_scores
from common.gather import gather_with_grad
from common.numerics import precise


def variance_term(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """v(Z): the hinge on the regularised standard deviation of every dimension."""
    return F.relu(gamma - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """c(Z): the squared off-diagonal covariances, summed, over d."""
    n, d = z.shape
    x = z - z.mean(dim=0)
    cov = x.T @ x / (n - 1)
    return (cov - torch.diag_embed(cov.diagonal())).pow(2).sum() / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, gamma: float = 1.0, eps: float = 1e-4, gather: bool = True):
    """(L, {"inv", "var", "cov"}) of this rank's embeddings [B, D] of the two views;
    ``var`` is (v(Z) + v(Z')) / 2 and ``cov`` c(Z) + c(Z'), over the global
    batch with ``gather``."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = precise(z1), precise(z2)
        inv = F.mse_loss(z1, z2)
        if gather:
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        var = (variance_term(z1, gamma, eps) + variance_term(z2, gamma, eps)) / 2
        cov = covariance_term(z1) + covariance_term(z2)
    return sim_coeff * inv + std_coeff * var + cov_coeff * cov, {"inv": inv, "var": var, "cov": cov}


def pair_scores(z: torch.Tensor, pairs: torch.Tensor, n1: int, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, gamma: float = 1.0, eps: float = 1e-4, score: str = "contribution",
                gather: bool = True) -> torch.Tensor:
    """HVS score of every candidate pair, vectorised; [B, C].

    z: embeddings of this rank's candidates [V, B, D], the ``n1`` candidates of
    view 1 first, then those of view 2; pairs: [C, 2], (k, l) with k < n1 <= l.
    Entry (b, c), see :mod:`common.batch_scores`:

    - ``invariance``: the sample's invariance term 1/D ||z_b^k - z_b^l||^2
      (the batch mean of which is s(Z, Z'));
    - ``contribution``: lambda times that, plus the sample's terms of the
      variance and covariance terms linearised around the reference: for
      each view, centred with the mean over its candidates and the M images
      of the global batch, x, with G = d(mu/2 v + nu c)/dCov at the
      reference covariance Cov_ref = mean over the view's candidates of their
      covariance over the batch, M/(M-1) x_b^T G x_b.  The batch mean of the
      scores of the chosen pairs is the loss of the chosen batch up to
      second order (centred at the reference mean)."""
    with torch.autocast(z.device.type, enabled=False):
        z = precise(z)
        k, l = pairs[:, 0].to(z.device), pairs[:, 1].to(z.device)
        inv = (z[k] - z[l]).pow(2).mean(-1).T
        if score == "invariance":
            return inv
        if score != "contribution":
            raise ValueError(f"hvs.score={score!r} is not invariance or contribution")
        Z, own = candidate_columns(z, gather)
        M, D = Z.shape[1:]

        def dphi(var):  # derivative of mu/2 * 1/d * relu(gamma - sqrt(var + eps)) in var
            std = torch.sqrt(var + eps)
            return torch.where(std < gamma, -std_coeff / (4 * D * std), torch.zeros_like(std))

        reg = []
        for view in (Z[:n1], Z[n1:]):
            x = view - view.mean((0, 1))
            rows = x.reshape(-1, D)
            table = first_order_scores(x[:, own], x[:, own], rows, rows, len(view) * (M - 1), dphi, cov_coeff / D)
            reg.append(M / (M - 1) * table.diagonal(dim1=1, dim2=2))   # [B, n]: x_b^k . G x_b^k
        return sim_coeff * inv + reg[0][:, k] + reg[1][:, l - n1]
