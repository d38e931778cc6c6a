"""VICReg: the loss against a direct loop, the HVS scores against a direct
per-pair computation (and their ranking of near-identical and dissimilar pairs),
the expander, the LARS learning rates, and a short HVS run that resumes exactly
and evaluates.  Two gloo ranks against one process: tests/test_batch_scores.py."""
import math

import pytest
import torch
from torch import nn

from common.batch_scores import SCORES
from common.engine.config import COMMON_SPEC, resolve
from common.engine.method import StepInfo
from tests.helpers import assert_exact_resume, assert_knn_evaluates, read_log, tiny_cfg
from vicreg.loss import pair_scores, vicreg_loss
from vicreg.method import VICRegMethod

COEFFS = dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0)
PAIRS = torch.tensor([[0, 2], [0, 3], [1, 2], [1, 3]])  # 2 candidates of view 1 (0, 1), 2 of view 2 (2, 3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests.conftest


def tiny_vicreg_cfg(out, data_dir, *overrides):
    return tiny_cfg(VICRegMethod, out, data_dir, "model.proj_hidden=64", "model.dim=32",
                    "augment.blur_p=[1.0,0.1]", "optim.warmup_epochs=0", *overrides)


def make(tmp_path, *overrides):
    return VICRegMethod(tiny_vicreg_cfg(tmp_path, tmp_path, *overrides), torch.device("cpu"))


# --- the loss ---------------------------------------------------------------------
def direct_variance(z, gamma=1.0, eps=1e-4):
    n, d = z.shape
    total = 0.0
    for j in range(d):
        mean = sum(float(z[b, j]) for b in range(n)) / n
        var = sum((float(z[b, j]) - mean) ** 2 for b in range(n)) / (n - 1)
        total += max(0.0, gamma - math.sqrt(var + eps))
    return total / d


def direct_covariance(z):
    n, d = z.shape
    mean = [sum(float(z[b, j]) for b in range(n)) / n for j in range(d)]
    total = 0.0
    for i in range(d):
        for j in range(d):
            if i != j:
                cov = sum((float(z[b, i]) - mean[i]) * (float(z[b, j]) - mean[j]) for b in range(n)) / (n - 1)
                total += cov ** 2
    return total / d


def direct_loss(z1, z2, sim_coeff, std_coeff, cov_coeff):
    n, d = z1.shape
    inv = sum(float(z1[b, j] - z2[b, j]) ** 2 for b in range(n) for j in range(d)) / (n * d)
    var = (direct_variance(z1) + direct_variance(z2)) / 2
    cov = direct_covariance(z1) + direct_covariance(z2)
    return sim_coeff * inv + std_coeff * var + cov_coeff * cov, inv, var, cov


