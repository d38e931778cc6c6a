"""SimCLR: NT-Xent against a direct loop, HVS scores and selection against brute
force, LARS groups and schedule, and short training runs read by eval/knn.py."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.hvs import HardViewSelector, pair_combinations
from common.engine.method import StepInfo
from common.engine.train import run
from simclr.loss import nt_xent, pair_scores
from simclr.method import SimCLRMethod
from tests.helpers import Hooks, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


def tiny_simclr_cfg(out, data_dir, *overrides):
    """``tests.conftest.tiny_cfg`` for SimCLR, with a tiny output width."""
    return tiny_cfg(SimCLRMethod, out, data_dir, "model.dim=16", "optim.warmup_epochs=0",
                    "loss.temperature=0.5", *overrides)


def direct_nt_xent(z_a, z_b, t):
    """Per-anchor NT-Xent by a loop over anchors and every other view: [2B]."""
    views = [F.normalize(v, dim=0) for v in torch.cat([z_a, z_b])]
    n = len(views) // 2
    out = []
    for i, anchor in enumerate(views):
        positive = (i + n) % (2 * n)
        num = math.exp(float(anchor @ views[positive]) / t)
        den = sum(math.exp(float(anchor @ views[k]) / t) for k in range(2 * n) if k != i)
        out.append(-math.log(num / den))
    return torch.tensor(out, dtype=torch.float64)


def test_nt_xent_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    for t in (0.1, 0.5):
        per_anchor = direct_nt_xent(z_a, z_b, t)
        assert torch.allclose(nt_xent(z_a, z_b, t), per_anchor.mean(), atol=1e-10)
        assert torch.allclose(nt_xent(z_a, z_b, t, reduce=False), per_anchor[:5] + per_anchor[5:], atol=1e-10)
    z_a.requires_grad_(True)
    nt_xent(z_a, z_b, 0.5).backward()
    assert torch.isfinite(z_a.grad).all()


def test_pair_scores_match_each_pair_computed_separately():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    pairs = pair_combinations(4)
    scores = pair_scores(z, pairs, 0.2)
    assert scores.shape == (6, 6)
    for c, (k, l) in enumerate(pairs.tolist()):
        # views k and l of every image form their own NT-Xent problem
        assert torch.allclose(scores[:, c], nt_xent(z[k], z[l], 0.2, reduce=False), atol=1e-10)
        per_anchor = direct_nt_xent(z[k], z[l], 0.2)
        assert torch.allclose(scores[:, c], per_anchor[:6] + per_anchor[6:], atol=1e-10)


def test_selector_picks_the_brute_force_hardest_pair(tmp_path):
    method = SimCLRMethod(tiny_simclr_cfg(tmp_path, tmp_path), torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    candidates = [torch.randn(8, 16, generator=g) for _ in range(4)]  # stand-ins for projections
    step = StepInfo(0, 0, 1, {"lr": 0.0})
    hooks = Hooks(nn.Identity(), torch.stack, lambda outputs, combos: method.combination_scores(outputs, combos, step))
    sel = HardViewSelector([(4, 2)])(candidates, hooks)
    brute = torch.stack([nt_xent(candidates[k], candidates[l], 0.5, reduce=False)
                         for k, l in pair_combinations(4).tolist()], dim=1)
    assert torch.equal(sel.choice, brute.argmax(1))
    for b in range(8):
        k, l = pair_combinations(4)[brute[b].argmax()].tolist()
        assert torch.equal(sel.views[0][b], candidates[k][b]) and torch.equal(sel.views[1][b], candidates[l][b])


def test_lars_excludes_batchnorm_and_bias_and_schedule(tmp_path):
    method = SimCLRMethod(tiny_simclr_cfg(tmp_path, tmp_path, "optim.warmup_epochs=2", "train.epochs=10"),
                          torch.device("cpu"))
    opt = method.build_optimizer(256)
    adapted, plain = opt.param_groups
    assert adapted["weight_decay"] == 1e-4 and all(p.ndim > 1 for p in adapted["params"])
    assert plain["weight_decay"] == 0.0 and not plain["adapt"] and all(p.ndim == 1 for p in plain["params"])
    frozen = method.model.projector[-1].bias  # the head's last BN has no shift (SimCLR's center=False)
    assert not frozen.requires_grad and all(p is not frozen for p in plain["params"])
    # one step: BN/bias take plain SGD, weights the LARS update lr * trust * (g + wd w)
    w, bn = adapted["params"][0], plain["params"][0]
    w0, bn0 = w.detach().clone(), bn.detach().clone()
    for p in adapted["params"] + plain["params"]:
        p.grad = torch.full_like(p, 0.01)
    method.schedule(opt, StepInfo(5, 0, 4))
    lr = opt.param_groups[0]["lr"]
    opt.step()
    assert torch.allclose(bn, bn0 - lr * 0.01)
    trust = 1e-3 * w0.norm() / (w.grad + 1e-4 * w0).norm()  # SimCLR's LARS: |g + wd w|
    assert torch.allclose(w, w0 - lr * trust * (w.grad + 1e-4 * w0), atol=1e-7)
    assert adapted["lr_in_momentum"] and plain["lr_in_momentum"]  # SimCLR's classic momentum
    # schedule: 0.3 x 256/256, linear warm-up over 2 epochs, cosine to 0 over the other 8
    lrs = [method.schedule(opt, StepInfo(e, i, 4))["lr"] for e in range(10) for i in range(4)]
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(0.15) and lrs[8] == pytest.approx(0.3)
    assert lrs[24] == pytest.approx(0.15) and 0 < lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[8:], lrs[9:]))


def test_schedule_is_bitwise_the_warmup_then_cosine(tmp_path):
    """The schedule (now ``common.engine.schedules.cosine_schedule`` with
    ``warmup_shape="ratio"``) gives exactly, to the bit, SimCLR's formula:
    lr * step / warmup during the warm-up, then lr * 0.5 * (1 + cos(pi * (step -
    warmup) / (total - warmup)))."""
    method = SimCLRMethod(tiny_simclr_cfg(tmp_path, tmp_path), torch.device("cpu"))
    cfg = method.cfg
    for batch in (256, 4096, 1000):
        opt = method.build_optimizer(batch)
        init_lr = 0.3 * batch / 256
        for epochs, warmup_epochs, iters in ((10, 2, 4), (100, 10, 7), (3, 1, 5), (3, 0, 3), (2, 2, 3)):
            cfg["train"]["epochs"], cfg["optim"]["warmup_epochs"] = epochs, warmup_epochs
            warmup, total = round(warmup_epochs * iters), epochs * iters
            for e in range(epochs):
                for i in range(iters):
                    s = e * iters + i
                    if s < warmup:
                        old = init_lr * s / warmup
                    else:
                        old = init_lr * 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
                    assert method.schedule(opt, StepInfo(e, i, iters)) == {"lr": old}
                    assert [g["lr"] for g in opt.param_groups] == [old, old]  # float equality


@pytest.mark.slow
def test_candidate_outputs_are_one_forward_per_candidate(tmp_path):
    method = SimCLRMethod(tiny_simclr_cfg(tmp_path, tmp_path), torch.device("cpu"))
    method.model.eval()  # BatchNorm on running statistics: one forward equals a forward per candidate
    g = torch.Generator().manual_seed(4)
    candidates = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(3)]
    step = StepInfo(0, 0, 1, {"lr": 0.0})
    with torch.no_grad():
        z = method.candidate_outputs(method.model, candidates, step)
        assert z.shape == (3, 2, 16)
        for v, x in enumerate(candidates):
            assert torch.allclose(z[v], method.model.embed(x), atol=1e-5)
    loss, stats = method.training_loss(method.model, candidates[:2], None, step)
    assert loss.ndim == 0 and set(stats) == {"out_std"} and 0 < stats["out_std"] < 1


def read_steps(out):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "step"]



@pytest.mark.slow
@pytest.mark.parametrize("hvs", [False, True])
def test_short_run_and_knn(tmp_path, image_root, hvs, one_thread):
    out = tmp_path / "run"
    run(tiny_simclr_cfg(out, image_root, "train.epochs=1", "run.max_steps_per_epoch=2",
                        f"hvs.enabled={str(hvs).lower()}"), SimCLRMethod)
    steps = read_steps(out)
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    assert all(r["loss"] < 2 * math.log(15) for r in steps)  # 16 views: below a few times chance level
    if hvs:
        assert max(r["sel_changed"] for r in steps) > 0
        assert all(r["sel_score"] >= r["sel_score_all"] - 1e-6 for r in steps)
    r = subprocess.run([sys.executable, "-m", "eval.knn", "--checkpoint", str(out / "checkpoint.pth"),
                        "knn.ks=[1,3]", "data.num_workers=0", "--output", str(tmp_path / "knn.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "knn.json").read_text())
    assert res["method"] == "simclr" and res["n_train"] == 32 and res["hvs"] is hvs
    assert 0 <= res["knn"]["3"]["top1"] <= 100


@pytest.mark.slow
def test_overhead_benchmark_knows_simclr(tmp_path, capsys, one_thread):
    from bench.overhead import main as bench_main

    res = bench_main(["--method", "simclr", "--arch", "resnet18", "--image-size", "16", "--batch-size", "4",
                      "bench.repeats=1", "bench.warmup=0", "bench.resolutions=[1.0]", "--device", "cpu",
                      "--output", str(tmp_path / "overhead.json")])
    assert res["method"] == "simclr" and res["rows"][0]["paper_factor"] is None
    assert math.isfinite(res["rows"][0]["factor"]) and "—" in capsys.readouterr().out
