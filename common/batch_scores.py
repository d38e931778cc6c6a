"""Per-sample HVS scores for losses of batch statistics (Barlow Twins, VICReg).

SimSiam's and SimCLR's losses are sums of per-sample terms, so the score of a
pair of views is that sample's term.  Barlow Twins' and VICReg's losses are
functions of moment matrices of the whole batch (a cross-correlation, a
covariance), so the score of one image's pair has to be defined, and the batch
the training step will see is not known when the pairs are scored: it mixes
the pairs that all the images choose.

Both methods draw every view from its own recipe (BYOL's asymmetric
augmentation), so with HVS an image has ``n1`` candidates of view 1 and ``n2``
of view 2, and a combination (k, l) is one candidate of each.  The scores are
taken against a **reference**: the statistics the batch has in expectation
when every image picks its pair at random, i.e. pooled over all candidates of
a view and over the global batch (the candidates are gathered across ranks,
:func:`candidate_columns`).  No candidate is privileged and the reference is
the same for every pair, so a sample's score depends on its own pair only.

Two scores (config key ``hvs.score``, :func:`score_setting`):

``invariance``
    the sample's agreement term: how far apart its two embeddings are
    (Barlow Twins: ``1/2 ||a - b||^2`` of the embeddings standardised with the
    reference statistics, the sample's share of ``sum_i (1 - C_ii)``; VICReg:
    the per-sample mean squared error of the invariance term).
``contribution``
    the sample's term of the first-order expansion of the batch loss around
    the reference.  For a loss F(S) of a moment matrix S = 1/n sum_b x_b y_b^T
    (over the batch, with fixed centring/standardisation),

        F(S) ~ F(S_ref) + <G, S - S_ref>,   G = dF/dS at S_ref,
        <G, S> = 1/n sum_b x_b^T G y_b,

    a sum of one term per sample that depends on that sample's pair alone:
    choosing every image's pair by the largest ``x_b^T G y_b`` maximises the
    linearised loss of the batch (HVS's "hardest views", for a batch loss).
    :func:`first_order_scores` evaluates ``x^T G y`` for every pair of
    candidates without forming the D x D matrices, for the losses of the form

        F(S) = sum_i phi(S_ii) + kappa * sum_{i != j} S_ij^2

    that both methods are (Barlow Twins: phi(s) = (1 - s)^2, kappa = lambda;
    VICReg's variance hinge on the diagonal and covariance penalty off it).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from common.engine import dist
from common.engine.config import setting
from common.gather import gather_with_grad

SCORES = ("invariance", "contribution")


def score_setting(default: str = "contribution"):
    """The ``hvs.score`` config key of a method scored here."""
    return setting(default, "per-sample HVS score of a pair: invariance (the sample's agreement term) or contribution "
                   "(its term of the batch loss linearised around the statistics of a random choice); see "
                   "common/batch_scores.py", list(SCORES))


def candidate_columns(z: torch.Tensor, gather: bool = True):
    """The candidates of every image of the global batch, and where this rank's are.

    z: [V, B, D], candidate v of this rank's B images.  Returns (Z, own): Z
    [V, M, D] with the candidates of all M = ranks x B images in rank order
    (``z`` itself without ``gather`` or without a process group), and ``own``
    [B], the rows of this rank's images in Z."""
    B = z.shape[1]
    if not gather:
        return z, torch.arange(B, device=z.device)
    Z = gather_with_grad(z.transpose(0, 1).contiguous()).transpose(0, 1)
    return Z, dist.rank() * B + torch.arange(B, device=z.device)


def first_order_scores(x: torch.Tensor, y: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, n: float,
                       dphi: Callable[[torch.Tensor], torch.Tensor], kappa: float) -> torch.Tensor:
    """``x_{k,b}^T G y_{l,b}`` for every sample b and every pair (k, l), [B, K, L].

    G = dF/dS of F(S) = sum_i phi(S_ii) + kappa * sum_{i != j} S_ij^2 at the
    reference S = X^T Y / n, i.e. G = diag(phi'(S_ii)) + 2 kappa (S - diag S).

    x: [K, B, D] and y: [L, B, D], the rows scored; X, Y: [N, D], the rows of
    the reference; ``dphi`` maps the diagonal S_ii [D] to phi'(S_ii).  With
    q = x^T S y = 1/n sum_m (x . X_m)(Y_m . y) (Gram matrices: K B N D
    operations, no D x D matrix),

        x^T G y = sum_i (phi'(S_ii) - 2 kappa S_ii) x_i y_i + 2 kappa q."""
    s_diag = (X * Y).sum(0) / n                                    # [D]
    weights = dphi(s_diag) - 2 * kappa * s_diag                    # [D]
    diagonal = torch.einsum("kbd,lbd,d->bkl", x, y, weights)
    gx = torch.einsum("kbd,nd->kbn", x, X)                         # [K, B, N]
    gy = torch.einsum("lbd,nd->lbn", y, Y)                         # [L, B, N]
    return diagonal + (2 * kappa / n) * torch.einsum("kbn,lbn->bkl", gx, gy)
