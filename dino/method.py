"""DINO with and without Hard View Selection, as the shared loop sees it.

Recipe (HVS paper Table 8 / Appendix G.1.1, DINO's ``main_dino.py`` defaults):
ViT-S/16 (stochastic depth 0.1 in the student), head 2048-2048-256 with GELU and
no BN to 65,536 weight-normalised prototypes of norm 1, the last layer frozen
during the first epoch; student temperature 0.1, teacher temperature 0.04
(optionally warmed up linearly per epoch), centre momentum 0.9; AdamW, lr 5e-4
x batch/256 reached after 10 linear warm-up epochs, then cosine to 1e-6, weight
decay cosine from 0.04 to 0.4 (not on biases and norms), per step; teacher EMA
momentum cosine from 0.996 to 1; each parameter's gradient clipped to norm 3.0;
multi-crop: 2 global crops of 224 px (scale 0.4-1) and 8 local crops of 96 px
(scale 0.05-0.4), see :mod:`common.views.multicrop`.  ResNet-50 (DINO's README):
SGD, lr 0.03 x batch/256, weight decay 1e-4 constant, global scale 0.14-1,
local scale 0.05-0.14 (``configs/dino_resnet_paper.yaml``).

HVS (Section 3.3): candidates for every crop slot; the score of a combination
is its per-image DINO loss, read from a table of cross-entropies between the
teacher's output for every global candidate and the student's output for
every candidate (:func:`dino.loss.cross_entropy_table`), computed with one
forward pass of each network.  The selection uses the current centre and the
step's teacher temperature and changes neither; the teacher's outputs of the
chosen global views are reused in the training step when that is exact
(full-size selection, a teacher without BatchNorm), see ``hvs.reuse_teacher``.

State: the centre lives in the loss module (:class:`dino.loss.DINOLoss`, a
buffer, checkpointed through :meth:`DINOMethod.state_dict`); every scheduled
value of a step (lr, weight decay, teacher momentum, teacher temperature) is
returned by :meth:`DINOMethod.schedule` and read by the hooks from their
``step`` argument, so no attribute of the method changes during training.
"""
from __future__ import annotations

import torch
from torch import nn

from common.backbones import arch_label, build_backbone, has_batchnorm, is_vit, load_prefixed
from common.engine.config import setting
from common.hvs import precision_setting
from common.engine.method import BenchSettings, StepInfo
from common.engine.teacher import TeacherMethod
from common.views.multicrop import N_GLOBAL, MultiCropNet, multicrop_pools, multicrop_spec, multicrop_transform
from common.numerics import collapse_std
from common.engine.schedules import cosine_schedule, scaled_lr, set_lr
from dino.loss import DINOLoss
from dino.model import DINO, DINOHead


def clip_each_gradient(parameters, max_norm: float) -> None:
    """DINO's clipping: every parameter's gradient is scaled down to norm
    ``max_norm`` on its own (not the global norm of all gradients)."""
    for p in parameters:
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


