"""DINO: the loss against a direct loop, combination scores against brute force,
the cap, a selection that leaves the centre and the teacher alone, reduced-size
selection for ViT and ResNet, the reused teacher outputs, schedules, head,
clipping, the loss module's state (centre buffer, checkpointed), a schedule that
sets nothing on the method, and short runs (exact resume with the centre, k-NN
of the teacher)."""
import copy
import math
import random

import pytest
import torch
from PIL import Image

from common.engine import checkpoint as ckpt_io
from common.views.augment import P
from common.hvs import HardViewSelector
from common.engine.method import StepInfo
from common.engine.teacher import ema_update
from common.views.multicrop import multicrop_pools
from common.engine.schedules import cosine_schedule, linear_warmup
from common.engine.train import run
from dino.loss import DINOLoss, combination_scores, cross_entropy_table, dino_loss, updated_center
from dino.method import DINOMethod, clip_each_gradient
from dino.model import DINOHead
from tests.helpers import (VIT, Hooks, assert_exact_resume, assert_knn_evaluates, assert_schedule_sets_no_attribute,
                           assert_state_round_trips, cli, dino_cfg, multicrop_candidates, read_log)

RESNET = ["model.arch=resnet18", "model.cifar_stem=true"]
#: what the loop hands to the hooks (the values of a method's ``schedule``), here with a non-default temperature
STEP = StepInfo(0, 0, 4, {"lr": 1e-4, "wd": 0.04, "momentum": 0.9, "teacher_temp": 0.05})


def direct_dino_loss(student, teacher, center, st, tt):
    """Per-image loss by loops over images and (teacher view, student view) pairs.
    student [V, B, K], teacher [G, B, K]."""
    V, B, _ = student.shape
    out = []
    for b in range(B):
        total, terms = 0.0, 0
        for i in range(teacher.shape[0]):
            p = torch.exp((teacher[i, b] - center[0]) / tt)
            p = p / p.sum()
            for v in range(V):
                if v == i:
                    continue
                q = torch.exp(student[v, b] / st)
                q = q / q.sum()
                total += float(-(p * torch.log(q)).sum())
                terms += 1
        out.append(total / terms)
    return torch.tensor(out, dtype=torch.float64)


def test_dino_loss_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(10, 3, 7, generator=g, dtype=torch.float64)  # 2 global + 8 local views
    teacher = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    center = torch.randn(1, 7, generator=g, dtype=torch.float64)
    for st, tt in ((0.1, 0.04), (0.5, 0.07)):
        direct = direct_dino_loss(student, teacher, center, st, tt)
        per_image = dino_loss(student.reshape(30, 7), teacher.reshape(6, 7), center, st, tt, 10, 2, reduce=False)
        assert torch.allclose(per_image, direct, atol=1e-10)
        assert torch.allclose(dino_loss(list(student), list(teacher), center, st, tt, 10, 2), direct.mean(), atol=1e-10)


def test_centre_update():
    g = torch.Generator().manual_seed(0)
    teacher_out, center = torch.randn(6, 5, generator=g), torch.randn(1, 5, generator=g)
    new = updated_center(center, teacher_out, 0.9)
    assert torch.allclose(new, 0.9 * center + 0.1 * teacher_out.mean(0, keepdim=True), atol=1e-6)


def test_combination_scores_match_the_loss_of_each_combination():
    g = torch.Generator().manual_seed(2)
    pools = [(2, 1), (2, 1), (6, 3)]  # one of 2 candidates per global slot, 3 of 6 local candidates
    combos = HardViewSelector(pools).all_combos
    assert combos.shape == (2 * 2 * 20, 5)
    student = torch.randn(10, 4, 9, generator=g, dtype=torch.float64)  # candidates: 4 global, 6 local
    teacher = torch.randn(4, 4, 9, generator=g, dtype=torch.float64)
    center = torch.randn(1, 9, generator=g, dtype=torch.float64)
    table = cross_entropy_table(teacher, student, center, 0.1, 0.04)
    scores = combination_scores(table, combos, 2)
    for c, row in enumerate(combos.tolist()):
        views = student[row]                  # the combination's views, globals first
        expected = dino_loss(list(views), list(teacher[row[:2]]), center, 0.1, 0.04, 5, 2, reduce=False)
        assert torch.allclose(scores[:, c], expected, atol=1e-10), row


