"""SimSiam's loss against its formula, its model and its optimiser recipe."""
import math

import torch

from common.engine.config import COMMON_SPEC, resolve
from common.engine.method import StepInfo
from simsiam.loss import negative_cosine, pair_scores, simsiam_loss
from simsiam.method import SimSiamMethod


def test_negative_cosine_formula():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    direct = torch.tensor([-(p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(5)])
    assert torch.allclose(negative_cosine(p, z), direct, atol=1e-6)
    assert torch.allclose(negative_cosine(p, p), -torch.ones(5))


def test_simsiam_loss_formula_and_stop_gradient():
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(4, 6, generator=g, requires_grad=True) for _ in range(4))
    loss = simsiam_loss(p1, p2, z1, z2)
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(loss, -0.5 * (cos(p1, z2, dim=1).mean() + cos(p2, z1, dim=1).mean()))
    per = simsiam_loss(p1, p2, z1, z2, reduce=False)
    assert per.shape == (4,) and torch.allclose(per.mean(), loss)
    loss.backward()
    assert p1.grad is not None and z1.grad is None and z2.grad is None  # stop-gradient on z


def test_pair_scores_against_loop():
    g = torch.Generator().manual_seed(2)
    p, z = torch.randn(5, 3, 8, generator=g), torch.randn(5, 3, 8, generator=g)
    pairs = torch.tensor([[0, 1], [0, 4], [2, 3], [3, 4]])
    scores = pair_scores(p, z, pairs)
    for c, (k, l) in enumerate(pairs.tolist()):
        assert torch.allclose(scores[:, c], simsiam_loss(p[k], p[l], z[k], z[l], reduce=False), atol=1e-6)


def make(overrides=()):
    cfg = resolve({**COMMON_SPEC, **SimSiamMethod.spec}, None, ["model.arch=resnet18", *overrides])
    return cfg, SimSiamMethod(cfg, torch.device("cpu"))


def test_model_recipe():
    _, m = make()
    proj, pred = m.model.projector, m.model.predictor
    assert [l.out_features for l in proj if isinstance(l, torch.nn.Linear)] == [2048, 2048, 2048]
    assert not proj[-1].affine  # last BN without affine parameters
    assert [l.out_features for l in pred if isinstance(l, torch.nn.Linear)] == [512, 2048]
    # zero-init residual: the last BN of every residual block starts at zero
    assert all(torch.all(b.bn2.weight == 0) for b in m.model.backbone.layer1)
    p1, p2, z1, z2 = m.model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert p1.shape == z2.shape == (4, 2048) and not z1.requires_grad


def test_optimizer_recipe():
    cfg, m = make(["train.epochs=10"])
    opt = m.build_optimizer(512)
    assert math.isclose(m.init_lr, 0.05 * 512 / 256)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4
    m.schedule(opt, StepInfo(5, 0, 100))
    lrs = [g["lr"] for g in opt.param_groups]
    assert math.isclose(lrs[0], 0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert math.isclose(lrs[1], 0.1)  # fixed predictor lr


def test_lr_schedule_is_bitwise_the_cosine_per_epoch():
    """The schedule (now ``common.engine.schedules.cosine_schedule``) gives exactly, to
    the bit, SimSiam's formula init_lr * 0.5 * (1 + cos(pi * epoch / epochs))."""
    cfg, m = make()
    for batch in (256, 512, 100, 4096):
        opt = m.build_optimizer(batch)
        init_lr = 0.05 * batch / 256
        for epochs in (1, 3, 10, 100, 800):
            cfg["train"]["epochs"] = epochs
            for epoch in range(epochs):
                old = init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
                assert m.schedule(opt, StepInfo(epoch, 3, 7)) == {"lr": old}
                assert [g["lr"] for g in opt.param_groups] == [old, init_lr]  # float equality


def test_hooks_take_the_step():
    """PairMethod's candidate_outputs: (p, z) of every candidate, [V, B, ...],
    from one forward; the scores and the loss take the StepInfo."""
    _, m = make(["model.cifar_stem=true", "model.proj_hidden=32", "model.dim=32", "model.pred_dim=8"])
    m.model.eval()  # BatchNorm on running statistics: one forward equals a forward per candidate
    g = torch.Generator().manual_seed(3)
    candidates = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(4)]
    step = StepInfo(0, 0, 1, {"lr": 0.1})
    with torch.no_grad():
        p, z = m.candidate_outputs(m.model, candidates, step)
        assert p.shape == z.shape == (4, 2, 32)
        for v, x in enumerate(candidates):
            pv, zv = m.model.embed(x)
            assert torch.allclose(p[v], pv, atol=1e-5) and torch.allclose(z[v], zv, atol=1e-5)
        pairs = torch.tensor([[0, 1], [2, 3]])
        assert torch.equal(m.combination_scores((p, z), pairs, step), pair_scores(p, z, pairs))
    loss, stats = m.training_loss(m.model, candidates[:2], None, step)
    assert loss.ndim == 0 and set(stats) == {"out_std"} and 0 < stats["out_std"] < 1
