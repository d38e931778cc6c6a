"""The linear probe (eval/linear.py) and the loop it shares with finetuning
(eval/engine.py): known accuracy on toy features, frozen backbone, fast and
full modes agree, feature extraction, the protocols' optimizers and
schedules, the learning-rate sweep, errors, and torchrun."""
import json
import math

import pytest
import torch

from common.engine import checkpoint as ckpt_io
from common.views.augment import SeededDataset
from common.backbones import build_resnet, build_vit
from common.engine.config import resolve
from eval.engine import TensorBatches, Trainer, epoch_results, topk_correct
from eval.linear import (LINEAR_SPEC, PROTOCOLS, FrozenFeatures, LinearHeads, build_optimizer, check_unchanged,
                         main, make_schedule)
from tests.helpers import cli

FAST = ["data.num_workers=0", "train.batch_size=8", "run.log_every=1000"]


def linear_cfg(protocol="dino", *overrides):
    return resolve(LINEAR_SPEC, [PROTOCOLS[protocol]], ["run.device=cpu", *overrides])


def train_heads(cfg, x, y, tx, ty, lrs, epochs):
    heads = LinearHeads(x.shape[1], int(y.max()) + 1, len(lrs), seed=0)
    trainer = Trainer(cfg, heads, lambda net, f: net(f), build_optimizer(heads, cfg, lrs), make_schedule(cfg),
                      torch.device("cpu"), verbose=False)
    bs = cfg["train"]["batch_size"]
    history, finished = trainer.fit(TensorBatches(x, y, bs, seed=0), TensorBatches(tx, ty, bs, shuffle=False), epochs)
    assert finished
    return heads, history


# ---------------------------------------------------------------------------
# the probe reaches known accuracies
# ---------------------------------------------------------------------------
def gaussian_classes(n, g, separation):
    """Two classes whose first feature is N(-s, 1) or N(+s, 1); 7 noise features."""
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g)
    x[:, 0] += separation * (2 * y - 1)
    return x, y


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["dino", "simsiam", "simclr"])
def test_probe_reaches_the_bayes_accuracy_of_a_toy_problem(protocol):
    # Bayes-optimal accuracy of N(-1, 1) vs N(+1, 1): Phi(1) = 84.13 %.  Each
    # protocol at its paper learning rate (lr x paper batch / 256), ~1,300 steps.
    g = torch.Generator().manual_seed(0)
    x, y = gaussian_classes(4000, g, 1.0)
    tx, ty = gaussian_classes(4000, g, 1.0)
    cfg = linear_cfg(protocol, "run.log_every=100000")
    lr = cfg["optim"]["lr"] * cfg["train"]["batch_size"] / 256
    cfg["train"]["batch_size"] = 64
    bayes = 100 * 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    _, history = train_heads(cfg, x, y, tx, ty, [lr], epochs=20)
    assert abs(history[-1]["heads"][0]["top1"] - bayes) < 2.0
    # well separated classes: every test sample right
    x, y = gaussian_classes(1000, g, 6.0)
    tx, ty = gaussian_classes(1000, g, 6.0)
    _, history = train_heads(cfg, x, y, tx, ty, [lr], epochs=20)
    assert history[-1]["heads"][0]["top1"] == 100.0