@pytest.fixture
def tiny_method(tmp_path, image_root):
    torch.manual_seed(0)
    cfg = dino_cfg(tmp_path, image_root, "hvs.enabled=true")
    method = DINOMethod(cfg, torch.device("cpu"))
    method.loss.center.copy_(torch.randn(1, 32) * 0.1)  # a non-trivial centre
    return method


@pytest.mark.slow
def test_method_scores_match_a_forward_per_combination(tiny_method):
    """The table-based scores against running the networks and the loss on every
    combination's views separately."""
    m, model = tiny_method, tiny_method.model
    cands = multicrop_candidates(m)
    selector = HardViewSelector(m.pools(), max_combinations=12)
    combos = selector.combinations(torch.Generator().manual_seed(0))
    model.eval()  # no stochastic depth, so that separate forwards are comparable
    with torch.no_grad():
        scores = m.combination_scores(m.candidate_outputs(model, cands, STEP), combos, STEP)
        for c, row in enumerate(combos.tolist()):
            views = [cands[k] for k in row]
            student_out, teacher_out = model(views, 2)
            expected = dino_loss(student_out, teacher_out, m.loss.center, m.loss.student_temp, STEP["teacher_temp"],
                                 len(views), 2, reduce=False)
            assert torch.allclose(scores[:, c], expected, atol=1e-4), row


def test_cap_draws_a_full_random_subset():
    cfg = {"augment": {"n_local": 8}, "hvs": {"global_candidates": 4, "local_candidates": 16}}
    pools = multicrop_pools(cfg)
    assert pools == [(2, 1), (2, 1), (16, 8)]
    selector = HardViewSelector(pools, max_combinations=128)
    assert len(selector.all_combos) == 2 * 2 * math.comb(16, 8)
    a = selector.combinations(torch.Generator().manual_seed(0))
    b = selector.combinations(torch.Generator().manual_seed(1))
    assert a.shape == b.shape == (128, 10) and not torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) == 128  # no duplicates
    for row in a.tolist():
        assert row[0] in (0, 1) and row[1] in (2, 3)
        assert len(set(row[2:])) == 8 and all(4 <= k < 20 for k in row[2:])
    # the smallest cap still selects one candidate for every slot of every sample
    tiny = HardViewSelector(pools, max_combinations=1)
    cands = [torch.full((3, 1), float(k)) for k in range(20)]
    sel = tiny(cands, Hooks(torch.nn.Identity(), torch.stack, lambda o, combos: o.new_zeros(3, len(combos))),
               generator=torch.Generator().manual_seed(0))
    assert len(sel.views) == 10 and sel.combos.shape == (1, 10)
    for s, view in enumerate(sel.views):
        assert torch.equal(view[:, 0], sel.indices[:, s].float())


def test_selection_changes_neither_centre_nor_teacher(tiny_method):
    m, model = tiny_method, tiny_method.model
    model.train()
    center, state = m.loss.center.clone(), copy.deepcopy(model.state_dict())
    selector = HardViewSelector(m.pools(), max_combinations=16)
    sel = selector(multicrop_candidates(m), m, STEP, generator=torch.Generator().manual_seed(0))
    assert sel.scores.shape == (3, 16) and len(sel.views) == 4
    assert torch.equal(m.loss.center, center)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(mod.training for mod in model.modules())  # stochastic depth back on for training


