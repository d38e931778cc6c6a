"""MoCo v3's contrastive loss (Chen, Xie & He 2021, Eq. 1 and Alg. 1) and the
HVS score of every candidate pair, over the *global* batch.

For L2-normalised queries q (this rank's B images) and keys k (all M images of
the global batch, gathered from every rank; they come from the momentum
encoder and carry no gradient), the loss of query i is InfoNCE with its own
image's key as the positive and the other M - 1 keys as negatives,

    ctr_i(q, k) = 2T * -log( exp(q_i . k_i / T) / sum_{j=1..M} exp(q_i . k_j / T) ),

i.e. the cross-entropy of the logits q k^T / T with the positives on the
diagonal of the global batch, scaled by 2T as in MoCo v3's code (which makes
the gradient's scale independent of T).  The loss of an image with views 1 and
2 is symmetrised: ctr_i(q1, k2) + ctr_i(q2, k1).

Computed in float32 (float64 stays float64), outside autocast."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.engine import dist
from common.gather import gather_with_grad
from common.numerics import precise


def all_keys(k: torch.Tensor, gather: bool) -> torch.Tensor:
    """This rank's keys [B, ...] concatenated with every other rank's, in rank
    order ([M, ...]; the identity in one process or without ``gather``).  Keys
    are detached first: no gradient flows through them."""
    k = k.detach()
    return gather_with_grad(k.contiguous()) if gather else k


def own_index(B: int, gather: bool, device) -> torch.Tensor:
    """Where this rank's B images sit in the gathered batch."""
    return (dist.rank() * B if gather else 0) + torch.arange(B, device=device)


def contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float, gather: bool = True,
                reduce: bool = True) -> torch.Tensor:
    """ctr(q, k): this rank's queries q [B, D] against the keys of the global
    batch (``gather``; else the B local keys k [B, D]).  The mean over the B
    queries (``reduce``; MoCo v3's per-rank loss, which DDP's gradient
    averaging turns into the mean over the global batch) or per query [B]."""
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(precise(q), dim=-1)
        keys = F.normalize(precise(all_keys(k, gather)), dim=-1)
        logits = q @ keys.T / temperature                       # [B, M]
        per_query = F.cross_entropy(logits, own_index(len(q), gather, q.device), reduction="none")
        per_query = per_query * (2 * temperature)
    return per_query.mean() if reduce else per_query


def mocov3_loss(q1, q2, k1, k2, temperature: float, gather: bool = True, reduce: bool = True) -> torch.Tensor:
    """ctr(q1, k2) + ctr(q2, k1): the batch mean, or per image [B] if not ``reduce``."""
    per_image = (contrastive(q1, k2, temperature, gather, reduce=False)
                 + contrastive(q2, k1, temperature, gather, reduce=False))
    return per_image.mean() if reduce else per_image


def pair_scores(q: torch.Tensor, k: torch.Tensor, pairs: torch.Tensor, temperature: float,
                gather: bool = True) -> torch.Tensor:
    """HVS score of every candidate pair, vectorised.

    q, k: queries and keys of V candidate views of this rank's B images,
    [V, B, D]; pairs: [C, 2] candidate indices (k, l).  Entry (i, c) of the
    result [B, C] is image i's loss for the pair (k, l) = pairs[c],
    ctr_i(q^k, key^l) + ctr_i(q^l, key^k), where the keys of a candidate index
    are those of the same candidate index of every image of the global batch
    (the positive is image i's own, the negatives the other images'): exactly
    ``mocov3_loss(q[k], q[l], key[k], key[l], T, reduce=False)``, for every
    pair at once.

    One table of logits between every local query and every (gathered) key of
    every candidate index, [B, V, V, M] (M = ranks x B), gives all of them: a
    log-sum-exp over its last axis per (query view, key view)."""
    with torch.autocast(q.device.type, enabled=False):
        V, B, _ = q.shape
        q = F.normalize(precise(q), dim=-1)
        keys = all_keys(k.transpose(0, 1), gather).transpose(0, 1)            # [V, M, D]
        keys = F.normalize(precise(keys), dim=-1)
        logits = torch.einsum("vbd,wmd->bvwm", q, keys) / temperature          # [B, V, V, M]
        own = own_index(B, gather, q.device)
        positive = logits[torch.arange(B, device=q.device), :, :, own]         # [B, V, V]
        ctr = (logits.logsumexp(dim=-1) - positive) * (2 * temperature)       # ctr_i(q^v, key^w)
        first, second = pairs[:, 0].to(q.device), pairs[:, 1].to(q.device)
        return ctr[:, first, second] + ctr[:, second, first]
