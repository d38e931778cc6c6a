"""common/engine/optim.py against the LARS update of the official SimCLR, BYOL, Barlow
Twins and MoCo v3 code, re-stated here from their published formulas: one and
three steps on identical parameters and gradients, the learning rate changing
between steps as under a schedule, BatchNorm and bias tensors excluded as each
method excludes them."""
import pytest
import torch
from torch import nn

from common.engine.optim import LARS, lars

ETA, WD, MOMENTUM = 1e-3, 1e-4, 0.9
LRS = [0.3, 0.45, 0.6]  # a warm-up: the two momentum forms differ once the lr changes


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def excluded(name: str, p: torch.Tensor, method: str) -> bool:
    """Whether a tensor takes neither weight decay nor the trust ratio, as each method decides."""
    if method in ("mocov3", "barlowtwins"):  # their test: 1-d tensors (normalisation gamma/beta, biases)
        return p.ndim <= 1
    # BYOL: a tensor named "b" or inside a module with "norm" in its name; SimCLR: "bias" or
    # "batch_normalization" in the variable name.  Module 1 and 4 are the BatchNorm layers here.
    return name.endswith("bias") or name.split(".")[0] in ("1", "4")


def official_step(params, grads, state, lr, method):
    """One step of the official update (re-stated; see common/engine/optim.py for the formulas)."""
    for (name, w), g in zip(params, grads):
        d = g.clone()
        q = torch.tensor(1.0)
        if not excluded(name, w, method):
            d = d + WD * w
            w_norm, d_norm = w.norm(), d.norm()
            q = ETA * w_norm / d_norm if (w_norm > 0 and d_norm > 0) else torch.tensor(1.0)
        v = state.setdefault(name, torch.zeros_like(w))
        if method == "simclr":  # classic momentum: v = m v + lr q d; w -= v
            v.mul_(MOMENTUM).add_(lr * q * d)
            w.sub_(v)
        else:  # BYOL (optax chain: decay, LARS scaling and trace, scale by -lr), Barlow Twins, MoCo v3
            v.mul_(MOMENTUM).add_(q * d)
            w.sub_(lr * v)


@pytest.mark.parametrize("method", ["simclr", "byol", "barlowtwins", "mocov3"])
@pytest.mark.parametrize("steps", [1, 3])
def test_lars_equals_the_official_update(method, steps):
    net = small_net()
    ours = lars(net.parameters(), LRS[0], WD, MOMENTUM, ETA, lr_in_momentum=method == "simclr")
    ref = {name: p.detach().clone().double() for name, p in net.named_parameters()}
    names = [name for name, _ in net.named_parameters()]
    # our groups exclude exactly what the method excludes
    adapted = {id(p) for p in ours.param_groups[0]["params"]}
    for name, p in net.named_parameters():
        assert (id(p) not in adapted) == excluded(name, p, method), name
    state = {}
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen) * (10.0 ** -step) for p in net.parameters()]
        grads[0] = WD * ref[names[0]].float() * -0.9  # |g| close to wd |w|: where the two denominators differ most
        for p, g in zip(net.parameters(), grads):
            p.grad = g.clone()
        for group in ours.param_groups:
            group["lr"] = LRS[step]
        ours.step()
        official_step([(n, ref[n]) for n in names], [g.double() for g in grads], state, LRS[step], method)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach().double(), ref[name], rtol=0, atol=1e-6, msg=name)


def test_the_trust_ratio_uses_the_norm_of_the_decayed_gradient():
    """|g + wd w|, not timm's |g| + wd |w|: with g = -0.9 wd w the step is 19x larger."""
    w = nn.Parameter(torch.ones(4, 4))
    w.grad = -0.9 * WD * w.detach().clone()
    opt = LARS([{"params": [w], "weight_decay": WD}], lr=1.0, momentum=0.0, trust_coeff=ETA)
    opt.step()
    d = 0.1 * WD * torch.ones(4, 4)  # g + wd w
    trust = ETA * 4.0 / d.norm()
    torch.testing.assert_close(w.detach(), torch.ones(4, 4) - trust * d, rtol=0, atol=1e-7)


def test_zero_norms_and_trust_clip():
    w = nn.Parameter(torch.zeros(3, 3))
    w.grad = torch.ones(3, 3)
    LARS([w], lr=0.5, weight_decay=WD, momentum=0.0).step()  # |w| = 0: trust 1
    torch.testing.assert_close(w.detach(), torch.full((3, 3), -0.5))
    v = nn.Parameter(torch.ones(3, 3))
    v.grad = torch.full((3, 3), 1e-4)  # trust = 1e-3 * 3 / 3e-4 = 10: trust / lr = 20, capped at 1
    LARS([v], lr=0.5, weight_decay=0.0, momentum=0.0, trust_clip=True).step()
    torch.testing.assert_close(v.detach(), torch.ones(3, 3) - 0.5 * 1e-4, rtol=0, atol=1e-8)
