"""SimSiam with and without Hard View Selection, as the shared loop sees it.

Recipe (HVS paper Table 9, SimSiam paper): SGD, lr 0.05 x batch/256, momentum
0.9, weight decay 1e-4, cosine decay per epoch, fixed predictor lr, zero-init
residual; augmentation of MoCo v2 (crop scale 0.2-1, flip, colour jitter 0.4,
0.4, 0.4, 0.1 with p 0.8, grayscale p 0.2, blur sigma 0.1-2 with p 0.5)."""
import torch

from common.views.augment import augment_spec
from common.engine.config import setting
from common.engine.method import BenchSettings, PairMethod
from common.numerics import collapse_std
from common.engine.schedules import cosine_schedule, scaled_lr, set_lr
from simsiam.loss import pair_scores, simsiam_loss
from simsiam.model import SimSiam


class SimSiamMethod(PairMethod):
    """SimSiam (Chen & He 2021), optionally with Hard View Selection."""

    name = "simsiam"
    run_all_tokens = {"simsiam": "resnet"}
    paper_name = "SimSiam"
    linear_protocols = {"resnet": "simsiam", "vit": "simsiam"}
    bench = BenchSettings("pair", "resnet18", {1.0: 1.55, 0.75: 1.45, 0.5: 1.24, 0.25: 1.16}, "SimSiam RN50 GPU")
    gpu_smoke = True
    spec = {
        **PairMethod.spec,
        "model.proj_hidden": setting(2048, "projector hidden width", range="[1, inf)"),
        "model.dim": setting(2048, "projector output width", range="[1, inf)"),
        "model.pred_dim": setting(512, "predictor bottleneck width", range="[1, inf)"),
        "optim.lr": setting(0.05, "base learning rate for batch 256 (scaled linearly with the global batch)", range="[0, inf)"),
        "optim.momentum": setting(0.9, "SGD momentum", range="[0, 1]"),
        "optim.weight_decay": setting(1e-4, "SGD weight decay", range="[0, inf)"),
        "optim.fix_pred_lr": setting(True, "keep the predictor's learning rate constant"),
        **augment_spec(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5),
    }

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        m = cfg["model"]
        self.model = SimSiam(self.build_backbone(), m["dim"], m["pred_dim"], m["proj_hidden"])

    # --- optimisation ---------------------------------------------------------
    def build_optimizer(self, global_batch):
        o = self.cfg["optim"]
        self.init_lr = scaled_lr(o["lr"], global_batch)
        groups = [
            {"params": list(self.model.backbone.parameters()) + list(self.model.projector.parameters()),
             "fix_lr": False},
            {"params": list(self.model.predictor.parameters()), "fix_lr": o["fix_pred_lr"]},
        ]
        return torch.optim.SGD(groups, lr=self.init_lr, momentum=o["momentum"], weight_decay=o["weight_decay"])

    def schedule(self, optimizer, step):
        lr = cosine_schedule(step.epoch, self.cfg["train"]["epochs"], self.init_lr, 0.0)  # per epoch, to 0
        set_lr(optimizer, lambda group: self.init_lr if group["fix_lr"] else lr)
        return {"lr": lr}

    # --- hard view selection (candidate_outputs: PairMethod's, (p, z)) ----------
    def combination_scores(self, outputs, combos, step):
        return pair_scores(*outputs, combos)

    # --- training -----------------------------------------------------------------
    def training_loss(self, model, views, selection, step):
        p1, p2, z1, z2 = model(views[0], views[1])
        return simsiam_loss(p1, p2, z1, z2), {"out_std": collapse_std(z1)}
