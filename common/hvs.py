"""Hard View Selection (Ferreira, Rapant, Hutter; arXiv 2310.03940), written once
for every method.

The loader draws several *candidates* for each crop slot.  A *combination* picks
one candidate for every slot (for SimSiam and SimCLR: a pair of the N views; for
DINO and iBOT: some global and some local candidates).  The selector

1. pushes all candidates through the model once, without gradient (optionally
   resized to a fraction of their size: Section 4.3 of the paper);
2. asks the method for the per-sample score of every combination, computed
   vectorised from those outputs (the method's own per-sample loss);
3. keeps, per sample, the combination with the highest score (``hard``; the
   paper), the lowest (``easy``; Appendix F.2), or a random one (``random``; the
   control with the same number of drawn views and no forward pass);
4. assembles the training minibatch from the chosen candidates, sample by
   sample: different images may use different candidate indices.

To the selector a method is two functions::

    outputs = candidate_outputs(candidates)     # list of V tensors [B, ...]
    scores  = combination_scores(outputs, combos)   # [B, C], combos [C, S]

The selection pass changes no training state: it runs under ``torch.no_grad``,
takes no optimizer step, and (with the default ``bn_mode='batch'``) restores
the BatchNorm running statistics it touched.  EMA teachers and loss centres are
the method's, and ``combination_scores`` must not update them.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("hard", "easy", "random")
#: BatchNorm behaviour during the selection forward:
#:  - ``batch``: batch statistics of the candidates (as the authors' code), running
#:    statistics restored afterwards, so selection leaves no trace (default);
#:  - ``batch_update``: batch statistics, and the running statistics keep the
#:    update of the selection forward (exactly the authors' code);
#:  - ``running``: BatchNorm layers in eval mode, using the running statistics.
BN_MODES = ("batch", "batch_update", "running")
RESOLUTIONS = (1.0, 0.75, 0.5, 0.25)


def pair_combinations(n: int) -> torch.Tensor:
    """All C(n, 2) pairs (k, l), k < l, in lexicographic order: LongTensor [C, 2]."""
    if n < 2:
        raise ValueError(f"hard view selection needs at least 2 views, got n_views={n}")
    return torch.tensor(list(itertools.combinations(range(n), 2)), dtype=torch.long)


def pool_combinations(pools: Sequence[tuple]) -> torch.Tensor:
    """Every combination that picks ``k`` of the ``n`` candidates of each pool.

    ``pools`` is a list of ``(n, k)``; candidates are numbered pool after pool,
    so pool p's candidates are ``offset_p .. offset_p + n_p - 1``.  Returns a
    LongTensor [C, sum k] (C = prod over pools of C(n, k)); each row lists the
    chosen candidates pool by pool, in increasing order within a pool."""
    per_pool, offset = [], 0
    for n, k in pools:
        if not 1 <= k <= n:
            raise ValueError(f"a pool of {n} candidates cannot fill {k} slots")
        per_pool.append([tuple(offset + i for i in c) for c in itertools.combinations(range(n), k)])
        offset += n
    rows = [sum(parts, ()) for parts in itertools.product(*per_pool)]
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class Selection:
    """What the selector chose for a minibatch of B samples."""

    views: list            # S tensors [B, ...]: the training views, slot by slot
    indices: torch.Tensor  # [B, S] candidate index chosen for every slot (on the views' device)
    choice: torch.Tensor   # [B] row of ``combos`` chosen for every sample (same device)
    combos: torch.Tensor   # [C, S] the combinations compared this step (same device)
    scores: Optional[torch.Tensor]  # [B, C] their per-sample scores (None in random mode)
    outputs: Any = None    # what candidate_outputs returned (None in random mode); a method may
    #                        reuse parts of it in its training step where that is exact
    resolution: float = 1.0  # fraction of the candidates' size that ``outputs`` were computed at
    rendered: bool = False   # the views were gathered from other renderings than ``outputs`` saw

    @property
    def chosen_scores(self) -> Optional[torch.Tensor]:
        if self.scores is None:
            return None
        return self.scores.gather(1, self.choice[:, None]).squeeze(1)


@contextmanager
def batchnorm_mode(model: nn.Module, bn_mode: str):
    """Context for the selection forward; see :data:`BN_MODES`."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"hvs.bn_mode={bn_mode!r} is not one of {BN_MODES}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn_mode == "batch_update" or not bns:
        yield
        return
    if bn_mode == "running":
        flags = [m.training for m in bns]
        for m in bns:
            m.eval()
        try:
            yield
        finally:
            for m, flag in zip(bns, flags):
                m.train(flag)
        return
    saved = [[b.clone() for b in m.buffers()] for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in zip(bns, saved):
                for b, s in zip(m.buffers(), bufs):
                    b.copy_(s)


@contextmanager
def without_training_noise(model: nn.Module):
    """Dropout and stochastic depth (timm's DropPath) off during the selection
    forward, so that a combination's score is the loss of the current network,
    not of a random thinning of it; BatchNorm is left to :func:`batchnorm_mode`."""
    from timm.layers import DropPath

    noisy = [m for m in model.modules()
             if isinstance(m, (nn.modules.dropout._DropoutNd, DropPath)) and m.training]
    for m in noisy:
        m.eval()
    try:
        yield
    finally:
        for m in noisy:
            m.train()


def resize_views(views: Sequence[torch.Tensor], factor: float, multiple: int = 1) -> list:
    """Resize image batches [B, C, H, W] by ``factor`` (bilinear, antialiased).
    With ``multiple`` > 1 (a ViT's patch size) each side is rounded down to a
    multiple of it, as DINO's patch embedding drops a partial patch: 75 % of
    224 px is 168 px = 10.5 patches of 16, so 160 px."""
    if factor == 1.0:
        return list(views)
    out = []
    for v in views:
        h, w = v.shape[-2:]
        if multiple > 1:
            size = tuple(max(multiple, multiple * int(x * factor // multiple)) for x in (h, w))
        else:
            size = (max(1, round(h * factor)), max(1, round(w * factor)))
        out.append(F.interpolate(v, size=size, mode="bilinear", antialias=True, align_corners=False))
    return out


class HardViewSelector:
    """Per-sample selection of the hardest combination of candidate views.

    Args:
        pools: list of ``(n_candidates, n_slots)``; ``[(4, 2)]`` is the paper's
            setting for SimSiam/SimCLR (4 views, all 6 pairs compared).
        mode: ``hard`` (argmax), ``easy`` (argmin) or ``random``.
        max_combinations: compare at most this many combinations, a random subset
            drawn afresh every step (0: all).  Never yields an empty selection.
        resolution: fraction of each candidate's size used for the selection
            forward only; training always uses the full-size candidates.
        bn_mode: see :data:`BN_MODES`.
        size_multiple: reduced sizes are rounded to a multiple of this (a ViT's
            patch size).

    Dropout and stochastic depth are off during the selection forward.
    Ties resolve to the first combination in enumeration order.
    """

    def __init__(self, pools=((4, 2),), mode="hard", max_combinations=0, resolution=1.0,
                 bn_mode="batch", size_multiple=1):
        if mode not in MODES:
            raise ValueError(f"hvs.mode={mode!r} is not one of {MODES}")
        if not 0.0 < float(resolution) <= 1.0:
            raise ValueError(f"hvs.resolution={resolution} must be in (0, 1] (paper: {RESOLUTIONS})")
        if int(max_combinations) < 0:
            raise ValueError(f"hvs.max_combinations={max_combinations} must be >= 0 (0: compare all)")
        if bn_mode not in BN_MODES:
            raise ValueError(f"hvs.bn_mode={bn_mode!r} is not one of {BN_MODES}")
        self.pools = [tuple(p) for p in pools]
        self.mode, self.resolution, self.bn_mode = mode, float(resolution), bn_mode
        self.max_combinations = int(max_combinations)
        self.size_multiple = int(size_multiple)
        self.all_combos = pool_combinations(self.pools)
        # slot -> pool, so that candidates of one pool (same shape) are stacked together
        self.slot_pool = [p for p, (_, k) in enumerate(self.pools) for _ in range(k)]
        self.pool_start = [sum(n for n, _ in self.pools[:p]) for p in range(len(self.pools))]

    @property
    def num_candidates(self) -> int:
        return sum(n for n, _ in self.pools)

    def combinations(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The combinations compared this step (a random subset if capped)."""
        total = len(self.all_combos)
        if self.max_combinations == 0 or total <= self.max_combinations:
            return self.all_combos
        keep = torch.randperm(total, generator=generator)[: self.max_combinations].sort().values
        return self.all_combos[keep]

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Row index per sample: argmax (hard) or argmin (easy); the random mode
        chooses in :meth:`__call__` without scores."""
        return scores.argmax(dim=1) if self.mode == "hard" else scores.argmin(dim=1)

    def gather(self, candidates: Sequence[torch.Tensor], indices: torch.Tensor) -> list:
        """Training views slot by slot: view s of sample b is candidate indices[b, s]."""
        B = indices.shape[0]
        rows = torch.arange(B, device=candidates[0].device)
        stacks, views = {}, []
        for s, p in enumerate(self.slot_pool):
            if p not in stacks:
                n = self.pools[p][0]
                stacks[p] = torch.stack(candidates[self.pool_start[p]: self.pool_start[p] + n])
            views.append(stacks[p][indices[:, s] - self.pool_start[p], rows])
        return views

    def __call__(self, candidates: Sequence[torch.Tensor], model: nn.Module,
                 candidate_outputs: Callable, combination_scores: Callable,
                 generator: Optional[torch.Generator] = None,
                 renders: Optional[Sequence[torch.Tensor]] = None) -> Selection:
        """Select training views from ``candidates`` (V tensors [B, ...]).

        ``model`` is only used to put its BatchNorm layers in the selection mode;
        ``candidate_outputs(candidates)`` runs the forward, ``combination_scores``
        turns its outputs into scores [B, C].  ``generator`` (CPU) drives the cap
        subset and the random mode.  ``renders``: other renderings of the same
        candidates (V tensors) to train on instead of ``candidates`` (static
        colour augmentation: the candidates share one colour jitter, the
        renderings have their own)."""
        if len(candidates) != self.num_candidates:
            raise ValueError(f"the selector expects {self.num_candidates} candidate views per "
                             f"sample (pools {self.pools}), the loader gave {len(candidates)}")
        B, device = candidates[0].shape[0], candidates[0].device
        combos = self.combinations(generator).to(device)
        if self.mode == "random":
            choice = torch.randint(len(combos), (B,), generator=generator).to(device)
            scores = outputs = None
        else:
            small = resize_views(candidates, self.resolution, self.size_multiple)
            with torch.no_grad(), batchnorm_mode(model, self.bn_mode), without_training_noise(model):
                outputs = candidate_outputs(small)
                scores = combination_scores(outputs, combos).float()
            if scores.shape != (B, len(combos)):
                raise RuntimeError(f"combination_scores returned shape {tuple(scores.shape)}, "
                                   f"expected {(B, len(combos))}")
            choice = self.choose(scores)  # stays on the device: no synchronisation
        indices = combos[choice]
        if renders is not None and len(renders) != len(candidates):
            raise ValueError(f"{len(renders)} renderings for {len(candidates)} candidates")
        views = self.gather(candidates if renders is None else renders, indices)
        return Selection(views=views, indices=indices, choice=choice, combos=combos, scores=scores,
                         outputs=outputs, resolution=self.resolution, rendered=renders is not None)