@pytest.mark.parametrize("global_candidates", [2, 4])
def test_reused_teacher_outputs_give_the_identical_step(tmp_path, image_root, global_candidates):
    """Training on the selection's teacher outputs of the chosen global views
    against computing them again.  With one candidate per global slot the
    teacher sees the same input batch both ways and everything is bitwise equal
    (the right rows are reused, in the right order); with two per slot the
    selection's teacher batch is twice as large, which changes only the float
    rounding of the matrix products (about 1e-7 here), not the values."""
    torch.manual_seed(0)
    m = DINOMethod(dino_cfg(tmp_path, image_root, "hvs.enabled=true", f"hvs.global_candidates={global_candidates}"),
                   torch.device("cpu"))
    m.loss.center.copy_(torch.randn(1, 32) * 0.1)
    assert m.reuse_teacher
    other = copy.deepcopy(m)
    other.cfg["hvs"]["reuse_teacher"] = False
    assert not other.reuse_teacher
    cands = multicrop_candidates(m, B=4, seed=3)
    selector = HardViewSelector(m.pools(), max_combinations=16)
    results = []
    for method in (m, other):
        method.model.train()
        sel = selector(cands, method, STEP, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(7)  # the same stochastic-depth draws in both training forwards
        loss, _ = method.training_loss(method.model, sel.views, sel, STEP)
        loss.backward()
        grads = [p.grad.clone() for p in method.model.student.parameters() if p.grad is not None]
        results.append((sel.indices, loss.detach(), method.loss.center.clone(), grads))
    (ia, la, ca, ga), (ib, lb, cb, gb) = results
    assert torch.equal(ia, ib) and len(ga) == len(gb)
    if global_candidates == 2:
        assert torch.equal(la, lb) and torch.equal(ca, cb)
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    else:
        assert torch.allclose(la, lb, rtol=1e-6, atol=0) and torch.allclose(ca, cb, rtol=0, atol=1e-6)
        assert all((x - y).norm() <= 1e-5 * y.norm() for x, y in zip(ga, gb))  # relative to each gradient


def test_reuse_only_where_exact(tmp_path, image_root):
    cpu = torch.device("cpu")
    assert DINOMethod(dino_cfg(tmp_path, image_root, "hvs.enabled=true"), cpu).reuse_teacher
    assert not DINOMethod(dino_cfg(tmp_path, image_root, "hvs.resolution=0.5"), cpu).reuse_teacher
    assert not DINOMethod(dino_cfg(tmp_path, image_root, arch=RESNET), cpu).reuse_teacher  # BN in the teacher
    assert not DINOMethod(dino_cfg(tmp_path, image_root, "hvs.reuse_teacher=false"), cpu).reuse_teacher


@pytest.mark.slow
@pytest.mark.parametrize("arch,resolution,sizes", [
    (VIT, 0.5, {(8, 8), (4, 4)}), (VIT, 0.75, {(12, 12), (4, 4)}),  # 6 px rounds down to a patch multiple
    (RESNET, 0.5, {(8, 8), (4, 4)}), (RESNET, 0.25, {(4, 4), (2, 2)}),
])
def test_reduced_resolution_selection(tmp_path, image_root, arch, resolution, sizes):
    cfg = dino_cfg(tmp_path / "r", image_root, "hvs.enabled=true", f"hvs.resolution={resolution}",
                   "train.epochs=1", "run.max_steps_per_epoch=2", arch=arch)
    seen = {"select": set(), "train": set()}

    class Spy(DINOMethod):
        def __init__(self, cfg, device):
            super().__init__(cfg, device)
            for net in (self.model.student, self.model.teacher):
                net.backbone.register_forward_pre_hook(
                    lambda mod, args: seen["select" if self._selecting else "train"].add(tuple(args[0].shape[-2:])))
            self._selecting = False

        def candidate_outputs(self, module, candidates, step):
            self._selecting = True
            try:
                return super().candidate_outputs(module, candidates, step)
            finally:
                self._selecting = False

    run(cfg, Spy)
    assert seen["select"] == sizes
    assert seen["train"] == {(16, 16), (8, 8)}  # training always on the full-size crops


def test_schedules_follow_dino():
    base, final, total, warmup = 0.5, 0.01, 20, 5
    warm = [i * base / (warmup - 1) for i in range(warmup)]  # np.linspace(0, base, warmup)
    decay = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / (total - warmup)))
             for i in range(total - warmup)]
    got = [cosine_schedule(s, total, base, final, warmup) for s in range(total)]
    assert got == pytest.approx(warm + decay, abs=1e-12)
    assert [linear_warmup(e, 3, 0.04, 0.07) for e in range(5)] == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07])


