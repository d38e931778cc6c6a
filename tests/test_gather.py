"""common/gather.py: a two-process gloo run, each rank holding half the batch,
gives the single-process loss, gradients and HVS scores of the whole batch."""
import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from common.gather import gather_with_grad
from common.hvs import pair_combinations
from simclr.loss import nt_xent, pair_scores

B, D_IN, D, V, T = 6, 5, 4, 4, 0.2  # per-rank batch, input and feature widths, candidates, temperature


def problem():
    """The same seeded data and model on every process (float64)."""
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(2 * B, D_IN, generator=g), torch.randn(2 * B, D_IN, generator=g)
    candidates = torch.randn(V, 2 * B, D, generator=g)
    torch.manual_seed(1)
    return x_a.double(), x_b.double(), candidates.double(), nn.Linear(D_IN, D).double()


def worker(rank, out_dir):
    torch.set_num_threads(1)  # two processes share the cores
    # a rendezvous file, not a TCP port picked in advance: no race for the port
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        x_a, x_b, candidates, model = problem()
        ddp = nn.parallel.DistributedDataParallel(model)
        mine = slice(rank * B, (rank + 1) * B)
        loss = nt_xent(ddp(x_a[mine]), ddp(x_b[mine]), T)
        loss.backward()  # DDP averages the gradients over the two ranks
        with torch.no_grad():
            scores = pair_scores(candidates[:, mine], pair_combinations(V), T)
        gathered = gather_with_grad(torch.full((2, 3), float(rank)))
        torch.save({"loss": loss.detach(), "grads": [p.grad for p in model.parameters()],
                    "scores": scores, "gathered": gathered}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # both ranks done with collectives before teardown
        del ddp  # the DDP reducer must go before its process group (else gloo can abort at exit)
    finally:
        dist.destroy_process_group()


def test_gather_is_identity_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback, not whatever the hostname resolves to
    mp.spawn(worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    x_a, x_b, candidates, model = problem()
    loss = nt_xent(model(x_a), model(x_b), T)
    loss.backward()
    # loss: the loop's mean over ranks of each rank's loss
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), loss, atol=1e-12)
    # gradients: every rank holds the single-process gradient after DDP's averaging
    for r in ranks:
        for got, want in zip(r["grads"], [p.grad for p in model.parameters()]):
            assert torch.allclose(got, want, atol=1e-12)
    # HVS scores: each rank scores its own samples against the global batch
    scores = pair_scores(candidates, pair_combinations(V), T)
    assert torch.allclose(torch.cat([r["scores"] for r in ranks]), scores, atol=1e-12)
    # the gathered tensor is ordered by rank
    assert torch.equal(ranks[1]["gathered"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