class DINOMethod(TeacherMethod):
    """DINO (Caron et al. 2021), optionally with Hard View Selection."""

    name = "dino"
    run_all_tokens = {"dino": "vit", "dino_resnet": "resnet"}
    paper_name = "DINO"
    linear_protocols = {"resnet": "dino", "vit": "dino"}
    bench = BenchSettings("multicrop", "vit_tiny", {1.0: 2.15, 0.75: 1.68, 0.5: 1.56, 0.25: 1.50},
                          "DINO ViT-S/16 GPU, 4 global + 16 local candidates, 128 combinations")
    gpu_smoke = True
    has_teacher = True
    reuse_flag = "reuse_teacher"  # momentum_key: "momentum"
    model_cls, net_cls = DINO, MultiCropNet  # student + teacher; one network
    loss_cls = DINOLoss  # the loss and its state (centre, temperatures)
    spec = {
        "hvs.precision": precision_setting("auto", "Default auto: bf16 choices agreed with fp32 on 100 % of 256 samples "
                                           "(95 % interval 98.6-100 %) of a 345-step HVS checkpoint (bench/precision.py; "
                                           "93 % of a 23-step one), over the 95 % every method's default requires."),
        "model.arch": setting("vit_small", "backbone: vit_tiny, vit_small, vit_base (timm) or resnet18/34/50/101 (torchvision)"),
        "model.patch_size": setting(16, "ViT patch size (16 for ViT-S/16; 4 for 32 px images)", range="[1, inf)"),
        "model.depth": setting(0, "ViT blocks (0: the architecture's 12; fewer for quick CPU tests)", range="[0, inf)"),
        "model.drop_path": setting(0.1, "stochastic depth rate of the student ViT (the teacher has none)", range="[0, 1)"),
        "model.cifar_stem": setting(False, "ResNet: 3x3 stride-1 first convolution and no max-pool, for 32-64 px images"),
        "model.out_dim": setting(65536, "number of prototypes (head output width)", range="[1, inf)"),
        "model.head_hidden": setting(2048, "head MLP hidden width", range="[1, inf)"),
        "model.head_bottleneck": setting(256, "head bottleneck width before the weight-normalised last layer", range="[1, inf)"),
        "model.head_layers": setting(3, "linear layers in the head MLP", range="[1, inf)"),
        "model.use_bn_in_head": setting(False, "BatchNorm in the head MLP"),
        "model.norm_last_layer": setting(True, "fix the norm of every prototype to 1"),
        "loss.student_temp": setting(0.1, "student temperature", range="(0, inf)"),
        "loss.teacher_temp": setting(0.04, "teacher temperature after the warm-up", range="(0, inf)"),
        "loss.warmup_teacher_temp": setting(0.04, "teacher temperature at epoch 0", range="(0, inf)"),
        "loss.warmup_teacher_temp_epochs": setting(0, "epochs of linear teacher-temperature warm-up", range="[0, inf)"),
        "loss.center_momentum": setting(0.9, "momentum of the centre of the teacher outputs", range="[0, 1]"),
        "optim.name": setting("adamw", "optimizer", ["adamw", "sgd"]),
        "optim.lr": setting(5e-4, "peak learning rate for batch 256 (scaled linearly with the global batch)", range="[0, inf)"),
        "optim.min_lr": setting(1e-6, "learning rate at the end of the cosine decay", range="[0, inf)"),
        "optim.warmup_epochs": setting(10, "epochs of linear learning-rate warm-up from 0", type="number", range="[0, inf)"),
        "optim.weight_decay": setting(0.04, "weight decay at the start (cosine schedule; not on biases and norms)", range="[0, inf)"),
        "optim.weight_decay_end": setting(0.4, "weight decay at the end", range="[0, inf)"),
        "optim.momentum": setting(0.9, "SGD momentum (optim.name=sgd)", range="[0, 1]"),
        "optim.momentum_teacher": setting(0.996, "teacher EMA momentum at the start (cosine schedule to 1)", range="[0, 1]"),
        "optim.clip_grad": setting(3.0, "clip each parameter's gradient to this norm (0: off)", range="[0, inf)"),
        "optim.freeze_last_layer": setting(1, "epochs during which the head's last layer is not updated", range="[0, inf)"),
        "hvs.reuse_teacher": setting(True, "reuse the selection's teacher outputs of the chosen global views in the training step where exact (hvs.resolution=1, no BatchNorm in the teacher, the selection in fp32 or in the training step's autocast dtype)"),
        **multicrop_spec(),
    }

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        m = cfg["model"]
        self.loss = self.loss_cls.from_cfg(cfg).to(device)
        self.model = self.model_cls(self.network(cfg, m["drop_path"]), self.network(cfg, 0.0))
        self.size_multiple = int(m["patch_size"]) if is_vit(m["arch"]) else 1

    @classmethod
    def backbone(cls, cfg: dict, drop_path: float = 0.0) -> nn.Module:
        m = cfg["model"]
        return build_backbone(m["arch"], cifar_stem=m["cifar_stem"], patch_size=m["patch_size"],
                              img_size=cfg["augment"]["global_size"], drop_path_rate=drop_path,
                              depth=m["depth"])

    @classmethod
    def head(cls, cfg: dict, in_dim: int) -> nn.Module:
        m = cfg["model"]
        return DINOHead(in_dim, m["out_dim"], m["head_hidden"], m["head_bottleneck"], m["head_layers"],
                        m["use_bn_in_head"], m["norm_last_layer"])

    @classmethod
    def network(cls, cfg: dict, drop_path: float) -> MultiCropNet:
        backbone = cls.backbone(cfg, drop_path)
        return cls.net_cls(backbone, cls.head(cfg, backbone.num_features))

    # --- data ---------------------------------------------------------------
    def view_transform(self, hvs_on):
        return multicrop_transform(self.cfg, hvs_on)

    def pools(self):
        return multicrop_pools(self.cfg)

    @classmethod
    def image_size(cls, cfg):
        return int(cfg["augment"]["global_size"])

    @classmethod
    def arch(cls, cfg):
        return arch_label(cfg["model"])

    # --- optimisation ---------------------------------------------------------
    def build_optimizer(self, global_batch):
        o = self.cfg["optim"]
        self.init_lr = scaled_lr(o["lr"], global_batch)
        decay, no_decay = [], []
        for name, p in self.model.student.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        if o["name"] == "sgd":
            return torch.optim.SGD(groups, lr=0.0, momentum=o["momentum"])
        return torch.optim.AdamW(groups, lr=0.0)

    def schedule(self, optimizer, step: StepInfo):
        """lr, weight decay, teacher EMA momentum (per step) and the loss's
        teacher temperature(s) (per epoch, :meth:`DINOLoss.temperatures`)."""
        o, k = self.cfg["optim"], step.global_step
        total = self.cfg["train"]["epochs"] * step.iters
        lr = cosine_schedule(k, total, self.init_lr, o["min_lr"], round(o["warmup_epochs"] * step.iters))
        wd = cosine_schedule(k, total, o["weight_decay"], o["weight_decay_end"])
        momentum = cosine_schedule(k, total, o["momentum_teacher"], 1.0)
        set_lr(optimizer, lr)
        optimizer.param_groups[0]["weight_decay"] = wd
        return {"lr": lr, "wd": wd, "momentum": momentum, **self.loss.temperatures(step.epoch)}

    def before_optimizer_step(self, model, step: StepInfo):
        if self.cfg["optim"]["clip_grad"]:
            clip_each_gradient(self.model.student.parameters(), self.cfg["optim"]["clip_grad"])
        if step.epoch < self.cfg["optim"]["freeze_last_layer"]:
            for p in self.model.student.head.last_layer.parameters():
                p.grad = None

    def ema_pairs(self):
        return [(self.model.teacher, self.model.student)]

    # --- hard view selection ---------------------------------------------------
    def candidate_outputs(self, module, candidates, step: StepInfo):
        V, B = len(candidates), len(candidates[0])
        n_teacher = N_GLOBAL * self.pools()[0][0]  # the global candidates come first
        student = module.student(candidates).view(V, B, -1)
        teacher = module.teacher(candidates[:n_teacher]).view(n_teacher, B, -1)
        return {"student": student, "teacher": teacher}

    def combination_scores(self, outputs, combos, step: StepInfo):
        return self.loss.scores(outputs["teacher"], outputs["student"], combos, step["teacher_temp"], N_GLOBAL)

    # --- training -----------------------------------------------------------------
    def reuse_exact(self) -> bool:
        """No BatchNorm in the teacher: its outputs would depend on the batch,
        which differs between the selection and the training forward."""
        return not has_batchnorm(self.model.teacher)

    @staticmethod
    def chosen_globals(selection, key: str) -> torch.Tensor:
        """The selection's ``outputs[key]`` of the chosen global views, [2B, ...] (view after view)."""
        return torch.cat(selection.chosen_outputs(key, range(N_GLOBAL)))

    def training_loss(self, model, views, selection, step: StepInfo):
        reuse = self.chosen_globals(selection, "teacher") if self.can_reuse_teacher(selection) else None
        student_out, teacher_out = model(views, N_GLOBAL, reuse)
        loss = self.loss(student_out, teacher_out, step["teacher_temp"], n_student=len(views), n_teacher=N_GLOBAL)
        self.loss.update_center(teacher_out)
        return loss, {"out_std": collapse_std(teacher_out)}

    def state_dict(self):
        """The loss module's buffers (the centre; iBOT: both centres), on the CPU."""
        return {k: v.detach().cpu() for k, v in self.loss.state_dict().items()}

    def load_state_dict(self, state):
        self.loss.load_state_dict(state)  # copied into the buffers on the device, exactly

    # --- evaluation ---------------------------------------------------------------
    @classmethod
    def backbone_from_state(cls, cfg, model_state, which, drop_path=0.0):
        return load_prefixed(cls.backbone(cfg, drop_path), model_state, f"{which}.backbone.")
