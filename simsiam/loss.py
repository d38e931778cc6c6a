"""SimSiam's loss (Chen & He 2021, Eq. 1-2 of the HVS paper): the symmetrised
negative cosine similarity between one view's prediction and the other view's
projection, with stop-gradient on the projection."""
import torch
import torch.nn.functional as F


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -cos(p, sg(z)), per sample: [B]."""
    return -F.cosine_similarity(p, z.detach(), dim=-1)


def simsiam_loss(p1, p2, z1, z2, reduce: bool = True) -> torch.Tensor:
    """1/2 D(p1, z2) + 1/2 D(p2, z1); the batch mean, or per sample if not ``reduce``."""
    per_sample = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
    return per_sample.mean() if reduce else per_sample


def pair_scores(p: torch.Tensor, z: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Per-sample SimSiam loss of every candidate pair, vectorised.

    p, z: predictions and projections of V candidates, [V, B, D];
    pairs: [C, 2] candidate indices.  Returns [B, C] with entry (b, c) equal to
    ``simsiam_loss`` of sample b's candidates pairs[c, 0] and pairs[c, 1]."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.float(), dim=-1)
    cos = torch.einsum("vbd,wbd->bvw", p, z)  # cos[b, v, w] = cos(p_v, z_w)
    k, l = pairs[:, 0], pairs[:, 1]
    return -0.5 * (cos[:, k, l] + cos[:, l, k])
