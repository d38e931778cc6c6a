"""DINO's loss (Caron et al. 2021, Eq. 1 and Algorithm 1) and the HVS score of
every combination of candidate views.

For an image with teacher views t_1..t_G (the global crops) and student views
s_1..s_V (the same global crops first, then the local crops):

    P_t(i) = softmax((g_teacher(t_i) - c) / tau_t)         (centred, sharpened)
    log P_s(v) = log_softmax(g_student(s_v) / tau_s)
    loss = 1/|T| sum_{(i, v) in T} H(P_t(i), P_s(v)),  H(p, q) = -sum_k p_k log q_k,

over the terms T = {(i, v) : v != i} (a view is never compared with itself),
averaged over the images of the batch.  The centre c is updated after the loss
from the batch mean of the teacher outputs (:func:`batch_center`).

The functions are pure (tensors in, tensors out); :class:`DINOLoss` wraps them
and owns the loss's state, as the official ``DINOLoss``: the centre (a buffer,
checkpointed), its update, the student temperature and the teacher-temperature
schedule.

All computed in float32 (float64 for float64 inputs), outside autocast."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.engine import dist
from common.numerics import precise
from common.engine.schedules import linear_warmup


def _chunks(x, n: int) -> list:
    return list(x) if isinstance(x, (list, tuple)) else list(x.chunk(n))


def teacher_probs(teacher_out: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Centred and sharpened teacher distribution, softmax((t - c) / temp)."""
    return F.softmax((precise(teacher_out) - precise(center)) / temp, dim=-1)


def dino_loss(student_out, teacher_out, center: torch.Tensor, student_temp: float, teacher_temp: float,
              n_student: int, n_teacher: int, reduce: bool = True) -> torch.Tensor:
    """DINO loss of a batch of B images.

    ``student_out``: [n_student * B, K] (views concatenated, globals first) or a
    list of n_student tensors [B, K]; ``teacher_out`` likewise with the
    n_teacher global views.  Returns the mean over images (``reduce``) or the
    per-image loss [B]."""
    with torch.autocast(center.device.type, enabled=False):
        s_views = [F.log_softmax(precise(s) / student_temp, dim=-1) for s in _chunks(student_out, n_student)]
        t_views = [teacher_probs(t, center, teacher_temp) for t in _chunks(teacher_out, n_teacher)]
        total, terms = 0.0, 0
        for i, p in enumerate(t_views):
            for v, log_q in enumerate(s_views):
                if v == i:
                    continue
                total = total + torch.sum(-p * log_q, dim=-1)
                terms += 1
        if terms == 0:
            raise ValueError("the DINO loss needs at least two views (no teacher-student pair of different views)")
        per_image = total / terms
    return per_image.mean() if reduce else per_image


@torch.no_grad()
def cross_entropy_table(teacher_out: torch.Tensor, student_out: torch.Tensor, center: torch.Tensor,
                        student_temp: float, teacher_temp: float) -> torch.Tensor:
    """H(P_t(i), P_s(j)) for every teacher candidate i and student candidate j
    of every image: teacher_out [Vt, B, K], student_out [V, B, K] -> [B, Vt, V]."""
    with torch.autocast(center.device.type, enabled=False):
        p = teacher_probs(teacher_out, center, teacher_temp)
        log_q = F.log_softmax(precise(student_out) / student_temp, dim=-1)
        return -torch.einsum("ibk,jbk->bij", p, log_q)


def combination_scores(table: torch.Tensor, combos: torch.Tensor, n_teacher: int) -> torch.Tensor:
    """Per-image DINO loss of every combination, read from the table of
    :func:`cross_entropy_table` (no forward pass per combination).

    ``combos`` [C, S] lists the candidate chosen for each slot, the ``n_teacher``
    global slots first (their candidates index both the teacher's and the
    student's rows of the table).  Returns [B, C]: the mean over the terms
    (i, v), i < n_teacher, v != i, of table[b, combos[c, i], combos[c, v]],
    exactly :func:`dino_loss` on those views."""
    B, Vt, V = table.shape
    combos = combos.to(table.device)
    flat = table.reshape(B, Vt * V)
    S = combos.shape[1]
    score = table.new_zeros(B, combos.shape[0])
    for i in range(n_teacher):
        for v in range(S):
            if v != i:
                score += flat[:, combos[:, i] * V + combos[:, v]]
    return score / (n_teacher * (S - 1))


@torch.no_grad()
def batch_center(teacher_out: torch.Tensor) -> torch.Tensor:
    """Mean teacher output over the global batch (all ranks), [1, K]."""
    return dist.all_reduce_mean(teacher_out.float().mean(dim=0, keepdim=True))  # equal batches per rank


def updated_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> torch.Tensor:
    """c <- m c + (1 - m) mean(teacher outputs of the global batch)."""
    return center * momentum + batch_center(teacher_out) * (1.0 - momentum)


class DINOLoss(nn.Module):
    """DINO's loss with its state: the centre of the teacher outputs (buffer
    ``center`` [1, K], in :meth:`state_dict`), updated by :meth:`update_center`
    after each training loss; the student temperature; and the teacher
    temperature, warmed up linearly per epoch (:meth:`temperatures`: the loop
    gets it from the method's ``schedule`` and hands it back to every call)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
                 center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = float(student_temp)
        self.teacher_temp_warmup = (int(warmup_teacher_temp_epochs), float(warmup_teacher_temp), float(teacher_temp))
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))

    @classmethod
    def from_cfg(cls, cfg: dict) -> "DINOLoss":
        lo = cfg["loss"]
        return cls(cfg["model"]["out_dim"], lo["student_temp"], lo["teacher_temp"], lo["warmup_teacher_temp"],
                   lo["warmup_teacher_temp_epochs"], lo["center_momentum"])

    def temperatures(self, epoch: int) -> dict:
        """The teacher temperature of an epoch, ``{"teacher_temp": ...}``."""
        return {"teacher_temp": linear_warmup(epoch, *self.teacher_temp_warmup)}

    def forward(self, student_out, teacher_out, teacher_temp: float, n_student: int, n_teacher: int,
                reduce: bool = True) -> torch.Tensor:
        """:func:`dino_loss` with the current centre."""
        return dino_loss(student_out, teacher_out, self.center, self.student_temp, teacher_temp,
                         n_student, n_teacher, reduce)

    @torch.no_grad()
    def scores(self, teacher_out: torch.Tensor, student_out: torch.Tensor, combos: torch.Tensor,
               teacher_temp: float, n_teacher: int) -> torch.Tensor:
        """Per-image loss [B, C] of every combination of candidates (teacher_out
        [Vt, B, K], student_out [V, B, K]; see :func:`combination_scores`)."""
        table = cross_entropy_table(teacher_out, student_out, self.center, self.student_temp, teacher_temp)
        return combination_scores(table, combos, n_teacher)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """The centre after a training step (:func:`updated_center`), in place."""
        self.center.copy_(updated_center(self.center, teacher_out, self.center_momentum))
