"""torch.distributed helpers: one code path for a single CPU process, torchrun
with gloo on CPU, and torchrun with NCCL on one or many GPU nodes (torchrun's
rendezvous sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init(device_pref: str = "auto") -> torch.device:
    """Initialise the process group if launched by torchrun; return this rank's device."""
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if use_cuda:
            # modulo: a cluster that binds one GPU per task shows each task a single device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    if use_cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a copy; ``t`` itself is left alone)."""
    if not is_dist():
        return t.clone()
    out = t.clone()
    dist.all_reduce(out)
    return out / world()


def all_gather_object(obj) -> list:
    """``obj`` (a small picklable value) of every rank, in rank order."""
    if not is_dist():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
