"""SimSiam with and without Hard View Selection, as the shared loop sees it.

Recipe (HVS paper Table 9, SimSiam paper): SGD, lr 0.05 x batch/256, momentum
0.9, weight decay 1e-4, cosine decay per epoch, fixed predictor lr, zero-init
residual; augmentation of MoCo v2 (crop scale 0.2-1, flip, colour jitter 0.4,
0.4, 0.4, 0.1 with p 0.8, grayscale p 0.2, blur sigma 0.1-2 with p 0.5)."""
import math

import torch

from common.augment import MultiViewTransform, ViewRecipe
from common.backbones import build_resnet
from common.config import _spec
from common.method import SSLMethod
from simsiam.loss import pair_scores, simsiam_loss
from simsiam.model import SimSiam


class SimSiamMethod(SSLMethod):
    """SimSiam (Chen & He 2021), optionally with Hard View Selection."""

    name = "simsiam"
    spec = {
        "model.arch": _spec("resnet50", "torchvision ResNet backbone (resnet18/34/50/101)"),
        "model.cifar_stem": _spec(False, "3x3 stride-1 first convolution and no max-pool, for 32-64 px images"),
        "model.proj_hidden": _spec(2048, "projector hidden width"),
        "model.dim": _spec(2048, "projector output width"),
        "model.pred_dim": _spec(512, "predictor bottleneck width"),
        "optim.lr": _spec(0.05, "base learning rate for batch 256 (scaled linearly with the global batch)"),
        "optim.momentum": _spec(0.9, "SGD momentum"),
        "optim.weight_decay": _spec(1e-4, "SGD weight decay"),
        "optim.fix_pred_lr": _spec(True, "keep the predictor's learning rate constant"),
        "augment.size": _spec(224, "crop size in pixels"),
        "augment.scale": _spec([0.2, 1.0], "random-resized-crop area range"),
        "augment.jitter": _spec([0.4, 0.4, 0.4, 0.1], "colour jitter brightness, contrast, saturation, hue"),
        "augment.jitter_p": _spec(0.8, "probability of colour jitter"),
        "augment.gray_p": _spec(0.2, "probability of grayscale"),
        "augment.blur_p": _spec(0.5, "probability of applying Gaussian blur"),
        "augment.blur_sigma": _spec([0.1, 2.0], "blur sigma range"),
        "augment.flip_p": _spec(0.5, "probability of a horizontal flip"),
    }

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        m = cfg["model"]
        backbone = build_resnet(m["arch"], cifar_stem=m["cifar_stem"], zero_init_residual=True)
        self.model = SimSiam(backbone, m["dim"], m["pred_dim"], m["proj_hidden"])

    # --- data ---------------------------------------------------------------
    def view_transform(self, hvs_on):
        a = self.cfg["augment"]
        recipe = ViewRecipe(size=a["size"], scale=a["scale"], flip_p=a["flip_p"], jitter=a["jitter"],
                            jitter_p=a["jitter_p"], gray_p=a["gray_p"], blur_p=a["blur_p"],
                            blur_sigma=a["blur_sigma"])
        return MultiViewTransform([(recipe, self.cfg["hvs"]["n_views"] if hvs_on else 2)])

    def pools(self):
        return [(self.cfg["hvs"]["n_views"], 2)]

    # --- optimisation ---------------------------------------------------------
    def build_optimizer(self, global_batch):
        o = self.cfg["optim"]
        self.init_lr = o["lr"] * global_batch / 256
        groups = [
            {"params": list(self.model.backbone.parameters()) + list(self.model.projector.parameters()),
             "fix_lr": False},
            {"params": list(self.model.predictor.parameters()), "fix_lr": o["fix_pred_lr"]},
        ]
        return torch.optim.SGD(groups, lr=self.init_lr, momentum=o["momentum"], weight_decay=o["weight_decay"])

    def schedule(self, optimizer, epoch, it, iters_per_epoch):
        lr = self.init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.cfg["train"]["epochs"]))
        for group in optimizer.param_groups:
            group["lr"] = self.init_lr if group["fix_lr"] else lr
        return {"lr": lr}

    # --- hard view selection ---------------------------------------------------
    def candidate_outputs(self, module, candidates):
        V, B = len(candidates), candidates[0].shape[0]
        p, z = module.embed(torch.cat(candidates))
        return p.view(V, B, -1), z.view(V, B, -1)

    def combination_scores(self, outputs, combos):
        return pair_scores(*outputs, combos)

    # --- training -----------------------------------------------------------------
    def training_loss(self, model, views):
        p1, p2, z1, z2 = model(views[0], views[1])
        return simsiam_loss(p1, p2, z1, z2), {}

    # --- evaluation ---------------------------------------------------------------
    @classmethod
    def backbone_from_state(cls, cfg, model_state, method_state, which):
        if which == "teacher":
            raise ValueError("SimSiam has no teacher: use --which student (or auto)")
        backbone = build_resnet(cfg["model"]["arch"], cifar_stem=cfg["model"]["cifar_stem"])
        backbone.load_state_dict({k[len("backbone."):]: v for k, v in model_state.items()
                                  if k.startswith("backbone.")})
        return backbone
