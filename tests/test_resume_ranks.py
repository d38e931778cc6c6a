"""Resuming under several processes: every rank must resume from the
checkpoint rank 0 wrote (two gloo ranks that see different run folders stop
with one line), and the CUDA generators are restored per device that exists
(a checkpoint saved with another number of visible GPUs)."""
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from common.engine import checkpoint as ckpt_io
from common.engine.train import run
from simsiam.method import SimSiamMethod
from tests.helpers import tiny_cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resume_worker(rank, out_dirs, image_root, port, result_dir):
    """One rank of ``run``, launched as torchrun would (environment variables):
    each rank has its own run folder, as nodes without a shared file system."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    cfg = tiny_cfg(SimSiamMethod, out_dirs[rank], image_root, "train.epochs=1", "train.batch_size=8")
    try:
        run(cfg, SimSiamMethod)
        message = "finished"
    except ckpt_io.CheckpointError as err:
        message = f"CheckpointError: {err}"
    finally:
        torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None
    with open(f"{result_dir}/rank{rank}.txt", "w") as f:
        f.write(message)


@pytest.mark.slow
def test_ranks_that_find_different_checkpoints_stop_with_one_line(tmp_path, image_root):
    """Rank 0's folder holds a checkpoint after step 1, rank 1's none: both
    ranks stop before training, with one line naming both findings, instead of
    resuming at different steps and waiting on each other for ever."""
    a, b = tmp_path / "node0", tmp_path / "node1"
    run(tiny_cfg(SimSiamMethod, a, image_root, "train.epochs=1", "run.stop_after_steps=1"), SimSiamMethod)
    assert ckpt_io.load(a / "checkpoint.pth")["step"] == 1
    ctx = mp.start_processes(resume_worker, args=([str(a), str(b)], str(image_root), free_port(), str(tmp_path)),
                             nprocs=2, join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + 180
        while not ctx.join(timeout=5) and time.monotonic() < deadline:
            pass
    except mp.ProcessExitedException:
        pass
    finally:
        for p in ctx.processes:  # a hang (the fault this guards against) fails the test, not the suite
            if p.is_alive():
                p.kill()
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    for message in messages:
        assert message.startswith("CheckpointError: ") and "\n" not in message
        assert "rank 0 finds step 1" in message and "rank 1 no checkpoint" in message
    assert ckpt_io.load(a / "checkpoint.pth")["step"] == 1  # nothing lost
    assert not (b / "checkpoint.pth").exists()


def test_identity_tells_copies_apart():
    state = {"model": {"w": torch.ones(3)}}
    assert ckpt_io.identity(state) == ckpt_io.identity({"model": {"w": torch.ones(3)}})
    assert ckpt_io.identity(state) != ckpt_io.identity({"model": {"w": torch.zeros(3)}})
    assert ckpt_io.identity({**state, "id": "abc"}) == "abc"


class FakeCuda:
    """``device_count`` visible GPUs whose generator states are recorded; a
    state for a device that does not exist fails as CUDA does."""

    def __init__(self, monkeypatch, device_count):
        self.n, self.restored = device_count, {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.n)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda.random, "set_rng_state", self.set_rng_state)  # what set_rng_state_all calls
        monkeypatch.setattr(torch.cuda.random, "device_count", lambda: self.n)

    def set_rng_state(self, state, device="cuda"):
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= self.n:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.restored[index] = state


@pytest.mark.parametrize("saved, visible", [(8, 1), (1, 8), (2, 2)])
def test_cuda_generators_restored_per_existing_device(monkeypatch, saved, visible):
    state = ckpt_io.rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(saved)]
    cuda = FakeCuda(monkeypatch, visible)
    ckpt_io.set_rng_state(state)
    assert sorted(cuda.restored) == list(range(min(saved, visible)))
    assert all(torch.equal(s, state["cuda"][i]) for i, s in cuda.restored.items())
