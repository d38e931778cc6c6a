"""Linear probe: a linear classifier trained on the frozen features of a
pretrained backbone (HVS paper Section 3.3 and Appendix G; Table 1's "Lin."
column and Table 2's transfer "Lin." columns).

Each method's own protocol is a YAML file in ``configs/``, chosen from the
checkpoint (``--protocol auto``) or by name:

* ``dino`` (DINO, iBOT; ``configs/linear_dino.yaml``): DINO's ``eval_linear``.
  ViT features are the normalised [CLS] tokens of the last 4 blocks,
  concatenated (``features.n_last_blocks``; DINO uses 4 for ViT-S), or with
  ``features.avgpool_patchtokens`` the last block's [CLS] and its average
  patch token (DINO's ViT-B setting; we concatenate along the feature axis, a
  ``(n + 1) D`` vector, where DINO's code interleaves the two and so breaks
  for n > 1).  ResNets: the global-average-pooled features.  SGD, momentum
  0.9, no weight decay, lr 0.001 x batch / 256 at batch 1024, cosine per
  epoch to 0, 100 epochs.
* ``simsiam`` (``configs/linear_simsiam.yaml``): SimSiam's ``main_lincls``
  with LARS: lr 0.1 x batch / 256 at batch 4096, momentum 0.9, no weight
  decay, cosine per epoch, 90 epochs; the trust ratio applies to the weights
  and not to the bias.
* ``simclr`` (``configs/linear_simclr.yaml``): SimCLR's: SGD with Nesterov
  momentum 0.9, lr 0.1 x batch / 256 at batch 4096, no weight decay, cosine
  per step, 90 epochs.

Common to all: the backbone stays in eval mode (BatchNorm statistics frozen)
and without gradient, and its weights are checked to be unchanged at the end
(SimSiam's sanity check); the classifier starts from N(0, 0.01) weights and a
zero bias; training images are random-resized crops (scale 0.08-1) with
horizontal flips, test images are resized (x256/224 from 96 px up) and
centre-cropped to the backbone's input size (``data.image_size``, default the
pretraining crop size).  The reported accuracy is the last epoch's top-1 /
top-5; the best epoch is written beside it, labelled (DINO's code reports the
best epoch on the test set).

``mode=fast`` computes the features of un-augmented training and test images
once (cached in the output folder) and trains one classifier per learning
rate in one pass (``fast.lr_factors`` x the protocol's rate): with several
rates, ``fast.holdout`` of the training set is held out to choose the rate,
which is then trained on the whole training set and tested.  For small
budgets and sweeps; ``mode=full`` is the protocol.

Examples::

    python -m eval.linear --checkpoint runs/dino_hvs/checkpoint.pth
    python -m eval.linear --checkpoint runs/ss_hvs/checkpoint.pth --dataset cifar100 mode=fast
    torchrun --nproc_per_node 8 -m eval.linear --checkpoint runs/simsiam_hvs/checkpoint.pth \\
        --data-dir /datasets --dataset imagenet
"""
from __future__ import annotations

import math
import sys
import time

import torch
from torch import Tensor, nn
from torchvision import transforms as T

from common.engine import checkpoint as ckpt_io
from common.engine import dist, registry
from common.views.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from common.engine.config import setting
from common.views.data import subset_indices
from common.engine.schedules import cosine_schedule, scaled_lr, set_lr
from eval.engine import (CONFIGS, EVAL_SPEC, EvalError, TensorBatches, Trainer, eval_datasets, finish, image_data,
                         eval_session, parse_eval_args, resolve_run, run_main)

#: the protocols the registered methods declare (``linear_protocols``), each configs/linear_<name>.yaml
PROTOCOLS = {name: CONFIGS / f"linear_{name}.yaml" for name in registry.linear_protocols()}
SWEEP_SEED = 1  # the held-out part of the fast sweep (independent of the subsets' SUBSET_SEED)

