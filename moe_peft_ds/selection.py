"""Selection policies: which experts of each MoE layer get LoRA, from a routing profile.

Every policy returns the ``"selection"`` map of DESIGN.md: MoE layer index -> sorted global
expert ids. Ranking is by routed-token count, ties broken by the lower expert id.
"""

from __future__ import annotations

import random

from .config import SieveConfig
from .profiling import RoutingProfile


def ranked(counts: list[int]) -> list[int]:
    """Expert ids from most to least routed; ties go to the lower id."""
    return sorted(range(len(counts)), key=lambda e: (-counts[e], e))


def _topk(profile: RoutingProfile, cfg: SieveConfig) -> dict[int, list[int]]:
    k = cfg.per_layer_budget(profile.num_experts)
    return {layer: ranked(c)[:k] for layer, c in profile.counts.items()}


def _coverage(profile: RoutingProfile, cfg: SieveConfig) -> dict[int, list[int]]:
    """Smallest per-layer set whose share of routed tokens reaches ``cfg.coverage`` (ESFT)."""
    out = {}
    for layer, counts in profile.counts.items():
        total, covered, chosen = sum(counts), 0, []
        for e in ranked(counts):
            chosen.append(e)
            covered += counts[e]
            if covered >= cfg.coverage * total - 1e-9:
                break
        out[layer] = chosen
    return out


def _random(profile: RoutingProfile, cfg: SieveConfig) -> dict[int, list[int]]:
    """The ablation: the same per-layer budget as topk, experts drawn with ``cfg.seed``."""
    k = cfg.per_layer_budget(profile.num_experts)
    rng = random.Random(cfg.seed)
    return {layer: rng.sample(range(profile.num_experts), k) for layer in sorted(profile.counts)}


def _greedy(profile: RoutingProfile, cfg: SieveConfig) -> dict[int, list[int]]:
    """The other ablation: spend a total budget of ``k * layers`` experts where each next
    expert adds the most routed-token share, so skewed layers get fewer and flat layers more.
    Every layer keeps at least one expert."""
    k = cfg.per_layer_budget(profile.num_experts)
    order = {layer: ranked(c) for layer, c in profile.counts.items()}
    shares = {layer: profile.shares(layer).tolist() for layer in profile.counts}
    chosen = {layer: [order[layer][0]] for layer in profile.counts}
    for _ in range(k * len(chosen) - len(chosen)):
        open_layers = [layer for layer in chosen if len(chosen[layer]) < profile.num_experts]
        best = max(open_layers, key=lambda layer: (shares[layer][order[layer][len(chosen[layer])]], -layer))
        chosen[best].append(order[best][len(chosen[best])])
    return chosen


def _all(profile: RoutingProfile, cfg: SieveConfig) -> dict[int, list[int]]:
    return {layer: list(range(profile.num_experts)) for layer in profile.counts}


POLICY_FUNCTIONS = {"topk": _topk, "coverage": _coverage, "random": _random, "greedy": _greedy, "all": _all}


def select_experts(profile: RoutingProfile, cfg: SieveConfig | None = None, **overrides) -> dict[int, list[int]]:
    """Apply a selection policy; ``select_experts(profile, policy="topk", fraction=0.25)`` works too."""
    cfg = cfg or SieveConfig(**overrides)
    if cfg.policy != "all" and profile.tokens <= 0:
        raise ValueError("the routing profile saw no tokens; profile a non-empty calibration set first")
    selection = POLICY_FUNCTIONS[cfg.policy](profile, cfg)
    return {layer: sorted(ids) for layer, ids in sorted(selection.items())}


def selection_summary(selection: dict[int, list[int]], num_experts: int) -> str:
    n = sum(len(v) for v in selection.values())
    return f"{n} of {num_experts * len(selection)} experts over {len(selection)} layers"