def test_topk_counts_against_a_direct_count():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(3, 50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    top1, top5 = topk_correct(logits, targets)
    for h in range(3):
        ranked = [sorted(range(7), key=lambda c: -logits[h, i, c].item()) for i in range(50)]
        assert top1[h] == sum(r[0] == t for r, t in zip(ranked, targets.tolist()))
        assert top5[h] == sum(t in r[:5] for r, t in zip(ranked, targets.tolist()))
    assert topk_correct(torch.randn(1, 4, 3), torch.zeros(4, dtype=torch.long))[1] == 4  # top-min(5, C)


def test_reported_numbers_are_the_last_epoch_with_the_best_beside():
    history = [{"epoch": e, "train_loss": 1.0, "heads": [{"top1": a, "top5": a + 1, "loss": 0.0}]}
               for e, a in enumerate([50.0, 70.0, 60.0])]
    res = epoch_results(history)
    assert (res["top1"], res["epoch"]) == (60.0, 3)
    assert (res["best_epoch"]["top1"], res["best_epoch"]["epoch"]) == (70.0, 2) and "test set" in res["best_epoch"]["note"]


# ---------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------
def test_vit_features_last_blocks_and_avgpool():
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", patch_size=4, img_size=16, depth=4).eval()
    images = torch.randn(3, 3, 16, 16)
    # direct computation: tokens after each block, through the final norm
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        per_block = []
        for block in vit.blocks:
            x = block(x)
            per_block.append(vit.norm(x))
    four = FrozenFeatures(vit, 4)(images)
    assert four.shape == (3, 4 * 192) and FrozenFeatures(vit, 4).dim == 4 * 192
    assert torch.allclose(four, torch.cat([t[:, 0] for t in per_block], -1), atol=1e-5)
    pooled = FrozenFeatures(vit, 2, avgpool=True)
    out = pooled(images)
    assert out.shape == (3, 3 * 192) and pooled.dim == 3 * 192
    expected = torch.cat([per_block[2][:, 0], per_block[3][:, 0], per_block[3][:, 1:].mean(1)], -1)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(FrozenFeatures(vit, 1)(images), vit(images), atol=1e-5)  # last [CLS] = the backbone's output
    assert FrozenFeatures(vit, 1)(torch.randn(2, 3, 24, 24)).shape == (2, 192)  # other sizes: interpolated positions
    with pytest.raises(Exception, match="n_last_blocks=5"):
        FrozenFeatures(vit, 5)


def test_resnet_features_are_pooled_and_frozen():
    net = build_resnet("resnet18", cifar_stem=True)
    features = FrozenFeatures(net)
    features.train()  # stays in eval mode: BatchNorm statistics do not move
    images = torch.randn(4, 3, 16, 16)
    out = features(images)
    assert out.shape == (4, 512) and not out.requires_grad and not net.training
    assert torch.equal(out, net.eval()(images))
    info = {"fingerprint": ckpt_io.fingerprint(net)}
    check_unchanged(features, info)
    with torch.no_grad():
        net.bn1.running_mean += 1e-3
    with pytest.raises(RuntimeError, match="changed"):
        check_unchanged(features, info)


# ---------------------------------------------------------------------------
# protocols: optimizers and schedules
# ---------------------------------------------------------------------------
def test_lars_adapts_the_weight_and_not_the_bias():
    cfg = linear_cfg("simsiam")
    heads = LinearHeads(6, 3, 1, seed=0)
    w0, b0 = heads.heads[0].weight.detach().clone(), heads.heads[0].bias.detach().clone()
    opt = build_optimizer(heads, cfg, [1.6])
    gw, gb = torch.randn(3, 6), torch.randn(3)
    heads.heads[0].weight.grad, heads.heads[0].bias.grad = gw.clone(), gb.clone()
    opt.step()
    trust = 0.001 * w0.norm() / gw.norm()  # SimSiam's LARS: weight decay 0, first step (no momentum yet)
    assert torch.allclose(heads.heads[0].weight, w0 - 1.6 * trust * gw, atol=1e-7)
    assert torch.allclose(heads.heads[0].bias, b0 - 1.6 * gb, atol=1e-6)


def test_sgd_protocols():
    dino, simclr = build_optimizer(LinearHeads(4, 2), linear_cfg("dino"), [0.1]), \
        build_optimizer(LinearHeads(4, 2), linear_cfg("simclr"), [0.1])
    assert isinstance(dino, torch.optim.SGD) and not dino.param_groups[0]["nesterov"]
    assert simclr.param_groups[0]["nesterov"] and simclr.param_groups[0]["momentum"] == 0.9
    assert dino.param_groups[0]["weight_decay"] == simclr.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("protocol", ["dino", "simclr"])
def test_cosine_per_epoch_or_per_step(protocol):
    cfg = linear_cfg(protocol, "train.epochs=4")
    heads = LinearHeads(4, 2, 2)
    opt = build_optimizer(heads, cfg, [1.0, 0.5])
    schedule, iters = make_schedule(cfg), 5
    for epoch in range(4):
        for it in range(iters):
            schedule(opt, epoch, it, iters)
            t = epoch / 4 if protocol == "dino" else (epoch * iters + it) / (4 * iters)
            expected = 0.5 * (1 + math.cos(math.pi * t))
            assert opt.param_groups[0]["lr"] == pytest.approx(expected)
            assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * expected)


def test_protocol_files_hold_the_papers_settings():
    dino, simsiam, simclr = (linear_cfg(p) for p in ("dino", "simsiam", "simclr"))
    assert (dino["optim"]["lr"], dino["train"]["batch_size"], dino["train"]["epochs"]) == (0.001, 1024, 100)
    assert (simsiam["optim"]["name"], simsiam["optim"]["lr"], simsiam["train"]["batch_size"],
            simsiam["train"]["epochs"]) == ("lars", 0.1, 4096, 90)
    assert (simclr["optim"]["name"], simclr["optim"]["lr"], simclr["train"]["batch_size"],
            simclr["train"]["epochs"], simclr["optim"]["schedule"]) == ("sgd", 0.1, 4096, 90, "step")
    assert dino["features"]["n_last_blocks"] == 4 and not dino["features"]["avgpool_patchtokens"]


def test_seeded_augmentations_depend_on_epoch_and_index_only():
    from torchvision import transforms as T

    base = [(torch.rand(3, 12, 12), 0) for _ in range(3)]
    ds = SeededDataset(base, T.Compose([T.RandomResizedCrop(8), T.RandomHorizontalFlip()]), seed=5)
    first = [ds[i][0] for i in range(3)]
    torch.manual_seed(123)  # other use of the global generator changes nothing
    assert all(torch.equal(ds[i][0], first[i]) for i in reversed(range(3)))
    ds.set_epoch(1)
    assert not all(torch.equal(ds[i][0], first[i]) for i in range(3))