def spread(*shape, seed):
    """Random embeddings whose dimensions' standard deviations go from 0.3 to 2:
    the variance hinge is active in some dimensions and not in others."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, shape[-1]).double()


def test_loss_matches_a_direct_loop():
    z1, z2 = spread(7, 5, seed=0), spread(7, 5, seed=1)
    for coeffs in (COEFFS, dict(sim_coeff=1.0, std_coeff=3.0, cov_coeff=0.5)):
        loss, terms = vicreg_loss(z1, z2, **coeffs)
        want, inv, var, cov = direct_loss(z1, z2, **coeffs)
        assert math.isclose(loss.item(), want, rel_tol=1e-10)
        assert [terms[k].item() for k in ("inv", "var", "cov")] == pytest.approx([inv, var, cov], rel=1e-10)
    # constant embeddings: no invariance or covariance cost, the full variance hinge
    loss, terms = vicreg_loss(torch.ones(4, 3), torch.ones(4, 3))
    assert terms["inv"] == 0 and terms["cov"] == 0 and terms["var"] == pytest.approx(1 - math.sqrt(1e-4))


# --- HVS scores -------------------------------------------------------------------
def direct_scores(z, n1, score, sim_coeff, std_coeff, cov_coeff, gamma=1.0, eps=1e-4):
    """The invariance term per sample; for the contribution, each view centred
    with its mean over all candidates and images (a loop), the reference
    covariance the mean of its candidates' covariances, G by autograd of the
    variance and covariance terms written on that matrix, then every pair and
    sample on its own."""
    V, B, D = z.shape
    out = torch.empty(B, len(PAIRS), dtype=z.dtype)
    for c, (k, l) in enumerate(PAIRS.tolist()):
        for b in range(B):
            out[b, c] = sim_coeff * (z[k, b] - z[l, b]).pow(2).sum() / D if score == "contribution" else \
                (z[k, b] - z[l, b]).pow(2).sum() / D
    if score == "invariance":
        return out
    centred, grads = torch.empty_like(z), {}
    for view in (range(n1), range(n1, V)):
        for i in range(D):
            mean = sum(float(z[v, b, i]) for v in view for b in range(B)) / (len(view) * B)
            for v in view:
                centred[v, :, i] = z[v, :, i] - mean
        cov = sum(centred[v].T @ centred[v] / (B - 1) for v in view) / len(view)
        cov.requires_grad_(True)
        std = torch.sqrt(cov.diagonal() + eps)
        f = std_coeff / 2 * torch.relu(gamma - std).mean() + cov_coeff * (cov * (1 - torch.eye(D))).pow(2).sum() / D
        (g,) = torch.autograd.grad(f, cov)
        for v in view:
            grads[v] = g
    for c, (k, l) in enumerate(PAIRS.tolist()):
        for b in range(B):
            x, y = centred[k, b], centred[l, b]
            out[b, c] += B / (B - 1) * (x @ grads[k] @ x + y @ grads[l] @ y)
    return out


@pytest.mark.parametrize("score", SCORES)
def test_pair_scores_match_a_direct_computation_per_pair(score):
    z = spread(4, 6, 5, seed=2)
    scores = pair_scores(z, PAIRS, 2, score=score, **COEFFS)
    assert scores.shape == (6, 4)
    assert torch.allclose(scores, direct_scores(z, 2, score, **COEFFS), atol=1e-10)


def test_invariance_scores_average_to_the_invariance_term():
    z = spread(4, 6, 5, seed=3)
    scores = pair_scores(z, PAIRS, 2, score="invariance")
    for c, (k, l) in enumerate(PAIRS.tolist()):
        assert torch.isclose(scores[:, c].mean(), vicreg_loss(z[k], z[l])[1]["inv"], atol=1e-12)


@pytest.mark.parametrize("score", SCORES)
def test_dissimilar_pair_scores_above_the_near_identical_one(score):
    """Candidates 0 (view 1) and 2 (view 2) of every image nearly identical, 1
    and 3 independent of everything, all of standard deviation 0.5 (the
    variance hinge active)."""
    g = torch.Generator().manual_seed(4)
    e = torch.randn(16, 64, generator=g)
    z = 0.5 * torch.stack([e + 0.01 * torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g),
                           e + 0.01 * torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)])
    scores = pair_scores(z, PAIRS, 2, score=score, **COEFFS)
    assert (scores[:, 3] > scores[:, 0]).all()
    assert (scores.argmax(1) != 0).all()  # the near-identical pair (0, 2) is never the hardest


# --- model, optimiser, hooks ---------------------------------------------------------
def test_expander_and_defaults():
    cfg = resolve({**COMMON_SPEC, **VICRegMethod.spec}, None, [])
    assert (cfg["model"]["proj_hidden"], cfg["model"]["dim"]) == (8192, 8192)
    assert (cfg["loss"]["sim_coeff"], cfg["loss"]["std_coeff"], cfg["loss"]["cov_coeff"]) == (25.0, 25.0, 1.0)
    assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"], cfg["optim"]["warmup_epochs"]) == (0.2, 1e-6, 10)
    assert "bias_lr" not in cfg["optim"] and "lambd" not in cfg["loss"]
    cfg = resolve({**COMMON_SPEC, **VICRegMethod.spec}, None, ["model.arch=resnet18", "model.proj_hidden=32",
                                                              "model.dim=16"])
    expander = VICRegMethod(cfg, torch.device("cpu")).model.projector
    linears = [x for x in expander if isinstance(x, nn.Linear)]
    assert [(x.in_features, x.out_features) for x in linears] == [(512, 32), (32, 32), (32, 16)]
    assert [x.bias is not None for x in linears] == [True, True, False]  # the official code's biases
    assert sum(isinstance(x, nn.BatchNorm1d) for x in expander) == 2 and isinstance(expander[-1], nn.Linear)


def test_one_learning_rate_for_all_parameters(tmp_path):
    m = make(tmp_path, "train.epochs=10", "optim.warmup_epochs=2")
    opt = m.build_optimizer(512)
    weights, biases = opt.param_groups
    assert weights["weight_decay"] == 1e-6 and weights["adapt"]
    assert biases["weight_decay"] == 0.0 and not biases["adapt"] and all(p.ndim == 1 for p in biases["params"])
    for e, i in ((0, 0), (1, 0), (2, 0), (6, 1), (9, 3)):
        step, warmup, total = e * 4 + i, 8, 40
        if step < warmup:
            factor = step / warmup
        else:
            q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
            factor = q + 0.001 * (1 - q)
        values = m.schedule(opt, StepInfo(e, i, 4))
        assert values["lr"] == values["bias_lr"] == pytest.approx(0.2 * 512 / 256 * factor, rel=1e-12, abs=1e-15)
        assert weights["lr"] == biases["lr"] == values["lr"]


def test_hooks(tmp_path):
    m = make(tmp_path)
    g = torch.Generator().manual_seed(5)
    candidates = [torch.randn(3, 3, 8, 8, generator=g) for _ in range(4)]
    step = StepInfo(0, 0, 1, {})
    with torch.no_grad():
        z = m.candidate_outputs(m.model, candidates, step)
        assert z.shape == (4, 3, 32)
        assert torch.equal(m.combination_scores(z, PAIRS, step), pair_scores(z, PAIRS, 2, score="contribution"))
    loss, stats = m.training_loss(m.model, candidates[:2], None, step)
    assert set(stats) == {"out_std", "inv", "var", "cov"} and 0 < stats["out_std"] < 1
    assert torch.isclose(loss, 25 * stats["inv"] + 25 * stats["var"] + stats["cov"])


# --- training ------------------------------------------------------------------------
@pytest.mark.slow
def test_hvs_run_resumes_exactly_and_evaluates(tmp_path, image_root):
    args = ("train.epochs=2", "run.max_steps_per_epoch=2", "hvs.enabled=true", "optim.lr=0.5")
    assert_exact_resume(lambda out, *o: tiny_vicreg_cfg(out, image_root, *o), VICRegMethod, tmp_path, args,
                        stop=3, state_keys=(), steps=4)
    steps = [r for r in read_log(tmp_path / "a") if r["type"] == "step"]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) and r["var"] > 0 for r in steps)
    assert all(r["loss"] == pytest.approx(25 * r["inv"] + 25 * r["var"] + r["cov"], rel=1e-5) for r in steps)
    assert max(r["sel_changed"] for r in steps) > 0
    assert all(r["sel_score"] >= r["sel_score_all"] - 1e-6 for r in steps)
    assert_knn_evaluates(tmp_path / "a" / "checkpoint.pth", tmp_path)
