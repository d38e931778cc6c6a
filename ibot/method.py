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
"""
from __future__ import annotations

import torch

from common.backbones import VITS
from common.config import _spec
from common.multicrop import N_GLOBAL, multicrop_spec
from common.schedules import linear_warmup
from dino.loss import cross_entropy_table, updated_center
from dino.method import DINOMethod
from ibot.loss import combination_scores, ibot_loss, patch_loss
from ibot.masking import MaskGenerator, resize_masks
from ibot.model import IBOT, MaskedViTNet


class IBOTMethod(DINOMethod):
    """iBOT (Zhou et al. 2021), optionally with Hard View Selection."""

    name = "ibot"
    model_cls, net_cls = IBOT, MaskedViTNet
    spec = {
        **DINOMethod.spec,
        "model.arch": _spec("vit_small", "ViT backbone (timm; iBOT needs patch tokens): vit_tiny, vit_small, vit_base", sorted(VITS)),
        "model.out_dim": _spec(8192, "prototypes of the head shared by the [CLS] and the patch tokens"),
        "model.norm_last_layer": _spec(False, "fix the norm of every prototype to 1 (iBOT: false for ViT-S, true for ViT-B)"),
        "model.use_bn_in_head": _spec(False, "BatchNorm in the head MLP (not supported by iBOT here: the head runs token by token)"),
        "loss.teacher_temp": _spec(0.07, "[CLS] teacher temperature after the warm-up"),
        "loss.warmup_teacher_temp_epochs": _spec(30, "epochs of linear warm-up of both teacher temperatures"),
        "loss.teacher_patch_temp": _spec(0.07, "patch teacher temperature after the warm-up"),
        "loss.warmup_teacher_patch_temp": _spec(0.04, "patch teacher temperature at epoch 0 (or at mask.start_epoch)"),
        "loss.patch_center_momentum": _spec(0.9, "momentum of the centre of the teacher's patch outputs"),
        "loss.lambda1": _spec(1.0, "weight of the [CLS] (DINO) loss"),
        "loss.lambda2": _spec(1.0, "weight of the masked-patch loss"),
        "mask.ratio": _spec([0.0, 0.3], "prediction ratios; one is chosen per crop (iBOT's pred_ratio)"),
        "mask.ratio_var": _spec([0.0, 0.2], "uniform jitter of each ratio (iBOT's pred_ratio_var)"),
        "mask.aspect": _spec([0.3, 1 / 0.3], "aspect-ratio range of the mask blocks"),
        "mask.start_epoch": _spec(0, "no masks before this epoch (iBOT's pred_start_epoch)"),
        **multicrop_spec(global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), n_local=10),
        "hvs.local_candidates": _spec(20, "local candidates per image with HVS, from which augment.n_local are chosen (2 per local crop, as the paper's 16 for DINO's 8)"),
    }

    def __init__(self, cfg, device):
        m = cfg["model"]
        if m["use_bn_in_head"]:
            raise ValueError("model.use_bn_in_head=true is not supported for iBOT (its head runs token by token)")
        if cfg["augment"]["global_size"] % m["patch_size"]:
            raise ValueError(f"augment.global_size={cfg['augment']['global_size']} must be a multiple of "
                             f"model.patch_size={m['patch_size']} (masks live on the patch grid)")
        super().__init__(cfg, device)
        lo = cfg["loss"]
        self.lambda1, self.lambda2 = float(lo["lambda1"]), float(lo["lambda2"])
        self.patch_center = torch.zeros(1, m["out_dim"], device=device)
        self.teacher_patch_temp = float(lo["warmup_teacher_patch_temp"])
        self.mask_generator = MaskGenerator.from_cfg(cfg["mask"])
        self.grid = int(cfg["augment"]["global_size"]) // int(m["patch_size"])
        self.epoch = 0

    # --- optimisation ---------------------------------------------------------
    def schedule(self, optimizer, epoch, it, iters_per_epoch):
        values = super().schedule(optimizer, epoch, it, iters_per_epoch)  # lr, wd, momentum, [CLS] temperature
        lo, start = self.cfg["loss"], self.mask_generator.start_epoch
        self.teacher_patch_temp = linear_warmup(max(0, epoch - start), lo["warmup_teacher_temp_epochs"],
                                                lo["warmup_teacher_patch_temp"], lo["teacher_patch_temp"])
        self.epoch = epoch
        return {**values, "teacher_patch_temp": self.teacher_patch_temp}

    # --- masks -------------------------------------------------------------------
    def draw_masks(self, n: int) -> torch.Tensor:
        """Masks [n, h, w] on the full-size global crops' patch grid (on the device)."""
        return self.mask_generator(n, self.grid, self.grid, self.epoch).to(self.device, non_blocking=True)

    def grid_of(self, crops: torch.Tensor) -> tuple:
        return tuple(s // self.size_multiple for s in crops.shape[-2:])

    # --- hard view selection ---------------------------------------------------
    def candidate_outputs(self, module, candidates):
        V, B = len(candidates), len(candidates[0])
        G = N_GLOBAL * self.pools()[0][0]  # the global candidates come first
        masks = self.draw_masks(G * B)  # candidate after candidate, as torch.cat(candidates[:G])
        small = resize_masks(masks, self.grid_of(candidates[0]))  # the crops may be resized
        student_cls, student_patch = module.student.head_outputs(module.student.tokens(candidates[:G], small), small)
        if V > G:
            student_cls = torch.cat([student_cls, module.student(candidates[G:])])
        teacher_tokens = module.teacher.tokens(candidates[:G])
        teacher_cls, teacher_patch = module.teacher.head_outputs(teacher_tokens, small)  # masked patches only
        patch = patch_loss(student_patch, teacher_patch, small, self.patch_center, self.student_temp,
                           self.teacher_patch_temp, reduce=False)
        return {"student": student_cls.view(V, B, -1), "teacher": teacher_cls.view(G, B, -1),
                "patch": patch.view(G, B), "masks": masks.view(G, B, *masks.shape[1:]),
                "teacher_tokens": teacher_tokens.view(G, B, *teacher_tokens.shape[1:])}

    def combination_scores(self, outputs, combos):
        table = cross_entropy_table(outputs["teacher"], outputs["student"], self.center,
                                    self.student_temp, self.teacher_temp)
        return combination_scores(table, outputs["patch"], combos, N_GLOBAL, self.lambda1, self.lambda2)

    # --- training -----------------------------------------------------------------
    def training_loss(self, model, views, selection=None):
        B = len(views[0])
        if selection is not None and selection.outputs is not None:
            masks = self.chosen_globals(selection, "masks")  # each chosen view keeps its own mask
        else:
            masks = self.draw_masks(N_GLOBAL * B)
        teacher_tokens = self.chosen_globals(selection, "teacher_tokens") if self.can_reuse_teacher(selection) else None
        student_cls, student_patch, teacher_cls, teacher_patch = model(views, masks, N_GLOBAL, teacher_tokens)
        loss, cls, patch = ibot_loss(student_cls, student_patch, teacher_cls, teacher_patch, masks, self.center,
                                     self.patch_center, self.student_temp, self.teacher_temp,
                                     self.teacher_patch_temp, n_student=len(views), n_global=N_GLOBAL,
                                     lambda1=self.lambda1, lambda2=self.lambda2)
        lo = self.cfg["loss"]
        self.center = updated_center(self.center, teacher_cls, lo["center_momentum"])
        self.patch_center = updated_center(self.patch_center, teacher_patch.mean(1), lo["patch_center_momentum"])
        return loss, {"loss_cls": cls.detach(), "loss_patch": patch.detach(), "mask_ratio": masks.float().mean()}

    def state_dict(self):
        return {**super().state_dict(), "patch_center": self.patch_center.detach().cpu()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.patch_center = state["patch_center"].to(self.device)
