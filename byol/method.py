"""BYOL with and without Hard View Selection, as the shared loop sees it.

Recipe (Grill et al. 2020, Section 3 and Appendices B-C): ResNet-50 (zero-init
residual, as this repository's other ResNet methods), projector and predictor
MLPs 4096-256; loss :func:`byol.loss.byol_loss`; LARS (BYOL's: :class:`common.engine.optim.LARS`,
trust ratio eta |w| / |g + wd w|) with lr 0.2 x batch/256, momentum
0.9, trust coefficient 1e-3, weight decay 1.5e-6, biases and BatchNorm
parameters excluded from both weight decay and the adaptation, 10 epochs of
linear warm-up then cosine decay to 0, per step; target EMA rate per step k of
K, tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 with tau_base = 0.996.
Augmentation (Appendix B, Table 6): crop scale 0.08-1 resized bicubic, flip,
colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, then two
recipes: view 1 blur p 1.0 and no solarisation, view 2 blur p 0.1 and
solarisation p 0.2 (``augment.blur_p``, ``augment.solarize_p``).

HVS: BYOL's two views are drawn from different recipes, so the candidates keep
their recipe (:mod:`common.views.two_views`): ``hvs.n_views`` = N candidates, N/2 per
recipe, and a pair is one view-1 candidate and one view-2 candidate, (N/2)^2
pairs (4 with the default N = 4).  The score of a pair is
its per-image BYOL loss, read from one table of cosines between the online
predictions and the target projections of all candidates (one forward of each
network, :func:`byol.loss.pair_scores`).  The target's outputs of the chosen
views are reused in the training step where exact (``hvs.reuse_target``):
full-size selection on the trained rendering, in fp32 or in the training
step's autocast dtype, and no BatchNorm in the target.
A ResNet target has BatchNorm, whose batch statistics differ between the
candidates' forward and the training forward, so with the recipe above the
target runs again on the chosen views.

The EMA moves the target's parameters only; its BatchNorm running statistics
come from its own forward passes (train mode, as BYOL's code).  Evaluated is
the online backbone (``--which auto``/``student``); ``--which teacher`` gives
the target's.
"""
from __future__ import annotations

import torch

from common.backbones import build_resnet, has_batchnorm, load_prefixed
from common.engine.config import setting
from common.hvs import precision_setting
from common.engine.method import BenchSettings, PairMethod, StepInfo
from common.engine.teacher import TeacherMethod
from common.numerics import collapse_std
from common.engine.optim import lars
from common.engine.schedules import cosine_schedule, scaled_lr, set_lr
from common.views.two_views import N_RECIPES, TwoViews, two_views_spec
from byol.loss import byol_loss, pair_scores
from byol.model import BYOL