LINEAR_SPEC = {
    **EVAL_SPEC,
    "mode": setting("full", "full: the protocol (augmented images through the frozen backbone every epoch); "
                          "fast: features of un-augmented images computed once, several learning rates in one pass",
                  ["full", "fast"]),
    "features.n_last_blocks": setting(4, "ViT: concatenate the normalised [CLS] tokens of the last n blocks (DINO: 4 for ViT-S, 1 for ViT-B)", range="[1, inf)"),
    "features.avgpool_patchtokens": setting(False, "ViT: also concatenate the average patch token of the last block (DINO's ViT-B setting)"),
    "optim.name": setting("sgd", "sgd, or lars (SimSiam's: trust ratio on the weights, not on the bias)", ["sgd", "lars"]),
    "optim.lr": setting(0.001, "learning rate per 256 images (scaled by train.batch_size / 256)", range="[0, inf)"),
    "optim.momentum": setting(0.9, "momentum", range="[0, 1]"),
    "optim.nesterov": setting(False, "Nesterov momentum (SimCLR's)"),
    "optim.weight_decay": setting(0.0, "weight decay (all three protocols: none)", range="[0, inf)"),
    "optim.trust_coeff": setting(0.001, "LARS trust coefficient", range="(0, inf)"),
    "optim.schedule": setting("epoch", "cosine decay to 0, per epoch (DINO, SimSiam) or per step (SimCLR)", ["epoch", "step"]),
    "augment.train": setting("rrc", "training images: rrc (random resized crop + flip, the protocols) or none "
                                  "(the test transform, as the fast mode's features)", ["rrc", "none"]),
    "augment.scale": setting([0.08, 1.0], "area range of the random resized crop"),
    "fast.lr_factors": setting([0.1, 0.3, 1.0, 3.0, 10.0], "fast mode: the learning rates tried, as factors of optim.lr", range="(0, inf)"),
    "fast.holdout": setting(0.1, "fast mode with several rates: class-stratified fraction of the training set held "
                               "out to choose the rate (the chosen rate is then trained on the whole training set)", range="[0, 1)"),
}


def auto_protocol(ckpt: dict) -> str:
    """The pretraining method's protocol for the checkpoint's backbone family, as
    the method declares it (``linear_protocols`` in :mod:`common.engine.registry`):
    DINO's for DINO, DINO with the STN adversary and iBOT (iBOT evaluates as DINO
    does), SimSiam's and SimCLR's for theirs.  The methods beyond the paper take
    the nearest of the three: SimCLR's (SGD, no weight decay, cosine; BYOL's
    protocol is SimCLR's, Barlow Twins' and VICReg's are plain SGD too) for a
    ResNet, DINO's for a ViT (MoCo v3 ViT)."""
    family = "vit" if str(ckpt.get("arch", "")).startswith("vit") else "resnet"
    return registry.get_method(ckpt["method"]).linear_protocols[family]


# ---------------------------------------------------------------------------
# features and classifier
# ---------------------------------------------------------------------------
class FrozenFeatures(nn.Module):
    """The frozen backbone as a feature extractor: always in eval mode (BatchNorm
    statistics frozen), no gradient.

    * ViT: the [CLS] token after the final norm of each of the last
      ``n_last_blocks`` blocks, concatenated; with ``avgpool``, followed by the
      mean of the last block's normalised patch tokens: ``[B, (n + avgpool) D]``.
    * ResNet: the global-average-pooled features ``[B, D]``.
    """

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 4, avgpool: bool = False):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.vit = hasattr(backbone, "blocks")
        if self.vit:
            if not 1 <= n_last_blocks <= len(backbone.blocks):
                raise EvalError(f"features.n_last_blocks={n_last_blocks} must be between 1 and the "
                                f"backbone's {len(backbone.blocks)} blocks")
            self.n, self.avgpool = n_last_blocks, avgpool
            self.dim = backbone.embed_dim * (n_last_blocks + int(avgpool))
        else:
            self.dim = backbone.num_features
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if not self.vit:
            return self.backbone(images).float()
        blocks = self.backbone.forward_intermediates(images, indices=self.n, return_prefix_tokens=True, norm=True,
                                                     output_fmt="NLC", intermediates_only=True)
        out = [cls[:, 0] for _patches, cls in blocks]
        if self.avgpool:
            out.append(blocks[-1][0].mean(dim=1))
        return torch.cat(out, dim=-1).float()

    def describe(self) -> dict:
        if self.vit:
            return {"dim": self.dim, "kind": "vit_cls", "n_last_blocks": self.n, "avgpool_patchtokens": self.avgpool}
        return {"dim": self.dim, "kind": "resnet_avgpool"}


class LinearHeads(nn.Module):
    """``n`` linear classifiers over the same features, logits ``[n, B, C]``;
    every head starts from the same N(0, 0.01) weights (seeded) and zero bias."""

    def __init__(self, dim: int, num_classes: int, n: int = 1, seed: int = 0):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(n))
        for head in self.heads:
            nn.init.normal_(head.weight, 0.0, 0.01, generator=torch.Generator().manual_seed(seed))
            nn.init.zeros_(head.bias)

    def forward(self, features: Tensor) -> Tensor:
        return torch.stack([head(features) for head in self.heads])


