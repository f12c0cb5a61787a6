"""Which experts each expert-parallel rank holds, per MoE layer.

Under expert parallelism every rank of an EP group of size N holds E/N experts of each layer and
waits, at each layer's all-to-all, for the rank with the most routed rows. Routing is skewed
(the sieve's premise), so holding experts by id (``contiguous``: rank r holds r*E/N ..) leaves
the ranks holding hot experts doing most of the work. ``balanced`` spreads the profiled loads:
longest processing time first under the constraint that every rank holds exactly E/N experts
(the dispatch's split sizes are per rank and local expert), then pairwise swaps while they lower
the busiest rank's load. It is deterministic, so every rank computes the same placement from the
same (all-reduced) routing profile.

An expert held once keeps its rows on one rank, so no such placement beats the hottest expert's
load (and its rank's other experts): ``lower_bound`` says how close to 1.0 the busiest rank can
get at all. ``redundant`` slots lift that bound (as DeepSeek's EPLB does): every rank holds E/N + R
experts, the hottest ones on several ranks, and the dispatch splits an expert's rows evenly over its
copies (``copies``). One of them, the expert's owner (``owners``), alone holds the expert's adapter;
the other copies read it from the owner every step.

A placement is ``list[list[int]]``: rank r's global expert ids, ascending. Checkpoints keep
global ids, so an adapter trained under one placement loads under any other.
"""

from __future__ import annotations

from typing import Sequence

from .config import ConfigError

PLACEMENTS = ("contiguous", "balanced")


def contiguous(num_experts: int, ep_size: int) -> list[list[int]]:
    """Rank r holds experts ``r*E/N .. (r+1)*E/N - 1``."""
    _check_divides(num_experts, ep_size)
    share = num_experts // ep_size
    return [list(range(r * share, (r + 1) * share)) for r in range(ep_size)]


def _check_divides(num_experts: int, ep_size: int) -> None:
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size {ep_size} must divide the {num_experts} experts per layer")