# ---------------------------------------------------------------------------
# the command line on pretrained checkpoints
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_probe_leaves_the_backbone_unchanged(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["simsiam"]
    before = ckpt_io.fingerprint(ckpt_io.load_backbone(ckpt)[0])
    res = main(["--checkpoint", str(ckpt), "--output-dir", str(tmp_path / "lin"), "train.epochs=2", *FAST])
    assert res["protocol"] == "simsiam" and res["mode"] == "full" and res["optimizer"] == "lars"
    assert res["backbone_unchanged"] and res["fingerprint"] == before
    assert ckpt_io.fingerprint(ckpt_io.load_backbone(ckpt)[0]) == before
    assert (res["n_train"], res["n_test"], res["num_classes"], res["features"]["dim"]) == (32, 16, 4, 512)
    assert res["lr"] == pytest.approx(0.1 * 8 / 256)
    saved = json.loads((tmp_path / "lin" / "results.json").read_text())
    assert saved["top1"] == res["top1"] and len(saved["history"]) == 2


@pytest.mark.slow
def test_fast_and_full_modes_agree(tiny_checkpoints, tmp_path):
    """Without augmentation the full mode trains on the same features, batch by
    batch, as the fast mode with one learning rate."""
    ckpt, args = str(tiny_checkpoints["dino"]), [*FAST, "train.epochs=6", "features.n_last_blocks=2"]
    full = main(["--checkpoint", ckpt, "--output-dir", str(tmp_path / "full"), "augment.train=none", *args])
    fast = main(["--checkpoint", ckpt, "--output-dir", str(tmp_path / "fast"), "mode=fast",
                 "fast.lr_factors=[1.0]", *args])
    assert full["protocol"] == fast["protocol"] == "dino" and full["lr"] == fast["lr"]
    assert [(h["top1"], h["top5"]) for h in full["history"]] == [(h["top1"], h["top5"]) for h in fast["history"]]
    assert full["train_loss"] == pytest.approx(fast["train_loss"], rel=1e-4)
    assert full["train_loss"][-1] < full["train_loss"][0]
    assert (tmp_path / "fast" / "features.pt").exists()


@pytest.mark.slow
def test_fast_sweep_chooses_the_rate_on_held_out_training_images(tiny_checkpoints, tmp_path):
    res = main(["--checkpoint", str(tiny_checkpoints["simsiam"]), "--output-dir", str(tmp_path / "s"),
                "mode=fast", "fast.lr_factors=[0.01,1.0,100.0]", "fast.holdout=0.25", "train.epochs=5", *FAST])
    assert [s["lr"] for s in res["sweep"]] == pytest.approx([0.1 * 8 / 256 * f for f in (0.01, 1.0, 100.0)])
    best = max(res["sweep"], key=lambda s: s["holdout_top1"])
    assert res["lr"] == best["lr"] and res["holdout"]["n"] == 8  # a quarter of each class of 8
    assert res["n_train"] == 32 and len(res["history"]) == 5  # the chosen rate retrained on all 32 images


@pytest.mark.slow
def test_errors_name_the_problem(tiny_checkpoints, tmp_path):
    r = cli("-m", "eval.linear")
    assert r.returncode == 2 and "no checkpoint given" in r.stderr
    r = cli("-m", "eval.linear", "--checkpoint", str(tmp_path / "missing.pth"))
    assert r.returncode == 2 and "missing.pth does not exist" in r.stderr
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_checkpoints["simsiam"]), "optim.lr=fast"])
    r = cli("-m", "eval.linear", "--checkpoint", str(tiny_checkpoints["simsiam"]), "--output-dir", str(tmp_path / "x"),
            "--dataset", "flowers102", "data.num_workers=0")
    assert r.returncode == 2 and "flowers102" in r.stderr and "not found" in r.stderr
    r = cli("-m", "eval.linear", "--checkpoint", str(tiny_checkpoints["simsiam"]), "--which", "teacher")
    assert r.returncode == 2 and "no teacher" in r.stderr


@pytest.mark.slow
def test_resume_refuses_another_checkpoint(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "shared")
    main(["--checkpoint", str(tiny_checkpoints["dino"]), "--output-dir", out, "train.epochs=1",
          "features.n_last_blocks=1", *FAST])
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_checkpoints["dino_hvs"]), "--output-dir", out, "train.epochs=1",
              "features.n_last_blocks=1", *FAST])


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tiny_checkpoints, tmp_path):
    """DDP over two gloo processes (each half of every batch, test counts summed)
    gives the one-process result: 32 training images, batches of 8."""
    args = ["--checkpoint", str(tiny_checkpoints["simsiam"]), "train.epochs=2", *FAST]
    one = main([*args, "--output-dir", str(tmp_path / "one")])
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "eval.linear",
            *args, "--output-dir", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["n_test"] == one["n_test"] == 16
    assert [h["top1"] for h in two["history"]] == [h["top1"] for h in one["history"]]
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    a = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "checkpoint.pth", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
