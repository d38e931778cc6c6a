"""Finetuning (eval/finetune.py): the paper's tables, the model and its
optimizer groups, a short run that trains, exact resume, and errors."""
import json

import pytest
import torch

from common.engine import checkpoint as ckpt_io
from common.backbones import build_vit
from common.engine.config import resolve
from eval.engine import EvalError
from eval.finetune import FINETUNE_SPEC, PROTOCOLS, Classifier, from_table, main

TINY = ["data.num_workers=0", "train.batch_size=8", "run.log_every=1000", "optim.warmup_epochs=1",
        "augment.re_prob=0.0"]


def table_cfg(protocol, dataset, *overrides):
    cfg = resolve(FINETUNE_SPEC, [PROTOCOLS[protocol]], [f"data.dataset={dataset}", *overrides])
    cfg["eval"]["protocol"] = protocol
    return from_table(cfg)


@pytest.mark.parametrize("protocol, dataset, lr, epochs", [
    ("vit", "cifar10", 7.5e-6, 300), ("vit", "cifar100", 7.5e-6, 300), ("vit", "flowers102", 5e-5, 300),
    ("vit", "inat21", 5e-5, 100), ("vit", "food101", 5e-5, 100),
    ("resnet", "cifar10", 7.5e-6, 300), ("resnet", "cifar100", 5e-6, 300), ("resnet", "flowers102", 5e-4, 300),
    ("resnet", "inat21", 7e-5, 100), ("resnet", "food101", 5e-6, 100)])
def test_tables_11_and_12(protocol, dataset, lr, epochs):
    cfg = table_cfg(protocol, dataset)
    assert (cfg["optim"]["lr"], cfg["train"]["epochs"]) == (lr, epochs)
    assert (cfg["optim"]["weight_decay"], cfg["train"]["batch_size"]) == (0.05, 512)


def test_table_values_give_way_to_explicit_ones():
    cfg = table_cfg("vit", "cifar10", "optim.lr=1e-4")
    assert (cfg["optim"]["lr"], cfg["train"]["epochs"]) == (1e-4, 300)
    with pytest.raises(EvalError, match="train.epochs not set.*tiny-imagenet-100.*cifar10, cifar100"):
        table_cfg("resnet", "tiny-imagenet-100", "optim.lr=1e-3")
    assert table_cfg("resnet", "tiny-imagenet-100", "optim.lr=1e-3", "train.epochs=2")["train"]["epochs"] == 2


def test_no_weight_decay_on_biases_norms_and_tokens():
    from timm.optim import create_optimizer_v2

    model = Classifier(build_vit("vit_tiny", patch_size=4, img_size=16, depth=1), 5)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "head.weight" in decayed and "backbone.blocks.0.attn.qkv.weight" in decayed
    assert not decayed & {"backbone.pos_embed", "backbone.cls_token", "head.bias", "backbone.norm.weight"}
    assert model(torch.randn(2, 3, 16, 16)).shape == (1, 2, 5)


@pytest.mark.slow
def test_finetuning_trains_and_reports(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["simsiam"]
    res = main(["--checkpoint", str(ckpt), "--output-dir", str(tmp_path / "ft"), "optim.lr=0.064", "train.epochs=4",
                "augment.auto_augment=", *TINY])
    assert res["eval"] == "finetune" and res["protocol"] == "resnet" and res["method"] == "simsiam"
    assert res["lr"] == pytest.approx(0.064 * 8 / 512) and len(res["history"]) == 4
    assert res["train_loss"][-1] < res["train_loss"][0] - 0.1  # it trains
    saved = torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=True)["model"]
    pretrained = ckpt_io.load_backbone(ckpt)[0].state_dict()
    assert not torch.equal(saved["backbone.conv1.weight"], pretrained["conv1.weight"])  # end to end
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["top1"] == res["top1"]


@pytest.mark.slow
def test_resume_is_exact(tiny_checkpoints, tmp_path):
    """Stopped inside an epoch and resumed, the run ends with the weights and
    logs of an uninterrupted one (seeded augmentations, RandAugment included,
    and stochastic depth)."""
    args = ["--checkpoint", str(tiny_checkpoints["dino"]), "optim.lr=1e-3", "train.epochs=2", "model.drop_path=0.2",
            *TINY]
    whole = main([*args, "--output-dir", str(tmp_path / "a")])
    assert main([*args, "--output-dir", str(tmp_path / "b"), "run.stop_after_steps=5"]) == {}
    resumed = main([*args, "--output-dir", str(tmp_path / "b")])
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert whole["train_loss"] == resumed["train_loss"] and whole["history"] == resumed["history"]


@pytest.mark.slow
def test_errors(tiny_checkpoints, tmp_path):
    with pytest.raises(SystemExit):  # imagefolder is in neither table
        main(["--checkpoint", str(tiny_checkpoints["simsiam"]), "--output-dir", str(tmp_path / "e"), *TINY])
    with pytest.raises(SystemExit):  # the ViT table for a ResNet
        main(["--checkpoint", str(tiny_checkpoints["simsiam"]), "--protocol", "vit", "optim.lr=1e-3",
              "train.epochs=1", *TINY])
    with pytest.raises(SystemExit):  # warm-up longer than the run
        main(["--checkpoint", str(tiny_checkpoints["simsiam"]), "optim.lr=1e-3", "train.epochs=1", *TINY])


def test_randaugment_keeps_at_least_one_posterize_bit():
    """timm's PosterizeIncreasing at magnitude 10 asks Pillow for 0 bits (an error
    in Pillow >= 11): magnitudes are capped below 10, and many draws run through."""
    import random

    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import _posterize_increasing_level_to_arg

    from eval.finetune import RAND_AUGMENT_MAX, train_transform

    assert _posterize_increasing_level_to_arg(10, {})[0] == 0  # what the cap avoids
    assert _posterize_increasing_level_to_arg(RAND_AUGMENT_MAX, {})[0] >= 1
    cfg = resolve(FINETUNE_SPEC, [PROTOCOLS["resnet"]], [])
    cfg["data"]["image_size"] = 16
    transform = train_transform(cfg)
    ops = transform.transforms[1].ops
    assert all(op.magnitude_max == RAND_AUGMENT_MAX for op in ops) and len(ops) == 15
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    for seed in range(400):
        random.seed(seed)
        torch.manual_seed(seed)
        assert transform(image).shape == (3, 16, 16)
