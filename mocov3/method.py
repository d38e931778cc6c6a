"""MoCo v3 with and without Hard View Selection, as the shared loop sees it.

Recipe (Chen, Xie & He 2021; the released code's ``main_moco.py`` and
``CONFIG.md``, whose commands reproduce the paper's numbers):

- Networks (:mod:`mocov3.model`): base encoder = backbone + projector +
  predictor, momentum encoder = backbone + projector, MLPs 4096 wide with BN,
  output 256.  The momentum encoder is an EMA of the base encoder (predictor
  excluded) with momentum cosine from 0.99 to 1 over training, per step
  (``--moco-m-cos``); BN buffers are not averaged.
- Loss (:mod:`mocov3.loss`): symmetrised InfoNCE over the keys of the global
  batch, scaled by 2T; T = 1.0 (ResNet), 0.2 (ViT).
- ResNet-50 (zero-init residual): LARS, lr 0.6 x batch/256, momentum 0.9,
  weight decay 1e-6, no weight decay and no LARS adaptation for BN and bias
  parameters, batch 4096, 10 warm-up epochs then cosine to 0, per step;
  crop scale 0.2-1 for 100 epochs.
- ViT-S/16: AdamW, lr 1.5e-4 x batch/256, weight decay 0.1 (on every
  parameter, as the released code), 40 warm-up epochs then cosine to 0, per
  step; the patch projection stays at its random initialisation
  (``--stop-grad-conv1``, Section 4.2: ``model.frozen_patch_embed``).  The
  ViT is MoCo v3's (``vits.py``; :func:`mocov3.model.mocov3_vit`): a fixed 2-D
  sin-cos position embedding, never trained, and its initialisation
  (xavier-uniform, the qkv weight as three matrices, the patch projection's
  range from its fan-in, the class token N(0, 1e-6^2)).  The momentum encoder
  starts as a copy of the base encoder.
- Augmentation of BYOL (two asymmetric recipes): crop scale 0.08-1, flip,
  colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2; view 1
  blurred always, view 2 blurred with p 0.1 and solarised with p 0.2.

LARS is MoCo v3's own (:class:`common.engine.optim.LARS`): trust ratio
eta |w| / |g + wd w| on the weights; BN and bias parameters (the 1-d ones)
take neither weight decay nor adaptation.

The momentum update after step t uses the schedule's value at step t + 1:
MoCo v3 updates at the *start* of step t + 1, before the keys, with that
step's momentum, so the momentum encoder holds the same weights at every key
computation (and the selection of step t + 1 sees them too).

HVS: the two views of an image come from different recipes, so the candidates
keep their recipe (:mod:`common.views.two_views`), ``hvs.n_views / 2`` each, and a
combination is a pair of one candidate of each (4 candidates give 2 x 2 = 4
pairs).  The score of pair (k, l) is the pair's symmetrised
loss, the keys of candidate index k (l) of the other images of the global
batch being the negatives (:func:`mocov3.loss.pair_scores`).  The selection
forward takes every candidate once through the base encoder (queries) and once
through the momentum encoder (keys), without gradient.  The momentum
encoder's keys of the chosen views are recomputed in the training step, never
reused: its projector has BatchNorm in train mode, and its batch statistics in
the training step (one view of every image per batch) differ from those of
the selection forward (all candidates in one batch), so reuse is never exact.

Evaluated backbone: the base encoder's (MoCo v3's linear probe loads
``base_encoder``); ``--which teacher`` takes the momentum encoder's.
"""
from __future__ import annotations

import torch
from torch import nn

from common.backbones import arch_label, build_backbone, is_vit, load_prefixed
from common.engine.config import setting
from common.hvs import precision_setting
from common.engine.method import BenchSettings
from common.engine.teacher import TeacherMethod
from common.numerics import collapse_std
from common.engine.optim import lars
from common.engine.schedules import cosine_schedule, scaled_lr, set_lr
from common.views.two_views import TwoViews, per_recipe, two_views_spec
from mocov3.loss import mocov3_loss, pair_scores
from mocov3.model import MoCoV3, mocov3_vit

