"""BYOL: the loss and its pair scores against direct formulas, the two view
recipes and their pools, the target (EMA schedule and update, no gradient,
reused outputs), LARS groups and schedule, and short runs (exact resume, k-NN,
torchrun)."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from byol.loss import byol_loss, cosine_table, normalized_mse, pair_scores
from byol.method import BYOLMethod
from common.engine import checkpoint as ckpt_io
from common.engine.config import ConfigError
from common.hvs import HardViewSelector, pair_combinations, pool_combinations
from common.engine.method import StepInfo
from common.views.two_views import recipes
from common.engine.train import run
from tests.helpers import assert_exact_resume, assert_knn_evaluates, cli, read_log, tiny_cfg

CPU = torch.device("cpu")
STEP = StepInfo(0, 0, 1, {"lr": 0.0, "tau": 0.99})


pytestmark = pytest.mark.usefixtures("one_thread")  # tests.conftest


def byol_cfg(out, data_dir, *overrides):
    """``tests.helpers.tiny_cfg`` for BYOL: tiny MLPs, BYOL's two blur probabilities."""
    return tiny_cfg(BYOLMethod, out, data_dir, "model.pred_hidden=32", "model.proj_hidden=32", "model.dim=16",
                    "augment.blur_p=[1.0,0.1]", "optim.warmup_epochs=0", *overrides)


def make(tmp_path, *overrides):
    torch.manual_seed(0)
    return BYOLMethod(byol_cfg(tmp_path, tmp_path, *overrides), CPU)


def direct_loss(q, z):
    """|| q/|q| - z/|z| ||^2 per sample, by a loop."""
    return torch.stack([((a / a.norm() - b / b.norm()) ** 2).sum() for a, b in zip(q, z)])