def build_optimizer(heads: LinearHeads, cfg: dict, lrs: list) -> torch.optim.Optimizer:
    """The protocol's optimizer with one parameter group per head (its own
    learning rate); LARS adapts the weights and not the bias (SimSiam's)."""
    o = cfg["optim"]
    if o["name"] == "lars":
        from common.engine.optim import LARS

        groups = []
        for head, lr in zip(heads.heads, lrs):
            groups += [{"params": [head.weight], "lr": lr, "base_lr": lr, "adapt": True},
                       {"params": [head.bias], "lr": lr, "base_lr": lr, "adapt": False, "weight_decay": 0.0}]
        return LARS(groups, lr=lrs[0], momentum=o["momentum"], weight_decay=o["weight_decay"],
                    trust_coeff=o["trust_coeff"])
    groups = [{"params": list(head.parameters()), "lr": lr, "base_lr": lr} for head, lr in zip(heads.heads, lrs)]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=o["momentum"], nesterov=o["nesterov"],
                           weight_decay=o["weight_decay"])


def make_schedule(cfg: dict):
    """Cosine from each group's ``base_lr`` to 0, per epoch or per step."""
    per_epoch, epochs = cfg["optim"]["schedule"] == "epoch", int(cfg["train"]["epochs"])

    def schedule(optimizer, epoch, it, iters):
        if per_epoch:
            factor = cosine_schedule(epoch, epochs, 1.0, 0.0)
        else:
            factor = cosine_schedule(epoch * iters + it, epochs * iters, 1.0, 0.0)
        set_lr(optimizer, lambda group: group["base_lr"] * factor)
        return {"lr": optimizer.param_groups[0]["lr"]}

    return schedule


