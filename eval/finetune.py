"""End-to-end finetuning of a pretrained backbone with a linear classifier
(HVS paper Section 4.2 and Appendix G.2; Table 2's "F.T." columns).

The paper's recipe (Tables 11 and 12): AdamW, weight decay 0.05, batch 512,
and per dataset and backbone the learning rate and number of epochs below.
The two tables are ``configs/finetune_vit.yaml`` (DINO ViT-S/16) and
``configs/finetune_resnet.yaml`` (SimSiam ResNet-50), chosen from the
checkpoint's backbone (``--protocol auto``); for a dataset outside the table
give ``optim.lr`` and ``train.epochs``.

    dataset      ViT-S/16 lr  epochs   ResNet-50 lr  epochs
    cifar10      7.5e-6       300      7.5e-6        300
    cifar100     7.5e-6       300      5e-6          300
    flowers102   5e-5         300      5e-4          300
    inat21       5e-5         100      7e-5          100
    food101      5e-5         100      5e-6          100

What the paper does not state we take from DeiT's finetuning recipe (which
DINO's transfer experiments follow): the learning rate is the one at batch 512
and scales linearly with ``train.batch_size``; a linear warm-up of 5 epochs,
then a cosine decay per step (to ``optim.min_lr``, 0); no weight decay on
biases, norms, position embedding and [CLS] token; label smoothing 0.1;
stochastic depth 0.1 for ViTs; training images are random-resized crops
(scale 0.08-1, bicubic) with flips, RandAugment (``rand-m9-mstd0.5-inc1``)
and random erasing (p 0.25), built by timm's ``create_transform``; no mixup
or cutmix.  Test images are resized and centre-cropped.  Every dataset is
resized to the backbone's input size (``data.image_size``, default the
pretraining crop size: 224 for the paper's models).  The classifier is a
linear layer on the ViT's normalised [CLS] token or the ResNet's pooled
features, initialised N(0, 0.01) with a zero bias.  BatchNorm trains (and is
synchronised across GPUs under torchrun).

Finetuning runs long: it checkpoints every epoch (and every
``run.ckpt_every_steps``), and re-running the same command resumes exactly
(augmentations are seeded per image and epoch).  The reported accuracy is the
last epoch's; the best epoch is written beside it, labelled.

Examples::

    python -m eval.finetune --checkpoint runs/dino_vits16_hvs/checkpoint.pth --dataset cifar10 \\
        --data-dir /datasets
    torchrun --nproc_per_node 8 -m eval.finetune --checkpoint runs/simsiam_hvs/checkpoint.pth \\
        --dataset flowers102 --data-dir /datasets
"""
from __future__ import annotations

import sys
import time

import torch
from torch import Tensor, nn

from common.engine import dist
from common.views.augment import IMAGENET_MEAN, IMAGENET_STD
from common.engine.config import setting
from common.engine.schedules import cosine_schedule, set_lr
from eval.engine import (CONFIGS, EVAL_SPEC, EvalError, Trainer, finish, image_data, parse_eval_args, resolve_run,
                         run_main, eval_session)

PROTOCOLS = {"vit": CONFIGS / "finetune_vit.yaml", "resnet": CONFIGS / "finetune_resnet.yaml"}

