"""iBOT's networks (Zhou et al. 2021, Section 3.3): DINO's student and EMA
teacher, each a ViT whose [CLS] *and* patch tokens go through one shared head
(DINO's head, :class:`dino.model.DINOHead`: the online tokenizer).  The
student's global crops are masked: masked patch embeddings are replaced by a
learned mask token.  The teacher sees unmasked crops; its copy of the mask token
follows the EMA but is never used."""
from __future__ import annotations

import torch
from torch import nn

from common.backbones import vit_tokens
from common.views.multicrop import MultiCropNet
from dino.model import DINO


class MaskedViTNet(MultiCropNet):
    """ViT + shared head.  ``net(crops)`` gives the [CLS] outputs of crops of any
    sizes (as DINO's network: the local crops); :meth:`tokens` and
    :meth:`head_outputs` give the [CLS] and patch outputs of same-size crops."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__(backbone, head)
        # zero-initialised and [1, D] as iBOT's (a matrix, so it gets weight decay like iBOT's)
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim))

    def tokens(self, crops, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone tokens [n B, 1 + N, D] of n same-size crop batches [B, 3, H, W];
        ``masks`` [n B, h, w] masks the patches."""
        return vit_tokens(self.backbone, torch.cat(list(crops)), masks, self.mask_token)

    def head_outputs(self, tokens: torch.Tensor, masks: torch.Tensor | None = None):
        """(cls [n B, K], patch) through the shared head: ``patch`` holds the
        outputs of all patches [n B, N, K], or with ``masks`` only those of the
        masked patches [M, K] (``masks.nonzero()`` order): the loss uses no other
        student patch, and the head is applied token by token."""
        cls, patches = tokens[:, 0], tokens[:, 1:]
        rows = patches.reshape(-1, patches.shape[-1]) if masks is None else patches[masks.flatten(1)]
        out = self.head(torch.cat([cls, rows]))
        cls_out, patch_out = out[: len(cls)], out[len(cls):]
        if masks is None:
            patch_out = patch_out.view(*patches.shape[:2], -1)
        return cls_out, patch_out


class IBOT(DINO):
    """Student and teacher (:class:`MaskedViTNet`).  ``forward(views, n_global,
    masks=masks)`` (DINO's signature; the masks keyword-only) with the two
    global crops first (``n_global``) and their masks [2B, h, w] returns

        student_cls [V B, K], student_patch [M, K] (masked patches only),
        teacher_cls [2B, K], teacher_patch [2B, N, K];

    without ``masks`` nothing is masked and ``student_patch`` holds all
    patches [2B, N, K].  The teacher's output to pass as ``teacher_out`` (to
    skip its backbone) is its backbone tokens of the global crops
    [2B, 1 + N, D]: the patch centre needs all its patches, which the
    selection computes only for the masked ones."""

    def forward(self, views, n_global: int, teacher_out: torch.Tensor | None = None, *,
                masks: torch.Tensor | None = None):
        tokens = self.student.tokens(views[:n_global], masks)
        cls_global, student_patch = self.student.head_outputs(tokens, masks)
        student_cls = cls_global
        if len(views) > n_global:
            student_cls = torch.cat([cls_global, self.student(views[n_global:])])
        with torch.no_grad():
            teacher_tokens = self.teacher.tokens(views[:n_global]) if teacher_out is None else teacher_out
            teacher_cls, teacher_patch = self.teacher.head_outputs(teacher_tokens)
        return student_cls, student_patch, teacher_cls, teacher_patch
