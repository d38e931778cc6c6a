"""MoCo v3: the contrastive loss and the HVS pair scores against direct loops,
the heads, the momentum encoder (schedule, EMA, no gradient), the optimizers
and their schedule, the frozen patch projection, the two augmentation recipes,
the evaluated backbone, keys gathered across two gloo ranks, and short
training runs (exact resume, k-NN, torchrun)."""
import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from common.engine import checkpoint as ckpt_io
from common.views.augment import P
from common.engine.config import ConfigError
from common.hvs import HardViewSelector, pair_combinations, pool_combinations
from common.engine.method import StepInfo
from mocov3.loss import contrastive, mocov3_loss, pair_scores
from mocov3.method import MoCoV3Method
from tests.helpers import assert_exact_resume, assert_knn_evaluates, cli, read_log, tiny_cfg

TINY_VIT = ["model.arch=vit_tiny", "model.patch_size=4", "model.depth=1", "model.proj_layers=3",
            "model.pred_last_bn=true", "optim.name=adamw", "optim.lr=1.5e-4", "optim.weight_decay=0.1",
            "loss.temperature=0.2"]


def tiny_mocov3_cfg(out, data_dir, *overrides):
    """``tests.helpers.tiny_cfg`` for MoCo v3: narrow heads, no warm-up."""
    return tiny_cfg(MoCoV3Method, out, data_dir, "augment.blur_p=[0.5,0.5]", "model.mlp_hidden=32",
                    "model.dim=16", "optim.warmup_epochs=0", "optim.momentum_encoder=0.9", *overrides)


