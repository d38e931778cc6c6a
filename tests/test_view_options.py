"""The view options of the paper's Section 5: the manual IoU policy (Table 5),
static colour augmentation (Fig. 4 right), the selection log of runs without
selection, and the collapse measure every method logs (Appendix F.2)."""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from common.views.augment import (P, PARAM_NAMES, IoUPolicy, IoUPolicyError, MultiViewDataset, MultiViewTransform, ViewRecipe,
                            box_iou, pair_iou)
from common.engine.config import ConfigError, load_yaml
from common.hvs import HardViewSelector
from common.numerics import collapse_std
from common.engine.runtime import EpochSampler, one_line
from common.engine.train import run
from simsiam.method import SimSiamMethod
from tests.helpers import ROOT, TINY, Hooks, cli, read_log, tiny_cfg


def image(w=48, h=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------
# the IoU policy
# ----------------------------------------------------------------------------
def test_pair_iou_by_hand():
    assert pair_iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert pair_iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert pair_iou((2, 3, 4, 5), (2, 3, 4, 5)) == 1.0
    rng = random.Random(0)
    for _ in range(200):  # the same as box_iou on param rows
        boxes = [(rng.randint(0, 20), rng.randint(0, 20), rng.randint(1, 20), rng.randint(1, 20)) for _ in range(2)]
        rows = torch.zeros(2, len(PARAM_NAMES))
        for row, box in zip(rows, boxes):
            row[[P["crop_x"], P["crop_y"], P["crop_w"], P["crop_h"]]] = torch.tensor(box, dtype=torch.float32)
        assert pair_iou(*boxes) == pytest.approx(box_iou(rows[0], rows[1]).item(), rel=1e-6)


def test_threshold_goes_linearly_from_start_to_end():
    p = IoUPolicy(0.3, 0.35, total_steps=11)
    assert [round(p.threshold(s), 4) for s in (0, 5, 10)] == [0.3, 0.325, 0.35]
    inverse = IoUPolicy(1.0, 0.1, total_steps=4)
    assert [round(inverse.threshold(s), 4) for s in range(4)] == [1.0, 0.7, 0.4, 0.1]


@pytest.mark.parametrize("start,end", [(0.3, 0.35), (0.1, 0.8), (1.0, 0.1)])
def test_every_drawn_pair_lies_in_the_scheduled_range(start, end):
    policy = IoUPolicy(start, end, total_steps=10)
    transform = MultiViewTransform([(ViewRecipe(size=8), 2)], policy=policy)
    img = image()
    for step in range(10):
        for seed in range(30):
            _, params = transform(img, random.Random(seed * 100 + step), step=step)
            assert box_iou(params[0], params[1]) <= policy.threshold(step) + 1e-6
            assert params[0, P["draws"]] >= 1 and params[0, P["draws"]] == params[1, P["draws"]]


def test_the_policy_redraws_and_without_it_pairs_overlap_more():
    img = image()
    plain = MultiViewTransform([(ViewRecipe(size=8), 2)])
    policy = MultiViewTransform([(ViewRecipe(size=8), 2)], policy=IoUPolicy(0.2, 0.2, total_steps=1))
    iou_plain = [float(box_iou(*plain(img, random.Random(s))[1][:2])) for s in range(200)]
    draws = [policy(img, random.Random(s), step=0)[1][0, P["draws"]].item() for s in range(200)]
    assert max(iou_plain) > 0.2  # the standard augmentation makes pairs the policy rejects
    assert max(draws) > 1 and np.mean(draws) > 1


def test_alternating_mode_alternates():
    policy = IoUPolicy(0.1, 0.1, total_steps=20, alternate=True)
    transform = MultiViewTransform([(ViewRecipe(size=8), 2)], policy=policy)
    img = image()
    for step in range(6):
        rows = [transform(img, random.Random(s), step=step)[1] for s in range(40)]
        ious = [float(box_iou(r[0], r[1])) for r in rows]
        draws = [r[0, P["draws"]].item() for r in rows]
        if step % 2 == 0:
            assert min(draws) >= 1 and max(ious) <= 0.1 + 1e-6
        else:  # the standard augmentation: no redraw, pairs above the threshold
            assert max(draws) == 0 and max(ious) > 0.1


def test_unreachable_range_is_a_clear_error():
    recipe = ViewRecipe(size=8, scale=(0.9, 1.0))  # two crops of >= 90 % of the image overlap by >= 80 %
    transform = MultiViewTransform([(recipe, 2)], policy=IoUPolicy(0.05, 0.05, max_draws=50))
    with pytest.raises(IoUPolicyError, match=r"IoU <= 0.050.*in 50 draws.*iou_policy") as err:
        transform(image(), random.Random(0), step=0)
    assert isinstance(err.value, ConfigError)  # a user error: exit status 2, one line


def test_the_policy_needs_the_step():
    transform = MultiViewTransform([(ViewRecipe(size=8), 2)], policy=IoUPolicy())
    with pytest.raises(RuntimeError, match="step"):
        transform(image(), random.Random(0))


def test_sampler_tags_samples_with_their_step():
    plain = list(EpochSampler(20, batch_size=4, seed=0))
    sampler = EpochSampler(20, batch_size=4, seed=0, tag_steps=True, steps_per_epoch=5)
    tagged = list(sampler)
    assert [i for i, _ in tagged] == plain and [s for _, s in tagged] == [k // 4 for k in range(20)]
    sampler.set_epoch(2, skip_batches=3)  # resumed inside epoch 2: steps 13 and 14 are left
    assert sorted({s for _, s in sampler}) == [13, 14]
    ds = MultiViewDataset([(image(), 0)] * 4, MultiViewTransform([(ViewRecipe(size=8), 2)],
                                                                 policy=IoUPolicy(0.3, 0.3)))
    views, params, label, index = ds[(2, 7)]
    assert index == 2 and len(views) == 2 and params[0, P["draws"]] >= 1


# ----------------------------------------------------------------------------
# static colour augmentation
# ----------------------------------------------------------------------------
def test_static_colour_shares_one_jitter_and_renders_own_colours():
    recipe = ViewRecipe(size=8, jitter_p=1.0, gray_p=0.0, blur_p=0.0)
    views, params = MultiViewTransform([(recipe, 4)], static_color=True)(image(), random.Random(3))
    assert len(views) == 8 and params.shape[0] == 4
    colour = ["brightness", "contrast", "saturation", "hue", "order0", "order1", "order2", "order3"]
    shared = params[:, [P[c] for c in colour]]
    assert torch.equal(shared, shared[:1].expand_as(shared))  # one colour for all candidates
    assert len({tuple(params[k, [P["crop_x"], P["crop_y"], P["crop_w"], P["crop_h"]]].tolist())
                for k in range(4)}) > 1  # their crops differ
    candidates, renders = views[:4], views[4:]
    assert all(not torch.allclose(c, r) for c, r in zip(candidates, renders))  # own colour for training

    # without colour distortion the two renderings of a candidate are the same image
    plain = ViewRecipe(size=8, jitter_p=0.0, gray_p=0.0, blur_p=0.5)
    views, _ = MultiViewTransform([(plain, 3)], static_color=True)(image(), random.Random(3))
    assert all(torch.equal(c, r) for c, r in zip(views[:3], views[3:]))


def test_selector_trains_on_the_renderings_of_the_chosen_candidates():
    B, V = 5, 4
    candidates = [torch.full((B, 1), float(v)) for v in range(V)]
    renders = [torch.full((B, 1), 10.0 + v) for v in range(V)]
    selector = HardViewSelector([(V, 2)])

    def scores(outputs, combos):  # the pair (1, 3) is the hardest for every sample
        return (torch.stack(outputs)[combos].squeeze(-1).prod(1)).T

    sel = selector(candidates, Hooks(torch.nn.Identity(), lambda c: c, scores), renders=renders)
    assert sel.rendered and sel.indices.tolist() == [[2, 3]] * B
    assert torch.equal(sel.views[0], renders[2]) and torch.equal(sel.views[1], renders[3])
    plain = selector(candidates, Hooks(torch.nn.Identity(), lambda c: c, scores))
    assert not plain.rendered and torch.equal(plain.views[0], candidates[2])


# ----------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------
def test_options_are_checked_against_hvs(tmp_path, image_root):
    with pytest.raises(ConfigError, match="static_color.*hvs.enabled=true"):
        run(tiny_cfg(SimSiamMethod, tmp_path / "a", image_root, "hvs.static_color=true"), SimSiamMethod)
    with pytest.raises(ConfigError, match="iou_policy.*hvs.enabled=false"):
        run(tiny_cfg(SimSiamMethod, tmp_path / "b", image_root, "iou_policy.enabled=true", "hvs.enabled=true"),
            SimSiamMethod)
    with pytest.raises(ConfigError, match="iou_policy.start"):
        tiny_cfg(SimSiamMethod, tmp_path / "c", image_root, "iou_policy.start=1.5")


def test_analysis_configs_resolve_for_every_method():
    from common.engine.config import COMMON_SPEC, resolve
    from common.engine.registry import get_method

    configs = sorted((ROOT / "configs" / "analysis").glob("*.yaml"))
    assert {"easy.yaml", "n_views_8.yaml", "static_color.yaml"} <= {c.name for c in configs}
    for name in ("simsiam", "simclr", "dino", "ibot"):
        cls = get_method(name)
        for c in configs:
            keys = set(load_yaml(c))
            if "hvs.n_views" in keys and "hvs.n_views" not in cls.spec:
                continue  # the pair methods' N; multi-crop names its candidates per crop
            resolve({**COMMON_SPEC, **cls.spec}, [ROOT / "configs" / f"{name}_small.yaml", c])


# ----------------------------------------------------------------------------
# runs: the selection log without selection, the collapse measure
# ----------------------------------------------------------------------------
def test_collapse_std():
    torch.manual_seed(0)
    d = 64
    assert collapse_std(torch.randn(4096, d)).item() == pytest.approx(d ** -0.5, rel=0.05)
    assert collapse_std(torch.ones(16, d) * 3.0).item() == 0.0
    assert collapse_std(torch.randn(1, d).expand(16, d) * torch.rand(16, 1) + 0.0).item() < 1e-6  # one direction


@pytest.mark.slow
def test_policy_run_logs_its_views_draws_and_collapse_measure(tmp_path, image_root):
    out = tmp_path / "policy"
    run(tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=2", "iou_policy.enabled=true",
                 "iou_policy.start=0.5", "iou_policy.end=0.2", "iou_policy.alternate=true"), SimSiamMethod)
    steps = [r for r in read_log(out) if r["type"] == "step"]
    assert [r["iou_policy_on"] for r in steps] == [True, False] * 4
    assert steps[0]["iou_threshold"] == pytest.approx(0.5) and steps[-1]["iou_threshold"] == pytest.approx(0.2)
    for r in steps:
        assert 0 < r["out_std"] < 1
        if r["iou_policy_on"]:
            assert r["policy_draws"] >= 1 and r["policy_iou"] <= r["iou_threshold"] + 1e-6
        else:
            assert r["policy_draws"] == 0
    logs = [np.load(f) for f in sorted((out / "selection").glob("*.npz"))]  # one per checkpoint (epoch)
    assert [log["step"].tolist() for log in logs] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for log in logs:
        assert log["params"].shape[:3] == (4, 8, 2) and log["combos"].tolist() == [[[0, 1]]] * 4
        assert np.isnan(log["scores"]).all() and (log["choice"] == 0).all()
        iou = box_iou(torch.from_numpy(log["params"][:, :, 0]), torch.from_numpy(log["params"][:, :, 1]))
        on = log["params"][:, 0, 0, P["draws"]] > 0
        assert on.tolist() == [True, False] * 2 and (iou[on] <= 0.5 + 1e-6).all()
    # the end of the log, for the summary (analysis.collapse)
    from analysis.collapse import main as collapse

    assert collapse(["--run", str(out), "--output", str(tmp_path / "train.json")]) == 0
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["method"] == "simsiam" and report["steps"] == 8
    assert report["last"]["out_std"] == pytest.approx(np.mean([r["out_std"] for r in steps[-3:]]))
    assert collapse(["--run", str(tmp_path / "nothing"), "--output", str(tmp_path / "x.json")]) == 2


@pytest.mark.slow
def test_static_colour_run_and_unreachable_policy_from_the_command_line(tmp_path, image_root):
    out = tmp_path / "static"
    run(tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=1", "hvs.enabled=true", "hvs.static_color=true"),
        SimSiamMethod)
    (npz,) = (out / "selection").glob("*.npz")
    params = np.load(npz)["params"]
    assert params.shape[2] == 4 and (params[..., P["brightness"]] == params[..., :1, P["brightness"]]).all()
    r = cli("-m", "simsiam.main", "--output-dir", str(tmp_path / "x"), "--data-dir", str(image_root),
            *[o for o in TINY if not o.startswith("data.num_workers")], "data.num_workers=1",
            "iou_policy.enabled=true", "iou_policy.start=0", "iou_policy.end=0", "augment.scale=[0.9,1.0]",
            "iou_policy.max_draws=20")
    assert r.returncode == 2, r.stderr
    assert "in 20 draws" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_one_line_strips_worker_tracebacks():
    err = IoUPolicyError("Caught IoUPolicyError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                         "call last):\n  File x\ncommon.views.augment.IoUPolicyError: IoU policy: no pair\n")
    assert one_line(err) == "IoU policy: no pair"
    assert one_line(ValueError("plain")) == "plain"


@pytest.mark.slow
def test_multicrop_runs_with_static_colour_and_the_policy_on_the_global_crops(tmp_path, image_root):
    """DINO: static colour shares one colour over every candidate (global and local) and trains on the
    renderings (the teacher's selection outputs are not reused); the IoU policy holds the global crops."""
    from dino.method import DINOMethod
    from tests.helpers import dino_cfg

    static = tmp_path / "static"
    run(dino_cfg(static, image_root, "train.epochs=1", "hvs.enabled=true", "hvs.static_color=true"), DINOMethod)
    (npz,) = (static / "selection").glob("*.npz")
    params = np.load(npz)["params"]  # [steps, B, 2 + 2 + 4 candidates, P]
    assert params.shape[2] == 8
    assert (params[..., P["brightness"]] == params[..., :1, P["brightness"]]).all()
    assert all(np.isfinite(r["loss"]) for r in read_log(static) if r["type"] == "step")

    policy = tmp_path / "policy"
    run(dino_cfg(policy, image_root, "train.epochs=1", "iou_policy.enabled=true", "iou_policy.start=0.4",
                 "iou_policy.end=0.4"), DINOMethod)
    (npz,) = (policy / "selection").glob("*.npz")
    params = torch.from_numpy(np.load(npz)["params"])  # baseline: 2 global crops, then 2 local crops
    assert params.shape[2] == 4 and (box_iou(params[:, :, 0], params[:, :, 1]) <= 0.4 + 1e-6).all()
    assert (params[:, :, :2, P["draws"]] >= 1).all() and (params[:, :, 2:, P["draws"]] == 0).all()
