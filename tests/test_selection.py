"""Selection policies on hand-made profiles."""

import pytest

from moe_peft_ds import RoutingProfile, SieveConfig, select_experts
from moe_peft_ds.config import ConfigError


def profile(counts, E=8):
    return RoutingProfile(
        counts=counts, gate_sums={l: [0.0] * E for l in counts}, tokens=100, samples=10, num_experts=E, top_k=2
    )


P = profile({0: [50, 10, 10, 0, 30, 5, 5, 90], 1: [25, 25, 25, 25, 25, 25, 25, 25], 3: [1, 0, 0, 0, 0, 0, 0, 199]})


def test_topk_fraction_rounds_up_and_breaks_ties_by_lower_id():
    sel = select_experts(P, SieveConfig(policy="topk", fraction=0.3))  # ceil(2.4) = 3
    assert sel == {0: [0, 4, 7], 1: [0, 1, 2], 3: [0, 1, 7]}


def test_topk_k():
    assert select_experts(P, policy="topk", k=1, fraction=None) == {0: [7], 1: [0], 3: [7]}


def test_coverage_is_smallest_set_reaching_share():
    sel = select_experts(P, SieveConfig(policy="coverage", coverage=0.5))
    assert sel[0] == [0, 7]  # 90 + 50 = 140 of 200
    assert sel[1] == [0, 1, 2, 3]  # flat layer needs half of its experts
    assert sel[3] == [7]


def test_random_is_seeded_with_topk_budget():
    a = select_experts(P, SieveConfig(policy="random", fraction=0.25, seed=3))
    b = select_experts(P, SieveConfig(policy="random", fraction=0.25, seed=3))
    c = select_experts(P, SieveConfig(policy="random", fraction=0.25, seed=4))
    assert a == b and a != c
    assert all(len(v) == 2 and len(set(v)) == 2 for v in a.values())


def test_greedy_spends_total_budget_where_coverage_grows_most():
    sel = select_experts(P, SieveConfig(policy="greedy", k=2, fraction=None))
    assert sum(len(v) for v in sel.values()) == 6
    assert sel[3] == [7]  # one expert already covers 99.5%: the budget moves elsewhere
    assert all(len(v) >= 1 for v in sel.values())
    assert len(sel[1]) >= 2


def test_all():
    assert select_experts(P, policy="all") == {l: list(range(8)) for l in (0, 1, 3)}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy="topk", fraction=0.0), "fraction"),
        (dict(policy="topk", fraction=1.5), "fraction"),
        (dict(policy="topk", k=0, fraction=None), "k="),
        (dict(policy="topk", k=-2, fraction=None), "k="),
        (dict(policy="coverage"), "coverage"),
        (dict(policy="coverage", coverage=1.2), "coverage"),
        (dict(policy="best"), "policy"),
    ],
)
def test_bad_policy_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        select_experts(P, SieveConfig(**kwargs))


def test_k_larger_than_expert_count():
    with pytest.raises(ConfigError, match="exceeds"):
        select_experts(P, SieveConfig(policy="topk", k=9, fraction=None))
