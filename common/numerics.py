"""Numerical helpers shared by the losses, and the host-to-device copy of
small arrays that the training step uses."""
from __future__ import annotations

import torch


def precise(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision a loss is computed in: float64 stays float64,
    anything else (float16, bfloat16 under autocast, float32) becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def collapse_std(x: torch.Tensor) -> torch.Tensor:
    """SimSiam's collapse measure (Chen & He 2021, Fig. 2): the standard
    deviation over the batch of the L2-normalised outputs ``x`` [B, d],
    averaged over the d channels.  About 1/sqrt(d) for outputs spread over the
    sphere, 0 for collapsed (constant) outputs.  Logged by every method as
    ``out_std`` (Appendix F.2: easy selection collapses)."""
    return torch.nn.functional.normalize(precise(x.detach()), dim=1).std(dim=0).mean()


def to_device(values, device, dtype=None) -> torch.Tensor:
    """A small host array, list or tensor on ``device`` without waiting for
    the device's queued work: on a GPU copied from pinned memory with
    ``non_blocking=True`` (a blocking copy, or an index given as a Python list,
    would synchronise the training step with the GPU)."""
    t = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
