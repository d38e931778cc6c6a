"""The selector against a brute-force loop over every combination."""
import itertools

import pytest
import torch
from torch import nn

from common.hvs import (HardViewSelector, Selection, batchnorm_mode, pair_combinations, pool_combinations,
                        resize_views)
from simsiam.loss import pair_scores, simsiam_loss
from tests.helpers import Hooks


class Toy(nn.Module):
    """A model without BatchNorm, so that a forward per pair equals the batched one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Flatten(), nn.LazyLinear(8))
        self.pred = nn.Linear(8, 8)

    def embed(self, x):
        z = self.f(x)
        return self.pred(z), z


def outputs_fn(model):
    def run(cands):
        V, B = len(cands), cands[0].shape[0]
        p, z = model.embed(torch.cat(cands))
        return p.view(V, B, -1), z.view(V, B, -1)
    return run


def scores_fn(outputs, combos):
    return pair_scores(*outputs, combos)


def brute_force(model, cands, pairs, pick=max):
    """Per sample, the pair with the highest (or lowest) SimSiam loss, one forward per pair."""
    best = []
    for b in range(cands[0].shape[0]):
        losses = []
        for k, l in pairs:
            p1, z1 = model.embed(cands[k][b:b + 1])
            p2, z2 = model.embed(cands[l][b:b + 1])
            losses.append(simsiam_loss(p1, p2, z1, z2).item())
        best.append(tuple(pairs[losses.index(pick(losses))]))
    return best


def candidates(n, B=6, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, size, size, generator=g) for _ in range(n)]


def test_pair_combinations():
    assert pair_combinations(4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert pair_combinations(2).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="at least 2"):
        pair_combinations(1)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("mode,pick", [("hard", max), ("easy", min)])
def test_selection_matches_brute_force(n, mode, pick):
    model, cands = Toy(), candidates(n)
    sel = HardViewSelector([(n, 2)], mode=mode)(cands, Hooks(model, outputs_fn(model), scores_fn))
    pairs = list(itertools.combinations(range(n), 2))
    expected = brute_force(model, cands, pairs, pick)
    assert [tuple(r) for r in sel.indices.tolist()] == expected
    for b, (k, l) in enumerate(expected):  # the hard minibatch is assembled per sample
        assert torch.equal(sel.views[0][b], cands[k][b])
        assert torch.equal(sel.views[1][b], cands[l][b])
    assert sel.scores.shape == (6, len(pairs))


def test_different_samples_pick_different_pairs():
    model, cands = Toy(), candidates(4, B=32)
    sel = HardViewSelector([(4, 2)])(cands, Hooks(model, outputs_fn(model), scores_fn))
    assert len({tuple(r) for r in sel.indices.tolist()}) > 1


def test_ties_resolve_to_first_combination():
    cands = candidates(4)
    const = lambda c: torch.zeros(len(c), c[0].shape[0], 3)  # noqa: E731
    sel = HardViewSelector([(4, 2)])(cands, Hooks(nn.Identity(), const, lambda o, combos: torch.zeros(o.shape[1], len(combos))))
    assert sel.indices.tolist() == [[0, 1]] * 6


def test_random_mode_runs_no_forward_and_covers_all_pairs():
    def forbidden(_):
        raise AssertionError("random mode must not run the selection forward")

    cands = candidates(4, B=600, size=2)
    sel = HardViewSelector([(4, 2)], mode="random")(cands, Hooks(nn.Identity(), forbidden, None),
                                                    generator=torch.Generator().manual_seed(0))
    assert sel.scores is None
    counts = torch.bincount(sel.choice, minlength=6)
    assert (counts > 50).all()  # every pair is drawn (expected 100 each)
    again = HardViewSelector([(4, 2)], mode="random")(cands, Hooks(nn.Identity(), forbidden, None),
                                                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(sel.choice, again.choice)


def test_cap_draws_a_subset_and_selects_within_it():
    model, cands = Toy(), candidates(4)
    selector = HardViewSelector([(4, 2)], max_combinations=3)
    sel = selector(cands, Hooks(model, outputs_fn(model), scores_fn), generator=torch.Generator().manual_seed(3))
    assert sel.combos.shape == (3, 2)
    allowed = [tuple(r) for r in sel.combos.tolist()]
    assert len(set(allowed)) == 3 and set(allowed) <= set(itertools.combinations(range(4), 2))
    assert [tuple(r) for r in sel.indices.tolist()] == brute_force(model, cands, allowed)
    assert len(HardViewSelector([(4, 2)], max_combinations=100).combinations()) == 6
    assert len(HardViewSelector([(4, 2)], max_combinations=1).combinations()) == 1


def test_cap_on_pools_never_partial():
    pools = [(4, 2), (6, 3)]
    assert len(pool_combinations(pools)) == 6 * 20
    selector = HardViewSelector(pools, max_combinations=10)
    combos = selector.combinations(torch.Generator().manual_seed(0))
    assert combos.shape == (10, 5)
    assert ((combos[:, :2] >= 0) & (combos[:, :2] < 4)).all()
    assert ((combos[:, 2:] >= 4) & (combos[:, 2:] < 10)).all()
    assert (combos[:, 0] < combos[:, 1]).all() and (combos[:, 2] < combos[:, 3]).all()
    # gathering from pools of different image sizes
    cands = candidates(4, size=8) + candidates(6, size=4, seed=2)
    views = selector.gather(cands, combos[:6])
    assert [tuple(v.shape[-2:]) for v in views] == [(8, 8)] * 2 + [(4, 4)] * 3
    for b in range(6):
        for s in range(5):
            assert torch.equal(views[s][b], cands[combos[b, s]][b])


@pytest.mark.parametrize("factor", [0.75, 0.5, 0.25])
def test_reduced_resolution_selection(factor):
    model, cands = Toy(), candidates(4, size=16)
    seen = []

    def fn(c):
        seen.append(tuple(c[0].shape[-2:]))
        return outputs_fn(model)(c)

    model.embed(torch.zeros(1, 3, round(16 * factor), round(16 * factor)))  # materialise LazyLinear
    sel = HardViewSelector([(4, 2)], resolution=factor)(cands, Hooks(model, fn, scores_fn))
    assert seen == [(round(16 * factor),) * 2]
    assert sel.views[0].shape[-1] == 16  # training uses the full-size views
    small = resize_views(cands, factor)
    assert [tuple(r) for r in sel.indices.tolist()] == brute_force(model, small, list(itertools.combinations(range(4), 2)))
    for b, (k, _) in enumerate(sel.indices.tolist()):
        assert torch.equal(sel.views[0][b], cands[k][b])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="hvs.mode"):
        HardViewSelector(mode="hardest")
    with pytest.raises(ValueError, match="hvs.resolution"):
        HardViewSelector(resolution=1.5)
    with pytest.raises(ValueError, match="hvs.max_combinations"):
        HardViewSelector(max_combinations=-1)
    with pytest.raises(ValueError, match="candidate views"):
        HardViewSelector([(4, 2)])(candidates(3), Hooks(nn.Identity(), None, None))


class BNToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.BatchNorm1d(8))
        self.pred = nn.Linear(8, 8)

    def embed(self, x):
        z = self.f(x)
        return self.pred(z), z


def test_selection_changes_no_training_state():
    model = BNToy().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cands = candidates(4, size=4)
    HardViewSelector([(4, 2)], bn_mode="batch")(cands, Hooks(model, outputs_fn(model), scores_fn))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.f[2].training
    HardViewSelector([(4, 2)], bn_mode="batch_update")(cands, Hooks(model, outputs_fn(model), scores_fn))
    assert not torch.equal(before["f.2.running_mean"], model.f[2].running_mean)


def test_bn_running_mode_uses_running_statistics():
    model = BNToy().train()
    model.f[2].running_mean.fill_(0.5)
    cands = candidates(4, size=4)
    with torch.no_grad(), batchnorm_mode(model, "running"):
        assert not model.f[2].training
        out = model.embed(cands[0])[1]
    assert model.f[2].training
    model.eval()
    with torch.no_grad():
        assert torch.allclose(out, model.embed(cands[0])[1])


def test_from_cfg_takes_the_method_and_the_hvs_section():
    class Toy:
        size_multiple = 16

        def pools(self):
            return [(4, 1), (6, 2)]

    h = {"mode": "random", "max_combinations": 8, "resolution": 0.5, "bn_mode": "running", "precision": "bf16"}
    sel = HardViewSelector.from_cfg(Toy(), h)
    assert (sel.pools, sel.mode, sel.max_combinations, sel.resolution, sel.bn_mode, sel.size_multiple,
            sel.precision) == ([(4, 1), (6, 2)], "random", 8, 0.5, "running", 16, "bf16")
    swept = HardViewSelector.from_cfg(Toy(), h, resolution=0.25, precision="fp32")
    assert (swept.resolution, swept.precision, swept.mode) == (0.25, "fp32", "random")


def test_selector_takes_any_object_with_the_protocols_three_parts():
    """The selector asks a method only for ``model``, ``candidate_outputs`` and
    ``combination_scores``; the step it is given reaches both functions unchanged."""
    seen = []

    class Minimal:
        model = BNToy().train()

        def candidate_outputs(self, model, candidates, step):
            seen.append(("outputs", model, step))
            assert not torch.is_grad_enabled()
            return outputs_fn(model)(candidates)

        def combination_scores(self, outputs, combos, step):
            seen.append(("scores", step))
            return scores_fn(outputs, combos)

    hooks, step, cands = Minimal(), object(), candidates(4, size=4)
    before = {k: v.clone() for k, v in hooks.model.state_dict().items()}
    sel = HardViewSelector([(4, 2)])(cands, hooks, step)
    assert seen == [("outputs", hooks.model, step), ("scores", step)]
    assert all(torch.equal(before[k], v) for k, v in hooks.model.state_dict().items())  # BN mode on ``model``
    with torch.no_grad():
        expected = scores_fn(outputs_fn(hooks.model)(cands), sel.combos)  # batch statistics, as the selection
    assert torch.equal(sel.choice, expected.argmax(1))


def test_chosen_outputs_gather_each_samples_chosen_candidates():
    B, D, pools = 5, 3, [(2, 1), (4, 2)]  # slot 0 from candidates 0-1, slots 1 and 2 from 2-5
    g = torch.Generator().manual_seed(2)
    cands = [torch.randn(B, D, generator=g) for _ in range(6)]

    def outputs(c):  # every candidate's output; the first pool's alone (a prefix of the candidates)
        every = torch.stack(c)
        return {"every": every, "first": every[:2] * 10}

    sel = HardViewSelector(pools)(cands, Hooks(nn.Identity(), outputs, lambda o, combos: torch.randn(B, len(combos),
                                                                                                      generator=g)))
    assert len({tuple(r) for r in sel.indices.tolist()}) > 1  # the samples chose differently
    every = sel.chosen_outputs("every")
    assert len(every) == 3
    for s in range(3):
        for b in range(B):
            assert torch.equal(every[s][b], sel.outputs["every"][sel.indices[b, s], b])
            assert torch.equal(every[s][b], sel.views[s][b])
    (first,) = sel.chosen_outputs("first", slots=[0])
    assert torch.equal(first, torch.stack([sel.outputs["first"][sel.indices[b, 0], b] for b in range(B)]))
    whole = Selection(views=sel.views, indices=sel.indices, choice=sel.choice, combos=sel.combos, scores=sel.scores,
                      outputs=sel.outputs["every"])
    assert all(torch.equal(x, y) for x, y in zip(whole.chosen_outputs(), every))  # key None: the outputs themselves
