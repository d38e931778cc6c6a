"""iBOT's loss (Zhou et al. 2021, Eq. 1-3) and the HVS score of a combination.

For an image with global crops u, v (the teacher's views, unmasked; the
student's views masked by m_u, m_v) and local crops:

    L_cls   = DINO's loss on the [CLS] outputs (:func:`dino.loss.dino_loss`): the
              teacher's centred, sharpened [CLS] distribution of each global crop
              against the student's of every *other* crop, local crops included;
    L_patch = for each global crop, the mean over its masked patches i of
              H(P_t(patch i of the unmasked crop), P_s(patch i of the masked crop)),
              then the mean over the two global crops (an image whose crops are
              both unmasked contributes 0);
    loss    = lambda1 L_cls + lambda2 L_patch, averaged over the images.

The patch distributions have their own centre (the mean teacher patch output
over all tokens of the batch) and their own teacher temperature.  The functions
are pure; :class:`IBOTLoss` wraps them and owns the state (both centres, their
updates, both teacher-temperature schedules).  All computed in float32 (float64
for float64 inputs), outside autocast."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.numerics import precise
from common.engine.schedules import linear_warmup
from dino.loss import (combination_scores as cls_combination_scores, cross_entropy_table, dino_loss,
                       teacher_probs, updated_center)


def patch_loss(student_patch: torch.Tensor, teacher_patch: torch.Tensor, masks: torch.Tensor,
               center: torch.Tensor, student_temp: float, teacher_temp: float,
               reduce: bool = True) -> torch.Tensor:
    """Masked-patch loss of one global view of B images.

    ``masks`` [B, h, w] (or [B, N]) marks the masked patches; ``student_patch``
    and ``teacher_patch`` are the outputs of all N patches [B, N, K] or only of
    the masked ones [M, K] (in the order of ``masks.nonzero()``: image by image,
    row-major).  Per image: the mean over its masked patches of H(P_t, P_s) (0
    without masked patches).  Returns the mean over images (``reduce``) or the
    per-image loss [B]."""
    flat = masks.flatten(1)
    image, patch = flat.nonzero(as_tuple=True)  # the one synchronisation (the count of masked patches)

    def rows(x):
        return x if x.dim() == 2 else x[image, patch]

    with torch.autocast(center.device.type, enabled=False):
        p = teacher_probs(rows(teacher_patch), center, teacher_temp)
        log_q = F.log_softmax(precise(rows(student_patch)) / student_temp, dim=-1)
        per_patch = torch.sum(-p * log_q, dim=-1)  # [M]
        total = per_patch.new_zeros(flat.shape[0]).index_add_(0, image, per_patch)
        per_image = total / flat.sum(1).clamp(min=1).to(total.dtype)
    return per_image.mean() if reduce else per_image


def ibot_loss(student_cls, student_patch, teacher_cls, teacher_patch, masks: torch.Tensor,
              center: torch.Tensor, patch_center: torch.Tensor, student_temp: float, teacher_temp: float,
              teacher_patch_temp: float, n_student: int, n_global: int = 2, lambda1: float = 1.0,
              lambda2: float = 1.0, reduce: bool = True):
    """iBOT's loss of a batch of B images: returns (loss, L_cls, L_patch), means
    over images (``reduce``) or per-image [B].

    ``student_cls`` [n_student * B, K] (global crops first, then the local ones)
    and ``teacher_cls`` [n_global * B, K] as for :func:`dino.loss.dino_loss`;
    ``masks`` [n_global * B, h, w] of the global crops, view after view, with
    ``student_patch`` and ``teacher_patch`` in the forms of :func:`patch_loss`."""
    cls = dino_loss(student_cls, teacher_cls, center, student_temp, teacher_temp, n_student, n_global,
                    reduce=False)
    patch = patch_loss(student_patch, teacher_patch, masks, patch_center, student_temp, teacher_patch_temp,
                       reduce=False).view(n_global, -1).mean(0)
    loss = lambda1 * cls + lambda2 * patch
    return (loss.mean(), cls.mean(), patch.mean()) if reduce else (loss, cls, patch)


def combination_scores(cls_table: torch.Tensor, candidate_patch_loss: torch.Tensor, combos: torch.Tensor,
                       n_global: int, lambda1: float = 1.0, lambda2: float = 1.0) -> torch.Tensor:
    """Per-image iBOT loss of every combination [B, C], with no forward pass per
    combination: the [CLS] term is read from DINO's table of cross-entropies
    (:func:`dino.loss.cross_entropy_table` of the [CLS] outputs), the patch term
    is the mean of the per-candidate patch losses [G, B] of the combination's
    ``n_global`` global candidates (a patch loss depends only on its own view
    and mask).  ``combos`` [C, S] lists the global candidates first; their
    numbers index the rows of ``candidate_patch_loss``."""
    combos = combos.to(cls_table.device)
    cls = cls_combination_scores(cls_table, combos, n_global)
    patch = sum(candidate_patch_loss[combos[:, s]] for s in range(n_global)).t() / n_global
    return lambda1 * cls + lambda2 * patch.to(cls.dtype)


class IBOTLoss(nn.Module):
    """iBOT's loss with its state: the centres of the teacher's [CLS] outputs
    (buffer ``center``) and of its patch outputs (buffer ``patch_center``), both
    [1, K], in :meth:`state_dict` and updated by :meth:`update_centers` after each
    training loss; the student temperature; both teacher temperatures, warmed up
    linearly per epoch, the patch one from ``mask_start_epoch`` on
    (:meth:`temperatures`); and the weights lambda1, lambda2."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, teacher_patch_temp: float = 0.07,
                 warmup_teacher_patch_temp: float = 0.04, warmup_teacher_temp_epochs: int = 30,
                 center_momentum: float = 0.9, patch_center_momentum: float = 0.9, lambda1: float = 1.0,
                 lambda2: float = 1.0, mask_start_epoch: int = 0):
        super().__init__()
        warmup = int(warmup_teacher_temp_epochs)
        self.student_temp = float(student_temp)
        self.teacher_temp_warmup = (warmup, float(warmup_teacher_temp), float(teacher_temp))
        self.teacher_patch_temp_warmup = (warmup, float(warmup_teacher_patch_temp), float(teacher_patch_temp))
        self.mask_start_epoch = int(mask_start_epoch)
        self.center_momentum, self.patch_center_momentum = float(center_momentum), float(patch_center_momentum)
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("patch_center", torch.zeros(1, out_dim))

    @classmethod
    def from_cfg(cls, cfg: dict) -> "IBOTLoss":
        lo = cfg["loss"]
        return cls(cfg["model"]["out_dim"], lo["student_temp"], lo["teacher_temp"], lo["warmup_teacher_temp"],
                   lo["teacher_patch_temp"], lo["warmup_teacher_patch_temp"], lo["warmup_teacher_temp_epochs"],
                   lo["center_momentum"], lo["patch_center_momentum"], lo["lambda1"], lo["lambda2"],
                   cfg["mask"]["start_epoch"])

    def temperatures(self, epoch: int) -> dict:
        """Both teacher temperatures of an epoch: the [CLS] one warmed up from
        epoch 0, the patch one from ``mask_start_epoch`` (iBOT's)."""
        return {"teacher_temp": linear_warmup(epoch, *self.teacher_temp_warmup),
                "teacher_patch_temp": linear_warmup(max(0, epoch - self.mask_start_epoch),
                                                    *self.teacher_patch_temp_warmup)}

    def forward(self, student_cls, student_patch, teacher_cls, teacher_patch, masks: torch.Tensor,
                teacher_temp: float, teacher_patch_temp: float, n_student: int, n_global: int = 2,
                reduce: bool = True):
        """:func:`ibot_loss` with the current centres: (loss, L_cls, L_patch)."""
        return ibot_loss(student_cls, student_patch, teacher_cls, teacher_patch, masks, self.center,
                         self.patch_center, self.student_temp, teacher_temp, teacher_patch_temp, n_student,
                         n_global, self.lambda1, self.lambda2, reduce)

    @torch.no_grad()
    def patch_losses(self, student_patch, teacher_patch, masks: torch.Tensor, teacher_patch_temp: float):
        """Per-view patch loss [n] of n masked views (:func:`patch_loss`)."""
        return patch_loss(student_patch, teacher_patch, masks, self.patch_center, self.student_temp,
                          teacher_patch_temp, reduce=False)

    @torch.no_grad()
    def scores(self, teacher_cls: torch.Tensor, student_cls: torch.Tensor, candidate_patch_loss: torch.Tensor,
               combos: torch.Tensor, teacher_temp: float, n_global: int) -> torch.Tensor:
        """Per-image loss [B, C] of every combination of candidates (teacher_cls
        [G, B, K], student_cls [V, B, K], candidate_patch_loss [G, B]; see
        :func:`combination_scores`)."""
        table = cross_entropy_table(teacher_cls, student_cls, self.center, self.student_temp, teacher_temp)
        return combination_scores(table, candidate_patch_loss, combos, n_global, self.lambda1, self.lambda2)

    @torch.no_grad()
    def update_centers(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """Both centres after a training step, in place (``teacher_patch`` [n, N, K]:
        the patch centre follows the mean over all tokens)."""
        self.center.copy_(updated_center(self.center, teacher_cls, self.center_momentum))
        self.patch_center.copy_(updated_center(self.patch_center, teacher_patch.mean(1), self.patch_center_momentum))
