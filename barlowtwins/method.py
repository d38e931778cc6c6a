"""Barlow Twins with and without Hard View Selection, as the shared loop sees it.

Recipe (Zbontar et al. 2021, Section 4 and App. A; official ``main.py``):
ResNet-50 (zero-init residual), projector 8192-8192-8192 (BN and ReLU after the
first two linear layers, no biases), loss weight lambda = 5e-3 (the code's
default: 0.0051) over the global batch; LARS (momentum 0.9, trust coefficient
1e-3; BatchNorm and bias parameters excluded from weight decay and adaptation),
weight decay 1.5e-6 (the code's default: 1e-6), learning rates 0.2 for the
weights and 0.0048 for biases and BatchNorm parameters, both x batch/256, 10
epochs of linear warm-up then a cosine decay to 1/1000 of them, per step;
batch 2048 for 1000 epochs.  Augmentation of BYOL, one recipe per view: crop
scale 0.08-1 (bicubic), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8,
grayscale p 0.2, Gaussian blur (sigma 0.1-2) with p 1.0 / 0.1, solarisation
with p 0 / 0.2 for view 1 / view 2.  LARS is the official one
(:class:`common.engine.optim.LARS`: trust ratio eta |w| / |g + wd w|, momentum on the
adapted update, BatchNorm and bias parameters excluded).

HVS: the two views keep their recipes (:mod:`common.views.two_views`), so the loader
draws ``hvs.n_views / 2`` candidates with each and a combination is one
candidate of each, (N/2)^2 pairs (4 for N = 4).  The score of a pair is per sample,
``hvs.score``: ``invariance`` or ``contribution`` (its term of the batch loss
linearised around the statistics of a random choice), see
:mod:`common.batch_scores` and :func:`barlowtwins.loss.pair_scores`.  The
candidates go through the network one batch at a time, as the training step
forwards each view's batch on its own, so BatchNorm sees what it would see in
training.

VICReg (``vicreg/``) shares this recipe: :data:`SHARED_SPEC`.
"""
from __future__ import annotations

import torch

from barlowtwins.loss import barlow_twins_loss, pair_scores
from barlowtwins.model import BarlowTwins
from common.batch_scores import score_setting
from common.engine.config import setting
from common.hvs import precision_setting
from common.engine.method import BenchSettings, PairMethod
from common.numerics import collapse_std
from common.engine.optim import lars
from common.engine.schedules import cosine_schedule, scaled_lr, set_lr
from common.views.two_views import TwoViews, per_recipe, two_views_spec

#: Barlow Twins' recipe that VICReg shares (VICReg paper, Section 4.1 and App. C): the
#: encoder with a 3-layer MLP, BYOL's two view recipes, LARS with warm-up and cosine decay
SHARED_SPEC = {
    **PairMethod.spec,
    "hvs.precision": precision_setting("fp32", "Default fp32: the agreement of bf16 choices with fp32 ones has not "
                                       "been measured for this method yet (bench/precision.py)."),
    "hvs.score": score_setting("contribution"),
    "model.proj_hidden": setting(8192, "projector hidden width", range="[1, inf)"),
    "model.dim": setting(8192, "projector output width (the embedding)", range="[1, inf)"),
    "optim.lr": setting(0.2, "learning rate of the weights for batch 256 (scaled linearly with the global batch)",
                        range="[0, inf)"),
    "optim.momentum": setting(0.9, "LARS momentum", range="[0, 1]"),
    "optim.trust_coeff": setting(0.001, "LARS trust coefficient eta", range="(0, inf)"),
    "optim.warmup_epochs": setting(10, "epochs of linear learning-rate warm-up before the cosine decay",
                                   type="number", range="[0, inf)"),
    "optim.end_lr_ratio": setting(0.001, "learning rate at the end of the cosine decay, as a fraction of the peak",
                                  range="[0, 1]"),
    **two_views_spec(interpolation="bicubic"),
}


class BarlowTwinsMethod(TwoViews, PairMethod):
    """Barlow Twins (Zbontar et al. 2021), optionally with Hard View Selection."""

    name = "barlowtwins"
    run_all_tokens = {"barlowtwins": "resnet"}
    paper_name = "Barlow Twins"
    linear_protocols = {"resnet": "simclr", "vit": "dino"}  # plain SGD, as SimCLR's
    bench = BenchSettings("pair", "resnet18", paper_setting="beyond the paper: no factor in it")
    model_cls = BarlowTwins
    spec = {
        **SHARED_SPEC,
        "loss.lambd": setting(5e-3, "weight of the redundancy-reduction (off-diagonal) term", range="[0, inf)"),
        "optim.bias_lr": setting(0.0048, "learning rate of biases and BatchNorm parameters for batch 256 (scaled "
                                 "linearly with the global batch)", range="[0, inf)"),
        "optim.weight_decay": setting(1.5e-6, "LARS weight decay (not on BatchNorm and bias parameters)",
                                      range="[0, inf)"),
    }

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.n_first = per_recipe(cfg)  # candidates of view 1 with HVS; view 2's follow them
        m = cfg["model"]
        self.model = self.model_cls(self.build_backbone(), m["dim"], m["proj_hidden"])

    # --- optimisation ---------------------------------------------------------
    def base_lrs(self, global_batch: int) -> tuple:
        """Peak learning rates of the weights and of the biases/BatchNorm parameters."""
        o = self.cfg["optim"]
        return scaled_lr(o["lr"], global_batch), scaled_lr(o["bias_lr"], global_batch)

    def build_optimizer(self, global_batch):
        o = self.cfg["optim"]
        self.peak_lrs = self.base_lrs(global_batch)
        weights_lr, bias_lr = self.peak_lrs  # no decay or adaptation of biases and BatchNorm parameters
        return lars(self.model.parameters(), weights_lr, o["weight_decay"], o["momentum"], o["trust_coeff"],
                    bias_lr=bias_lr)

    def schedule(self, optimizer, step):
        """Linear warm-up from 0 (lr x step / warm-up steps), then cosine decay
        to ``end_lr_ratio`` x the peak, per step; the same factor for both groups."""
        o = self.cfg["optim"]
        total = self.cfg["train"]["epochs"] * step.iters
        factor = cosine_schedule(step.global_step, total, 1.0, o["end_lr_ratio"],
                                 round(o["warmup_epochs"] * step.iters), warmup_shape="ratio")
        lrs = [factor * lr for lr in self.peak_lrs]
        set_lr(optimizer, lrs)
        return {"lr": lrs[0], "bias_lr": lrs[1]}

    # --- hard view selection ------------------------------------------------------
    def candidate_outputs(self, module, candidates, step):
        """Embeddings of every candidate, [V, B, D]: one forward per candidate
        batch, as the training step forwards each view's batch."""
        return torch.stack([module.embed(c) for c in candidates])

    def combination_scores(self, outputs, combos, step):
        return pair_scores(outputs, combos, self.n_first, self.cfg["loss"]["lambd"], self.cfg["hvs"]["score"])

    # --- training -----------------------------------------------------------------
    def training_loss(self, model, views, selection, step):
        z1, z2 = model(views[0], views[1])
        loss, terms = barlow_twins_loss(z1, z2, self.cfg["loss"]["lambd"])
        return loss, {"out_std": collapse_std(z1), **{k: v.detach() for k, v in terms.items()}}
