"""DINO with the adversarial STN (stn/method.py, HVS paper Appendix E / Table 6):
the transformation families and their degrees of freedom, the initial crops,
crops rendered from known thetas, the Theta Crops Penalty, the gradient
reversal (the STN's step raises the loss, the student's lowers it), the data
(raw image + full-image copies), the optimizer's STN group and its schedule,
HVS refused, the configs, and short runs whose checkpoints evaluate."""
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.engine import checkpoint as ckpt_io
from common.views.augment import IMAGENET_MEAN, IMAGENET_STD, P
from common.engine.config import COMMON_SPEC, ConfigError, resolve
from common.engine.method import StepInfo
from common.engine.registry import get_method
from common.engine.train import run
from stn.method import (MODES, N_PARAMS, STN, STNDINOMethod, crop_area, initial_raw, render_views, reverse_gradient,
                      tcp_penalty, theta_from_raw)
from tests.helpers import VIT, assert_exact_resume, assert_knn_evaluates, cli, read_log, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
STEP = StepInfo(0, 0, 4, {"lr": 1e-4, "wd": 0.04, "momentum": 0.9, "teacher_temp": 0.05})
TRANSLATION_SCALE = ("translation-scale-sym", "translation-scale")
ROTATION = ("rotation-translation", "rotation-translation-scale", "rotation-translation-scale-sym")
SYM = ("translation-scale-sym", "rotation-translation-scale-sym")


def stn_cfg(out, data_dir, *overrides):
    """ViT-tiny/4 with 2 blocks, 16 px global and 8 px local crops (2 of them)
    from 16 px copies, a tiny head and STN; 4 steps of batch 8 on ``image_root``."""
    return tiny_cfg(STNDINOMethod, out, data_dir, *VIT, "model.out_dim=32", "model.head_hidden=32",
                    "model.head_bottleneck=16", "augment.global_size=16", "augment.local_size=8",
                    "augment.n_local=2", "augment.blur_p=[1.0,0.1,0.5]", "optim.warmup_epochs=0",
                    "optim.momentum_teacher=0.9", "stn.input_size=16", "stn.hidden=4", *overrides)


