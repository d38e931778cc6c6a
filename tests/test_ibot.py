"""iBOT: the patch loss against a direct loop, the [CLS] loss against DINO's,
block masks (ratio, aspect, unmasked crops), the mask token, selection scores
against a forward per combination, masks that travel with the selected
candidates (also at reduced resolution), masks that follow the step handed to
the hooks, the reused teacher tokens, the loss module's state (both centres),
DINO's forward signature, and short runs (exact resume with both centres, k-NN
of the teacher, torchrun)."""
import copy
import inspect
import math
import random

import pytest
import torch

from common.engine import checkpoint as ckpt_io
from common.backbones import build_vit, vit_tokens
from common.hvs import HardViewSelector
from common.engine.method import StepInfo
from common.engine.train import run
from dino.loss import dino_loss, updated_center
from dino.model import DINO
from ibot.loss import IBOTLoss, ibot_loss, patch_loss
from ibot.masking import MaskGenerator, block_mask, resize_masks
from ibot.method import IBOTMethod
from ibot.model import IBOT
from tests.helpers import (assert_exact_resume, assert_knn_evaluates, assert_schedule_sets_no_attribute, tiny_cfg,
                             assert_state_round_trips, multicrop_candidates)
from tests.helpers import cli, read_log

TINY = ["model.arch=vit_tiny", "model.patch_size=4", "model.drop_path=0.1", "model.depth=2",
        "model.out_dim=32", "model.head_hidden=32", "model.head_bottleneck=16", "augment.global_size=16",
        "augment.local_size=8", "augment.n_local=2", "hvs.local_candidates=4", "optim.warmup_epochs=0",
        "optim.momentum_teacher=0.9", "augment.blur_p=[1.0,0.1,0.5]"]
CPU = torch.device("cpu")
#: what the loop hands to the hooks (the values of a method's ``schedule``), with non-default temperatures
STEP = StepInfo(0, 0, 4, {"lr": 1e-4, "wd": 0.04, "momentum": 0.9, "teacher_temp": 0.05,
                          "teacher_patch_temp": 0.06})


def ibot_cfg(out, data_dir, *overrides):
    return tiny_cfg(IBOTMethod, out, data_dir, *TINY, *overrides)


