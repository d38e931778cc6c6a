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

To the selector a method is a model and two functions (:class:`SelectionHooks`;
every method of this repository is one, and so is any small object with them)::

    outputs = method.candidate_outputs(method.model, candidates, step)  # e.g. V tensors [B, ...]
    scores  = method.combination_scores(outputs, combos, step)          # [B, C], combos [C, S]

The selection pass changes no training state: it runs under ``torch.no_grad``,
takes no optimizer step, and (with the default ``bn_mode='batch'``) restores
the BatchNorm running statistics it touched.  EMA teachers and loss centres are
the method's, and ``combination_scores`` must not update them.
"""
from __future__ import annotations

import functools
import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.numerics import to_device

MODES = ("hard", "easy", "random")
#: BatchNorm behaviour during the selection forward:
#:  - ``batch``: batch statistics of the candidates (as the authors' code), running
#:    statistics restored afterwards, so selection leaves no trace (default);
#:  - ``batch_update``: batch statistics, and the running statistics keep the
#:    update of the selection forward (exactly the authors' code);
#:  - ``running``: BatchNorm layers in eval mode, using the running statistics.
#: Under DDP with SyncBatchNorm the batch statistics are those of each rank's own
#: candidates (:func:`local_batch_statistics`), as in a single-process run.
BN_MODES = ("batch", "batch_update", "running")
RESOLUTIONS = (1.0, 0.75, 0.5, 0.25)
#: precision of the selection forward: ``auto`` (bf16 where the device supports it, else fp32)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def precision_setting(default: str, measured: str):
    """The ``hvs.precision`` config key with a method's default and why (``bench/precision.py``)."""
    from common.engine.config import setting

    return setting(default, "precision of the selection forward and scoring: fp32, bf16, fp16 (GPU) or auto "
                   f"(bf16 where the device computes it natively, else fp32); scores are compared in fp32. {measured}",
                   list(PRECISIONS))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 natively: a GPU that supports it, or
    a CPU with AVX512-BF16 or AMX (elsewhere bf16 is emulated, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX in the CPU's flags (read once per process, not every step)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def selection_dtype(precision: str, device: torch.device):
    """The autocast dtype of the selection forward (None: fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"hvs.precision={precision!r} is not one of {PRECISIONS}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("hvs.precision=fp16 needs a GPU; on CPU use bf16 or fp32")
    return DTYPES.get(precision)


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


def num_pool_combinations(pools: Sequence[tuple]) -> int:
    """``len(pool_combinations(pools))`` without enumerating: the product over
    pools of C(n, k), as an exact Python int (it may exceed 2**63)."""
    total = 1
    for n, k in pools:
        if not 1 <= k <= n:
            raise ValueError(f"a pool of {n} candidates cannot fill {k} slots")
        total *= math.comb(n, k)
    return total


def unrank_combinations(pools: Sequence[tuple], ranks: Sequence[int]) -> list:
    """Rows ``ranks`` of :func:`pool_combinations` (a list of lists of candidate
    indices), computed without enumerating the table: row r of the table is
    ``unrank_combinations(pools, [r])[0]``.

    A rank is first split in mixed radix over the pools (the last pool varies
    fastest, as in ``itertools.product``), then each pool's index is turned
    into its k-subset of ``range(n)`` in the lexicographic order of
    ``itertools.combinations`` (combinatorial number system).  Exact for ranks
    of any size (Python ints)."""
    sizes = [math.comb(n, k) for n, k in pools]  # validates like num_pool_combinations
    total = num_pool_combinations(pools)
    offsets = [sum(n for n, _ in pools[:p]) for p in range(len(pools))]
    # binom[m][j] = C(m, j): the number of k-subsets whose next element is x is C(n - x - 1, j - 1)
    n_max = max((n for n, _ in pools), default=0)
    binom = [[math.comb(m, j) for j in range(n_max + 1)] for m in range(n_max + 1)]
    rows = []
    for rank in ranks:
        rank = int(rank)
        if not 0 <= rank < total:
            raise IndexError(f"combination rank {rank} is outside [0, {total})")
        index = [0] * len(pools)
        for p in reversed(range(len(pools))):
            rank, index[p] = divmod(rank, sizes[p])
        row = []
        for (n, k), r, offset in zip(pools, index, offsets):
            x = 0
            for j in range(k, 0, -1):  # j slots of this pool still to fill
                while r >= binom[n - x - 1][j - 1]:  # skip every subset whose next element is x
                    r -= binom[n - x - 1][j - 1]
                    x += 1
                row.append(offset + x)
                x += 1
        rows.append(row)
    return rows


#: random words are drawn in blocks of this many 62-bit integers (a fixed size, so that
#: the numbers a draw consumes from the generator depend on nothing but its arguments)
_RANDOM_BLOCK = 256


def sample_ranks(total: int, count: int, generator: Optional[torch.Generator] = None) -> list:
    """``count`` distinct integers from ``[0, total)``, every subset of that size
    equally likely, returned sorted (R. Floyd's sampler: ``count`` draws, no
    table of ``total`` entries).  ``total`` may exceed 2**63: the draws are
    exact Python ints assembled from 62-bit words of ``torch.randint`` on
    ``generator`` (uniform below a bound by rejection), so the result depends
    only on the generator's state."""
    total, count = int(total), int(count)
    if not 0 < count <= total:
        raise ValueError(f"cannot draw {count} distinct ranks from [0, {total})")
    words: list = []

    def below(bound: int) -> int:  # uniform in [0, bound)
        bits = (bound - 1).bit_length()
        if bits == 0:
            return 0
        n_words, mask = -(-bits // 62), (1 << bits) - 1
        while True:  # accepts with probability > 1/2
            while len(words) < n_words:
                block = torch.randint(0, 1 << 62, (_RANDOM_BLOCK,), generator=generator, dtype=torch.long)
                words[:0] = reversed(block.tolist())  # consumed from the end, in drawing order
            value = 0
            for _ in range(n_words):
                value = (value << 62) | words.pop()
            value &= mask
            if value < bound:
                return value

    chosen: set = set()
    for j in range(total - count, total):
        t = below(j + 1)
        chosen.add(j if t in chosen else t)
    return sorted(chosen)


class SelectionHooks(Protocol):
    """What the selector knows of a method, and all it knows.

    ``model``: the module whose BatchNorm, dropout and stochastic-depth layers
    are switched to the selection mode during the selection forward (the
    method's trainable network).  ``step``: whatever the caller hands the
    selector for this step (the loop: the :class:`common.engine.method.StepInfo`);
    it is passed on unchanged.  Both functions run without gradient and must
    not change any training state."""

    model: nn.Module

    def candidate_outputs(self, model: nn.Module, candidates: Sequence[torch.Tensor], step: Any) -> Any:
        """The outputs of all V candidates (V tensors [B, ...]), one batched forward of ``model``."""

    def combination_scores(self, outputs: Any, combos: torch.Tensor, step: Any) -> torch.Tensor:
        """The per-sample score [B, C] of every combination [C, S] from ``outputs``."""


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
    dtype: Optional[torch.dtype] = None  # autocast dtype ``outputs`` were computed in (None: fp32)

    def reusable(self) -> bool:
        """Whether ``outputs`` are what the training step would compute for the
        chosen views, so that a method may train on them instead of running a
        network again: full-size candidates of the same rendering, computed in
        fp32 or in the low precision of the autocast active now.  Call it inside
        the training step's autocast.  (Outputs of a bf16 selection are never
        reused by an fp16 or fp32 training step: they differ, and mixing bf16 with
        fp16 tensors fails under autocast.)"""
        if self.outputs is None or self.resolution != 1.0 or self.rendered:
            return False
        return self.dtype is None or self.dtype == active_autocast_dtype(self.indices.device.type)

    def chosen_outputs(self, key=None, slots: Optional[Sequence[int]] = None) -> list:
        """The selection's outputs of the chosen candidates, slot by slot:
        for every slot s in ``slots`` (default: all), the tensor [B, ...] whose
        row b is ``outputs[key][indices[b, s], b]``.  ``outputs[key]`` (or
        ``outputs`` itself with ``key`` None) is [V', B, ...] over the first V'
        candidates (DINO's teacher outputs: the global candidates only)."""
        t = self.outputs if key is None else self.outputs[key]
        rows = torch.arange(t.shape[1], device=t.device)
        return [t[self.indices[:, s], rows] for s in (range(self.indices.shape[1]) if slots is None else slots)]

    @property
    def chosen_scores(self) -> Optional[torch.Tensor]:
        if self.scores is None:
            return None
        return self.scores.gather(1, self.choice[:, None]).squeeze(1)


def active_autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of the autocast active now on ``device_type`` (None: none active)."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


@contextmanager
def batchnorm_mode(model: nn.Module, bn_mode: str):
    """Context for the selection forward; see :data:`BN_MODES`.  In the batch
    modes a SyncBatchNorm layer (DDP on GPUs, ``train.sync_bn``) uses the
    statistics of this rank's candidates, as a BatchNorm layer does
    (:func:`local_batch_statistics`)."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"hvs.bn_mode={bn_mode!r} is not one of {BN_MODES}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
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
    saved = [[b.clone() for b in m.buffers()] for m in bns] if bn_mode == "batch" else None
    try:
        with local_batch_statistics(bns):
            yield
    finally:
        if saved is not None:
            with torch.no_grad():
                for m, bufs in zip(bns, saved):
                    for b, s in zip(m.buffers(), bufs):
                        b.copy_(s)


def _local_batchnorm(module: nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    return nn.modules.batchnorm._BatchNorm.forward(module, x)


@contextmanager
def local_batch_statistics(bns: Sequence[nn.Module]):
    """SyncBatchNorm layers computed as BatchNorm: the mean and variance of
    this rank's batch, no all-gather.  Under DDP, SyncBatchNorm in train mode
    gathers every layer's statistics from all ranks (one collective and a host
    synchronisation per layer: 24 for a ResNet-18, 57 for a ResNet-50); in the
    selection forward that would make each rank's choice depend on the other
    ranks' candidates, unlike a single-process run and the authors' code, which
    score the candidates with the statistics of the GPU's own batch.  The
    training forward keeps SyncBatchNorm."""
    syncs = [m for m in bns if isinstance(m, nn.SyncBatchNorm) and "forward" not in vars(m)]
    for m in syncs:
        m.forward = functools.partial(_local_batchnorm, m)
    try:
        yield
    finally:
        for m in syncs:
            del m.forward


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
            drawn afresh every step (0: all): uniform over the combinations,
            without replacement, in enumeration order, drawn directly (the full
            table is not built, so memory and start-up do not grow with the
            number of candidates).  Never yields an empty selection.
        resolution: fraction of each candidate's size used for the selection
            forward only; training always uses the full-size candidates.
        bn_mode: see :data:`BN_MODES`.
        size_multiple: reduced sizes are rounded to a multiple of this (a ViT's
            patch size).
        precision: ``fp32``, ``bf16``, ``fp16`` or ``auto`` (bf16 where the
            device supports it): the selection forward and scoring run under
            autocast of that type; scores are compared in fp32.  Training is
            not affected.

    Dropout and stochastic depth are off during the selection forward.
    Ties resolve to the first combination in enumeration order.
    """

    def __init__(self, pools=((4, 2),), mode="hard", max_combinations=0, resolution=1.0,
                 bn_mode="batch", size_multiple=1, precision="fp32"):
        if mode not in MODES:
            raise ValueError(f"hvs.mode={mode!r} is not one of {MODES}")
        if not 0.0 < float(resolution) <= 1.0:
            raise ValueError(f"hvs.resolution={resolution} must be in (0, 1] (paper: {RESOLUTIONS})")
        if int(max_combinations) < 0:
            raise ValueError(f"hvs.max_combinations={max_combinations} must be >= 0 (0: compare all)")
        if bn_mode not in BN_MODES:
            raise ValueError(f"hvs.bn_mode={bn_mode!r} is not one of {BN_MODES}")
        self.pools = [tuple(p) for p in pools]
        if precision not in PRECISIONS:
            raise ValueError(f"hvs.precision={precision!r} is not one of {PRECISIONS}")
        self.mode, self.resolution, self.bn_mode = mode, float(resolution), bn_mode
        self.precision = precision
        self.max_combinations = int(max_combinations)
        self.size_multiple = int(size_multiple)
        #: the number of combinations (an exact Python int; validates the pools)
        self.num_combinations = num_pool_combinations(self.pools)
        # the full table [C, S]: built here only when every step compares all of it
        self._table = pool_combinations(self.pools) if not self.capped else None
        self._device_tables: dict = {}  # the full table on each device it was used on (uncapped)
        # slot -> pool, so that candidates of one pool (same shape) are stacked together
        self.slot_pool = [p for p, (_, k) in enumerate(self.pools) for _ in range(k)]
        self.pool_start = [sum(n for n, _ in self.pools[:p]) for p in range(len(self.pools))]

    @classmethod
    def from_cfg(cls, method, hvs: dict, resolution: float | None = None,
                 precision: str | None = None) -> HardViewSelector:
        """The selector of a run: ``method``'s pools and size multiple, the
        ``hvs`` section of its config (``mode``, ``max_combinations``,
        ``resolution``, ``bn_mode``, ``precision``); ``resolution`` and
        ``precision`` given here replace the config's (the benchmark's sweep)."""
        return cls(method.pools(), mode=hvs["mode"], max_combinations=hvs["max_combinations"],
                   resolution=hvs["resolution"] if resolution is None else resolution, bn_mode=hvs["bn_mode"],
                   size_multiple=method.size_multiple, precision=precision or hvs["precision"])

    @property
    def num_candidates(self) -> int:
        return sum(n for n, _ in self.pools)

    @property
    def capped(self) -> bool:
        """Whether each step compares a random subset rather than every combination."""
        return 0 < self.max_combinations < self.num_combinations

    @property
    def all_combos(self) -> torch.Tensor:
        """Every combination, LongTensor [C, S] in enumeration order (see
        :func:`pool_combinations`).  With a cap it is built on first use and
        kept: it can be large (iBOT's pools (2, 1), (2, 1), (20, 10): 739,024
        rows, ~68 MiB and ~1 s; 2 x 2 x C(24, 12): 10.8 million rows), so prefer
        :attr:`num_combinations`, :attr:`baseline_combo` or :meth:`combo`."""
        if self._table is None:
            self._table = pool_combinations(self.pools)
        return self._table

    @property
    def enumerated(self) -> bool:
        """Whether the full table of combinations has been built."""
        return self._table is not None

    def combo(self, rank: int) -> torch.Tensor:
        """Row ``rank`` of :attr:`all_combos`, LongTensor [S], without building the table."""
        if self._table is not None:
            return self._table[rank]
        return torch.tensor(unrank_combinations(self.pools, [rank])[0], dtype=torch.long)

    @property
    def baseline_combo(self) -> torch.Tensor:
        """The combination the baseline trains on: the first candidates of every
        pool (``all_combos[0]``), LongTensor [S]."""
        return self.combo(0)

    def combinations(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The combinations compared this step: all of them, or with a cap a
        random subset of ``max_combinations`` distinct rows (uniform, in
        enumeration order, so ties resolve as over the full table), drawn as
        ranks and unranked without building the table; it depends only on
        ``generator``."""
        if not self.capped:
            return self.all_combos
        ranks = sample_ranks(self.num_combinations, self.max_combinations, generator)
        if self._table is not None:  # already built (e.g. by a caller of all_combos): same rows
            return self._table[torch.tensor(ranks, dtype=torch.long)]
        return torch.tensor(unrank_combinations(self.pools, ranks), dtype=torch.long)

    def device_combinations(self, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """:meth:`combinations` on ``device`` without a host synchronisation:
        the full table is copied there once and kept; a capped subset (drawn on
        the host) is sent every step without waiting (:func:`common.numerics.to_device`)."""
        if self.capped:
            return to_device(self.combinations(generator), device)
        key = str(torch.device(device))
        if key not in self._device_tables:
            self._device_tables[key] = to_device(self.all_combos, device)
        return self._device_tables[key]

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

    def __call__(self, candidates: Sequence[torch.Tensor], method: SelectionHooks, step: Any = None, *,
                 generator: Optional[torch.Generator] = None,
                 renders: Optional[Sequence[torch.Tensor]] = None) -> Selection:
        """Select training views from ``candidates`` (V tensors [B, ...]).

        ``method`` (:class:`SelectionHooks`): ``method.candidate_outputs(method.model,
        candidates, step)`` runs the forward (``method.model``'s BatchNorm layers in
        the selection mode), ``method.combination_scores(outputs, combos, step)``
        turns its outputs into scores [B, C].  ``generator`` (CPU) drives the cap
        subset and the random mode.  ``renders``: other renderings of the same
        candidates (V tensors) to train on instead of ``candidates`` (static
        colour augmentation: the candidates share one colour jitter, the
        renderings have their own)."""
        if len(candidates) != self.num_candidates:
            raise ValueError(f"the selector expects {self.num_candidates} candidate views per "
                             f"sample (pools {self.pools}), the loader gave {len(candidates)}")
        B, device = candidates[0].shape[0], candidates[0].device
        combos = self.device_combinations(device, generator)
        dtype = None
        if self.mode == "random":
            choice = to_device(torch.randint(len(combos), (B,), generator=generator), device)
            scores = outputs = None
        else:
            small = resize_views(candidates, self.resolution, self.size_multiple)
            dtype = selection_dtype(self.precision, device)
            # no weight cache: autocast caches its low-precision copies of the weights by weight, not by
            # dtype, so a bf16 selection inside fp16 training would hand bf16 weights to the training forward
            autocast = (torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype is not None
                        else torch.autocast(device.type, enabled=False))  # fp32, also inside training AMP
            model = method.model
            with torch.no_grad(), batchnorm_mode(model, self.bn_mode), without_training_noise(model), autocast:
                outputs = method.candidate_outputs(model, small, step)
                scores = method.combination_scores(outputs, combos, step).float()
            if scores.shape != (B, len(combos)):
                raise RuntimeError(f"combination_scores returned shape {tuple(scores.shape)}, "
                                   f"expected {(B, len(combos))}")
            choice = self.choose(scores)  # stays on the device: no synchronisation
        indices = combos[choice]
        if renders is not None and len(renders) != len(candidates):
            raise ValueError(f"{len(renders)} renderings for {len(candidates)} candidates")
        views = self.gather(candidates if renders is None else renders, indices)
        return Selection(views=views, indices=indices, choice=choice, combos=combos, scores=scores,
                         outputs=outputs, resolution=self.resolution, rendered=renders is not None, dtype=dtype)
