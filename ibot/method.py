"""iBOT with and without Hard View Selection, as the shared loop sees it.

iBOT is DINO (:mod:`dino.method`: multi-crop, EMA teacher, centring,
schedules, optimizer, per-parameter clipping, frozen last layer) plus masked
image modelling with the teacher as online tokenizer:

- the student's two global crops are block-masked (:mod:`ibot.masking`); a
  learned mask token replaces the masked patch embeddings;
- one head is shared by the [CLS] and the patch tokens (8,192 prototypes,
  the norm of the prototypes free: ``norm_last_layer`` false for ViT-S);
- loss = lambda1 x DINO's [CLS] loss + lambda2 x the masked-patch loss
  (:mod:`ibot.loss`), each with its own centre (momentum 0.9) and teacher
  temperature (both warmed up linearly from 0.04 to 0.07 over 30 epochs).

Recipe: the official iBOT ViT-S/16 command (iBOT's README) with DINO's
defaults: global crops 224 px at scale 0.25-1, 10 local crops of 96 px at
scale 0.05-0.25; masks ``pred_ratio 0 0.3``, ``pred_ratio_var 0 0.2``, aspect
0.3 to 1/0.3; AdamW lr 5e-4 x batch/256 after 10 warm-up epochs, cosine to
1e-6, weight decay 0.04 -> 0.4, teacher momentum 0.996 -> 1, stochastic depth
0.1, clip 3.0, last layer frozen for one epoch.

HVS (Section 3.3): two candidates for every crop slot as for DINO (4 global,
20 local for the 10 local crops: 2 x 2 x C(20,10) = 739,024 combinations, a
random 128 compared per step); each global
candidate is drawn with its own mask, and the mask travels with the candidate
that is selected.  A combination's score is its per-image iBOT loss,
lambda1 x the [CLS] loss (DINO's cross-entropy table) + lambda2 x the mean
patch loss of its two global candidates (one number per candidate: the
patch loss compares a view only with itself).  Local crops are part of the
combinations.  At reduced resolution the masks are resized with the crops.

State: both centres live in the loss module (:class:`ibot.loss.IBOTLoss`,
buffers, checkpointed), which also owns both teacher-temperature schedules;
the hooks read the step's temperatures and epoch (the masks) from their
``step`` argument.
"""
from __future__ import annotations

import torch

from common.backbones import VITS
from common.engine.config import setting
from common.hvs import precision_setting
from common.engine.method import BenchSettings, StepInfo
from common.views.multicrop import N_GLOBAL, multicrop_spec
from common.numerics import collapse_std
from dino.method import DINOMethod
from ibot.loss import IBOTLoss
from ibot.masking import MaskGenerator, resize_masks
from ibot.model import IBOT, MaskedViTNet