class BYOLMethod(TwoViews, TeacherMethod, PairMethod):
    """BYOL (Grill et al. 2020), optionally with Hard View Selection."""

    name = "byol"
    run_all_tokens = {"byol": "resnet"}
    paper_name = "BYOL"
    linear_protocols = {"resnet": "simclr", "vit": "dino"}  # BYOL's protocol is SimCLR's
    bench = BenchSettings("pair", "resnet18", paper_setting="beyond the paper: no factor in it")
    momentum_key, reuse_flag = "tau", "reuse_target"
    spec = {
        **PairMethod.spec,
        "model.proj_hidden": setting(4096, "projector hidden width", range="[1, inf)"),
        "model.dim": setting(256, "projection (and prediction) width", range="[1, inf)"),
        "model.pred_hidden": setting(4096, "predictor hidden width", range="[1, inf)"),
        "optim.lr": setting(0.2, "base learning rate for batch 256 (scaled linearly with the global batch)", range="[0, inf)"),
        "optim.momentum": setting(0.9, "LARS momentum", range="[0, 1]"),
        "optim.weight_decay": setting(1.5e-6, "weight decay (not on BatchNorm and bias parameters)", range="[0, inf)"),
        "optim.trust_coeff": setting(0.001, "LARS trust coefficient eta", range="(0, inf)"),
        "optim.trust_clip": setting(False, "clip the LARS trust ratio at 1 / lr (LARC; solo-learn's clip_lr)"),
        "optim.warmup_epochs": setting(10, "epochs of linear learning-rate warm-up before the cosine decay", type="number", range="[0, inf)"),
        "optim.tau_base": setting(0.996, "target EMA rate at step 0 (cosine schedule to 1 at the last step)", range="[0, 1]"),
        "hvs.precision": precision_setting("fp32", "Default fp32: BYOL's bf16 agreement is not measured yet "
                                           "(bench/precision.py)."),
        "hvs.reuse_target": setting(True, "reuse the selection's target projections of the chosen views in the "
                                    "training step where exact (hvs.resolution=1 and no BatchNorm in the target)"),
        **two_views_spec(interpolation="bicubic"),
    }

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        m = cfg["model"]
        self.model = BYOL(self.build_backbone(), m["dim"], m["proj_hidden"], m["pred_hidden"])

    # --- optimisation ---------------------------------------------------------
    def build_optimizer(self, global_batch):
        o = self.cfg["optim"]
        self.init_lr = scaled_lr(o["lr"], global_batch)
        # online + predictor (the target has no gradient); no decay or adaptation of biases and BatchNorm
        return lars(self.model.parameters(), self.init_lr, o["weight_decay"], o["momentum"], o["trust_coeff"],
                    o["trust_clip"])

    def schedule(self, optimizer, step: StepInfo):
        """lr: linear warm-up (lr * k / warm-up steps), then cosine to 0; tau:
        the target's EMA rate; both per step k of K."""
        o = self.cfg["optim"]
        k, total = step.global_step, self.cfg["train"]["epochs"] * step.iters
        lr = cosine_schedule(k, total, self.init_lr, 0.0, round(o["warmup_epochs"] * step.iters),
                             warmup_shape="ratio")
        set_lr(optimizer, lr)
        return {"lr": lr, "tau": cosine_schedule(k, total, o["tau_base"], 1.0)}

    def ema_pairs(self):
        return [(self.model.target, self.model.online)]

    # --- hard view selection ---------------------------------------------------
    def candidate_outputs(self, module, candidates, step):
        """Online predictions and target projections of all candidates, one
        forward of each network: {"online": [V, B, D], "target": [V, B, D]}."""
        V, B, x = len(candidates), len(candidates[0]), torch.cat(candidates)
        q, _ = module.predict(x)
        return {"online": self.per_candidate(q, V, B), "target": self.per_candidate(module.target(x), V, B)}

    def combination_scores(self, outputs, combos, step):
        return pair_scores(outputs["online"], outputs["target"], combos)

    # --- training -----------------------------------------------------------------
    def reuse_exact(self) -> bool:
        """No BatchNorm in the target (see the module docstring)."""
        return not has_batchnorm(self.model.target)

    def training_loss(self, model, views, selection, step):
        # the selection's target projections of the chosen view 1 and view 2, [B, D] each
        reuse = tuple(selection.chosen_outputs("target", range(N_RECIPES))) if self.can_reuse_teacher(selection) else None
        q1, q2, z1_target, z2_target, z1 = model(views[0], views[1], reuse)
        return byol_loss(q1, q2, z1_target, z2_target), {"out_std": collapse_std(z1)}

    # --- evaluation ---------------------------------------------------------------
    @classmethod
    def backbone_from_state(cls, cfg, model_state, which, drop_path=0.0):
        """The online backbone (``student``, the evaluated one), or the target's (``teacher``)."""
        prefix = {"student": "online.backbone.", "teacher": "target.backbone."}[which]
        return load_prefixed(build_resnet(cfg["model"]["arch"], cifar_stem=cfg["model"]["cifar_stem"]),
                             model_state, prefix)