# --- loss ------------------------------------------------------------------------
def direct_patch_loss(student, teacher, masks, center, st, tt):
    """Per image: loop over its masked patches, mean of H(P_t, P_s); 0 if none."""
    out = []
    for b in range(student.shape[0]):
        terms = []
        for i in range(student.shape[1]):
            if masks[b, i]:
                p = torch.exp((teacher[b, i] - center[0]) / tt)
                p = p / p.sum()
                q = torch.exp(student[b, i] / st)
                q = q / q.sum()
                terms.append(float(-(p * torch.log(q)).sum()))
        out.append(sum(terms) / len(terms) if terms else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def test_patch_loss_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    B, N, K = 4, 9, 6
    student, teacher = (torch.randn(B, N, K, generator=g, dtype=torch.float64) for _ in range(2))
    center = torch.randn(1, K, generator=g, dtype=torch.float64) * 0.1
    masks = torch.rand(B, 3, 3, generator=g) < 0.4
    masks[1] = False  # an unmasked image
    masks[2, 0, 0] = True
    expected = direct_patch_loss(student, teacher, masks.flatten(1), center, 0.1, 0.07)
    full = patch_loss(student, teacher, masks, center, 0.1, 0.07, reduce=False)
    assert torch.allclose(full, expected, atol=1e-10) and full[1] == 0
    rows = masks.flatten(1)
    only_masked = patch_loss(student[rows], teacher[rows], masks, center, 0.1, 0.07, reduce=False)
    assert torch.allclose(only_masked, expected, atol=1e-10)  # the student's masked-rows form
    assert torch.allclose(patch_loss(student, teacher, masks, center, 0.1, 0.07), expected.mean())


def test_cls_loss_is_dinos_and_the_loss_combines_both():
    g = torch.Generator().manual_seed(1)
    B, N, K, V = 3, 4, 5, 4  # 2 global + 2 local crops
    student_cls = torch.randn(V * B, K, generator=g, dtype=torch.float64)
    teacher_cls = torch.randn(2 * B, K, generator=g, dtype=torch.float64)
    student_patch, teacher_patch = (torch.randn(2 * B, N, K, generator=g, dtype=torch.float64) for _ in range(2))
    masks = torch.rand(2 * B, 2, 2, generator=g) < 0.5
    c1, c2 = (torch.randn(1, K, generator=g, dtype=torch.float64) * 0.1 for _ in range(2))
    loss, cls, patch = ibot_loss(student_cls, student_patch, teacher_cls, teacher_patch, masks, c1, c2,
                                 0.1, 0.04, 0.06, n_student=V, lambda1=0.7, lambda2=1.3, reduce=False)
    assert torch.allclose(cls, dino_loss(student_cls, teacher_cls, c1, 0.1, 0.04, V, 2, reduce=False))
    per_view = [patch_loss(student_patch[v * B:(v + 1) * B], teacher_patch[v * B:(v + 1) * B],
                           masks[v * B:(v + 1) * B], c2, 0.1, 0.06, reduce=False) for v in range(2)]
    assert torch.allclose(patch, (per_view[0] + per_view[1]) / 2)  # same-view pairs only, mean of the two
    assert torch.allclose(loss, 0.7 * cls + 1.3 * patch)


# --- masks -------------------------------------------------------------------------
def test_block_masks_reach_the_ratio_within_the_aspect_limits():
    rng = random.Random(0)
    lo, hi = 0.3, 1 / 0.3
    fractions, aspects = [], []
    for _ in range(400):
        blocks = []
        mask = block_mask(rng, 14, 14, 0.3, (lo, hi), blocks)
        assert mask.sum() <= 0.3 * 196  # never more than the target
        fractions.append(mask.mean())
        covered = torch.zeros(14, 14, dtype=torch.bool)
        for top, left, h, w in blocks:
            assert h >= 1 and w >= 1 and top + h <= 14 and left + w <= 14
            # integer sides are the rounded sqrt(area * a), sqrt(area / a) with a in [lo, hi]
            assert (h + 0.5) / (w - 0.5 if w > 0.5 else 1e-9) >= lo - 1e-9 and (h - 0.5) / (w + 0.5) <= hi + 1e-9
            aspects.append(h / w)
            covered[top:top + h, left:left + w] = True
        assert torch.equal(covered, torch.from_numpy(mask))  # the mask is the union of its blocks
    assert 0.25 < sum(fractions) / len(fractions) <= 0.3
    assert min(aspects) < 0.6 and max(aspects) > 1.7  # both tall and wide blocks


def test_mask_generator_leaves_half_the_crops_unmasked():
    gen = MaskGenerator([0.0, 0.3], [0.0, 0.2])  # iBOT's ViT-S/16 recipe
    masks = gen(2000, 14, 14, seed=0)
    assert masks.shape == (2000, 14, 14) and masks.dtype == torch.bool
    counts = masks.flatten(1).sum(1).float()
    assert 0.45 < (counts == 0).float().mean() < 0.55
    ratios = counts[counts > 0] / 196
    assert ratios.max() <= 0.5 and ratios.min() < 0.15 and 0.22 < ratios.mean() < 0.31  # r ~ U(0.1, 0.5)
    assert not gen(50, 14, 14, epoch=0, seed=1).equal(gen(50, 14, 14, epoch=0, seed=2))
    assert torch.equal(gen(50, 14, 14, seed=1), gen(50, 14, 14, seed=1))
    assert not MaskGenerator([0.0], [0.0])(20, 8, 8, seed=0).any()  # unmasked crops have no masked token
    assert not MaskGenerator([0.3], [0.0], start_epoch=2)(20, 8, 8, epoch=1).any()
    with pytest.raises(ValueError, match="mask.ratio 0.1 with mask.ratio_var 0.2"):
        MaskGenerator([0.1], [0.2])


def test_resize_masks_nearest():
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, :2, :2] = True
    assert torch.equal(resize_masks(m, (2, 2))[0], torch.tensor([[True, False], [False, False]]))
    assert resize_masks(m, (4, 4)) is m


