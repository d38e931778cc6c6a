"""Per-step schedules of DINO-style training (lr, weight decay, teacher momentum)."""
from __future__ import annotations

import math


def cosine_schedule(step: int, total: int, base: float, final: float, warmup: int = 0,
                    start: float = 0.0) -> float:
    """Value at ``step`` (0-based) of ``total`` steps: a linear warm-up from
    ``start`` to ``base`` over the first ``warmup`` steps (both ends included, as
    ``np.linspace``), then a cosine from ``base`` down to ``final`` over the
    remaining steps.  DINO's ``cosine_scheduler``, one value at a time."""
    if step < warmup:
        return start + (base - start) * (step / (warmup - 1) if warmup > 1 else 1.0)
    rest = max(1, total - warmup)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * (step - warmup) / rest))


def linear_warmup(epoch: int, warmup_epochs: int, start: float, end: float) -> float:
    """``start`` to ``end`` linearly over ``warmup_epochs`` (both ends included),
    then constant ``end``: DINO's teacher-temperature schedule, per epoch."""
    if epoch >= warmup_epochs:
        return end
    return start + (end - start) * (epoch / (warmup_epochs - 1) if warmup_epochs > 1 else 1.0)