def random_raw(mode, n=64, seed=0):
    return 2 * torch.randn(n, N_PARAMS[mode], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gram(theta):
    """A^T A of the 2x2 parts [..., 2, 2]: diagonal iff the columns are orthogonal."""
    a = theta[..., :2]
    return a.transpose(-1, -2) @ a


# ---------------------------------------------------------------------------
# the transformation families
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_theta_has_the_family_of_its_mode(mode):
    theta = theta_from_raw(random_raw(mode), mode)
    assert theta.shape == (64, 2, 3)
    a, t, area = theta[:, :, :2], theta[:, :, 2], crop_area(theta)
    assert (t.abs() < 1).all()  # the crop's centre lies inside the image
    if mode in TRANSLATION_SCALE:
        assert (theta[:, 0, 1] == 0).all() and (theta[:, 1, 0] == 0).all()  # no rotation, no shear
        assert (a.diagonal(dim1=1, dim2=2) > 0).all() and (a.diagonal(dim1=1, dim2=2) < 1).all()
        assert (t.abs() <= 1 - a.diagonal(dim1=1, dim2=2) + 1e-12).all()  # the crop stays inside the image
        assert torch.allclose(area, theta[:, 0, 0] * theta[:, 1, 1])
    if mode in SYM:
        g = gram(theta)
        assert torch.allclose(g[:, 0, 0], g[:, 1, 1])  # one scale for both axes
    if mode == "translation-scale":
        assert not torch.allclose(theta[:, 0, 0], theta[:, 1, 1])
    if mode in ROTATION:
        g = gram(theta)
        assert torch.allclose(g[:, 0, 1], torch.zeros(64, dtype=g.dtype), atol=1e-12)  # a scaled rotation
        assert (theta[:, 0, 1].abs() > 1e-3).any()  # the angles are not all 0
        angles = torch.atan2(theta[:, 1, 0], theta[:, 0, 0])
        assert angles.min() < -math.pi / 2 and angles.max() > math.pi / 2
    if mode == "rotation-translation":
        assert torch.allclose(area, torch.ones(64, dtype=area.dtype))
        assert torch.allclose(gram(theta), torch.eye(2, dtype=theta.dtype).expand(64, 2, 2), atol=1e-12)
    if mode == "rotation-translation-scale":
        assert not torch.allclose(gram(theta)[:, 0, 0], gram(theta)[:, 1, 1])  # two scales
    if mode == "affine":
        assert (gram(theta)[:, 0, 1].abs() > 1e-3).any()  # shear: columns not orthogonal
        assert ((a - a.transpose(1, 2)).abs() > 1e-3).any()  # no symmetry between the entries
        assert (a.abs() < 1).all()


@pytest.mark.parametrize("mode", MODES)
def test_every_raw_output_is_a_degree_of_freedom(mode):
    """The Jacobian of theta's 6 entries by the raw outputs has full rank: the
    modes have 3, 4, 3, 5, 4 and 6 degrees of freedom, affine all six entries."""
    raw = random_raw(mode, n=1, seed=3)[0]
    jac = torch.autograd.functional.jacobian(lambda u: theta_from_raw(u, mode).reshape(6), raw)
    assert torch.linalg.matrix_rank(jac).item() == N_PARAMS[mode]


@pytest.mark.parametrize("mode", MODES)
def test_initial_crops_are_centred_unrotated_and_mid_range(mode):
    torch.manual_seed(0)
    areas = [0.7, 0.7, 0.225, 0.225, 0.225]
    stn = STN(mode, areas, hidden=4)
    theta = stn(torch.randn(3, 3, 16, 16)).detach()
    assert theta.shape == (3, 5, 2, 3)
    assert torch.allclose(theta[..., 2], torch.zeros(3, 5, 2), atol=1e-6)  # centred
    assert torch.allclose(theta[..., 0, 1], torch.zeros(3, 5)) and torch.allclose(theta[..., 1, 0], torch.zeros(3, 5))
    expected = torch.ones(5) if mode == "rotation-translation" else torch.tensor(areas)
    assert torch.allclose(crop_area(theta), expected.expand(3, 5), atol=1e-5)
    lo = torch.tensor([0.4, 0.4, 0.05, 0.05, 0.05])
    hi = torch.tensor([1.0, 1.0, 0.4, 0.4, 0.4])
    penalty = tcp_penalty(crop_area(theta), lo, hi)
    assert (penalty[:, :2] == 0).all()
    if mode != "rotation-translation":  # area 1 for every crop: the locals lie outside their range
        assert (penalty == 0).all()
    assert len(initial_raw(mode, 0.5)) == N_PARAMS[mode]


# ---------------------------------------------------------------------------
# views from known thetas
# ---------------------------------------------------------------------------
def test_views_of_known_thetas_are_the_hand_computed_crops():
    """With align_corners=False, scale 0.5 to 4 px of an 8 px image samples
    pixel centres exactly: the central half, or shifted by a translation of
    0.5 (a quarter of the normalised width, 2 px); tx is horizontal."""
    img = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def crop(s, tx, ty, size=4):
        theta = torch.tensor([[s, 0.0, tx], [0.0, s, ty]]).expand(2, 1, 2, 3)
        return render_views([img], theta, [size])[0]

    assert torch.allclose(crop(0.5, 0, 0), img[:, :, 2:6, 2:6], atol=1e-6)
    assert torch.allclose(crop(0.5, 0.5, 0), img[:, :, 2:6, 4:8], atol=1e-6)
    assert torch.allclose(crop(0.5, 0, -0.5), img[:, :, 0:4, 2:6], atol=1e-6)
    assert torch.allclose(crop(1.0, 0, 0, size=8), img, atol=1e-6)  # the identity
    # the same from the mode's parameterisation: s = 0.5 is a raw logit of 0
    theta = theta_from_raw(torch.zeros(2, 1, 3), "translation-scale-sym")
    assert torch.allclose(render_views([img], theta, [4])[0], img[:, :, 2:6, 2:6], atol=1e-6)
    # a rotation by 90 degrees of the whole image
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]).expand(2, 1, 2, 3)
    out = render_views([img], rot, [8])[0]
    assert torch.allclose(out, torch.rot90(img, 1, dims=(2, 3)), atol=1e-6) or \
        torch.allclose(out, torch.rot90(img, -1, dims=(2, 3)), atol=1e-6)


