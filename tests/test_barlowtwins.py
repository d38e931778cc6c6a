"""Barlow Twins: the loss against a direct loop, the HVS scores against a direct
per-pair computation (and their ranking of near-identical and dissimilar pairs),
the views, model, LARS groups and schedule, and a short HVS run that resumes
exactly and evaluates.  Two gloo ranks against one process: tests/test_batch_scores.py."""
import math
import random

import pytest
import torch
from PIL import Image
from torch import nn

from barlowtwins.loss import barlow_twins_loss, cross_correlation, pair_scores, redundancy_loss, standardise
from barlowtwins.method import BarlowTwinsMethod
from common.views.augment import P
from common.batch_scores import SCORES
from common.engine.config import ConfigError
from common.hvs import HardViewSelector
from common.engine.method import StepInfo
from tests.helpers import assert_exact_resume, assert_knn_evaluates, read_log, tiny_cfg

LAMBD = 5e-3
PAIRS = torch.tensor([[0, 2], [0, 3], [1, 2], [1, 3]])  # 2 candidates of view 1 (0, 1), 2 of view 2 (2, 3)


def tiny_bt_cfg(out, data_dir, *overrides):
    return tiny_cfg(BarlowTwinsMethod, out, data_dir, "model.proj_hidden=64", "model.dim=32",
                    "augment.blur_p=[1.0,0.1]", "optim.warmup_epochs=0", *overrides)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests.conftest


def make(tmp_path, *overrides):
    return BarlowTwinsMethod(tiny_bt_cfg(tmp_path, tmp_path, *overrides), torch.device("cpu"))


# --- the loss ---------------------------------------------------------------------
def direct_standardise(z, eps=1e-5):
    M, D = z.shape
    out = torch.empty_like(z)
    for i in range(D):
        mean = sum(z[m, i] for m in range(M)) / M
        var = sum((z[m, i] - mean) ** 2 for m in range(M)) / M
        out[:, i] = (z[:, i] - mean) / math.sqrt(var + eps)
    return out


def direct_loss(z1, z2, lambd):
    """Eq. 1-2 of the paper, one entry at a time: (L, on-diagonal, off-diagonal)."""
    a, b = direct_standardise(z1), direct_standardise(z2)
    M, D = a.shape
    c = [[sum(float(a[m, i] * b[m, j]) for m in range(M)) / M for j in range(D)] for i in range(D)]
    on = sum((1 - c[i][i]) ** 2 for i in range(D))
    off = sum(c[i][j] ** 2 for i in range(D) for j in range(D) if i != j)
    return on + lambd * off, on, off


def test_loss_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 3 + 1 for _ in range(2))
    for lambd in (LAMBD, 0.5):
        loss, terms = barlow_twins_loss(z1, z2, lambd)
        want, on, off = direct_loss(z1, z2, lambd)
        assert math.isclose(loss.item(), want, rel_tol=1e-10)
        assert math.isclose(terms["on_diag"].item(), on, rel_tol=1e-10)
        assert math.isclose(terms["off_diag"].item(), off, rel_tol=1e-10)
    # the views' own correlation is I: only the off-diagonal redundancy remains
    loss, terms = barlow_twins_loss(z1, z1, LAMBD)
    assert terms["on_diag"] < 1e-8 and torch.isclose(loss, LAMBD * terms["off_diag"])


def test_standardisation_is_batchnorm_without_affine():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 6, generator=g) * 2 - 3
    bn = nn.BatchNorm1d(6, affine=False).train()
    assert torch.allclose(standardise(z), bn(z), atol=1e-6)
    assert torch.allclose(standardise(z.double()), direct_standardise(z.double()), atol=1e-12)


# --- HVS scores -------------------------------------------------------------------
def direct_scores(z, n1, lambd, score, eps=1e-5):
    """Each view's candidates standardised with statistics over all of them and
    all images (a loop), C_ref the mean of every pair's C, G = dL/dC at C_ref by
    autograd, then every pair and sample on its own."""
    V, B, D = z.shape
    ref = torch.empty_like(z)
    for view in (range(n1), range(n1, V)):
        for i in range(D):
            values = [z[v, b, i] for v in view for b in range(B)]
            mean = sum(values) / len(values)
            var = sum((x - mean) ** 2 for x in values) / len(values)
            for v in view:
                ref[v, :, i] = (z[v, :, i] - mean) / math.sqrt(var + eps)
    all_pairs = [(k, l) for k in range(n1) for l in range(n1, V)]
    c_ref = sum(ref[k].T @ ref[l] / B for k, l in all_pairs) / len(all_pairs)
    c_ref.requires_grad_(True)
    (G,) = torch.autograd.grad(redundancy_loss(c_ref, lambd)[0], c_ref)
    out = torch.empty(B, len(PAIRS), dtype=z.dtype)
    for c, (k, l) in enumerate(PAIRS.tolist()):
        for b in range(B):
            a_, b_ = ref[k, b], ref[l, b]
            out[b, c] = 0.5 * (a_ - b_).pow(2).sum() if score == "invariance" else a_ @ G @ b_
    return out


