"""common/batch_scores.py: the first-order per-sample scores of a loss of a
moment matrix against autograd and a direct loop, the linearisation they stand
for, and, on two gloo ranks, Barlow Twins' and VICReg's losses, gradients and
scores over the global batch against one process."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from barlowtwins.loss import barlow_twins_loss
from barlowtwins.loss import pair_scores as bt_scores
from common.batch_scores import SCORES, candidate_columns, first_order_scores, score_setting
from common.engine.config import ConfigError, resolve
from vicreg.loss import pair_scores as vicreg_scores
from vicreg.loss import vicreg_loss

KAPPA = 0.3


def phi(s):
    """A diagonal penalty with a non-trivial derivative (any smooth one would do)."""
    return (1 - s).pow(2) + 0.1 * s.pow(3)


def dphi(s):
    return -2 * (1 - s) + 0.3 * s.pow(2)


def loss_of_moments(S):
    """F(S) = sum_i phi(S_ii) + kappa sum_{i != j} S_ij^2, written out."""
    D = S.shape[0]
    off = sum(S[i, j] ** 2 for i in range(D) for j in range(D) if i != j)
    return sum(phi(S[i, i]) for i in range(D)) + KAPPA * off


def problem(seed=0, K=2, L=3, B=4, N=9, D=5):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(K, B, D, generator=g, dtype=torch.float64), torch.randn(L, B, D, generator=g, dtype=torch.float64)
    X, Y = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)
    return x, y, X, Y


def gradient_at(S):
    S = S.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(loss_of_moments(S), S)
    return G


def test_first_order_scores_are_x_G_y_with_G_from_autograd():
    x, y, X, Y = problem()
    n = 7.0  # any normaliser (VICReg's covariance: M - 1)
    G = gradient_at(X.T @ Y / n)
    scores = first_order_scores(x, y, X, Y, n, dphi, KAPPA)
    assert scores.shape == (4, 2, 3)
    for k in range(2):
        for l in range(3):
            for b in range(4):
                assert torch.isclose(scores[b, k, l], x[k, b] @ G @ y[l, b], atol=1e-10)


def test_scores_of_a_batch_add_up_to_the_linearised_loss():
    """A batch of n rows chosen among the candidates (one pair per sample): the
    mean of the chosen scores is <G, S_batch> (n = batch size), i.e. the
    directional derivative of F at the reference towards S_batch, plus <G, S_ref>."""
    x, y, X, Y = problem(seed=1, B=6)
    n = 6
    S_ref = X.T @ Y / n
    scores = first_order_scores(x, y, X, Y, n, dphi, KAPPA)
    g = torch.Generator().manual_seed(2)
    k, l = torch.randint(2, (6,), generator=g), torch.randint(3, (6,), generator=g)
    rows = torch.arange(6)
    S_batch = x[k, rows].T @ y[l, rows] / n
    assert torch.isclose(scores[rows, k, l].sum() / n, (gradient_at(S_ref) * S_batch).sum(), atol=1e-10)
    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(loss_of_moments(S_ref + t * (S_batch - S_ref)), t)
    assert torch.isclose(slope, scores[rows, k, l].sum() / n - (gradient_at(S_ref) * S_ref).sum(), atol=1e-10)


def test_candidate_columns_in_one_process():
    z = torch.randn(3, 4, 2)
    for gather in (False, True):  # without a process group the global batch is this rank's
        Z, own = candidate_columns(z, gather)
        assert torch.equal(Z, z) and torch.equal(own, torch.arange(4))


def test_score_setting():
    spec = {"hvs.score": score_setting("invariance")}
    assert resolve(spec, None, [])["hvs"]["score"] == "invariance"
    assert set(SCORES) == {"invariance", "contribution"}
    with pytest.raises(ConfigError, match="hvs.score"):
        resolve(spec, None, ["hvs.score=loss"])


# --- two ranks ------------------------------------------------------------------------
B, D_IN, D = 5, 6, 4  # images per rank, input and embedding widths
PAIRS = torch.tensor([[0, 2], [0, 3], [1, 2], [1, 3]])
LOSSES = {"barlowtwins": (barlow_twins_loss, bt_scores), "vicreg": (vicreg_loss, vicreg_scores)}


def two_rank_problem():
    """The same seeded data and linear model on every process (float64)."""
    g = torch.Generator().manual_seed(6)
    x_a, x_b = torch.randn(2 * B, D_IN, generator=g), torch.randn(2 * B, D_IN, generator=g)
    candidates = torch.randn(4, 2 * B, D, generator=g) * torch.linspace(0.3, 2.0, D)
    torch.manual_seed(7)
    return x_a.double(), x_b.double(), candidates.double(), nn.Linear(D_IN, D).double()


def worker(rank, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        mine = slice(rank * B, (rank + 1) * B)
        for name, (loss_fn, score_fn) in LOSSES.items():
            x_a, x_b, candidates, model = two_rank_problem()
            ddp = nn.parallel.DistributedDataParallel(model)
            loss, _ = loss_fn(ddp(x_a[mine]), ddp(x_b[mine]))
            loss.backward()  # DDP averages the gradients over the two ranks
            with torch.no_grad():
                scores = {s: score_fn(candidates[:, mine], PAIRS, 2, score=s) for s in SCORES}
            torch.save({"loss": loss.detach(), "grads": [p.grad for p in model.parameters()], **scores},
                       f"{out_dir}/{name}{rank}.pt")
            dist.barrier()
            del ddp  # the DDP reducer must go before its process group
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(str(tmp_path),), nprocs=2, join=True)
    for name, (loss_fn, score_fn) in LOSSES.items():
        ranks = [torch.load(tmp_path / f"{name}{r}.pt", weights_only=True) for r in range(2)]
        x_a, x_b, candidates, model = two_rank_problem()
        loss, _ = loss_fn(model(x_a), model(x_b), gather=False)
        loss.backward()
        # the loop's loss (the mean over ranks; Barlow Twins: every rank's) and, after DDP, every rank's gradient
        assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), loss, atol=1e-12), name
        if name == "barlowtwins":
            assert torch.allclose(ranks[0]["loss"], ranks[1]["loss"], atol=1e-12)
        for r in ranks:
            assert all(torch.allclose(a, b.grad, atol=1e-12) for a, b in zip(r["grads"], model.parameters())), name
        for s in SCORES:  # each rank scores its images against the statistics of the global batch
            whole = score_fn(candidates, PAIRS, 2, score=s, gather=False)
            assert torch.allclose(torch.cat([r[s] for r in ranks]), whole, atol=1e-10), (name, s)
