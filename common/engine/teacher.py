"""Methods with an EMA teacher (DINO, iBOT, BYOL, MoCo v3): the teacher's
update after every step and the rule for reusing the selection's teacher
outputs in the training step.

A method subclasses :class:`TeacherMethod` and states

- :meth:`TeacherMethod.ema_pairs`: its (teacher, student) module pairs;
- :attr:`TeacherMethod.momentum_key`: the key of its EMA momentum among the
  values its ``schedule`` returns;
- :attr:`TeacherMethod.reuse_flag` and :meth:`TeacherMethod.reuse_exact`: the
  ``hvs`` config key that allows reuse and its own condition for reuse to be
  exact (DINO: no BatchNorm in the teacher; MoCo v3: never).
"""
from __future__ import annotations

import torch
from torch import nn

from common.engine.method import SSLMethod, StepInfo


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by
    parameter (buffers are not averaged, as in DINO)."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise RuntimeError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1.0 - momentum)


class TeacherMethod(SSLMethod):
    """A method whose teacher is an exponential moving average of its student."""

    #: the key of the step's EMA momentum in the values :meth:`schedule` returns
    momentum_key: str = "momentum"
    #: the ``hvs`` config key that allows reusing the selection's teacher outputs (None: never)
    reuse_flag: str | None = None

    def ema_pairs(self) -> list:
        """``[(teacher, student), ...]``: the modules the EMA moves, each teacher
        towards its student (parameters in the same order)."""
        raise NotImplementedError

    def after_step(self, step: StepInfo) -> None:
        """Every teacher one EMA step towards its student, with the step's momentum."""
        for teacher, student in self.ema_pairs():
            ema_update(teacher, student, step[self.momentum_key])

    # --- reuse of the selection's teacher outputs -----------------------------------
    def reuse_exact(self) -> bool:
        """The method's own condition for the selection's teacher outputs to be
        what the training step computes (beyond a full-size selection of the
        same rendering and precision)."""
        raise NotImplementedError

    @property
    def reuse_teacher(self) -> bool:
        """Whether a full-size selection's teacher outputs are reused: the config
        flag (:attr:`reuse_flag`), ``hvs.resolution`` 1 and :meth:`reuse_exact`."""
        h = self.cfg["hvs"]
        return (self.reuse_flag is not None and bool(h[self.reuse_flag]) and float(h["resolution"]) == 1.0
                and self.reuse_exact())

    def can_reuse_teacher(self, selection) -> bool:
        """Whether the training step takes the teacher's outputs from ``selection``
        (:attr:`reuse_teacher`, and :meth:`common.hvs.Selection.reusable`: full-size
        candidates of the trained rendering, in fp32 or the step's autocast dtype)."""
        return self.reuse_teacher and selection is not None and selection.reusable()