def test_loss_module_wraps_the_pure_loss_and_owns_the_centre():
    g = torch.Generator().manual_seed(4)
    loss = DINOLoss(6, student_temp=0.2, teacher_temp=0.07, warmup_teacher_temp=0.04,
                    warmup_teacher_temp_epochs=3, center_momentum=0.8)
    assert list(loss.state_dict()) == ["center"] and dict(loss.named_buffers())["center"] is loss.center
    loss.center.copy_(torch.randn(1, 6, generator=g))
    student, teacher = torch.randn(4 * 3, 6, generator=g), torch.randn(2 * 3, 6, generator=g)
    assert torch.equal(loss(student, teacher, 0.05, 4, 2), dino_loss(student, teacher, loss.center, 0.2, 0.05, 4, 2))
    expected = updated_center(loss.center, teacher, 0.8)
    buffer = loss.center
    loss.update_center(teacher)
    assert loss.center is buffer and torch.equal(loss.center, expected)  # in place: still the registered buffer
    temps = [loss.temperatures(e)["teacher_temp"] for e in range(5)]
    assert temps == [linear_warmup(e, 3, 0.04, 0.07) for e in range(5)]


def test_centre_round_trips_through_the_method_state(tmp_path, image_root):
    assert_state_round_trips(lambda: DINOMethod(dino_cfg(tmp_path, image_root), torch.device("cpu")), ["center"])


def test_schedule_returns_the_values_and_sets_no_attribute(tmp_path, image_root):
    m = DINOMethod(dino_cfg(tmp_path, image_root, "train.epochs=3", "loss.warmup_teacher_temp_epochs=3",
                            "loss.teacher_temp=0.07"), torch.device("cpu"))
    values = assert_schedule_sets_no_attribute(m)
    assert [v["teacher_temp"] for v in values[::4]] == pytest.approx([0.04, 0.055, 0.07])
    assert values[0]["momentum"] == pytest.approx(0.9) and values[-1]["momentum"] > values[0]["momentum"]


def test_hooks_read_the_step(tiny_method):
    """The teacher temperature of the scores and the loss, the EMA momentum and
    the frozen last layer come from the step handed to the hook."""
    m, model = tiny_method, tiny_method.model
    model.eval()
    cands = multicrop_candidates(m)
    combos = HardViewSelector(m.pools(), max_combinations=4).combinations(torch.Generator().manual_seed(0))
    other = StepInfo(1, 0, 4, {**STEP.values, "teacher_temp": 0.07, "momentum": 0.5})
    with torch.no_grad():
        outputs = m.candidate_outputs(model, cands, STEP)
        a, b = m.combination_scores(outputs, combos, STEP), m.combination_scores(outputs, combos, other)
        table = cross_entropy_table(outputs["teacher"], outputs["student"], m.loss.center,
                                    m.loss.student_temp, 0.07)
    assert torch.equal(b, combination_scores(table, combos, 2)) and not torch.equal(a, b)
    teacher = copy.deepcopy(model.teacher)
    m.after_step(other)
    expected = [0.5 * t + 0.5 * s for t, s in zip(teacher.parameters(), model.student.parameters())]
    assert all(torch.allclose(p, e) for p, e in zip(model.teacher.parameters(), expected))
    last = model.student.head.last_layer.parametrizations.weight.original1
    for step, frozen in ((StepInfo(0, 0, 4, STEP.values), True), (StepInfo(1, 0, 4, STEP.values), False)):
        last.grad = torch.ones_like(last)
        m.before_optimizer_step(model, step)
        assert (last.grad is None) == frozen


