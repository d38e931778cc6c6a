"""VICReg with and without Hard View Selection, as the shared loop sees it.

Recipe (Bardes et al. 2022, Section 4.1-4.2 and App. C; official
``main_vicreg.py``): Barlow Twins' setting (:data:`barlowtwins.method.SHARED_SPEC`):
ResNet-50 (zero-init residual), expander 8192-8192-8192, BYOL's augmentation
with one recipe per view, LARS (momentum 0.9, trust coefficient 1e-3,
BatchNorm and bias parameters excluded from weight decay and adaptation),
weight decay 1e-6, one learning rate 0.2 x batch/256 for all parameters, 10
epochs of linear warm-up then a cosine decay to 1/1000 of it, per step; batch
2048 for 1000 epochs (the code's default: 100).  Loss coefficients lambda =
mu = 25, nu = 1 (:mod:`vicreg.loss`).

HVS as Barlow Twins' (candidates per view recipe, (N/2)^2 pairs); the
per-sample score ``hvs.score`` is VICReg's own: :func:`vicreg.loss.pair_scores`.
The three loss terms are logged (``inv``, ``var``, ``cov``).
"""
from barlowtwins.method import SHARED_SPEC, BarlowTwinsMethod
from common.engine.config import setting
from common.engine.method import BenchSettings
from common.numerics import collapse_std
from common.engine.schedules import scaled_lr
from vicreg.loss import pair_scores, vicreg_loss
from vicreg.model import VICReg


class VICRegMethod(BarlowTwinsMethod):
    """VICReg (Bardes, Ponce & LeCun 2022), optionally with Hard View Selection."""

    name = "vicreg"
    run_all_tokens = {"vicreg": "resnet"}
    paper_name = "VICReg"
    linear_protocols = {"resnet": "simclr", "vit": "dino"}  # plain SGD, as SimCLR's
    bench = BenchSettings("pair", "resnet18", paper_setting="beyond the paper: no factor in it")
    model_cls = VICReg
    spec = {
        **SHARED_SPEC,
        "model.proj_hidden": setting(8192, "expander hidden width", range="[1, inf)"),
        "model.dim": setting(8192, "expander output width (the embedding)", range="[1, inf)"),
        "loss.sim_coeff": setting(25.0, "lambda: weight of the invariance term", range="[0, inf)"),
        "loss.std_coeff": setting(25.0, "mu: weight of the variance term", range="[0, inf)"),
        "loss.cov_coeff": setting(1.0, "nu: weight of the covariance term", range="[0, inf)"),
        "loss.gamma": setting(1.0, "target standard deviation of every embedding dimension", range="(0, inf)"),
        "loss.eps": setting(1e-4, "added to the variance under the square root", range="(0, inf)"),
        "optim.weight_decay": setting(1e-6, "LARS weight decay (not on BatchNorm and bias parameters)",
                                      range="[0, inf)"),
    }

    def base_lrs(self, global_batch):
        """One peak learning rate for all parameters."""
        lr = scaled_lr(self.cfg["optim"]["lr"], global_batch)
        return lr, lr

    def combination_scores(self, outputs, combos, step):
        return pair_scores(outputs, combos, self.n_first, score=self.cfg["hvs"]["score"], **self.cfg["loss"])

    def training_loss(self, model, views, selection, step):
        z1, z2 = model(views[0], views[1])
        loss, terms = vicreg_loss(z1, z2, **self.cfg["loss"])
        return loss, {"out_std": collapse_std(z1), **{k: v.detach() for k, v in terms.items()}}
