"""The capped selector draws its subset of combinations without enumerating them:
ranks sampled uniformly without replacement, unranked pool by pool."""
import collections
import itertools
import math

import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from common.hvs import (HardViewSelector, num_pool_combinations, pool_combinations, sample_ranks,
                        unrank_combinations)
from tests.helpers import Hooks

LAYOUTS = [[(4, 2)], [(2, 1), (2, 1), (6, 3)], [(3, 1), (5, 2)], [(1, 1), (5, 5), (7, 3), (2, 1)]]


def assert_valid(rows, pools):
    """Each row picks k distinct candidates of each pool, increasing, inside the
    pool's index range; rows are distinct and in enumeration (lexicographic) order."""
    rows = [list(r) for r in rows]
    assert rows, "empty selection"
    for row in rows:
        assert len(row) == sum(k for _, k in pools)
        start = i = 0
        for n, k in pools:
            part = row[i: i + k]
            assert all(start <= c < start + n for c in part), (row, pools)
            assert all(a < b for a, b in zip(part, part[1:])), (row, pools)
            start, i = start + n, i + k
    assert len({tuple(r) for r in rows}) == len(rows)
    assert rows == sorted(rows)


@pytest.mark.parametrize("pools", LAYOUTS)
def test_unranking_equals_enumeration(pools):
    table = pool_combinations(pools)
    assert num_pool_combinations(pools) == len(table)
    assert unrank_combinations(pools, range(len(table))) == table.tolist()
    selector = HardViewSelector(pools, max_combinations=1)
    assert not selector.enumerated
    for r in (0, len(table) // 2, len(table) - 1):
        assert selector.combo(r).tolist() == table[r].tolist()
    assert selector.baseline_combo.tolist() == table[0].tolist()
    with pytest.raises(IndexError):
        unrank_combinations(pools, [len(table)])


@pytest.mark.parametrize("pools,cap", [([(4, 2)], 1), ([(4, 2)], 5), ([(2, 1), (2, 1), (6, 3)], 7),
                                       ([(3, 1), (5, 2)], 29), ([(2, 1), (2, 1), (16, 8)], 128)])
def test_sampled_rows_are_valid_distinct_sorted_and_exactly_cap(pools, cap):
    selector = HardViewSelector(pools, max_combinations=cap)
    for seed in range(5):
        combos = selector.combinations(torch.Generator().manual_seed(seed))
        assert combos.dtype == torch.long and combos.shape == (cap, sum(k for _, k in pools))
        assert_valid(combos.tolist(), pools)
    assert not selector.enumerated
    # they are rows of the table, found again there
    table = {tuple(r): i for i, r in enumerate(pool_combinations(pools).tolist())}
    assert all(tuple(r) in table for r in combos.tolist())


def test_the_subset_depends_only_on_the_generator():
    selector = HardViewSelector([(2, 1), (2, 1), (10, 5)], max_combinations=16)
    a = selector.combinations(torch.Generator().manual_seed(3))
    torch.manual_seed(123)  # the global generator plays no part
    b = selector.combinations(torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, selector.combinations(torch.Generator().manual_seed(4)))
    # an enumerated selector (the table built by a caller) compares the very same rows
    enumerated = HardViewSelector([(2, 1), (2, 1), (10, 5)], max_combinations=16)
    assert len(enumerated.all_combos) == 4 * 252 and enumerated.enumerated
    assert torch.equal(enumerated.combinations(torch.Generator().manual_seed(3)), a)
    ranks = sample_ranks(4 * 252, 16, torch.Generator().manual_seed(3))
    assert torch.equal(enumerated.all_combos[ranks], a)


def test_uncapped_keeps_the_full_table():
    pools = [(2, 1), (2, 1), (6, 3)]
    for cap in (0, 80, 1000):
        selector = HardViewSelector(pools, max_combinations=cap)
        assert selector.enumerated and not selector.capped
        assert torch.equal(selector.combinations(torch.Generator()), pool_combinations(pools))
    assert HardViewSelector(pools, max_combinations=79).capped


def test_sampling_is_uniform():
    """Chi-square goodness of fit with fixed seeds (deterministic; p > 0.001).
    Per combination: pools [(4, 2), (3, 1)] (18 combinations), cap 3, 3000 draws;
    per subset: pools [(4, 2)] (6 combinations), cap 2, so all C(6, 2) = 15
    subsets, 3000 draws."""
    selector = HardViewSelector([(4, 2), (3, 1)], max_combinations=3)
    g = torch.Generator().manual_seed(0)
    counts = collections.Counter()
    for _ in range(3000):
        counts.update(tuple(r) for r in selector.combinations(g).tolist())
    table = [tuple(r) for r in pool_combinations([(4, 2), (3, 1)]).tolist()]
    observed = [counts[r] for r in table]
    assert sum(observed) == 9000
    assert chisquare(observed).pvalue > 1e-3

    selector = HardViewSelector([(4, 2)], max_combinations=2)
    g = torch.Generator().manual_seed(1)
    subsets = collections.Counter(tuple(map(tuple, selector.combinations(g).tolist())) for _ in range(3000))
    table = [tuple(r) for r in pool_combinations([(4, 2)]).tolist()]
    observed = [subsets[s] for s in itertools.combinations(table, 2)]
    assert sum(observed) == 3000
    assert chisquare(observed).pvalue > 1e-3


def test_sample_ranks_beyond_int64():
    total = 4 * math.comb(48, 24) ** 2  # ~1e28 > 2**63
    ranks = sample_ranks(total, 64, torch.Generator().manual_seed(0))
    assert len(set(ranks)) == 64 and ranks == sorted(ranks) and 0 <= ranks[0] and ranks[-1] < total
    assert ranks[-1] > 2 ** 63  # the draws cover the whole range
    pools = [(2, 1), (2, 1), (48, 24), (48, 24)]
    assert_valid(unrank_combinations(pools, ranks), pools)
    assert sample_ranks(5, 5, torch.Generator()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        sample_ranks(5, 0, torch.Generator())


@pytest.mark.parametrize("mode", ["hard", "easy"])
def test_choice_over_the_sampled_rows_equals_brute_force(mode):
    """Scores are a deterministic function of the combination (the sum of a random
    per-sample table over its candidates); the selector's choice is the best of
    the sampled rows, and the same as the enumerated selector's."""
    pools, B = [(2, 1), (2, 1), (8, 4)], 6
    V = sum(n for n, _ in pools)
    weight = torch.randn(B, V, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    candidates = [weight[:, v, None] for v in range(V)]  # candidate v of sample b carries weight[b, v]

    def candidate_outputs(cands):
        return torch.cat(cands, 1)  # [B, V]

    def combination_scores(outputs, combos):
        return outputs[:, combos].sum(-1)  # [B, C]

    def select(selector, seed):
        return selector(candidates, Hooks(nn.Identity(), candidate_outputs, combination_scores),
                        generator=torch.Generator().manual_seed(seed))

    sampled = HardViewSelector(pools, mode=mode, max_combinations=20)
    enumerated = HardViewSelector(pools, mode=mode, max_combinations=20)
    enumerated.all_combos
    for seed in range(3):
        sel = select(sampled, seed)
        assert not sampled.enumerated
        rows = sel.combos.tolist()
        assert len(rows) == 20
        assert_valid(rows, pools)
        pick = max if mode == "hard" else min
        for b in range(B):
            best = pick(range(len(rows)), key=lambda c: sum(weight[b, i].item() for i in rows[c]))
            assert sel.choice[b].item() == best
            assert sel.indices[b].tolist() == rows[best]
            assert [v[b, 0].item() for v in sel.views] == [weight[b, i].item() for i in rows[best]]
        other = select(enumerated, seed)
        assert torch.equal(other.combos, sel.combos) and torch.equal(other.choice, sel.choice)


def test_ties_resolve_to_the_first_sampled_row():
    selector = HardViewSelector([(2, 1), (2, 1), (8, 4)], max_combinations=10)
    cands = [torch.zeros(3, 1) for _ in range(12)]
    sel = selector(cands, Hooks(nn.Identity(), lambda c: None, lambda o, combos: torch.zeros(3, len(combos))),
                   generator=torch.Generator().manual_seed(0))
    assert sel.choice.tolist() == [0, 0, 0] and sel.indices.tolist() == [sel.combos[0].tolist()] * 3


def test_start_up_stays_flat_with_many_candidates():
    """2 x 2 x C(24, 12) = 10.8 million combinations, cap 128: nothing is enumerated."""
    pools = [(2, 1), (2, 1), (24, 12)]
    selector = HardViewSelector(pools, max_combinations=128)
    assert selector.num_combinations == 4 * math.comb(24, 12) and selector.capped
    assert not selector.enumerated  # no table: the only rows ever built are the ones returned
    combos = selector.combinations(torch.Generator().manual_seed(0))
    assert combos.shape == (128, 2 + 12)
    assert_valid(combos.tolist(), pools)
    assert selector.baseline_combo.tolist() == [0, 2] + list(range(4, 16))
    random = HardViewSelector(pools, mode="random", max_combinations=128)
    sel = random([torch.full((2, 1), float(v)) for v in range(28)], Hooks(nn.Identity(), None, None),
                 generator=torch.Generator().manual_seed(0))
    assert sel.combos.shape == (128, 14) and sel.indices.shape == (2, 14)
    assert [v[:, 0].tolist() for v in sel.views] == sel.indices.t().float().tolist()
    assert not selector.enumerated and not random.enumerated