def test_head_prototypes_have_unit_norm():
    head = DINOHead(12, out_dim=40, hidden=16, bottleneck=8, layers=3)
    assert head(torch.randn(5, 12)).shape == (5, 40)
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(40), atol=1e-5)
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert "last_layer.parametrizations.weight.original0" not in trainable  # the gain is frozen
    assert "last_layer.parametrizations.weight.original1" in trainable
    free = DINOHead(12, out_dim=40, hidden=16, bottleneck=8, norm_last_layer=False)
    assert all(p.requires_grad for p in free.parameters())


def test_clipping_is_per_parameter_and_ema():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.full((4,), 10.0), torch.tensor([0.1, 0.2, 0.2])
    clip_each_gradient([a, b], 3.0)
    assert a.grad.norm() == pytest.approx(3.0, rel=1e-5)
    assert torch.equal(b.grad, torch.tensor([0.1, 0.2, 0.2]))  # under the limit: untouched
    t, s = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = [0.9 * pt.detach() + 0.1 * ps.detach() for pt, ps in zip(t.parameters(), s.parameters())]
    ema_update(t, s, 0.9)
    assert all(torch.allclose(p, e) for p, e in zip(t.parameters(), expected))


@pytest.mark.slow
def test_last_layer_frozen_in_the_first_epoch(tmp_path, image_root):
    cfg = dino_cfg(tmp_path / "f", image_root, "train.epochs=2", "run.max_steps_per_epoch=1",
                   "optim.freeze_last_layer=1", "run.stop_after_steps=1")
    run(cfg, DINOMethod)
    torch.manual_seed(0)
    init = DINOMethod(cfg, torch.device("cpu")).model.state_dict()
    after = ckpt_io.load(tmp_path / "f" / "checkpoint.pth")["model"]
    key = "student.head.last_layer.parametrizations.weight.original1"
    assert torch.equal(after[key], init[key])
    assert not torch.equal(after["student.head.mlp.0.weight"], init["student.head.mlp.0.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, 4])  # inside the first epoch (4 steps), and at its end
def test_exact_resume_with_centre(tmp_path, image_root, stop):
    args = ("train.epochs=2", "hvs.enabled=true", "hvs.max_combinations=8", "optim.warmup_epochs=1",
            "loss.warmup_teacher_temp_epochs=2")
    assert_exact_resume(lambda out, *o: dino_cfg(out, image_root, *o), DINOMethod, tmp_path, args, stop, ["center"])


@pytest.mark.slow
@pytest.mark.parametrize("hvs", ["false", "true"])
def test_short_run_evaluates_with_knn_on_the_teacher(tmp_path, image_root, hvs):
    out = tmp_path / "r"
    run(dino_cfg(out, image_root, f"hvs.enabled={hvs}", "train.epochs=1"), DINOMethod)
    steps = [r for r in read_log(out) if r["type"] == "step"]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    if hvs == "true":
        assert all(r["sel_score"] >= r["sel_score_all"] - 1e-6 for r in steps)
    teacher, info = ckpt_io.load_backbone(out / "checkpoint.pth")
    student, _ = ckpt_io.load_backbone(out / "checkpoint.pth", which="student")
    state = ckpt_io.load(out / "checkpoint.pth")["model"]
    assert info["method"] == "dino" and info["arch"] == "vit_tiny/4" and info["image_size"] == 16
    assert torch.equal(teacher.state_dict()["cls_token"], state["teacher.backbone.cls_token"])
    assert not torch.equal(teacher.state_dict()["cls_token"], student.state_dict()["cls_token"])
    assert_knn_evaluates(out / "checkpoint.pth", tmp_path)


@pytest.mark.slow
def test_torchrun_two_processes_hvs(tmp_path, image_root):
    out = tmp_path / "ddp"
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dino.main",
            "--output-dir", str(out), "--data-dir", str(image_root), "data.dataset=imagefolder",
            *VIT, "model.out_dim=32", "model.head_hidden=32", "model.head_bottleneck=16",
            "augment.global_size=16", "augment.local_size=8", "augment.n_local=2", "hvs.local_candidates=4",
            "train.batch_size=8", "train.epochs=1", "data.num_workers=0", "hvs.enabled=true",
            "run.log_every=1", env={"GLOO_SOCKET_IFNAME": "lo"})
    assert r.returncode == 0, r.stderr[-3000:]
    state = ckpt_io.load(out / "checkpoint.pth")
    assert state["step"] == 4 and state["method_state"]["center"].shape == (1, 32)


def test_multicrop_errors(tmp_path, image_root):
    with pytest.raises(ValueError, match="hvs.global_candidates=3"):
        DINOMethod(dino_cfg(tmp_path, image_root, "hvs.global_candidates=3"), torch.device("cpu")).pools()
    with pytest.raises(ValueError, match="hvs.local_candidates=1 must be at least augment.n_local=2"):
        DINOMethod(dino_cfg(tmp_path, image_root, "hvs.local_candidates=1"), torch.device("cpu")).pools()
    # caught by the config (a list of 3) or by the multi-crop transform
    with pytest.raises(ValueError, match=r"augment.blur_p=\[0.5, 0.5\].* 3 (probabilities|values)"):
        DINOMethod(dino_cfg(tmp_path, image_root, "augment.blur_p=[0.5,0.5]"), torch.device("cpu")).view_transform(False)


def test_multicrop_views_follow_their_slot_recipes(tmp_path, image_root):
    method = DINOMethod(dino_cfg(tmp_path, image_root, "augment.n_local=3", "hvs.local_candidates=6"),
                        torch.device("cpu"))
    img = Image.new("RGB", (40, 30), (120, 60, 200))
    for hvs_on, n in ((False, 5), (True, 10)):
        views, params = method.view_transform(hvs_on)(img, random.Random(0))
        assert len(views) == n and params.shape[0] == n
        n_global = 4 if hvs_on else 2
        assert all(v.shape[-1] == 16 for v in views[:n_global]) and all(v.shape[-1] == 8 for v in views[n_global:])
    # the first global slot is always blurred, locals never solarised
    for seed in range(5):
        _, params = method.view_transform(True)(img, random.Random(seed))
        assert (params[:2, P["blur_sigma"]] > 0).all()
        assert (params[4:, P["solarize"]] == 0).all()


def test_selection_stats_compare_with_the_baseline_views():
    """``sel_changed`` counts samples that train on other views than the
    baseline's (the first candidates of every pool), and the IoU columns use
    the two global crops."""
    from common.hvs import Selection
    from common.engine.train import selection_stats

    selector = HardViewSelector([(2, 1), (2, 1), (4, 2)])
    first = selector.all_combos[0]
    assert first.tolist() == [0, 2, 4, 5]
    combos = selector.all_combos[:3]
    indices = torch.stack([first, combos[2]])  # sample 0: the baseline's views; sample 1: others
    sel = Selection(views=[], indices=indices, choice=torch.tensor([0, 2]), combos=combos,
                    scores=torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    params = torch.zeros(2, 8, len(P))
    params[..., P["crop_w"]] = params[..., P["crop_h"]] = 10.0
    stats = selection_stats(sel, params, first)
    assert stats["sel_changed"] == 0.5
    assert stats["sel_score"] == 1.0 and stats["sel_iou"] == 1.0