def make(tmp_path, *overrides):
    return MoCoV3Method(tiny_mocov3_cfg(tmp_path, tmp_path, *overrides), torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests.conftest


# --- loss ----------------------------------------------------------------------
def direct_ctr(q, k, t):
    """2T x InfoNCE of every query with its own key as the positive, by a loop: [B]."""
    q = [v / v.norm() for v in q]
    k = [v / v.norm() for v in k]
    out = []
    for i, qi in enumerate(q):
        logits = [float(qi @ kj) / t for kj in k]
        out.append(-2 * t * (logits[i] - math.log(sum(math.exp(s) for s in logits))))
    return torch.tensor(out, dtype=torch.float64)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_contrastive_loss_matches_a_direct_loop():
    q1, q2, k1, k2 = (randn(5, 7, seed=s) for s in range(4))
    for t in (1.0, 0.2):
        assert torch.allclose(contrastive(q1, k2, t, reduce=False), direct_ctr(q1, k2, t), atol=1e-10)
        assert torch.allclose(contrastive(q1, k2, t), direct_ctr(q1, k2, t).mean(), atol=1e-10)
        per_image = direct_ctr(q1, k2, t) + direct_ctr(q2, k1, t)  # symmetrised
        assert torch.allclose(mocov3_loss(q1, q2, k1, k2, t, reduce=False), per_image, atol=1e-10)
        assert torch.allclose(mocov3_loss(q1, q2, k1, k2, t), per_image.mean(), atol=1e-10)
    # the 2T scale: perfectly aligned, well separated pairs approach 0, swapped keys do not
    eye = torch.eye(4, dtype=torch.float64)
    assert mocov3_loss(eye, eye, eye, eye, 0.05) < 1e-6 < mocov3_loss(eye, eye, eye.flip(0), eye.flip(0), 0.05)


def test_keys_carry_no_gradient(tmp_path):
    q1, q2, k1, k2 = (randn(4, 6, seed=s).requires_grad_(True) for s in range(4))
    mocov3_loss(q1, q2, k1, k2, 0.2).backward()
    assert k1.grad is None and k2.grad is None
    assert q1.grad is not None and q1.grad.abs().sum() > 0
    # in the model: the keys come from the momentum encoder without a graph; only
    # the base encoder and the predictor receive gradients
    method = make(tmp_path, *TINY_VIT)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    out = method.model(x1, x2)
    assert out[0].requires_grad and not out[2].requires_grad and not out[3].requires_grad
    mocov3_loss(*out, 0.2).backward()
    model = method.model
    assert all(p.grad is None and not p.requires_grad for p in model.momentum.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert all(p.grad is not None for p in model.base.projector.parameters())


def test_pair_scores_match_each_pair_computed_separately():
    """Pair (k, l) of image i: ctr_i(q^k, key^l) + ctr_i(q^l, key^k), the keys
    of candidate index k (l) of every image being the key set."""
    V, B = 4, 6
    q, k = randn(V, B, 8, seed=10), randn(V, B, 8, seed=11)
    for pairs in (pool_combinations([(2, 1), (2, 1)]), pair_combinations(V)):
        scores = pair_scores(q, k, pairs, 0.2)
        assert scores.shape == (B, len(pairs))
        for c, (a, b) in enumerate(pairs.tolist()):
            assert torch.allclose(scores[:, c], mocov3_loss(q[a], q[b], k[a], k[b], 0.2, reduce=False), atol=1e-10)
            assert torch.allclose(scores[:, c], direct_ctr(q[a], k[b], 0.2) + direct_ctr(q[b], k[a], 0.2), atol=1e-10)


# --- model ---------------------------------------------------------------------
def linear_widths(mlp):
    return [m.out_features for m in mlp if isinstance(m, nn.Linear)]


def test_heads_follow_the_released_code(tmp_path):
    resnet = make(tmp_path).model
    assert linear_widths(resnet.base.projector) == [32, 16]       # 2 layers (ResNet)
    assert linear_widths(resnet.predictor) == [32, 16]
    assert not resnet.base.projector[-1].affine                    # last BN without affine
    assert not isinstance(resnet.predictor[-1], nn.BatchNorm1d)    # no BN after the ResNet predictor
    assert all(m.bias is None for m in resnet.modules() if isinstance(m, nn.Linear))
    vit = make(tmp_path, *TINY_VIT).model
    assert linear_widths(vit.base.projector) == [32, 32, 16]      # 3 layers (ViT)
    assert isinstance(vit.predictor[-1], nn.BatchNorm1d) and not vit.predictor[-1].affine
    for model in (resnet, vit):  # the momentum encoder: a copy of backbone + projector, no predictor
        base, momentum = model.base.state_dict(), model.momentum.state_dict()
        assert base.keys() == momentum.keys() and all(torch.equal(base[n], momentum[n]) for n in base)
        assert not any(n.startswith("predictor") for n in momentum)
    q1, q2, k1, k2 = vit(torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16))
    assert q1.shape == k2.shape == (3, 16)


# --- momentum encoder, optimizers, schedules --------------------------------------
def test_momentum_schedule_and_ema(tmp_path):
    method = make(tmp_path, *TINY_VIT, "optim.momentum_encoder=0.99", "train.epochs=3")
    opt = method.build_optimizer(8)
    iters, total = 5, 15
    got = [method.schedule(opt, StepInfo(e, i, iters))["momentum"] for e in range(3) for i in range(iters)]
    # MoCo v3 updates at the start of step s with 1 - 0.5 (1 + cos(pi s / total)) (1 - m0):
    # our update after step t is its update at the start of step t + 1
    moco = [1 - 0.5 * (1 + math.cos(math.pi * s / total)) * (1 - 0.99) for s in range(1, total + 1)]
    assert got == pytest.approx(moco, rel=0, abs=1e-15)
    assert got[-1] == 1.0 and all(a < b for a, b in zip(got, got[1:]))

    model = method.model
    with torch.no_grad():
        for p in model.base.parameters():
            p.add_(torch.randn_like(p))
    before = {n: t.clone() for n, t in model.momentum.state_dict().items()}
    base = dict(model.base.named_parameters())
    method.after_step(StepInfo(0, 0, 1, {"momentum": 0.9}))
    params = dict(model.momentum.named_parameters())
    for n, t in model.momentum.state_dict().items():
        if n in params:  # parameters: m * momentum + (1 - m) * base
            assert torch.allclose(t, 0.9 * before[n] + 0.1 * base[n].detach(), atol=1e-6)
        else:  # BN buffers are the momentum encoder's own
            assert torch.equal(t, before[n])


def test_lars_groups_and_learning_rate_schedule(tmp_path):
    method = make(tmp_path, "optim.warmup_epochs=2", "train.epochs=10", "optim.lr=0.6")
    opt = method.build_optimizer(512)
    weights, others = opt.param_groups
    assert weights["weight_decay"] == 1e-6 and weights["adapt"] and all(p.ndim > 1 for p in weights["params"])
    assert others["weight_decay"] == 0.0 and not others["adapt"] and all(p.ndim <= 1 for p in others["params"])
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    model = method.model
    assert trained == {id(p) for p in [*model.base.parameters(), *model.predictor.parameters()]}
    assert not trained & {id(p) for p in model.momentum.parameters()}
    # MoCo v3's adjust_learning_rate at the fractional epoch e = epoch + it / iters
    init_lr, iters = 0.6 * 512 / 256, 4
    for epoch in range(10):
        for it in range(iters):
            e = epoch + it / iters
            want = init_lr * e / 2 if e < 2 else init_lr * 0.5 * (1 + math.cos(math.pi * (e - 2) / 8))
            assert method.schedule(opt, StepInfo(epoch, it, iters))["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15)
            assert [g["lr"] for g in opt.param_groups] == [pytest.approx(want, rel=1e-12, abs=1e-15)] * 2


def test_vit_adamw_and_frozen_patch_embedding(tmp_path):
    """AdamW on every trained parameter with weight decay 0.1; the random
    patch projection never changes (``model.frozen_patch_embed``), while
    everything else trains; off, it trains too."""
    for frozen in (True, False):
        torch.manual_seed(0)
        method = make(tmp_path, *TINY_VIT, f"model.frozen_patch_embed={str(frozen).lower()}")
        model = method.model
        opt = method.build_optimizer(256)
        assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
        assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.defaults["lr"] == pytest.approx(1.5e-4)
        embed = [model.base.backbone.patch_embed.proj.weight, model.base.backbone.patch_embed.proj.bias]
        assert all(p.requires_grad is not frozen for p in embed)
        start = {n: t.detach().clone() for n, t in model.state_dict().items()}
        for it in range(2):
            step = StepInfo(0, it, 2, method.schedule(opt, StepInfo(1, it, 2)))  # epoch 1: past the (0) warm-up
            loss, _ = method.training_loss(model, [torch.randn(4, 3, 16, 16) for _ in range(2)], None, step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_step(step)
        now = model.state_dict()
        for prefix in ("base", "momentum"):
            name = f"{prefix}.backbone.patch_embed.proj.weight"
            if frozen and prefix == "base":
                assert torch.equal(now[name], start[name])
            elif frozen:  # m x + (1 - m) x: equal up to rounding
                assert torch.allclose(now[name], start[name], rtol=1e-6, atol=1e-7)
            else:
                assert not torch.allclose(now[name], start[name])
        qkv = "base.backbone.blocks.0.attn.qkv.weight"
        assert not torch.equal(now[qkv], start[qkv])


# --- data, selection, evaluation -------------------------------------------------------
def test_views_keep_their_recipes(tmp_path):
    method = make(tmp_path, *TINY_VIT, "augment.blur_p=[1.0,0.0]", "augment.solarize_p=[0.0,1.0]")
    assert method.pools() == [(2, 1), (2, 1)]
    img = Image.new("RGB", (40, 30), (120, 60, 200))
    for hvs_on, n in ((False, 2), (True, 4)):
        views, params = method.view_transform(hvs_on)(img, random.Random(0))
        assert len(views) == n and all(v.shape == (3, 16, 16) for v in views)
        first, second = params[: n // 2], params[n // 2:]
        assert (first[:, P["blur_sigma"]] > 0).all() and (first[:, P["solarize"]] == 0).all()
        assert (second[:, P["blur_sigma"]] == 0).all() and (second[:, P["solarize"]] == 1).all()
    with pytest.raises(ConfigError, match="hvs.n_views=3 must be even"):
        make(tmp_path, "hvs.n_views=3")


def test_candidate_outputs_and_a_selection_that_changes_nothing(tmp_path):
    method = make(tmp_path, *TINY_VIT)
    model = method.model
    g = torch.Generator().manual_seed(3)
    candidates = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(4)]
    step = StepInfo(0, 0, 1, {"lr": 0.0, "momentum": 0.9})
    model.eval()  # BN on running statistics: one forward over all candidates equals one per candidate
    with torch.no_grad():
        out = method.candidate_outputs(model, candidates, step)
        assert out["q"].shape == out["k"].shape == (4, 4, 16)
        for v, x in enumerate(candidates):
            assert torch.allclose(out["q"][v], model.queries(x), atol=1e-5)
            assert torch.allclose(out["k"][v], model.keys(x), atol=1e-5)
        pairs = pool_combinations(method.pools())
        want = pair_scores(out["q"], out["k"], pairs, method.temperature)
        assert torch.equal(method.combination_scores(out, pairs, step), want)
    model.train()  # as in training: the selection restores the BN statistics and updates nothing
    before = {n: t.clone() for n, t in model.state_dict().items()}
    sel = HardViewSelector(method.pools())(candidates, method, step)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert sel.combos.tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]  # one candidate of each recipe
    assert torch.equal(sel.choice, sel.scores.argmax(1))
    loss, stats = method.training_loss(model, sel.views, sel, step)
    assert loss.ndim == 0 and set(stats) == {"out_std"} and 0 < stats["out_std"] < 1


def test_evaluated_backbone_is_the_base_encoders(tmp_path):
    method = make(tmp_path)
    with torch.no_grad():
        for p in method.model.base.backbone.parameters():
            p.add_(1.0)
    state, cfg = method.model.state_dict(), method.cfg
    assert MoCoV3Method.has_teacher is False  # --which auto: the base encoder, as MoCo v3's linear probe
    student = MoCoV3Method.backbone_from_state(cfg, state, "student")
    teacher = MoCoV3Method.backbone_from_state(cfg, state, "teacher")
    assert torch.equal(student.conv1.weight, method.model.base.backbone.conv1.weight)
    assert torch.equal(teacher.conv1.weight, method.model.momentum.backbone.conv1.weight)
    assert not torch.equal(student.conv1.weight, teacher.conv1.weight)


# --- two ranks -------------------------------------------------------------------------
B, D_IN, D, V, T = 4, 5, 6, 4, 0.2  # per-rank batch, input and feature widths, candidates, temperature


def two_rank_problem():
    """The same seeded data and networks on every process (float64): a query
    network trained by DDP, a fixed key network."""
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2 * B, D_IN, generator=g).double(), torch.randn(2 * B, D_IN, generator=g).double()
    q, k = torch.randn(V, 2 * B, D, generator=g).double(), torch.randn(V, 2 * B, D, generator=g).double()
    torch.manual_seed(1)
    return x1, x2, q, k, nn.Linear(D_IN, D).double(), nn.Linear(D_IN, D).double()


def gather_worker(rank, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        x1, x2, q, k, query_net, key_net = two_rank_problem()
        ddp = nn.parallel.DistributedDataParallel(query_net)
        mine = slice(rank * B, (rank + 1) * B)
        with torch.no_grad():
            k1, k2 = key_net(x1[mine]), key_net(x2[mine])
        q1, q2 = ddp(x1[mine]), ddp(x2[mine])
        loss = mocov3_loss(q1, q2, k1, k2, T)
        local = mocov3_loss(q1, q2, k1, k2, T, gather=False)  # the rank's own keys only
        loss.backward()
        with torch.no_grad():
            scores = pair_scores(q[:, mine], k[:, mine], pair_combinations(V), T)
        torch.save({"loss": loss.detach(), "local": local.detach(), "grads": [p.grad for p in query_net.parameters()],
                    "scores": scores}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
        del ddp
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_gather_the_keys(tmp_path, monkeypatch):
    """Each rank's queries meet the keys of the whole global batch: two
    ranks with half the batch each give the single-process loss, gradients
    and pair scores of the whole batch."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(gather_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x1, x2, q, k, query_net, key_net = two_rank_problem()
    with torch.no_grad():
        k1, k2 = key_net(x1), key_net(x2)
    loss = mocov3_loss(query_net(x1), query_net(x2), k1, k2, T, gather=False)
    loss.backward()
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), loss, atol=1e-12)
    assert not torch.allclose(torch.stack([r["local"] for r in ranks]).mean(), loss, atol=1e-3)
    for r in ranks:
        for got, want in zip(r["grads"], [p.grad for p in query_net.parameters()]):
            assert torch.allclose(got, want, atol=1e-12)
    scores = pair_scores(q, k, pair_combinations(V), T, gather=False)
    assert torch.allclose(torch.cat([r["scores"] for r in ranks]), scores, atol=1e-12)


# --- training runs ---------------------------------------------------------------------------
@pytest.mark.slow
def test_hvs_run_resumes_exactly_and_evaluates(tmp_path, image_root):
    def make_cfg(out, *overrides):
        return tiny_mocov3_cfg(out, image_root, *overrides)

    assert_exact_resume(make_cfg, MoCoV3Method, tmp_path, ["hvs.enabled=true", "train.epochs=2"], stop=3,
                        state_keys=[])
    steps = [r for r in read_log(tmp_path / "a") if r["type"] == "step"]
    assert len(steps) == 8 and all(math.isfinite(r["loss"]) for r in steps)
    assert all(r["sel_score"] >= r["sel_score_all"] - 1e-6 for r in steps)
    assert all(0 < r["momentum"] <= 1 and r["out_std"] > 0 for r in steps)
    backbone, info = ckpt_io.load_backbone(tmp_path / "a" / "checkpoint.pth")
    state = ckpt_io.load(tmp_path / "a" / "checkpoint.pth")["model"]
    assert info["method"] == "mocov3" and info["which"] == "student" and info["hvs"] is True
    assert torch.equal(backbone.state_dict()["conv1.weight"], state["base.backbone.conv1.weight"])
    assert_knn_evaluates(tmp_path / "a" / "checkpoint.pth", tmp_path)


@pytest.mark.slow
def test_torchrun_two_processes_vit_hvs(tmp_path, image_root):
    out = tmp_path / "ddp"
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mocov3.main",
            "--output-dir", str(out), "--data-dir", str(image_root), "data.dataset=imagefolder",
            *TINY_VIT, "model.mlp_hidden=32", "model.dim=16", "augment.size=16", "optim.warmup_epochs=0",
            "train.batch_size=8", "train.epochs=1", "data.num_workers=0", "hvs.enabled=true",
            "run.log_every=1", "run.selection_log_every=1", env={"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    state = ckpt_io.load(out / "checkpoint.pth")
    assert state["step"] == 4 and state["arch"] == "vit_tiny/4"
    weights = state["model"]
    assert torch.allclose(weights["base.backbone.patch_embed.proj.weight"],  # frozen in both encoders
                          weights["momentum.backbone.patch_embed.proj.weight"], rtol=1e-6, atol=1e-7)
    rank1 = sorted((out / "selection").glob("rank1*.npz"))
    assert rank1, "rank 1 wrote no selection log"


# --- MoCo v3's ViT (its vits.py), re-stated from its definitions -------------------------------------
def official_sincos(h, w, dim, temperature=10000.0):
    """vits.py's build_2d_sincos_position_embedding: a (w, h) meshgrid in ij order, one quarter of
    the width per sin / cos of each coordinate, omega_k = 1 / temperature^(k / (dim / 4)), a zero
    row for [CLS]."""
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), emb])[None]


def official_init(vit, patch):
    """vits.py's initialisation, in its order: every Linear (qkv: U(+-sqrt(6 / (out/3 + in))),
    others xavier-uniform; zero bias), the class token N(0, 1e-6), the patch projection
    U(+-sqrt(6 / (3 p^2 + dim))) with zero bias."""
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -val, val)
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)
    val = math.sqrt(6.0 / float(3 * patch * patch + vit.embed_dim))
    nn.init.uniform_(vit.patch_embed.proj.weight, -val, val)
    nn.init.zeros_(vit.patch_embed.proj.bias)


def test_vit_has_mocov3s_fixed_sincos_position_embedding_and_initialisation(tmp_path):
    from common.backbones import build_vit
    from mocov3.model import mocov3_vit, sincos_position_embedding

    for grid, dim in ((8, 192), (14, 384)):
        torch.testing.assert_close(sincos_position_embedding(grid, grid, dim), official_sincos(grid, grid, dim),
                                   rtol=0, atol=0)
    torch.manual_seed(3)
    method = make(tmp_path, *TINY_VIT, "model.depth=2")
    base = method.model.base.backbone
    torch.testing.assert_close(base.pos_embed.detach(), official_sincos(4, 4, 192), rtol=0, atol=0)  # 16 px / 4
    assert not base.pos_embed.requires_grad
    assert torch.equal(method.model.momentum.backbone.pos_embed, base.pos_embed)
    # the initialisation, draw for draw, from the same seed
    ours, ref = build_vit("vit_tiny", 4, 16, depth=2), build_vit("vit_tiny", 4, 16, depth=2)
    torch.manual_seed(5)
    mocov3_vit(ours)
    torch.manual_seed(5)
    with torch.no_grad():
        official_init(ref, 4)
    ref_state = ref.state_dict()
    for name, tensor in ours.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(tensor, ref_state[name]), name
    # and the ranges those definitions give
    qkv = ours.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6 / (192 + 192)) and qkv.abs().max() > 0.9 * math.sqrt(6 / (192 + 192))
    proj = ours.patch_embed.proj.weight
    assert proj.abs().max() <= math.sqrt(6 / (3 * 16 + 192)) and proj.abs().max() > 0.9 * math.sqrt(6 / (3 * 16 + 192))
    assert ours.cls_token.abs().max() < 1e-5 and ours.cls_token.abs().max() > 0


def test_vit_position_embedding_is_never_trained(tmp_path):
    torch.manual_seed(0)
    method = make(tmp_path, *TINY_VIT)
    model = method.model
    opt = method.build_optimizer(256)
    pos = model.base.backbone.pos_embed
    assert all(p is not pos for g in opt.param_groups for p in g["params"])
    start = pos.detach().clone()
    for it in range(2):
        step = StepInfo(0, it, 2, method.schedule(opt, StepInfo(1, it, 2)))
        loss, _ = method.training_loss(model, [torch.randn(4, 3, 16, 16) for _ in range(2)], None, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step)
    assert torch.equal(pos, start)