def test_penalty_is_zero_inside_the_range_and_grows_outside():
    area = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.3, 0.4, 0.5, 0.8, 1.0])
    pen = tcp_penalty(area, 0.05, 0.4)
    assert (pen[2:6] == 0).all()
    assert pen[0] > pen[1] > 0 and pen[8] > pen[7] > pen[6] > 0
    assert torch.allclose(pen, torch.tensor([0.05 ** 2, 0.03 ** 2, 0, 0, 0, 0, 0.1 ** 2, 0.4 ** 2, 0.6 ** 2]))
    # per crop ranges broadcast; the area of a rotated, scaled crop is sx * sy
    theta = theta_from_raw(torch.tensor([[0.3, 0.0, 1.0, 0.0, 0.0]]), "rotation-translation-scale")
    s = torch.sigmoid(torch.tensor([0.0, 1.0]))
    assert torch.allclose(crop_area(theta), s.prod().reshape(1))


# ---------------------------------------------------------------------------
# the adversarial game
# ---------------------------------------------------------------------------
@pytest.fixture
def method(tmp_path, image_root):
    """A deterministic method (no stochastic depth) in float64, with an STN
    whose output depends on the image."""
    torch.manual_seed(0)
    m = STNDINOMethod(stn_cfg(tmp_path, image_root, "model.drop_path=0.0"), CPU)
    m.model.double()
    m.loss.double()
    with torch.no_grad():
        m.model.stn.fc.weight.normal_(0, 0.02)
    return m


def fixed_batch(method, B=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(1 + method.n_crops)]


def dino_loss(method, inputs):
    with torch.no_grad():
        return method.losses(method.model, inputs, STEP["teacher_temp"])["dino"].item()


def test_adversarial_step_raises_the_loss_and_the_student_step_lowers_it(method):
    inputs = fixed_batch(method)
    before = dino_loss(method, inputs)
    assert dino_loss(method, inputs) == before  # deterministic
    r = method.losses(method.model, inputs, STEP["teacher_temp"])
    assert r["penalty"].item() == 0.0  # inside the ranges: the DINO loss alone
    (r["dino"] + 10.0 * r["penalty"]).backward()
    stn_params = list(method.model.stn.parameters())
    student_params = [p for p in method.model.student.parameters() if p.grad is not None]
    assert all(p.grad is None for p in method.model.teacher.parameters())
    assert all(p.grad is not None for p in stn_params)
    grads = {id(p): p.grad.clone() for p in stn_params + student_params}

    saved = {k: v.clone() for k, v in method.model.state_dict().items()}
    torch.optim.SGD(stn_params, lr=1e-3).step()  # the STN's step: minimises the reversed loss
    raised = dino_loss(method, inputs)
    assert raised > before

    method.model.load_state_dict(saved)
    for p in stn_params + student_params:
        p.grad = grads[id(p)].clone()
    torch.optim.SGD(student_params, lr=1e-5).step()  # the student's step: the usual descent (gradient norm ~400)
    lowered = dino_loss(method, inputs)
    assert lowered < before