def test_mask_token_hides_the_masked_patches():
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", patch_size=4, img_size=16, depth=2).eval()
    x = torch.randn(1, 3, 16, 16)
    y = x.clone()
    y[..., 4:8, 8:12] += 1.0  # change one patch (row 1, column 2)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    token = torch.randn(vit.embed_dim)
    with torch.no_grad():
        assert torch.equal(vit_tokens(vit, x)[:, 0], vit(x))  # [CLS] row = the backbone's feature
        assert torch.equal(vit_tokens(vit, x, ~mask & mask, token), vit_tokens(vit, x))
        assert not torch.allclose(vit_tokens(vit, x), vit_tokens(vit, y))
        assert torch.allclose(vit_tokens(vit, x, mask, token), vit_tokens(vit, y, mask, token), atol=1e-6)
        assert not torch.allclose(vit_tokens(vit, x, mask, token), vit_tokens(vit, x, mask, token + 1))


# --- selection --------------------------------------------------------------------
@pytest.fixture
def tiny_method(tmp_path, image_root):
    torch.manual_seed(0)
    method = IBOTMethod(ibot_cfg(tmp_path, image_root, "hvs.enabled=true", "mask.ratio=[0.5]",
                                 "mask.ratio_var=[0.2]"), CPU)
    method.loss.center.copy_(torch.randn(1, 32) * 0.1)  # non-trivial centres
    method.loss.patch_center.copy_(torch.randn(1, 32) * 0.1)
    return method


def test_method_scores_match_a_forward_per_combination(tiny_method):
    """Scores from the [CLS] table and the per-candidate patch losses against
    running the networks and the iBOT loss on every combination's views, each
    global view with its own mask."""
    m, model = tiny_method, tiny_method.model
    cands = multicrop_candidates(m)
    combos = HardViewSelector(m.pools(), max_combinations=12).combinations(torch.Generator().manual_seed(0))
    model.eval()  # no stochastic depth, so that separate forwards are comparable
    with torch.no_grad():
        outputs = m.candidate_outputs(model, cands, STEP)
        scores = m.combination_scores(outputs, combos, STEP)
        assert outputs["masks"].shape == (4, 3, 4, 4) and outputs["masks"].any()
        assert (outputs["patch"] > 0).any()
        for c, row in enumerate(combos.tolist()):
            views = [cands[k] for k in row]
            masks = torch.cat([outputs["masks"][row[0]], outputs["masks"][row[1]]])
            out = model(views, 2, masks=masks)
            expected, _, _ = ibot_loss(*out[:2], *out[2:], masks, m.loss.center, m.loss.patch_center,
                                       m.loss.student_temp, STEP["teacher_temp"], STEP["teacher_patch_temp"],
                                       len(views), reduce=False)
            assert torch.allclose(scores[:, c], expected, atol=1e-4), row