def train_transform(cfg: dict):
    size = cfg["data"]["image_size"]
    if cfg["augment"]["train"] == "none":
        return eval_transform(size)
    return T.Compose([
        T.Lambda(lambda im: im.convert("RGB") if im.mode != "RGB" else im),
        T.RandomResizedCrop(size, scale=tuple(cfg["augment"]["scale"])),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ---------------------------------------------------------------------------
# the two modes
# ---------------------------------------------------------------------------
def check_unchanged(features: FrozenFeatures, info: dict) -> None:
    """SimSiam's sanity check: the probe must not have changed the backbone."""
    if ckpt_io.fingerprint(features.backbone) != info["fingerprint"]:
        raise RuntimeError("the backbone's weights changed during the linear probe: the features were not frozen")


def run_full(cfg, features, info, device, out) -> tuple[dict, dict]:
    """The protocol: augmented images through the frozen backbone every epoch."""
    train, test, sizes = image_data(cfg, train_transform(cfg), device)
    lr = scaled_lr(cfg["optim"]["lr"], cfg["train"]["batch_size"])
    heads = LinearHeads(features.dim, sizes["num_classes"], 1, int(cfg["run"]["seed"])).to(device)
    identity = {"kind": "linear-full", "source": info["fingerprint"]}
    trainer = Trainer(cfg, heads, lambda net, x: net(features(x)), build_optimizer(heads, cfg, [lr]),
                      make_schedule(cfg), device, out=out, identity=identity)
    history, finished = trainer.fit(train, test, int(cfg["train"]["epochs"]))
    check_unchanged(features, info)
    return history, {**sizes, "lr": lr, "finished": finished}


def cached_features(cfg, features, info, device, out) -> dict:
    """Features and labels of the (un-augmented) training and test images,
    computed once and cached in ``<out>/features.pt`` (reused while the
    backbone, dataset, subsets, size and feature settings are the same)."""
    from eval.knn import extract_features

    key = {"fingerprint": info["fingerprint"], "dataset": cfg["data"]["dataset"], "features": features.describe(),
           **{k: cfg["data"][k] for k in ("image_size", "train_subset", "test_subset")}}
    path = out / "features.pt"
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            print(f"features from {path}", file=sys.stderr)
            return cached
    transform = eval_transform(cfg["data"]["image_size"])
    train, test, classes = eval_datasets(cfg, transform, transform)
    cached = {"key": key, "num_classes": classes}
    for split, ds in (("train", train), ("test", test)):
        loader = torch.utils.data.DataLoader(ds, batch_size=min(256, cfg["train"]["batch_size"]), shuffle=False,
                                             num_workers=cfg["data"]["num_workers"], pin_memory=device.type == "cuda")
        print(f"extracting {split} features ({len(ds)} images)", file=sys.stderr, flush=True)
        cached[f"{split}_x"], cached[f"{split}_y"] = extract_features(features, loader, device)
    ckpt_io.save_atomic(cached, path)
    return cached


def run_fast(cfg, features, info, device, out) -> tuple[dict, dict]:
    """Cached features; one classifier per learning rate, the rate chosen on a
    held-out part of the training set, then trained on all of it."""
    if dist.world() > 1:
        raise EvalError("mode=fast runs in one process: launch it without torchrun")
    data = cached_features(cfg, features, info, device, out)
    x, y, tx, ty = (data[k].to(device) for k in ("train_x", "train_y", "test_x", "test_y"))
    seed, bs, epochs = int(cfg["run"]["seed"]), int(cfg["train"]["batch_size"]), int(cfg["train"]["epochs"])
    base = scaled_lr(cfg["optim"]["lr"], bs)
    lrs = [base * f for f in cfg["fast"]["lr_factors"]]
    if not lrs:
        raise EvalError("fast.lr_factors is empty: give at least one factor (e.g. [1.0])")
    schedule, n_classes = make_schedule(cfg), data["num_classes"]

    def fit(rates, train_x, train_y, test_x, test_y):
        heads = LinearHeads(x.shape[1], n_classes, len(rates), seed).to(device)
        trainer = Trainer(cfg, heads, lambda net, f: net(f), build_optimizer(heads, cfg, rates), schedule, device,
                          head_names=[f"lr {r:.3g}" for r in rates])
        history, _ = trainer.fit(TensorBatches(train_x, train_y, bs, seed), TensorBatches(test_x, test_y, bs, shuffle=False),
                                 epochs)
        return trainer, history

    extra = {}
    if len(lrs) > 1:
        holdout = float(cfg["fast"]["holdout"])
        if not 0 < holdout < 1:
            raise EvalError(f"fast.holdout={holdout} must be a fraction in (0, 1) to choose among {len(lrs)} rates")
        held = torch.zeros(len(y), dtype=torch.bool)
        held[subset_indices(y.tolist(), holdout, SWEEP_SEED)] = True
        held = held.to(device)
        print(f"sweep: {len(lrs)} learning rates, {int(held.sum())} of {len(y)} training images held out",
              file=sys.stderr, flush=True)
        trainer, history = fit(lrs, x[~held], y[~held], x[held], y[held])
        on_holdout = history[-1]["heads"]
        on_test = trainer.evaluate(TensorBatches(tx, ty, bs, shuffle=False))
        stable = [h for h in range(len(lrs)) if math.isfinite(on_holdout[h]["loss"])]  # diverged rates drop out
        if not stable:
            raise EvalError(f"every learning rate of the sweep diverged ({lrs}): lower fast.lr_factors")
        best = max(stable, key=lambda h: (on_holdout[h]["top1"], -h))
        extra["sweep"] = [{"lr": lr, "holdout_top1": ho["top1"], "test_top1_for_reference": te["top1"],
                           "diverged": h not in stable}
                          for h, (lr, ho, te) in enumerate(zip(lrs, on_holdout, on_test))]
        extra["holdout"] = {"fraction": holdout, "n": int(held.sum()), "note":
                            "the rate is chosen on these held-out training images, then trained on all of them"}
        lrs = [lrs[best]]
        print(f"chosen learning rate {lrs[0]:.4g} (held-out top-1 {on_holdout[best]['top1']:.2f})",
              file=sys.stderr, flush=True)
    _, history = fit(lrs, x, y, tx, ty)
    check_unchanged(features, info)
    sizes = {"n_train": len(y), "n_test": len(ty), "num_classes": n_classes, "lr": lrs[0], "finished": True, **extra}
    return history, sizes


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def main(argv=None) -> dict:
    def body():
        cfg, backbone, info = parse_eval_args(LINEAR_SPEC, __doc__.split("\n\n")[0], PROTOCOLS, auto_protocol, argv)
        cfg = resolve_run(cfg, info, f"linear_{cfg['mode']}")
        with eval_session(cfg, info) as (device, out):
            f = cfg["features"]
            features = FrozenFeatures(backbone, f["n_last_blocks"], f["avgpool_patchtokens"]).to(device)
            if dist.is_main():
                print(f"linear probe ({cfg['eval']['protocol']} protocol, {cfg['mode']} mode) of {info['method']} / "
                      f"{info['arch']} ({info['which']}) on {cfg['data']['dataset']} at {cfg['data']['image_size']} "
                      f"px, {features.dim} features -> {out}", file=sys.stderr, flush=True)
            t0 = time.time()
            history, sizes = (run_fast if cfg["mode"] == "fast" else run_full)(cfg, features, info, device, out)
            return finish(cfg, info, history, sizes, t0, eval="linear", mode=cfg["mode"],
                          features=features.describe(), optimizer=cfg["optim"]["name"], backbone_unchanged=True)

    return run_main("eval.linear", body)


if __name__ == "__main__":
    main()
