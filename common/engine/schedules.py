"""Per-step schedules (lr, weight decay, teacher momentum) of the pretraining
methods and the evaluation protocols."""
from __future__ import annotations

import math


WARMUP_SHAPES = ("linspace", "ratio")


def cosine_schedule(step: int, total: int, base: float, final: float, warmup: int = 0,
                    start: float = 0.0, warmup_shape: str = "linspace") -> float:
    """Value at ``step`` (0-based) of ``total`` steps: a linear warm-up from
    ``start`` towards ``base`` over the first ``warmup`` steps, then a cosine
    from ``base`` down to ``final`` over the remaining steps.

    ``warmup_shape`` says where the warm-up ends:

    - ``"linspace"`` (default): both ends included, as ``np.linspace(start,
      base, warmup)``; step ``warmup - 1`` is at ``base`` already.  DINO's
      ``cosine_scheduler``, one value at a time.
    - ``"ratio"``: ``start + (base - start) * step / warmup``; ``base`` is first
      reached at step ``warmup`` (the cosine's first step).  SimCLR's warm-up
      (and Goyal et al.'s gradual warm-up)."""
    if warmup_shape not in WARMUP_SHAPES:
        raise ValueError(f"warmup_shape={warmup_shape!r}: expected one of {WARMUP_SHAPES}")
    if step < warmup:
        if warmup_shape == "ratio":
            return start + (base - start) * step / warmup
        return start + (base - start) * (step / (warmup - 1) if warmup > 1 else 1.0)
    rest = max(1, total - warmup)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * (step - warmup) / rest))


def linear_warmup(epoch: int, warmup_epochs: int, start: float, end: float) -> float:
    """``start`` to ``end`` linearly over ``warmup_epochs`` (both ends included),
    then constant ``end``: DINO's teacher-temperature schedule, per epoch."""
    if epoch >= warmup_epochs:
        return end
    return start + (end - start) * (epoch / (warmup_epochs - 1) if warmup_epochs > 1 else 1.0)


def scaled_lr(lr: float, batch: int) -> float:
    """The linear scaling rule: ``lr`` given for a batch of 256, at ``batch``."""
    return lr * batch / 256


def set_lr(optimizer, lr) -> None:
    """Set the learning rate of every parameter group of ``optimizer``: ``lr``
    is a number, a list of one number per group, or a function of the group
    (a group's own peak, a fixed rate)."""
    if isinstance(lr, (list, tuple)):
        if len(lr) != len(optimizer.param_groups):
            raise ValueError(f"{len(lr)} learning rates for {len(optimizer.param_groups)} parameter groups")
        for group, value in zip(optimizer.param_groups, lr):
            group["lr"] = value
        return
    for group in optimizer.param_groups:
        group["lr"] = lr(group) if callable(lr) else lr
