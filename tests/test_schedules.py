"""common.engine.schedules: the two warm-up shapes of cosine_schedule."""
import math

import pytest

from common.engine.schedules import cosine_schedule


def test_default_warmup_is_linspace_bitwise():
    """The default (DINO's callers) is np.linspace's warm-up, bit for bit the formula before
    ``warmup_shape`` existed."""
    for base, final, start, total, warmup in ((0.5, 0.01, 0.0, 20, 5), (3e-4, 1e-6, 1e-5, 50, 1),
                                              (0.04, 0.4, 0.0, 30, 0), (1.0, 0.0, 0.2, 9, 9)):
        for s in range(total):
            if s < warmup:
                old = start + (base - start) * (s / (warmup - 1) if warmup > 1 else 1.0)
            else:
                old = final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
            assert cosine_schedule(s, total, base, final, warmup, start) == old
            assert cosine_schedule(s, total, base, final, warmup, start, warmup_shape="linspace") == old


def test_the_two_warmup_shapes():
    total, warmup = 12, 4
    linspace = [cosine_schedule(s, total, 1.0, 0.0, warmup) for s in range(total)]
    ratio = [cosine_schedule(s, total, 1.0, 0.0, warmup, warmup_shape="ratio") for s in range(total)]
    assert linspace[:warmup] == pytest.approx([0, 1 / 3, 2 / 3, 1])  # base at step warmup - 1
    assert ratio[:warmup] == [0, 0.25, 0.5, 0.75]  # base at step warmup
    assert linspace[warmup:] == ratio[warmup:] and ratio[warmup] == 1.0
    assert cosine_schedule(1, 4, 1.0, 0.0, 2, start=0.5, warmup_shape="ratio") == 0.75
    with pytest.raises(ValueError, match="warmup_shape"):
        cosine_schedule(5, 10, 1.0, 0.0, 2, warmup_shape="cosine")


def test_step_info_global_step_counts_the_steps_before():
    from common.engine.method import StepInfo

    seen = [StepInfo(e, i, 3).global_step for e in range(4) for i in range(3)]
    assert seen == list(range(12))
