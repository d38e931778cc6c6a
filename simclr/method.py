"""SimCLR with and without Hard View Selection, as the shared loop sees it.

Recipe (HVS paper Table 10 / Appendix G.1.3, SimCLR paper): ResNet-50 with
zero-init residual, head 2048-2048-128 with BN, NT-Xent at temperature 0.1 over
the global batch (4096), LARS with lr 0.3 x batch/256 (linear, not square-root,
scaling), momentum 0.9, weight decay 1e-4, 10 epochs of linear warm-up then
cosine decay to 0, per step.  Augmentation of SimCLR: crop scale 0.08-1, flip,
colour jitter of strength 1 (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale p 0.2,
blur sigma 0.1-2 with p 0.5.

HVS (Appendix I.1): the objective is unchanged; the score of pair (k, l) for an
image is its NT-Xent with both directions summed, the negatives being views k
and l of the other images of the global batch (:func:`simclr.loss.pair_scores`).

LARS is SimCLR's own (:class:`common.engine.optim.LARS`): trust ratio
eta |w| / |g + wd w|, the learning rate inside the momentum buffer
(v = m v + lr trust (g + wd w), SimCLR's "classic momentum"), BatchNorm and
bias parameters excluded from weight decay and adaptation.
"""
from common.views.augment import augment_spec
from common.engine.config import setting
from common.engine.method import BenchSettings, PairMethod
from common.numerics import collapse_std
from common.engine.optim import lars
from common.engine.schedules import cosine_schedule, scaled_lr, set_lr
from simclr.loss import nt_xent, pair_scores
from simclr.model import SimCLR


class SimCLRMethod(PairMethod):
    """SimCLR (Chen et al. 2020), optionally with Hard View Selection."""

    name = "simclr"
    run_all_tokens = {"simclr": "resnet"}
    paper_name = "SimCLR"
    linear_protocols = {"resnet": "simclr", "vit": "simclr"}
    bench = BenchSettings("pair", "resnet18", paper_setting="no SimCLR factor in the paper")
    gpu_smoke = True
    spec = {
        **PairMethod.spec,
        "model.proj_hidden": setting(2048, "projection head hidden width", range="[1, inf)"),
        "model.dim": setting(128, "projection head output width", range="[1, inf)"),
        "model.proj_layers": setting(3, "linear layers in the projection head (SimCLR v1: 2, v2: 3)", range="[1, inf)"),
        "loss.temperature": setting(0.1, "NT-Xent temperature", range="(0, inf)"),
        "optim.lr": setting(0.3, "base learning rate for batch 256 (scaled linearly with the global batch)", range="[0, inf)"),
        "optim.momentum": setting(0.9, "LARS momentum", range="[0, 1]"),
        "optim.weight_decay": setting(1e-4, "weight decay (not on BatchNorm and bias parameters)", range="[0, inf)"),
        "optim.trust_coeff": setting(0.001, "LARS trust coefficient eta", range="(0, inf)"),
        "optim.warmup_epochs": setting(10, "epochs of linear learning-rate warm-up before the cosine decay", type="number", range="[0, inf)"),
        **augment_spec(scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5),
    }

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        m = cfg["model"]
        self.model = SimCLR(self.build_backbone(), m["dim"], m["proj_hidden"], m["proj_layers"])
        self.temperature = float(cfg["loss"]["temperature"])

    # --- optimisation ---------------------------------------------------------
    def build_optimizer(self, global_batch):
        o = self.cfg["optim"]
        self.init_lr = scaled_lr(o["lr"], global_batch)
        return lars(self.model.parameters(), self.init_lr, o["weight_decay"], o["momentum"], o["trust_coeff"],
                    lr_in_momentum=True)  # SimCLR's classic momentum

    def learning_rate(self, step: int, total: int, warmup: int) -> float:
        """Linear warm-up from 0 over ``warmup`` steps (lr * step / warmup: the
        base is reached at step ``warmup``), then cosine decay to 0."""
        return cosine_schedule(step, total, self.init_lr, 0.0, warmup, warmup_shape="ratio")

    def schedule(self, optimizer, step):
        warmup = round(self.cfg["optim"]["warmup_epochs"] * step.iters)
        total = self.cfg["train"]["epochs"] * step.iters
        lr = self.learning_rate(step.global_step, total, warmup)
        set_lr(optimizer, lr)
        return {"lr": lr}

    # --- hard view selection (candidate_outputs: PairMethod's, z) ---------------
    def combination_scores(self, outputs, combos, step):
        return pair_scores(outputs, combos, self.temperature)

    # --- training -----------------------------------------------------------------
    def training_loss(self, model, views, selection, step):
        z1, z2 = model(views[0], views[1])
        return nt_xent(z1, z2, self.temperature), {"out_std": collapse_std(z1)}