FINETUNE_SPEC = {
    **EVAL_SPEC,
    "model.drop_path": setting(0.1, "ViT stochastic depth while finetuning (DeiT-S: 0.1); ResNets have none", range="[0, 1)"),
    "optim.lr": setting(0.0, "peak learning rate at batch 512, scaled by train.batch_size / 512 "
                           "(0: the protocol table's value for data.dataset)", range="[0, inf)"),
    "optim.weight_decay": setting(0.05, "AdamW weight decay (not on biases, norms, position embedding, [CLS] token)", range="[0, inf)"),
    "optim.betas": setting([0.9, 0.999], "AdamW betas", range="[0, 1)", length=2),
    "optim.warmup_epochs": setting(5.0, "linear warm-up of the learning rate from 0, in epochs (DeiT: 5)", range="[0, inf)"),
    "optim.min_lr": setting(0.0, "learning rate at the end of the cosine decay", range="[0, inf)"),
    "train.epochs": setting(0, "number of epochs (0: the protocol table's value for data.dataset)", range="[0, inf)"),
    "train.batch_size": setting(512, "global batch size (the paper: 512)", range="[1, inf)"),
    "train.label_smoothing": setting(0.1, "label smoothing of the cross-entropy (DeiT: 0.1)", range="[0, 1)"),
    "train.sync_bn": setting(True, "convert BatchNorm to SyncBatchNorm under DDP on GPU"),
    "augment.scale": setting([0.08, 1.0], "area range of the random resized crop"),
    "augment.interpolation": setting("bicubic", "interpolation of the random resized crop", ["bicubic", "bilinear"]),
    "augment.auto_augment": setting("rand-m9-mstd0.5-inc1", "timm's RandAugment policy ('' for none)"),
    "augment.re_prob": setting(0.25, "probability of random erasing (0: none)", range="[0, 1]"),
    "table.datasets": setting([], "datasets of the paper's table (Table 11 or 12)"),
    "table.lr": setting([], "the table's learning rate per dataset (at batch 512)", range="[0, inf)"),
    "table.epochs": setting([], "the table's number of epochs per dataset", range="[0, inf)"),
}


def auto_protocol(ckpt: dict) -> str:
    """Table 11 for ViTs (the paper's DINO ViT-S/16), Table 12 for ResNets (SimSiam ResNet-50)."""
    return "vit" if str(ckpt["arch"]).startswith("vit") else "resnet"


def from_table(cfg: dict) -> dict:
    """Fill ``optim.lr`` and ``train.epochs`` left at 0 from the protocol's table."""
    t, dataset = cfg["table"], cfg["data"]["dataset"]
    if not len(t["datasets"]) == len(t["lr"]) == len(t["epochs"]):
        raise EvalError("table.datasets, table.lr and table.epochs must have the same length")
    missing = [key for key, value in (("optim.lr", cfg["optim"]["lr"]), ("train.epochs", cfg["train"]["epochs"]))
               if not value]
    if missing:
        if dataset not in t["datasets"]:
            raise EvalError(f"{' and '.join(missing)} not set, and the {cfg['eval']['protocol']} table has no row "
                            f"for dataset {dataset!r} (it has {', '.join(t['datasets']) or 'none'}): "
                            f"pass {' '.join(k + '=...' for k in missing)}")
        row = t["datasets"].index(dataset)
        cfg["optim"]["lr"] = cfg["optim"]["lr"] or t["lr"][row]
        cfg["train"]["epochs"] = cfg["train"]["epochs"] or t["epochs"][row]
    cfg["optim"]["lr"], cfg["train"]["epochs"] = float(cfg["optim"]["lr"]), int(cfg["train"]["epochs"])
    return cfg


class Classifier(nn.Module):
    """Backbone + linear layer on its features (ViT: normalised [CLS] token;
    ResNet: pooled features); logits ``[1, B, C]`` (one head, as the loop expects)."""

    def __init__(self, backbone: nn.Module, num_classes: int, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.normal_(self.head.weight, 0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))[None]

    def no_weight_decay(self) -> set:
        """Parameters timm's optimizer factory keeps out of weight decay (besides 1-D ones)."""
        inner = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in inner}


#: RandAugment magnitudes are capped just below 10: at 10, timm's PosterizeIncreasing
#: keeps 0 bits, which old Pillow turned into a black image and Pillow >= 11 refuses
RAND_AUGMENT_MAX = 9.99


