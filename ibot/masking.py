"""iBOT's masks (Zhou et al. 2021, Section 3.3; block-wise masking of BEiT, Bao
et al. 2021): which patch tokens of a student's global crop are replaced by the
learned mask token.

Per crop, a prediction ratio r is drawn: one of the ``ratios`` chosen
uniformly, each jittered uniformly by its ``variances`` (iBOT's ViT-S/16 recipe
``pred_ratio 0 0.3``, ``pred_ratio_var 0 0.2``: half of the crops unmasked, the
other half masked at r ~ U(0.1, 0.5)).  Then rectangular blocks are added until
about r x h x w of the h x w patches are masked: each block has an area drawn
between (min(h, w) // 3)^2 and the patches still missing, an aspect ratio
log-uniform in ``aspect`` (0.3 to 1/0.3), and is kept only if it adds at least
one patch and does not overshoot the target; ten failed tries end the mask.

Masks are drawn from a :class:`random.Random` seeded from the torch generator,
so a run's masks are a function of its per-step seed (exact resume)."""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def pred_ratio(rng: random.Random, ratios: Sequence[float], variances: Sequence[float]) -> float:
    """One crop's prediction ratio: ``ratios[i] + U(-variances[i], variances[i])`` for a uniform i."""
    drawn = [rng.uniform(r - v, r + v) if v > 0 else r for r, v in zip(ratios, variances)]
    return rng.choice(drawn)


def block_mask(rng: random.Random, h: int, w: int, ratio: float, aspect=(0.3, 1 / 0.3),
               blocks: list | None = None) -> np.ndarray:
    """A boolean [h, w] mask of about ``ratio * h * w`` patches in blocks (never
    more).  Each placed block ``(top, left, height, width)`` is appended to
    ``blocks`` when a list is given."""
    mask = np.zeros((h, w), dtype=bool)
    target = ratio * h * w
    low = (min(h, w) // 3) ** 2
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    count = 0
    while count < target:
        missing = target - count
        added = 0
        for _ in range(10):
            area = rng.uniform(low, missing)
            a = math.exp(rng.uniform(log_lo, log_hi))
            bh, bw = int(round(math.sqrt(area * a))), int(round(math.sqrt(area / a)))
            if bw < w and bh < h:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                region = mask[top: top + bh, left: left + bw]
                new = bh * bw - int(region.sum())
                if 0 < new <= missing:
                    region[...] = True
                    added = new
                    if blocks is not None:
                        blocks.append((top, left, bh, bw))
            if added:
                break
        if not added:
            break
        count += added
    return mask


class MaskGenerator:
    """Block masks for a batch of crops, from a mask config section (``mask.*``)."""

    def __init__(self, ratios, variances, aspect=(0.3, 1 / 0.3), start_epoch: int = 0):
        ratios, variances = list(ratios), list(variances)
        if len(ratios) != len(variances):
            raise ValueError(f"mask.ratio={ratios} and mask.ratio_var={variances} must have the same length")
        for r, v in zip(ratios, variances):
            if not (0.0 <= v <= r and r + v <= 1.0):
                raise ValueError(f"mask.ratio {r} with mask.ratio_var {v}: need 0 <= var <= ratio and "
                                 "ratio + var <= 1")
        lo, hi = aspect
        if not 0 < lo <= hi:
            raise ValueError(f"mask.aspect={list(aspect)} must satisfy 0 < min <= max")
        self.ratios, self.variances, self.aspect = ratios, variances, (lo, hi)
        self.start_epoch = int(start_epoch)

    @classmethod
    def from_cfg(cls, m: dict) -> "MaskGenerator":
        return cls(m["ratio"], m["ratio_var"], m["aspect"], m["start_epoch"])

    def __call__(self, n: int, h: int, w: int, epoch: int = 0, seed: int | None = None) -> torch.Tensor:
        """``n`` masks [n, h, w] (bool, CPU); all empty before ``start_epoch``.
        ``seed`` defaults to a draw from torch's global generator."""
        if epoch < self.start_epoch:
            return torch.zeros(n, h, w, dtype=torch.bool)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        rng = random.Random(seed)
        masks = [block_mask(rng, h, w, pred_ratio(rng, self.ratios, self.variances), self.aspect)
                 for _ in range(n)]
        return torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool)


def resize_masks(masks: torch.Tensor, size: tuple) -> torch.Tensor:
    """Masks [..., h, w] resized to the patch grid ``size`` of a resized crop
    (nearest neighbour), for the selection at reduced resolution."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    return F.interpolate(flat, size=size, mode="nearest").bool().reshape(*lead, *size)
