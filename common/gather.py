"""All-gather that passes gradients back, for losses whose negatives come from
the whole global batch (SimCLR's NT-Xent, and any method that needs it).

``gather_with_grad(x)`` returns the rank-ordered concatenation of every rank's
``x`` ([N*B, ...] from [B, ...]); it is the identity in a single process.

Why the backward is an all-reduce *sum* followed by this rank's slice.  Let
rank r hold the local features x_r and compute L_r, the mean of the loss over
its own anchors, with the gathered X = [x_1; ...; x_N] as candidates.  The loss
of one process on the whole batch is L = (1/N) sum_r L_r (every rank has the
same number of anchors).  x_r enters every L_r' through X, so

    dL/dx_r = (1/N) sum_r' dL_r'/dx_r,

a sum over *all* ranks of the gradient each of them computed for X's slice r.
Rank r' knows only dL_r'/dX, so the backward all-reduces (sums) the incoming
gradient over ranks and keeps slice r: rank r then holds sum_r' dL_r'/dx_r (the
direct use of x_r as an anchor, if any, is added locally by autograd and
belongs to L_r alone).  DDP averages the parameter gradients over ranks, which
supplies the 1/N: the result is exactly the single-process gradient of L.
``torch.distributed.nn.all_gather`` would do the same but needs reduce-scatter,
which gloo (CPU) lacks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from common.engine import dist as hvs_dist


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.size = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum over ranks of dL_r'/dX
        start = ctx.rank * ctx.size
        return grad[start:start + ctx.size]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order; gradients flow back to
    each rank's own slice (see the module docstring).  Identity without a
    process group; all ranks must pass tensors of the same shape."""
    if not hvs_dist.is_dist() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