def test_the_stn_gets_exactly_the_negated_gradient(method):
    inputs = fixed_batch(method)
    stn_params = list(method.model.stn.parameters())
    student_params = [p for p in method.model.student.parameters() if p.requires_grad]
    grads = {}
    for reverse in (True, False):
        loss = method.losses(method.model, inputs, STEP["teacher_temp"], reverse=reverse)["dino"]
        grads[reverse] = torch.autograd.grad(loss, stn_params + student_params, allow_unused=True)
    for k, p in enumerate(stn_params + student_params):
        a, b = grads[True][k], grads[False][k]
        if a is None:
            assert b is None
            continue
        sign = -1.0 if k < len(stn_params) else 1.0
        assert torch.allclose(a, sign * b, atol=1e-12, rtol=1e-9)
    assert any(g.abs().sum() > 0 for g in grads[True][:len(stn_params)])
    x = torch.randn(3, requires_grad=True)
    reverse_gradient(x).sum().backward()
    assert torch.equal(x.grad, -torch.ones(3))


def test_the_penalty_pulls_a_crop_back_into_its_range(method):
    """Outside the range the penalty's gradient moves the STN's area back."""
    with torch.no_grad():
        method.model.stn.fc.weight.zero_()
        method.model.stn.fc.bias.zero_()  # s = 0.5: area 0.25, below the global range 0.4-1
    inputs = fixed_batch(method)
    r = method.losses(method.model, inputs, STEP["teacher_temp"])
    assert r["penalty"].item() > 0
    r["penalty"].backward()
    with torch.no_grad():
        for p in method.model.stn.parameters():
            p -= 1.0 * p.grad
    area = method.losses(method.model, inputs, STEP["teacher_temp"])["area"]
    assert (area[:, :2] > 0.25).all()


def test_training_loss_logs_and_updates_the_centre(method):
    inputs = fixed_batch(method)
    loss, stats = method.training_loss(method.model, inputs, None, STEP)
    assert set(stats) == {"dino_loss", "stn_penalty", "area_global", "area_local", "theta_std", "out_std"}
    assert 0 < stats["out_std"].item() < 1
    assert loss.item() == pytest.approx(stats["dino_loss"].item() + 10 * stats["stn_penalty"].item())
    assert stats["area_global"].item() == pytest.approx(0.7, abs=0.05)
    assert stats["area_local"].item() == pytest.approx(0.225, abs=0.05)
    assert stats["theta_std"].item() > 0  # the thetas depend on the image
    assert method.loss.center.abs().sum() > 0


