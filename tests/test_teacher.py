"""The EMA teacher that DINO, iBOT, BYOL and MoCo v3 share (common/engine/teacher.py):
its update after every step and the rule for reusing the selection's teacher outputs."""
import copy

import pytest
import torch
from torch import nn

from byol.method import BYOLMethod
from common.engine.method import StepInfo
from common.engine.teacher import TeacherMethod, ema_update
from common.hvs import HardViewSelector
from dino.method import DINOMethod
from ibot.method import IBOTMethod
from mocov3.method import MoCoV3Method
from tests.helpers import Hooks


class ToyTeacher(TeacherMethod):
    """Two (teacher, student) pairs, its momentum under its own key."""

    name = "toy_teacher"
    momentum_key = "tau"
    reuse_flag = "reuse_teacher"

    def __init__(self, reuse=True, resolution=1.0, exact=True):
        super().__init__({"hvs": {"reuse_teacher": reuse, "resolution": resolution}}, torch.device("cpu"))
        torch.manual_seed(0)
        student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        head = nn.Linear(2, 2)
        self.model = nn.ModuleDict({"student": student, "teacher": nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4),
                                                                                 nn.Linear(4, 2)),
                                    "head": head, "head_teacher": nn.Linear(2, 2)})
        self.exact = exact

    def ema_pairs(self):
        m = self.model
        return [(m["teacher"], m["student"]), (m["head_teacher"], m["head"])]

    def reuse_exact(self):
        return self.exact


def test_ema_is_the_formula_on_every_pair_and_leaves_the_rest():
    m = ToyTeacher()
    for name in ("student", "head"):
        for p in m.model[name].parameters():
            p.data.normal_()  # every parameter differs from its teacher's
    m.model["student"][1].running_mean.fill_(3.0)  # buffers are not averaged
    before = copy.deepcopy(m.model)
    m.after_step(StepInfo(0, 0, 1, {"tau": 0.7, "momentum": 0.1}))  # its own key: tau
    for t_name, s_name in (("teacher", "student"), ("head_teacher", "head")):
        pairs = zip(m.model[t_name].parameters(), before[t_name].parameters(), before[s_name].parameters())
        for new, old_t, old_s in pairs:
            torch.testing.assert_close(new, 0.7 * old_t + 0.3 * old_s, rtol=0, atol=1e-7)
            assert not torch.equal(new, old_t)
        assert all(torch.equal(a, b) for a, b in zip(m.model[s_name].parameters(), before[s_name].parameters()))
    assert torch.equal(m.model["teacher"][1].running_mean, torch.zeros(4))


def test_ema_of_the_step_is_ema_update_of_each_pair_bitwise():
    """The methods' EMA is :func:`ema_update` of their pairs, in order, with the step's momentum."""
    a, b = ToyTeacher(), ToyTeacher()
    for p in a.model["student"].parameters():
        p.data.normal_()
    b.model.load_state_dict(a.model.state_dict())
    a.after_step(StepInfo(0, 0, 1, {"tau": 0.996}))
    ema_update(b.model["teacher"], b.model["student"], 0.996)
    ema_update(b.model["head_teacher"], b.model["head"], 0.996)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_the_four_methods_name_their_pairs_and_momentum():
    assert [c.momentum_key for c in (DINOMethod, IBOTMethod, BYOLMethod, MoCoV3Method)] == \
        ["momentum", "momentum", "tau", "momentum"]
    assert (DINOMethod.reuse_flag, BYOLMethod.reuse_flag, MoCoV3Method.reuse_flag) == \
        ("reuse_teacher", "reuse_target", None)
    assert all(issubclass(c, TeacherMethod) for c in (DINOMethod, IBOTMethod, BYOLMethod, MoCoV3Method))
    # which backbone evaluations take by default is not the EMA's business: DINO's teacher, BYOL's online network
    assert DINOMethod.has_teacher and not BYOLMethod.has_teacher and not MoCoV3Method.has_teacher


def selection(method, resolution=1.0, renders=None):
    g = torch.Generator().manual_seed(1)
    cands = [torch.randn(4, 1, 4, 4, generator=g) for _ in range(3)]  # B = 4 images per candidate
    hooks = Hooks(method.model, lambda c: torch.stack(c).flatten(2), lambda o, combos: o[combos].sum((1, 3)).T)
    return HardViewSelector([(3, 2)], resolution=resolution)(cands, hooks, renders=renders)


@pytest.mark.parametrize("case", ["selection none", "reduced resolution", "other rendering", "config off",
                                  "config resolution", "method condition"])
def test_reuse_is_refused_unless_every_condition_holds(case):
    method = ToyTeacher(reuse=case != "config off", resolution=0.5 if case == "config resolution" else 1.0,
                        exact=case != "method condition")
    full = selection(method)
    assert full.reusable()
    sel = {"selection none": None, "reduced resolution": selection(method, resolution=0.5),
           "other rendering": selection(method, renders=[torch.zeros(4, 1, 4, 4)] * 3)}.get(case, full)
    assert not method.can_reuse_teacher(sel)
    assert ToyTeacher().can_reuse_teacher(full)  # all conditions hold


def test_reuse_rule_reads_the_config_when_asked():
    method = ToyTeacher()
    sel = selection(method)
    assert method.reuse_teacher and method.can_reuse_teacher(sel)
    method.cfg["hvs"]["reuse_teacher"] = False
    assert not method.reuse_teacher and not method.can_reuse_teacher(sel)