def train_transform(cfg: dict):
    """DeiT's finetuning augmentations, from timm: random resized crop and flip,
    RandAugment (``augment.auto_augment``, with timm's parameters for the image
    size; magnitudes capped at :data:`RAND_AUGMENT_MAX`), tensor, normalisation,
    random erasing."""
    from timm.data import create_transform
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp
    from torchvision import transforms as T

    a, size = cfg["augment"], cfg["data"]["image_size"]
    crop, _, final = create_transform(size, is_training=True, scale=tuple(a["scale"]), interpolation=a["interpolation"],
                                      color_jitter=None, re_prob=a["re_prob"], re_mode="pixel", mean=IMAGENET_MEAN,
                                      std=IMAGENET_STD, separate=True)
    if not a["auto_augment"]:
        return T.Compose([crop, final])
    if not a["auto_augment"].startswith("rand"):
        raise EvalError(f"augment.auto_augment={a['auto_augment']!r}: only timm's RandAugment ('rand-...') or '' is supported")
    hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN),
               "interpolation": str_to_pil_interp(a["interpolation"]), "magnitude_max": RAND_AUGMENT_MAX}
    return T.Compose([crop, rand_augment_transform(a["auto_augment"], hparams), final])


def make_schedule(cfg: dict, peak: float):
    o, epochs = cfg["optim"], int(cfg["train"]["epochs"])

    def schedule(optimizer, epoch, it, iters):
        warmup = round(o["warmup_epochs"] * iters)
        lr = cosine_schedule(epoch * iters + it, epochs * iters, peak, o["min_lr"], warmup)
        set_lr(optimizer, lr)
        return {"lr": lr}

    return schedule


def finetune(cfg, backbone, info, device, out) -> tuple[list, dict]:
    from timm.optim import create_optimizer_v2

    train, test, sizes = image_data(cfg, train_transform(cfg), device)
    model = Classifier(backbone, sizes["num_classes"], int(cfg["run"]["seed"])).to(device)
    if dist.is_dist() and device.type == "cuda" and cfg["train"]["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    peak = cfg["optim"]["lr"] * cfg["train"]["batch_size"] / 512
    o = cfg["optim"]
    optimizer = create_optimizer_v2(model, "adamw", lr=peak, weight_decay=o["weight_decay"], betas=tuple(o["betas"]))
    identity = {"kind": "finetune", "source": info["fingerprint"]}
    trainer = Trainer(cfg, model, lambda net, x: net(x), optimizer, make_schedule(cfg, peak), device, out=out,
                      identity=identity, label_smoothing=cfg["train"]["label_smoothing"])
    history, finished = trainer.fit(train, test, int(cfg["train"]["epochs"]))
    return history, {**sizes, "lr": peak, "lr_at_512": o["lr"], "finished": finished}


def main(argv=None) -> dict:
    def body():
        cfg, backbone, info = parse_eval_args(FINETUNE_SPEC, __doc__.split("\n\n")[0], PROTOCOLS, auto_protocol, argv)
        if cfg["eval"]["protocol"] == "vit" and not hasattr(backbone, "blocks"):
            raise EvalError(f"--protocol vit is for ViT checkpoints; {cfg['eval']['checkpoint']} holds a {info['arch']}")
        cfg = from_table(resolve_run(cfg, info, "finetune"))
        if cfg["optim"]["warmup_epochs"] >= cfg["train"]["epochs"]:
            raise EvalError(f"optim.warmup_epochs={cfg['optim']['warmup_epochs']} must be below "
                            f"train.epochs={cfg['train']['epochs']}")
        with eval_session(cfg, info) as (device, out):
            if dist.is_main():
                print(f"finetuning ({cfg['eval']['protocol']} table) {info['method']} / {info['arch']} "
                      f"({info['which']}) on {cfg['data']['dataset']} at {cfg['data']['image_size']} px: lr "
                      f"{cfg['optim']['lr']:.3g} at batch 512, {cfg['train']['epochs']} epochs -> {out}",
                      file=sys.stderr, flush=True)
            t0 = time.time()
            history, sizes = finetune(cfg, backbone, info, device, out)
            return finish(cfg, info, history, sizes, t0, eval="finetune")

    return run_main("eval.finetune", body)


if __name__ == "__main__":
    main()
