"""Numerical helpers shared by the losses."""
from __future__ import annotations

import torch


def precise(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision a loss is computed in: float64 stays float64,
    anything else (float16, bfloat16 under autocast, float32) becomes float32."""
    return x if x.dtype == torch.float64 else x.float()