def select(method, cands, resolution=1.0, seed=0, step=STEP):
    selector = HardViewSelector(method.pools(), max_combinations=16, resolution=resolution,
                                size_multiple=method.size_multiple)
    return selector(cands, method, step, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("resolution", [1.0, 0.5])
def test_selected_global_views_keep_their_own_masks(tiny_method, resolution):
    m = tiny_method
    seen = {"select": [], "train": []}
    student = m.model.student
    tokens = student.tokens

    def spy(crops, masks=None):
        seen["train" if torch.is_grad_enabled() else "select"].append(masks)
        return tokens(crops, masks)

    student.tokens = spy
    cands = multicrop_candidates(m, B=6, seed=1)
    sel = select(m, cands, resolution)
    full = sel.outputs["masks"]  # [4 global candidates, B, 4, 4]
    (selection_masks,) = seen["select"]
    assert torch.equal(selection_masks, resize_masks(full.flatten(0, 1), (4, 4) if resolution == 1 else (2, 2)))
    m.training_loss(m.model, sel.views, sel, STEP)
    (train_masks,) = seen["train"]
    assert train_masks.shape == (12, 4, 4)  # the full-size patch grid
    for s in range(2):
        for b in range(6):
            assert torch.equal(train_masks[s * 6 + b], full[sel.indices[b, s], b])
    # the masks differ between candidates, so the check above tells them apart
    assert any(not torch.equal(full[0, b], full[1, b]) for b in range(6))


def test_selection_changes_no_state(tiny_method):
    m, model = tiny_method, tiny_method.model
    model.train()
    centres = (m.loss.center.clone(), m.loss.patch_center.clone())
    state = copy.deepcopy(model.state_dict())
    sel = select(m, multicrop_candidates(m))
    assert sel.scores.shape == (3, 16) and len(sel.views) == 4
    assert torch.equal(m.loss.center, centres[0]) and torch.equal(m.loss.patch_center, centres[1])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(mod.training for mod in model.modules())


def test_reused_teacher_tokens_give_the_identical_step(tmp_path, image_root):
    """One candidate per global slot: the selection's teacher batch is the
    training one, so reusing its tokens changes nothing, bitwise."""
    torch.manual_seed(0)
    m = IBOTMethod(ibot_cfg(tmp_path, image_root, "hvs.enabled=true", "hvs.global_candidates=2"), CPU)
    m.loss.center.copy_(torch.randn(1, 32) * 0.1)
    assert m.reuse_teacher
    other = copy.deepcopy(m)
    other.cfg["hvs"]["reuse_teacher"] = False
    assert not other.reuse_teacher
    cands = multicrop_candidates(m, B=4, seed=3)
    results = []
    for method in (m, other):
        method.model.train()
        torch.manual_seed(5)  # the same masks
        sel = select(method, cands)
        torch.manual_seed(7)  # the same stochastic-depth draws in both training forwards
        loss, _ = method.training_loss(method.model, sel.views, sel, STEP)
        loss.backward()
        grads = [p.grad.clone() for p in method.model.student.parameters() if p.grad is not None]
        results.append((loss.detach(), method.loss.center.clone(), method.loss.patch_center.clone(), grads))
    (la, ca, pa, ga), (lb, cb, pb, gb) = results
    assert torch.equal(la, lb) and torch.equal(ca, cb) and torch.equal(pa, pb)
    assert len(ga) == len(gb) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert not IBOTMethod(ibot_cfg(tmp_path, image_root, "hvs.resolution=0.5"), CPU).reuse_teacher


def test_patch_temperature_warms_up_after_the_mask_start(tmp_path, image_root):
    m = IBOTMethod(ibot_cfg(tmp_path, image_root, "train.epochs=10", "loss.warmup_teacher_temp_epochs=3",
                            "mask.start_epoch=2"), CPU)
    opt = m.build_optimizer(8)
    temps = [m.schedule(opt, StepInfo(e, 0, 4))["teacher_patch_temp"] for e in range(7)]
    assert temps == pytest.approx([0.04, 0.04, 0.04, 0.055, 0.07, 0.07, 0.07])
    assert m.schedule(opt, StepInfo(1, 0, 4))["teacher_temp"] == pytest.approx(0.055)  # [CLS]: from epoch 0
    assert [m.loss.temperatures(e)["teacher_patch_temp"] for e in range(7)] == temps  # the loss module's schedule


def test_schedule_sets_no_attribute(tmp_path, image_root):
    m = IBOTMethod(ibot_cfg(tmp_path, image_root, "train.epochs=3", "mask.start_epoch=1"), CPU)
    assert all("teacher_patch_temp" in v for v in assert_schedule_sets_no_attribute(m))


def test_masks_follow_the_step_passed(tmp_path, image_root):
    """Masks start at ``mask.start_epoch`` of the step handed to the hook,
    whatever ``schedule`` was last called with."""
    torch.manual_seed(0)
    m = IBOTMethod(ibot_cfg(tmp_path, image_root, "hvs.enabled=true", "mask.ratio=[0.5]", "mask.ratio_var=[0.2]",
                            "mask.start_epoch=1", "train.epochs=3"), CPU)
    opt = m.build_optimizer(8)
    cands = multicrop_candidates(m)
    before, after = (StepInfo(e, 0, 4, m.schedule(opt, StepInfo(e, 0, 4))) for e in (0, 1))
    m.schedule(opt, StepInfo(2, 0, 4))  # the last schedule called: masked
    with torch.no_grad():
        assert not m.candidate_outputs(m.model, cands, before)["masks"].any()
        assert m.candidate_outputs(m.model, cands, after)["masks"].any()
    m.schedule(opt, StepInfo(0, 0, 4))  # the last schedule called: unmasked
    views = cands[:1] + cands[2:3] + cands[4:6]  # no selection: the loss draws the masks
    assert m.training_loss(m.model, views, None, after)[1]["mask_ratio"] > 0
    assert m.training_loss(m.model, views, None, before)[1]["mask_ratio"] == 0
    assert not m.draw_masks(6, 0).any() and m.draw_masks(6, 1).any()


def test_loss_module_owns_both_centres(tmp_path, image_root):
    g = torch.Generator().manual_seed(3)
    loss = IBOTLoss(5, center_momentum=0.8, patch_center_momentum=0.7)
    assert sorted(loss.state_dict()) == ["center", "patch_center"]
    cls, patch = torch.randn(6, 5, generator=g), torch.randn(6, 4, 5, generator=g)
    expected = updated_center(loss.center, cls, 0.8), updated_center(loss.patch_center, patch.mean(1), 0.7)
    buffers = loss.center, loss.patch_center
    loss.update_centers(cls, patch)
    assert loss.center is buffers[0] and loss.patch_center is buffers[1]
    assert torch.equal(loss.center, expected[0]) and torch.equal(loss.patch_center, expected[1])
    assert_state_round_trips(lambda: IBOTMethod(ibot_cfg(tmp_path, image_root), CPU), ["center", "patch_center"])


def test_forward_keeps_dinos_signature(tiny_method):
    """IBOT.forward takes DINO's parameters, in order, with their defaults; the
    masks are keyword-only (optional), so a caller of DINO's forward can call it."""
    dino, ibot = inspect.signature(DINO.forward).parameters, inspect.signature(IBOT.forward).parameters
    assert list(ibot.values())[:len(dino)] == list(dino.values())
    extra = list(ibot.values())[len(dino):]
    assert [p.name for p in extra] == ["masks"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None for p in extra)
    model = tiny_method.model.eval()
    views = multicrop_candidates(tiny_method, B=2)[::2][:4]  # 2 global (16 px), 2 local (8 px)
    masks = torch.zeros(4, 4, 4, dtype=torch.bool)
    masks[:, 1, 2] = True
    with torch.no_grad():
        unmasked = model(views, 2)
        masked = model(views, 2, None, masks=masks)
        no_mask = model(views, 2, masks=torch.zeros_like(masks))
        reused = model(views, 2, model.teacher.tokens(views[:2]), masks=masks)
    assert unmasked[1].shape == (4, 16, 32) and masked[1].shape == (4, 32)  # all patches / the masked ones
    # the head sees [cls + all patches] without masks and [cls] with an empty mask: BLAS may round
    # batches of different sizes differently, so equal up to float rounding
    torch.testing.assert_close(unmasked[0], no_mask[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unmasked[0], masked[0], rtol=1e-3, atol=1e-4)
    assert all(torch.equal(x, y) for x, y in zip(masked, reused))


def test_mask_token_is_trained_with_weight_decay_as_ibots(tmp_path, image_root):
    m = IBOTMethod(ibot_cfg(tmp_path, image_root), CPU)
    decayed, plain = m.build_optimizer(8).param_groups
    token = m.model.student.mask_token
    assert any(p is token for p in decayed["params"]) and not any(p is token for p in plain["params"])
    assert all(p is not m.model.teacher.mask_token for g in (decayed, plain) for p in g["params"])


def test_ibot_config_errors(tmp_path, image_root):
    with pytest.raises(ValueError, match="model.arch='resnet18': must be one of"):
        IBOTMethod(ibot_cfg(tmp_path, image_root, "model.arch=resnet18"), CPU)
    with pytest.raises(ValueError, match="use_bn_in_head"):
        IBOTMethod(ibot_cfg(tmp_path, image_root, "model.use_bn_in_head=true"), CPU)
    with pytest.raises(ValueError, match="multiple of model.patch_size"):
        IBOTMethod(ibot_cfg(tmp_path, image_root, "augment.global_size=18"), CPU)


# --- runs -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, 4])  # inside the first epoch (4 steps), and at its end
def test_exact_resume_with_both_centres(tmp_path, image_root, stop):
    args = ("train.epochs=2", "hvs.enabled=true", "hvs.max_combinations=8", "loss.warmup_teacher_temp_epochs=2")
    assert_exact_resume(lambda out, *o: ibot_cfg(out, image_root, *o), IBOTMethod, tmp_path, args, stop,
                        ["center", "patch_center"])


@pytest.mark.slow
@pytest.mark.parametrize("hvs", ["false", "true"])
def test_short_run_evaluates_with_knn(tmp_path, image_root, hvs):
    out = tmp_path / "r"
    run(ibot_cfg(out, image_root, f"hvs.enabled={hvs}", "train.epochs=1"), IBOTMethod)
    steps = [r for r in read_log(out) if r["type"] == "step"]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    for r in steps:
        assert r["loss"] == pytest.approx(r["loss_cls"] + r["loss_patch"], rel=1e-5)
        assert 0 <= r["mask_ratio"] < 0.5 and "teacher_patch_temp" in r
    if hvs == "true":
        assert all(r["sel_score"] >= r["sel_score_all"] - 1e-6 for r in steps)
    teacher, info = ckpt_io.load_backbone(out / "checkpoint.pth")
    state = ckpt_io.load(out / "checkpoint.pth")["model"]
    assert info["method"] == "ibot" and info["arch"] == "vit_tiny/4" and info["image_size"] == 16
    assert torch.equal(teacher.state_dict()["cls_token"], state["teacher.backbone.cls_token"])
    assert state["student.mask_token"].shape == (1, 192)
    assert_knn_evaluates(out / "checkpoint.pth", tmp_path)


@pytest.mark.slow
def test_torchrun_two_processes_hvs(tmp_path, image_root):
    out = tmp_path / "ddp"
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ibot.main",
            "--output-dir", str(out), "--data-dir", str(image_root), "data.dataset=imagefolder", *TINY,
            "train.batch_size=8", "train.epochs=1", "data.num_workers=0", "hvs.enabled=true",
            "run.log_every=1", env={"GLOO_SOCKET_IFNAME": "lo"})
    assert r.returncode == 0, r.stderr[-3000:]
    state = ckpt_io.load(out / "checkpoint.pth")
    assert state["step"] == 4 and state["method_state"]["patch_center"].shape == (1, 32)