def balanced(
    loads: Sequence[float], ep_size: int, groups: Sequence[Sequence[int]] | None = None, redundant: int = 0
) -> list[list[int]]:
    """A placement of ``len(loads)`` experts on ``ep_size`` ranks, each holding E/N of them, whose
    busiest rank carries as little of ``loads`` as LPT plus pairwise swaps find. With ``groups``
    (a partition of the experts, e.g. a MixLoRA pool's tasks), every rank holds an equal share of
    each group, and swaps stay within a group. With ``redundant`` R, every rank holds E/N + R
    experts (``replicated``)."""
    num = len(loads)
    _check_divides(num, ep_size)
    if redundant:
        if groups:
            raise ValueError("redundant expert slots are not supported with expert groups (MixLoRA pools)")
        return replicated(loads, ep_size, redundant)
    groups = [list(g) for g in groups] if groups else [list(range(num))]
    if sorted(e for g in groups for e in g) != list(range(num)):
        raise ValueError(f"groups {groups} are not a partition of the {num} experts")
    group_of = {e: i for i, g in enumerate(groups) for e in g}
    room = [[len(g) // ep_size for g in groups] for _ in range(ep_size)]
    if any(len(g) % ep_size for g in groups):
        raise ValueError(f"ep_size {ep_size} must divide every group's size {[len(g) for g in groups]}")
    held: list[list[int]] = [[] for _ in range(ep_size)]
    total = [0.0] * ep_size
    for e in sorted(range(num), key=lambda e: (-loads[e], e)):  # heaviest first; ties by id
        g = group_of[e]
        r = min((r for r in range(ep_size) if room[r][g]), key=lambda r: (total[r], r))
        held[r].append(e)
        total[r] += loads[e]
        room[r][g] -= 1
    _improve_by_swaps(held, total, loads, group_of)
    return [sorted(h) for h in held]


def _improve_by_swaps(held: list[list[int]], total: list[float], loads, group_of) -> None:
    """Swap one expert of the busiest rank with one of another rank (same group) while that lowers
    the larger of the two ranks' loads; each swap lowers the busiest load or the number of ranks
    at it, so this ends."""
    for _ in range(len(loads) ** 2):  # a bound; in practice a few swaps
        busy = max(range(len(held)), key=lambda r: (total[r], -r))
        best = None  # (new max of the pair, rank, expert out, expert in)
        for r in range(len(held)):
            if r == busy:
                continue
            for a in held[busy]:
                for b in held[r]:
                    if group_of[a] != group_of[b] or loads[a] <= loads[b] or a in held[r] or b in held[busy]:
                        continue  # (a rank holds an expert at most once)
                    delta = loads[a] - loads[b]
                    pair = max(total[busy] - delta, total[r] + delta)
                    if pair < total[busy] - 1e-12 and (best is None or pair < best[0]):
                        best = (pair, r, a, b)
        if best is None:
            return
        _, r, a, b = best
        held[busy][held[busy].index(a)], held[r][held[r].index(b)] = b, a
        delta = loads[a] - loads[b]
        total[busy] -= delta
        total[r] += delta


def max_redundant(num_experts: int, ep_size: int) -> int:
    """The most redundant slots per rank: E/N (a rank holds at most twice its share), and no more
    than the experts it does not hold."""
    share = num_experts // ep_size
    return min(share, num_experts - share)


def check_redundant(num_experts: int, ep_size: int, redundant: int) -> None:
    """Raise (one line, a ``ConfigError``) unless ``redundant`` extra slots per rank fit."""
    if not 0 <= redundant <= max_redundant(num_experts, ep_size):
        raise ConfigError(
            f"--redundant-experts {redundant}: must be in [0, {max_redundant(num_experts, ep_size)}] "
            f"with {num_experts} experts over {ep_size} ranks (at most E/N, and only experts a rank does not hold)"
        )


def replicated(loads: Sequence[float], ep_size: int, redundant: int) -> list[list[int]]:
    """E/N + ``redundant`` experts per rank: the N*R extra slots go one by one to the expert whose
    load per copy is largest (at most one copy per rank), then the copies are packed, each copy
    carrying its expert's load over its copies: experts with several copies first, each on the
    least-loaded ranks with room, then the single ones by LPT, then pairwise swaps."""
    num = len(loads)
    _check_divides(num, ep_size)
    check_redundant(num, ep_size, redundant)
    copies = [1] * num
    for _ in range(ep_size * redundant):
        e = max((e for e in range(num) if copies[e] < ep_size), key=lambda e: (loads[e] / copies[e], -e))
        copies[e] += 1
    room = [num // ep_size + redundant] * ep_size
    held: list[list[int]] = [[] for _ in range(ep_size)]
    total = [0.0] * ep_size
    by_load = sorted(range(num), key=lambda e: (-loads[e] / copies[e], e))
    for e in [e for e in by_load if copies[e] > 1] + [e for e in by_load if copies[e] == 1]:
        free = sorted((r for r in range(ep_size) if room[r]), key=lambda r: (total[r], r))
        if len(free) < copies[e]:
            raise ValueError(f"cannot place {copies[e]} copies of expert {e}: {len(free)} ranks have room")
        for r in free[: copies[e]]:
            held[r].append(e)
            total[r] += loads[e] / copies[e]
            room[r] -= 1
    _improve_by_swaps(held, total, [loads[e] / copies[e] for e in range(num)], {e: 0 for e in range(num)})
    return [sorted(h) for h in held]


def copies(placement: list[list[int]]) -> dict[int, int]:
    """How many ranks hold each expert (1 everywhere without redundant slots)."""
    count: dict[int, int] = {}
    for held in placement:
        for e in held:
            count[e] = count.get(e, 0) + 1
    return count


def owned_by(placement: list[list[int]], rank: int) -> list[int]:
    """The experts ``rank`` holds whose adapters live there (``owners``), ascending."""
    owner = owners(placement)
    return [e for e in placement[rank] if owner[e] == rank]


def owners(placement: list[list[int]]) -> dict[int, int]:
    """Each expert's owner, the rank that holds its adapter: its only holder, or, for an expert with
    copies, the holder that owns the fewest experts with copies so far (in id order; ties: the lower
    rank). Copies are the hot experts, which the sieve selects: spreading their ownership spreads
    the adapters and their optimizer states over the ranks. A function of the placement alone, so a
    growing selection never moves an adapter."""
    count = copies(placement)
    owner = {e: r for r, held in enumerate(placement) for e in held if count[e] == 1}
    owned = [0] * len(placement)
    for e in sorted(e for e in count if count[e] > 1):
        r = min((r for r, held in enumerate(placement) if e in held), key=lambda r: (owned[r], r))
        owner[e] = r
        owned[r] += 1
    return owner


def rank_loads(loads: Sequence[float], placement: list[list[int]]) -> list[float]:
    """Each rank's summed load, an expert's load split evenly over its copies."""
    count = copies(placement)
    return [float(sum(loads[e] / count[e] for e in held)) for held in placement]


def imbalance(loads: Sequence[float], placement: list[list[int]]) -> float:
    """The busiest rank's load over the mean rank load (1.0: perfectly even)."""
    per_rank = rank_loads(loads, placement)
    mean = sum(per_rank) / len(per_rank)
    return max(per_rank) / mean if mean else 1.0


def lower_bound(loads: Sequence[float], ep_size: int) -> float:
    """No placement that keeps each expert's rows on one rank, E/N experts per rank, does better
    than this ``imbalance``: the hottest expert's rank also holds E/N - 1 others, at best the coldest."""
    mean = sum(loads) / ep_size
    if not mean:
        return 1.0
    hottest = max(range(len(loads)), key=lambda e: loads[e])
    rest = sorted(load for e, load in enumerate(loads) if e != hottest)
    return max(1.0, (loads[hottest] + sum(rest[: len(loads) // ep_size - 1])) / mean)


def rank_major(placement: list[list[int]]) -> list[int]:
    """Every rank's experts side by side, rank 0 first (the dispatch's ``order``)."""
    return [e for held in placement for e in held]


def check_placement(placement: list[list[int]], num_experts: int, ep_size: int, redundant: bool = False) -> None:
    """Raise unless ``placement`` gives each of ``ep_size`` ranks E/N ascending ids, every expert once;
    with ``redundant``, E/N + R ascending distinct ids each (R within ``check_redundant``), every expert at least once."""
    slots = len(placement[0]) if redundant and placement else num_experts // ep_size
    if len(placement) != ep_size or any(len(h) != slots for h in placement):
        raise ValueError(f"a placement needs {ep_size} ranks of {slots} experts, got {placement}")
    if redundant:
        check_redundant(num_experts, ep_size, slots - num_experts // ep_size)
    if any(h != sorted(set(h)) for h in placement) or sorted(copies(placement)) != list(range(num_experts)):
        raise ValueError(f"placement {placement} does not hold each of the {num_experts} experts, ascending")


def expert_loads(counts: Sequence[int], selected: Sequence[int] = (), adapter_share: float = 0.0) -> list[float]:
    """An expert's work: its routed rows, times ``1 + adapter_share`` where it carries an adapter
    (``adapter_share``: the LoRA GEMMs' FLOPs per row over the frozen expert's)."""
    chosen = set(selected)
    return [c * (1.0 + adapter_share if e in chosen else 1.0) for e, c in enumerate(counts)]


def placement_summary(counts: dict[int, Sequence[int]], placements: dict[int, list[list[int]]]) -> str:
    """One log line: per layer, the busiest rank's routed rows over the mean, balanced and by id."""
    ep_size = len(next(iter(placements.values())))
    extra = len(next(iter(placements.values()))[0]) - len(next(iter(counts.values()))) // ep_size
    parts = [
        f"{layer}: {imbalance(counts[layer], p):.2f} (by id {imbalance(counts[layer], contiguous(len(counts[layer]), ep_size)):.2f})"
        for layer, p in sorted(placements.items())
    ]
    kind = f"balanced with {extra} redundant slot(s) per rank" if extra else "balanced"
    return f"expert placement {kind}; busiest rank / mean routed rows per layer: " + ", ".join(parts)