@pytest.mark.parametrize("score", SCORES)
def test_pair_scores_match_a_direct_computation_per_pair(score):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 6, 5, generator=g, dtype=torch.float64) * 2 + 0.5
    scores = pair_scores(z, PAIRS, 2, LAMBD, score)
    assert scores.shape == (6, 4)
    assert torch.allclose(scores, direct_scores(z, 2, LAMBD, score), atol=1e-10)


def test_with_one_candidate_per_view_the_scores_decompose_the_batch_loss():
    """One candidate per view: the reference is the batch itself, so the batch
    mean of the invariance scores is sum_i (1 - C_ii) and that of the
    contributions is <dL/dC, C>, with the loss's own C and autograd's dL/dC."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(2, 10, 6, generator=g, dtype=torch.float64) * 3 - 1
    c = cross_correlation(z[0], z[1]).requires_grad_(True)
    (G,) = torch.autograd.grad(redundancy_loss(c, LAMBD)[0], c)
    pair = torch.tensor([[0, 1]])
    invariance = pair_scores(z, pair, 1, LAMBD, "invariance")
    assert torch.isclose(invariance.mean(), (1 - c.diagonal()).sum(), rtol=1e-5)  # eps 1e-5 against variance ~9
    assert torch.isclose(pair_scores(z, pair, 1, LAMBD, "contribution").mean(), (G * c).sum(), atol=1e-10)


def near_and_far(seed=3, B=16, D=64):
    """Candidates 0 (view 1) and 2 (view 2) of every image nearly identical,
    1 and 3 independent of everything."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(B, D, generator=g)
    return torch.stack([e + 0.01 * torch.randn(B, D, generator=g), torch.randn(B, D, generator=g),
                        e + 0.01 * torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)])


@pytest.mark.parametrize("score", SCORES)
def test_dissimilar_pair_scores_above_the_near_identical_one(score):
    scores = pair_scores(near_and_far(), PAIRS, 2, LAMBD, score)
    assert (scores[:, 3] > scores[:, 0]).all()
    assert (scores.argmax(1) != 0).all()  # the near-identical pair (0, 2) is never the hardest