# --- loss -------------------------------------------------------------------------
def test_loss_matches_the_direct_formula_and_stops_the_target_gradient():
    g = torch.Generator().manual_seed(0)
    q1, q2, z1, z2 = (torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    assert torch.allclose(normalized_mse(q1, z2), direct_loss(q1, z2), atol=1e-12)
    per = byol_loss(q1, q2, z1, z2, reduce=False)
    assert per.shape == (5,) and torch.allclose(per, direct_loss(q1, z2) + direct_loss(q2, z1), atol=1e-12)
    loss = byol_loss(q1, q2, z1, z2)
    assert torch.allclose(loss, per.mean())
    assert torch.allclose(byol_loss(q1, q2, q2, q1), torch.zeros((), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(byol_loss(q1, q2, -q2, -q1), torch.full((), 8.0, dtype=torch.float64))
    loss.backward()
    assert q1.grad is not None and q2.grad is not None and z1.grad is None and z2.grad is None


def test_pair_scores_match_each_pair_computed_separately():
    g = torch.Generator().manual_seed(1)
    q, z = torch.randn(4, 6, 8, generator=g, dtype=torch.float64), torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    cos = cosine_table(q, z)
    assert cos.shape == (6, 4, 4)
    for b in range(6):
        for v in range(4):
            for w in range(4):
                assert math.isclose(cos[b, v, w], float(q[v, b] @ z[w, b] / (q[v, b].norm() * z[w, b].norm())),
                                    abs_tol=1e-12)
    for pairs in (pool_combinations([(2, 1), (2, 1)]), pair_combinations(4)):
        scores = pair_scores(q, z, pairs)
        assert scores.shape == (6, len(pairs))
        for c, (k, l) in enumerate(pairs.tolist()):
            assert torch.allclose(scores[:, c], byol_loss(q[k], q[l], z[k], z[l], reduce=False), atol=1e-12)
            assert torch.allclose(scores[:, c], direct_loss(q[k], z[l]) + direct_loss(q[l], z[k]), atol=1e-12)


# --- views and pools ---------------------------------------------------------------
def test_two_recipes_and_their_pools(tmp_path):
    m = make(tmp_path, "augment.solarize_p=[0.0,0.2]", "hvs.n_views=6")
    r1, r2 = recipes(m.cfg)
    assert (r1.blur_p, r1.solarize_p, r2.blur_p, r2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert r1.interpolation == r2.interpolation == "bicubic" and r1.jitter == (0.4, 0.4, 0.2, 0.1)
    assert m.view_transform(False).recipes() == [r1, r2]
    assert m.view_transform(True).recipes() == [r1] * 3 + [r2] * 3
    assert m.pools() == [(3, 1), (3, 1)]
    combos = HardViewSelector(m.pools()).all_combos
    assert len(combos) == 9 and (combos[:, 0] < 3).all() and (combos[:, 1] >= 3).all()  # a view 1 and a view 2
    with pytest.raises(ConfigError, match="hvs.n_views=5"):
        make(tmp_path, "hvs.n_views=5").pools()


# --- target ----------------------------------------------------------------------
def test_target_starts_equal_and_gets_no_gradient(tmp_path):
    m = make(tmp_path)
    model = m.model
    assert all(torch.equal(a, b) for a, b in zip(model.target.state_dict().values(), model.online.state_dict().values()))
    assert not any(p.requires_grad for p in model.target.parameters())
    g = torch.Generator().manual_seed(2)
    views = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    loss, stats = m.training_loss(model, views, None, STEP)
    loss.backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert model.online.backbone.conv1.weight.grad.abs().sum() > 0
    assert set(stats) == {"out_std"} and 0 < stats["out_std"] < 1
    target = copy.deepcopy(model.target.state_dict())
    opt = m.build_optimizer(8)
    m.schedule(opt, StepInfo(0, 0, 4))
    opt.step()  # the optimizer holds no target parameter: only the EMA moves it
    assert all(torch.equal(v, model.target.state_dict()[k]) for k, v in target.items())


def test_ema_schedule_is_byols_cosine_and_updates_the_target(tmp_path):
    m = make(tmp_path, "train.epochs=3", "optim.tau_base=0.99")
    opt = m.build_optimizer(8)
    K, values = 12, [m.schedule(opt, StepInfo(e, i, 4))["tau"] for e in range(3) for i in range(4)]
    for k, tau in enumerate(values):
        assert math.isclose(tau, 1 - (1 - 0.99) * (math.cos(math.pi * k / K) + 1) / 2, rel_tol=0, abs_tol=1e-15)
    assert values[0] == 0.99 and all(a < b for a, b in zip(values, values[1:])) and values[-1] < 1
    online, target = m.model.online, m.model.target
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    m.after_step(StepInfo(1, 2, 4, {"lr": 0.1, "tau": values[6]}))
    params = dict(online.named_parameters())
    for name, p in target.named_parameters():
        assert torch.allclose(p, values[6] * before[name] + (1 - values[6]) * params[name], atol=1e-6)
    for name, b in target.named_buffers():  # running statistics are the target's own, not averaged
        assert torch.equal(b, before[name])


# --- optimiser -----------------------------------------------------------------
def test_lars_groups_and_lr_schedule(tmp_path):
    m = make(tmp_path, "train.epochs=10", "optim.warmup_epochs=2")
    opt = m.build_optimizer(512)
    assert math.isclose(m.init_lr, 0.2 * 512 / 256)
    adapted, plain = opt.param_groups
    trained = [p for n, p in m.model.named_parameters() if not n.startswith("target.")]
    assert {id(p) for p in adapted["params"] + plain["params"]} == {id(p) for p in trained}
    assert adapted["weight_decay"] == 1.5e-6 and adapted["adapt"] and all(p.ndim > 1 for p in adapted["params"])
    assert plain["weight_decay"] == 0.0 and not plain["adapt"]
    bn = {id(p) for mod in m.model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
          for p in mod.parameters()}
    biases = {id(p) for n, p in m.model.named_parameters() if n.endswith(".bias")}
    assert {id(p) for p in plain["params"]} == (bn | biases) & {id(p) for p in trained}
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["trust_coeff"] == 1e-3 and not opt.defaults["trust_clip"]
    # one step: biases and BN take plain momentum SGD, weights the LARS update lr * trust * (g + wd w)
    w, bn = adapted["params"][0], plain["params"][0]
    w0, bn0 = w.detach().clone(), bn.detach().clone()
    for p in trained:
        p.grad = torch.full_like(p, 0.01)
    lr = m.schedule(opt, StepInfo(5, 0, 4))["lr"]
    opt.step()
    assert torch.allclose(bn, bn0 - lr * 0.01)
    trust = 1e-3 * w0.norm() / (w.grad.norm() + 1.5e-6 * w0.norm())
    assert torch.allclose(w, w0 - lr * trust * (w.grad + 1.5e-6 * w0), atol=1e-7)
    # schedule: linear warm-up over 2 epochs (lr * k / 8), then cosine to 0 over the other 8, per step
    lrs = [m.schedule(opt, StepInfo(e, i, 4))["lr"] for e in range(10) for i in range(4)]
    for k, lr in enumerate(lrs):
        expected = 0.4 * k / 8 if k < 8 else 0.4 * 0.5 * (1 + math.cos(math.pi * (k - 8) / 32))
        assert math.isclose(lr, expected, rel_tol=1e-12, abs_tol=1e-15)
    assert all(g["lr"] == lrs[-1] for g in opt.param_groups)


# --- hard view selection ---------------------------------------------------------
def test_candidate_outputs_are_one_forward_of_each_network(tmp_path):
    m = make(tmp_path)
    m.model.eval()  # BatchNorm on running statistics: one forward equals a forward per candidate
    with torch.no_grad():
        for p in m.model.target.parameters():  # a target different from the online network
            p.mul_(0.9)
    g = torch.Generator().manual_seed(3)
    candidates = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(4)]
    with torch.no_grad():
        out = m.candidate_outputs(m.model, candidates, STEP)
        assert out["online"].shape == out["target"].shape == (4, 2, 16)
        for v, x in enumerate(candidates):
            assert torch.allclose(out["online"][v], m.model.predict(x)[0], atol=1e-5)
            assert torch.allclose(out["target"][v], m.model.project_target(x), atol=1e-5)
        pairs = HardViewSelector(m.pools()).all_combos
        assert torch.equal(m.combination_scores(out, pairs, STEP), pair_scores(out["online"], out["target"], pairs))


def strip_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm layer by the identity (a BN-free network)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            strip_batchnorm(child)


def select(method, candidates, resolution=1.0):
    selector = HardViewSelector(method.pools(), resolution=resolution)
    return selector(candidates, method, STEP)


def test_reuse_of_the_target_outputs_only_where_exact(tmp_path):
    g = torch.Generator().manual_seed(4)
    candidates = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(4)]
    m = make(tmp_path, "hvs.enabled=true")
    m.model.train()
    sel = select(m, candidates)
    assert not m.can_reuse_teacher(sel) and not m.reuse_teacher  # a ResNet target has BatchNorm
    strip_batchnorm(m.model)
    assert m.can_reuse_teacher(sel) and m.reuse_teacher and not m.can_reuse_teacher(None)
    assert not m.can_reuse_teacher(select(m, candidates, resolution=0.5))
    for override in ("hvs.reuse_target=false", "hvs.resolution=0.5"):
        other = make(tmp_path, override)
        strip_batchnorm(other.model)
        assert not other.reuse_teacher and not other.can_reuse_teacher(sel)


def test_reused_target_outputs_give_the_identical_step(tmp_path):
    """BN-free networks: training on the selection's target projections of the
    chosen views against running the target again.  The target does not run in
    the reusing step; the selection's forward saw all candidates as one batch,
    which changes only the float rounding."""
    m = make(tmp_path, "hvs.enabled=true")
    strip_batchnorm(m.model)
    other = copy.deepcopy(m)
    other.cfg = copy.deepcopy(m.cfg)
    other.cfg["hvs"]["reuse_target"] = False
    g = torch.Generator().manual_seed(5)
    candidates = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(4)]
    results = []
    for method in (m, other):
        calls = []
        method.model.target.register_forward_hook(lambda *args: calls.append(1))
        sel = select(method, candidates)
        assert len(calls) == 1  # the selection's one forward over all candidates
        loss, _ = method.training_loss(method.model, sel.views, sel, STEP)
        loss.backward()
        results.append((sel.indices, loss.detach(), len(calls) - 1,
                        [p.grad.clone() for p in method.model.parameters() if p.grad is not None]))
    (ia, la, ca, ga), (ib, lb, cb, gb) = results
    assert torch.equal(ia, ib) and (ca, cb) == (0, 2) and len(ga) == len(gb)
    assert torch.allclose(la, lb, rtol=1e-6, atol=0)
    assert all((x - y).norm() <= 1e-5 * y.norm() for x, y in zip(ga, gb))


# --- runs ---------------------------------------------------------------------------
@pytest.mark.slow
def test_hvs_run_resumes_exactly_and_evaluates_the_online_backbone(tmp_path, image_root):
    args = ("train.epochs=2", "run.max_steps_per_epoch=2", "hvs.enabled=true", "optim.warmup_epochs=1")
    # stopped inside the second epoch; BYOL keeps no method state (the target is part of the model)
    assert_exact_resume(lambda out, *o: byol_cfg(out, image_root, *o), BYOLMethod, tmp_path, args, 3, [], steps=4)
    path = tmp_path / "a" / "checkpoint.pth"
    steps = [r for r in read_log(tmp_path / "a") if r["type"] == "step"]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) and 0 <= r["loss"] <= 8 for r in steps)
    assert all(r["sel_score"] >= r["sel_score_all"] - 1e-6 for r in steps) and max(r["sel_changed"] for r in steps) > 0
    assert all(0 < r["out_std"] < 1 and r["tau"] < 1 for r in steps)
    state = ckpt_io.load(path)["model"]
    online, info = ckpt_io.load_backbone(path)
    target, _ = ckpt_io.load_backbone(path, which="teacher")
    assert info["method"] == "byol" and info["which"] == "student" and info["hvs"] is True
    assert torch.equal(online.state_dict()["conv1.weight"], state["online.backbone.conv1.weight"])
    assert torch.equal(target.state_dict()["conv1.weight"], state["target.backbone.conv1.weight"])
    assert not torch.equal(state["online.backbone.conv1.weight"], state["target.backbone.conv1.weight"])
    assert_knn_evaluates(path, tmp_path)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, image_root):
    out = tmp_path / "ddp"
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "byol.main",
            "--output-dir", str(out), "--data-dir", str(image_root), "data.dataset=imagefolder",
            "model.arch=resnet18", "model.cifar_stem=true", "model.proj_hidden=32", "model.pred_hidden=32",
            "model.dim=16", "augment.size=16", "train.batch_size=8", "train.epochs=1", "data.num_workers=0",
            "hvs.enabled=true", "run.log_every=1", "run.selection_log_every=1",
            env={"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    state = ckpt_io.load(out / "checkpoint.pth")
    assert state["step"] == 4 and state["epoch"] == 1  # 32 images / global batch 8
    rank1 = np.load(next((out / "selection").glob("rank1*.npz")))
    assert rank1["scores"].shape == (4, 4, 4)  # per-rank batch of 4, 2 x 2 pairs, on each rank