class MoCoV3Method(TwoViews, TeacherMethod):
    """MoCo v3 (Chen, Xie & He 2021), optionally with Hard View Selection."""

    name = "mocov3"
    run_all_tokens = {"mocov3": "resnet", "mocov3_vit": "vit"}
    paper_name = "MoCo v3"
    linear_protocols = {"resnet": "simclr", "vit": "dino"}  # the nearest of the three
    bench = BenchSettings("pair", "resnet18", paper_setting="beyond the paper: no factor in it")
    spec = {
        "model.arch": setting("resnet50", "backbone: resnet18/34/50/101 (torchvision) or vit_tiny, vit_small, vit_base (timm)"),
        "model.cifar_stem": setting(False, "ResNet: 3x3 stride-1 first convolution and no max-pool, for 32-64 px images"),
        "model.patch_size": setting(16, "ViT patch size (16 for ViT-S/16; 4 for 32 px images)", range="[1, inf)"),
        "model.depth": setting(0, "ViT blocks (0: the architecture's 12; fewer for quick CPU tests)", range="[0, inf)"),
        "model.drop_path": setting(0.0, "ViT stochastic depth of the base encoder (MoCo v3: none)", range="[0, 1)"),
        "model.frozen_patch_embed": setting(True, "ViT: keep the random patch projection fixed (MoCo v3's stop-grad-conv1, "
                                            "Section 4.2); no effect on a ResNet"),
        "model.dim": setting(256, "output width of the projector and the predictor", range="[1, inf)"),
        "model.mlp_hidden": setting(4096, "hidden width of the projector and the predictor", range="[1, inf)"),
        "model.proj_layers": setting(2, "linear layers of the projector (released code: 2 for ResNet, 3 for ViT)", range="[1, inf)"),
        "model.pred_layers": setting(2, "linear layers of the predictor", range="[1, inf)"),
        "model.pred_last_bn": setting(False, "BN (no affine) after the predictor's last layer (released code: ResNet no, ViT yes)"),
        "loss.temperature": setting(1.0, "softmax temperature T (MoCo v3: 1.0 ResNet, 0.2 ViT)", range="(0, inf)"),
        "optim.name": setting("lars", "optimizer: lars (MoCo v3's ResNet recipe) or adamw (its ViT recipe)", ["lars", "adamw"]),
        "optim.lr": setting(0.6, "peak learning rate for batch 256 (scaled linearly with the global batch)", range="[0, inf)"),
        "optim.weight_decay": setting(1e-6, "weight decay (LARS: not on BN and bias parameters; AdamW: on all)", range="[0, inf)"),
        "optim.momentum": setting(0.9, "LARS momentum", range="[0, 1]"),
        "optim.trust_coeff": setting(0.001, "LARS trust coefficient eta", range="(0, inf)"),
        "optim.warmup_epochs": setting(10, "epochs of linear learning-rate warm-up from 0, then cosine to 0", type="number", range="[0, inf)"),
        "optim.momentum_encoder": setting(0.99, "EMA momentum of the momentum encoder at the start (cosine schedule to 1)", range="[0, 1]"),
        "hvs.precision": precision_setting("fp32", "Default fp32: the bf16 agreement is not measured for MoCo v3."),
        **two_views_spec(interpolation="bilinear"),
    }

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        m = cfg["model"]
        self.vit = is_vit(m["arch"])
        self.size_multiple = int(m["patch_size"]) if self.vit else 1
        base, momentum = self.backbone(cfg, m["drop_path"]), self.backbone(cfg, 0.0)
        if self.vit:  # MoCo v3's ViT: fixed sin-cos position embedding, its initialisation
            mocov3_vit(base)
        if self.vit and m["frozen_patch_embed"]:
            for p in base.patch_embed.parameters():
                p.requires_grad_(False)
        self.model = MoCoV3(base, momentum, m["dim"], m["mlp_hidden"], m["proj_layers"], m["pred_layers"],
                            m["pred_last_bn"])
        self.temperature = float(cfg["loss"]["temperature"])
        per_recipe(cfg)  # an odd hvs.n_views is refused before anything runs

    @classmethod
    def backbone(cls, cfg: dict, drop_path: float = 0.0) -> nn.Module:
        m = cfg["model"]
        return build_backbone(m["arch"], cifar_stem=m["cifar_stem"], patch_size=m["patch_size"],
                              img_size=cfg["augment"]["size"], drop_path_rate=drop_path, depth=m["depth"],
                              zero_init_residual=True)

    @classmethod
    def arch(cls, cfg):
        return arch_label(cfg["model"])

    # --- optimisation ---------------------------------------------------------
    def build_optimizer(self, global_batch):
        o = self.cfg["optim"]
        self.init_lr = scaled_lr(o["lr"], global_batch)
        params = [p for p in self.model.parameters() if p.requires_grad]  # base encoder and predictor
        if o["name"] == "adamw":
            return torch.optim.AdamW(params, lr=self.init_lr, weight_decay=o["weight_decay"])
        return lars(params, self.init_lr, o["weight_decay"], o["momentum"], o["trust_coeff"])

    def schedule(self, optimizer, step):
        """Per step: lr (linear warm-up lr * step / warmup, then cosine to 0;
        MoCo v3's ``adjust_learning_rate`` at fractional epochs) and the
        momentum of the EMA update after this step (that of step + 1, see the
        module docstring)."""
        o, k = self.cfg["optim"], step.global_step
        total = self.cfg["train"]["epochs"] * step.iters
        warmup = round(o["warmup_epochs"] * step.iters)
        lr = cosine_schedule(k, total, self.init_lr, 0.0, warmup, warmup_shape="ratio")
        momentum = cosine_schedule(k + 1, total, o["momentum_encoder"], 1.0)
        set_lr(optimizer, lr)
        return {"lr": lr, "momentum": momentum}

    def ema_pairs(self):
        return [(self.model.momentum, self.model.base)]

    def reuse_exact(self) -> bool:
        """Never: the momentum encoder's keys of the chosen views are recomputed
        in the training step (BatchNorm in its projector; see the module docstring)."""
        return False

    # --- hard view selection ---------------------------------------------------
    def candidate_outputs(self, module, candidates, step):
        """Queries and keys of every candidate, [V, B, D] each: one forward
        through the base encoder and one through the momentum encoder."""
        V, B = len(candidates), len(candidates[0])
        x = torch.cat(list(candidates))
        return {"q": module.queries(x).view(V, B, -1), "k": module.keys(x).view(V, B, -1)}

    def combination_scores(self, outputs, combos, step):
        return pair_scores(outputs["q"], outputs["k"], combos, self.temperature)

    # --- training -----------------------------------------------------------------
    def training_loss(self, model, views, selection, step):
        q1, q2, k1, k2 = model(views[0], views[1])
        return mocov3_loss(q1, q2, k1, k2, self.temperature), {"out_std": collapse_std(q1)}

    # --- evaluation ---------------------------------------------------------------
    @classmethod
    def backbone_from_state(cls, cfg, model_state, which, drop_path=0.0):
        """The base encoder's backbone (``student``, MoCo v3's evaluated
        network) or the momentum encoder's (``teacher``)."""
        prefix = {"student": "base.backbone.", "teacher": "momentum.backbone."}[which]
        return load_prefixed(cls.backbone(cfg, drop_path), model_state, prefix)