class IBOTMethod(DINOMethod):
    """iBOT (Zhou et al. 2021), optionally with Hard View Selection."""

    name = "ibot"
    run_all_tokens = {"ibot": "vit"}
    paper_name = "iBOT"
    linear_protocols = {"resnet": "dino", "vit": "dino"}  # iBOT evaluates as DINO does
    bench = BenchSettings("multicrop_masks", "vit_tiny",
                          paper_setting="no iBOT factor in the paper: Table 14 has SimSiam and DINO only")
    gpu_smoke = True
    model_cls, net_cls = IBOT, MaskedViTNet
    loss_cls = IBOTLoss  # both centres and both temperature schedules
    spec = {
        **DINOMethod.spec,
        "hvs.precision": precision_setting("auto", "Default auto: bf16 choices agreed with fp32 on 98.4 % of "
                                           "samples (bench/precision.py)."),
        "model.arch": setting("vit_small", "ViT backbone (timm; iBOT needs patch tokens): vit_tiny, vit_small, vit_base", sorted(VITS)),
        "model.out_dim": setting(8192, "prototypes of the head shared by the [CLS] and the patch tokens", range="[1, inf)"),
        "model.norm_last_layer": setting(False, "fix the norm of every prototype to 1 (iBOT: false for ViT-S, true for ViT-B)"),
        "model.use_bn_in_head": setting(False, "BatchNorm in the head MLP (not supported by iBOT here: the head runs token by token)"),
        "loss.teacher_temp": setting(0.07, "[CLS] teacher temperature after the warm-up", range="(0, inf)"),
        "loss.warmup_teacher_temp_epochs": setting(30, "epochs of linear warm-up of both teacher temperatures", range="[0, inf)"),
        "loss.teacher_patch_temp": setting(0.07, "patch teacher temperature after the warm-up", range="(0, inf)"),
        "loss.warmup_teacher_patch_temp": setting(0.04, "patch teacher temperature at epoch 0 (or at mask.start_epoch)", range="(0, inf)"),
        "loss.patch_center_momentum": setting(0.9, "momentum of the centre of the teacher's patch outputs", range="[0, 1]"),
        "loss.lambda1": setting(1.0, "weight of the [CLS] (DINO) loss", range="[0, inf)"),
        "loss.lambda2": setting(1.0, "weight of the masked-patch loss", range="[0, inf)"),
        "mask.ratio": setting([0.0, 0.3], "prediction ratios; one is chosen per crop (iBOT's pred_ratio)", range="[0, 1]"),
        "mask.ratio_var": setting([0.0, 0.2], "uniform jitter of each ratio (iBOT's pred_ratio_var)", range="[0, 1]"),
        "mask.aspect": setting([0.3, 1 / 0.3], "aspect-ratio range of the mask blocks", range="(0, inf)", length=2),
        "mask.start_epoch": setting(0, "no masks before this epoch (iBOT's pred_start_epoch)", range="[0, inf)"),
        **multicrop_spec(global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), n_local=10),
        "hvs.local_candidates": setting(20, "local candidates per image with HVS, from which augment.n_local are chosen (2 per local crop, as the paper's 16 for DINO's 8)", range="[0, inf)"),
    }

    def __init__(self, cfg, device):
        m = cfg["model"]
        if m["use_bn_in_head"]:
            raise ValueError("model.use_bn_in_head=true is not supported for iBOT (its head runs token by token)")
        if cfg["augment"]["global_size"] % m["patch_size"]:
            raise ValueError(f"augment.global_size={cfg['augment']['global_size']} must be a multiple of "
                             f"model.patch_size={m['patch_size']} (masks live on the patch grid)")
        super().__init__(cfg, device)
        self.mask_generator = MaskGenerator.from_cfg(cfg["mask"])
        self.grid = int(cfg["augment"]["global_size"]) // int(m["patch_size"])

    # --- masks -------------------------------------------------------------------
    def draw_masks(self, n: int, epoch: int) -> torch.Tensor:
        """Masks [n, h, w] of an epoch (none before ``mask.start_epoch``) on the
        full-size global crops' patch grid (on the device)."""
        return self.mask_generator(n, self.grid, self.grid, epoch).to(self.device, non_blocking=True)

    def grid_of(self, crops: torch.Tensor) -> tuple:
        return tuple(s // self.size_multiple for s in crops.shape[-2:])

    # --- hard view selection ---------------------------------------------------
    def candidate_outputs(self, module, candidates, step: StepInfo):
        V, B = len(candidates), len(candidates[0])
        G = N_GLOBAL * self.pools()[0][0]  # the global candidates come first
        masks = self.draw_masks(G * B, step.epoch)  # candidate after candidate, as torch.cat(candidates[:G])
        small = resize_masks(masks, self.grid_of(candidates[0]))  # the crops may be resized
        student_cls, student_patch = module.student.head_outputs(module.student.tokens(candidates[:G], small), small)
        if V > G:
            student_cls = torch.cat([student_cls, module.student(candidates[G:])])
        teacher_tokens = module.teacher.tokens(candidates[:G])
        teacher_cls, teacher_patch = module.teacher.head_outputs(teacher_tokens, small)  # masked patches only
        patch = self.loss.patch_losses(student_patch, teacher_patch, small, step["teacher_patch_temp"])
        return {"student": student_cls.view(V, B, -1), "teacher": teacher_cls.view(G, B, -1),
                "patch": patch.view(G, B), "masks": masks.view(G, B, *masks.shape[1:]),
                "teacher_tokens": teacher_tokens.view(G, B, *teacher_tokens.shape[1:])}

    def combination_scores(self, outputs, combos, step: StepInfo):
        return self.loss.scores(outputs["teacher"], outputs["student"], outputs["patch"], combos,
                                step["teacher_temp"], N_GLOBAL)

    # --- training -----------------------------------------------------------------
    def training_loss(self, model, views, selection, step: StepInfo):
        B = len(views[0])
        if selection is not None and selection.outputs is not None:
            masks = self.chosen_globals(selection, "masks")  # each chosen view keeps its own mask
        else:
            masks = self.draw_masks(N_GLOBAL * B, step.epoch)
        teacher_tokens = self.chosen_globals(selection, "teacher_tokens") if self.can_reuse_teacher(selection) else None
        student_cls, student_patch, teacher_cls, teacher_patch = model(views, N_GLOBAL, teacher_tokens, masks=masks)
        loss, cls, patch = self.loss(student_cls, student_patch, teacher_cls, teacher_patch, masks,
                                     step["teacher_temp"], step["teacher_patch_temp"], n_student=len(views),
                                     n_global=N_GLOBAL)
        self.loss.update_centers(teacher_cls, teacher_patch)
        return loss, {"loss_cls": cls.detach(), "loss_patch": patch.detach(), "mask_ratio": masks.float().mean(),
                      "out_std": collapse_std(teacher_cls)}