# --- views, model, optimiser --------------------------------------------------------
def test_each_view_keeps_its_recipe(tmp_path):
    m = make(tmp_path, "hvs.n_views=8", "augment.size=8")
    assert m.pools() == [(4, 1), (4, 1)]
    assert HardViewSelector(m.pools()).baseline_combo.tolist() == [0, 4]
    r1, r2 = (recipe for recipe, n in m.view_transform(False).slots if n == 1)
    assert (r1.blur_p, r1.solarize_p, r2.blur_p, r2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert r1.scale == (0.08, 1.0) and r1.jitter == (0.4, 0.4, 0.2, 0.1) and r1.interpolation == "bicubic"
    transform = m.view_transform(True)
    assert [n for _, n in transform.slots] == [4, 4]
    img = Image.new("RGB", (24, 24), (200, 120, 40))
    for seed in range(5):
        views, params = transform(img, random.Random(seed))
        assert len(views) == 8 and (params[:4, P["blur_sigma"]] > 0).all()  # view 1: blur p 1.0
        assert (params[:4, P["solarize"]] == 0).all()                      # view 1: no solarisation
    with pytest.raises(ConfigError, match="n_views=5 must be even"):
        make(tmp_path, "hvs.n_views=5")


def test_model_recipe():
    from common.engine.config import COMMON_SPEC, resolve

    cfg = resolve({**COMMON_SPEC, **BarlowTwinsMethod.spec}, None, ["model.arch=resnet18", "model.proj_hidden=32",
                                                                   "model.dim=16"])
    model = BarlowTwinsMethod(cfg, torch.device("cpu")).model
    linears = [x for x in model.projector if isinstance(x, nn.Linear)]
    assert [(x.in_features, x.out_features) for x in linears] == [(512, 32), (32, 32), (32, 16)]
    assert all(x.bias is None for x in linears) and isinstance(model.projector[-1], nn.Linear)
    assert sum(isinstance(x, nn.BatchNorm1d) for x in model.projector) == 2
    assert all(torch.all(b.bn2.weight == 0) for b in model.backbone.layer1)  # zero-init residual
    defaults = resolve({**COMMON_SPEC, **BarlowTwinsMethod.spec}, None, [])
    assert (defaults["model"]["proj_hidden"], defaults["model"]["dim"], defaults["loss"]["lambd"]) == (8192, 8192, 5e-3)
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    z1, z2 = model(x1, x2)
    # each view's batch through BatchNorm on its own, not the two together
    assert torch.allclose(z1, model.embed(x1), atol=1e-5) and torch.allclose(z2, model.embed(x2), atol=1e-5)
    assert not torch.allclose(z1, model.embed(torch.cat([x1, x2]))[:4], atol=1e-3)


def official_factor(step, total, warmup, end=0.001):
    """The official adjust_learning_rate, as a factor of the peak."""
    if step < warmup:
        return step / warmup
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return q + end * (1 - q)


def test_lars_groups_learning_rates_and_schedule(tmp_path):
    m = make(tmp_path, "train.epochs=10", "optim.warmup_epochs=2")
    opt = m.build_optimizer(512)
    weights, biases = opt.param_groups
    assert weights["weight_decay"] == 1.5e-6 and weights["adapt"] and all(p.ndim > 1 for p in weights["params"])
    assert biases["weight_decay"] == 0.0 and not biases["adapt"] and all(p.ndim == 1 for p in biases["params"])
    assert len(weights["params"]) + len(biases["params"]) == len(list(m.model.parameters()))
    for e in range(10):
        for i in range(4):
            values = m.schedule(opt, StepInfo(e, i, 4))
            factor = official_factor(e * 4 + i, 40, 8)
            assert values["lr"] == pytest.approx(0.2 * 2 * factor, rel=1e-12, abs=1e-15)
            assert values["bias_lr"] == pytest.approx(0.0048 * 2 * factor, rel=1e-12, abs=1e-15)
            assert [g["lr"] for g in opt.param_groups] == [values["lr"], values["bias_lr"]]
    # one step: biases and BatchNorm take plain SGD, weights lr * trust * (g + wd w)
    m.schedule(opt, StepInfo(5, 0, 4))
    w, bn = weights["params"][0], biases["params"][0]
    w0, bn0 = w.detach().clone(), bn.detach().clone()
    for p in weights["params"] + biases["params"]:
        p.grad = torch.full_like(p, 0.01)
    opt.step()
    assert torch.allclose(bn, bn0 - biases["lr"] * 0.01)
    trust = 1e-3 * w0.norm() / (w.grad.norm() + 1.5e-6 * w0.norm())
    assert torch.allclose(w, w0 - weights["lr"] * trust * (w.grad + 1.5e-6 * w0), atol=1e-7)


def test_hooks(tmp_path):
    m = make(tmp_path, "hvs.score=invariance")
    g = torch.Generator().manual_seed(5)
    candidates = [torch.randn(3, 3, 8, 8, generator=g) for _ in range(4)]
    step = StepInfo(0, 0, 1, {})
    with torch.no_grad():
        z = m.candidate_outputs(m.model, candidates, step)
        assert z.shape == (4, 3, 32)
        assert all(torch.allclose(z[v], m.model.embed(c), atol=1e-5) for v, c in enumerate(candidates))
        assert torch.equal(m.combination_scores(z, PAIRS, step), pair_scores(z, PAIRS, 2, LAMBD, "invariance"))
    loss, stats = m.training_loss(m.model, candidates[:2], None, step)
    assert set(stats) == {"out_std", "on_diag", "off_diag"} and 0 < stats["out_std"] < 1
    assert torch.isclose(loss, stats["on_diag"] + LAMBD * stats["off_diag"])


# --- training ------------------------------------------------------------------------
@pytest.mark.slow
def test_hvs_run_resumes_exactly_and_evaluates(tmp_path, image_root):
    args = ("train.epochs=2", "run.max_steps_per_epoch=2", "hvs.enabled=true", "optim.lr=0.5", "optim.bias_lr=0.05")
    assert_exact_resume(lambda out, *o: tiny_bt_cfg(out, image_root, *o), BarlowTwinsMethod, tmp_path, args,
                        stop=3, state_keys=(), steps=4)
    steps = [r for r in read_log(tmp_path / "a") if r["type"] == "step"]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) and r["on_diag"] > 0 for r in steps)
    assert max(r["sel_changed"] for r in steps) > 0
    assert all(r["sel_score"] >= r["sel_score_all"] - 1e-6 for r in steps)
    assert_knn_evaluates(tmp_path / "a" / "checkpoint.pth", tmp_path)