def test_views_and_thetas_stay_in_float32_under_autocast(tmp_path, image_root):
    """Mixed precision (bf16 autocast, as on a GPU): the thetas, the grids and
    the views are float32; the loss is finite and reaches the STN."""
    torch.manual_seed(0)
    m = STNDINOMethod(stn_cfg(tmp_path, image_root), CPU)
    inputs = [x.float() for x in fixed_batch(m)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        views, theta = m.model.views(inputs)
        loss, _ = m.training_loss(m.model, inputs, None, STEP)
    assert theta.dtype == torch.float32 and all(v.dtype == torch.float32 for v in views)
    loss.backward()
    assert math.isfinite(loss.item()) and m.model.stn.fc.bias.grad.abs().sum() > 0


# ---------------------------------------------------------------------------
# data, optimizer, config
# ---------------------------------------------------------------------------
def test_loader_gives_the_raw_image_then_full_image_copies(tmp_path, image_root):
    m = STNDINOMethod(stn_cfg(tmp_path, image_root, "augment.n_local=3"), CPU)
    img = Image.fromarray((torch.rand(20, 20, 3) * 255).to(torch.uint8).numpy())
    views, params = m.view_transform(False)(img, random.Random(0))
    assert len(views) == params.shape[0] == 1 + 2 + 3
    assert all(v.shape == (3, 16, 16) for v in views)
    assert (params[:, P["crop_w"]] == 20).all() and (params[:, P["crop_h"]] == 20).all()  # no crop
    raw = img.resize((16, 16), Image.BICUBIC)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    expected = (torch.tensor(np.array(raw)).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(views[0], expected, atol=1e-5)  # the raw image: no augmentation
    assert params[0, [P["flip"], P["jitter"], P["gray"], P["blur_sigma"], P["solarize"]]].abs().sum() == 0
    for seed in range(6):  # the copies follow their slots' recipes
        _, params = m.view_transform(False)(img, random.Random(seed))
        assert params[1, P["blur_sigma"]] > 0  # global 1: always blurred
        assert (params[3:, P["solarize"]] == 0).all()


def test_hvs_and_the_iou_policy_are_refused(tmp_path, image_root):
    with pytest.raises(ConfigError, match="hvs.enabled=true"):
        STNDINOMethod(stn_cfg(tmp_path, image_root, "hvs.enabled=true"), CPU)
    with pytest.raises(ConfigError, match="stn.mode"):
        stn_cfg(tmp_path, image_root, "stn.mode=shear")
    if "iou_policy.enabled" in COMMON_SPEC:  # the manual IoU policy of Table 5, where the loop has it
        with pytest.raises(ConfigError, match="iou_policy.enabled=true"):
            STNDINOMethod(stn_cfg(tmp_path, image_root, "iou_policy.enabled=true"), CPU)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_stn_group_has_its_own_lr_and_no_weight_decay(tmp_path, image_root, schedule):
    m = STNDINOMethod(stn_cfg(tmp_path, image_root, "optim.warmup_epochs=1", "train.epochs=3", "stn.lr=0.002",
                              f"stn.lr_schedule={schedule}"), CPU)
    opt = m.build_optimizer(8)
    stn_group = [g for g in opt.param_groups if g.get("name") == "stn"]
    assert len(stn_group) == 1 and len(opt.param_groups) == 3
    assert {id(p) for p in stn_group[0]["params"]} == {id(p) for p in m.model.stn.parameters()}
    for epoch, it in ((0, 0), (0, 2), (1, 0), (2, 3)):
        values = m.schedule(opt, StepInfo(epoch, it, 4))
        assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == values["lr"]
        assert stn_group[0]["weight_decay"] == 0.0 and stn_group[0]["lr"] == values["stn_lr"]
        expected = 0.002 * values["lr"] / m.init_lr if schedule == "cosine" else 0.002
        assert values["stn_lr"] == pytest.approx(expected)
    # the STN's gradients are clipped per parameter as the student's
    for p in m.model.stn.parameters():
        p.grad = torch.full_like(p, 10.0)
    m.before_optimizer_step(m.model, StepInfo(1, 0, 4, values))
    assert all(p.grad.norm() <= 3.0 + 1e-4 for p in m.model.stn.parameters())


@pytest.mark.parametrize("name, out", [("dino_stn_small", "runs/small/dino_stn"),
                                       ("dino_stn_cifar10_gpu", "runs/gpu/dino_stn")])
def test_configs_resolve_for_the_stn_method(name, out):
    assert get_method("dino_stn") is STNDINOMethod
    cfg = resolve({**COMMON_SPEC, **STNDINOMethod.spec}, str(ROOT / "configs" / f"{name}.yaml"), [])
    assert cfg["run"]["output_dir"] == out
    assert cfg["model"]["arch"] == "vit_tiny" and cfg["model"]["patch_size"] == 4
    assert cfg["augment"]["global_size"] == cfg["stn"]["input_size"] == 32 and not cfg["hvs"]["enabled"]
    if name.endswith("gpu"):
        assert (cfg["train"]["epochs"], cfg["train"]["batch_size"], cfg["augment"]["n_local"]) == (300, 256, 8)
    else:
        cfg["method"] = STNDINOMethod.name
        m = STNDINOMethod(cfg, CPU)
        assert len(m.view_transform(False).slots) == 4 and m.model.stn.fc.out_features == 10 * 3


# ---------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------
def test_short_run_logs_the_game_and_its_checkpoint_loads(tmp_path, image_root):
    out = tmp_path / "r"
    run(stn_cfg(out, image_root, "train.epochs=1", "stn.mode=affine", "stn.lr=0.01"), STNDINOMethod)
    steps = [r for r in read_log(out) if r["type"] == "step"]
    assert len(steps) == 4
    for row in steps:
        assert all(math.isfinite(row[k]) for k in ("loss", "dino_loss", "stn_penalty", "area_global",
                                                    "area_local", "theta_std", "stn_lr"))
        assert row["loss"] == pytest.approx(row["dino_loss"] + 10 * row["stn_penalty"], rel=1e-5)
    assert steps[0]["stn_penalty"] == 0 and steps[0]["area_global"] == pytest.approx(0.7, abs=1e-5)
    state = ckpt_io.load(out / "checkpoint.pth")
    assert state["method"] == "dino_stn" and any(k.startswith("stn.") for k in state["model"])
    assert not torch.equal(state["model"]["stn.fc.weight"], torch.zeros_like(state["model"]["stn.fc.weight"]))
    teacher, info = ckpt_io.load_backbone(out / "checkpoint.pth")
    student, _ = ckpt_io.load_backbone(out / "checkpoint.pth", which="student")
    assert info["method"] == "dino_stn" and info["arch"] == "vit_tiny/4" and info["image_size"] == 16
    assert info["which"] == "teacher"
    assert torch.equal(teacher.state_dict()["cls_token"], state["model"]["teacher.backbone.cls_token"])
    assert torch.equal(student.state_dict()["cls_token"], state["model"]["student.backbone.cls_token"])


@pytest.mark.slow
def test_command_line_run_evaluates_with_knn_and_linear(tmp_path, image_root):
    out = tmp_path / "cli"
    r = cli("-m", "stn.main", "--output-dir", str(out), "--data-dir", str(image_root), "data.dataset=imagefolder",
            *VIT, "model.out_dim=32", "model.head_hidden=32", "model.head_bottleneck=16", "augment.global_size=16",
            "augment.local_size=8", "augment.n_local=2", "train.batch_size=8", "train.epochs=1",
            "data.num_workers=0", "stn.input_size=16", "stn.hidden=4", "stn.mode=rotation-translation-scale",
            "run.log_every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert ckpt_io.load(out / "checkpoint.pth")["step"] == 4
    assert_knn_evaluates(out / "checkpoint.pth", tmp_path)
    from eval.linear import main as linear_main

    res = linear_main(["--checkpoint", str(out / "checkpoint.pth"), "--protocol", "dino", "--output-dir",
                       str(tmp_path / "lin"), "train.epochs=1", "data.num_workers=0", "train.batch_size=8",
                       "run.log_every=1000", "features.n_last_blocks=2"])
    assert res["method"] == "dino_stn" and 0 <= res["top1"] <= 100
    bad = cli("-m", "stn.main", "--output-dir", str(tmp_path / "bad"), "--data-dir", str(image_root),
              "data.dataset=imagefolder", "hvs.enabled=true")
    assert bad.returncode == 2 and "hvs.enabled=true" in bad.stderr


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, image_root):
    """DDP (gloo, two CPU processes): the STN runs inside the wrapped model's
    forward, so DDP averages its gradients with the student's."""
    out = tmp_path / "ddp"
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "stn.main",
            "--output-dir", str(out), "--data-dir", str(image_root), "data.dataset=imagefolder",
            *VIT, "model.out_dim=32", "model.head_hidden=32", "model.head_bottleneck=16",
            "augment.global_size=16", "augment.local_size=8", "augment.n_local=2", "train.batch_size=8",
            "train.epochs=1", "data.num_workers=0", "stn.input_size=16", "stn.hidden=4", "stn.lr=0.01",
            "run.log_every=1", env={"GLOO_SOCKET_IFNAME": "lo"})
    assert r.returncode == 0, r.stderr[-3000:]
    state = ckpt_io.load(out / "checkpoint.pth")
    assert state["step"] == 4 and state["model"]["stn.fc.weight"].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("stop", [2])
def test_exact_resume_with_the_stn(tmp_path, image_root, stop):
    assert_exact_resume(lambda out, *o: stn_cfg(out, image_root, *o), STNDINOMethod, tmp_path,
                        ("train.epochs=1", "stn.lr=0.01"), stop, ["center"], steps=4)
