"""Routing drift while a sieve adapter trains (``--reprofile-every N``).

The sieve chooses its experts once, from a routing profile taken before training. Training the
adapters (attention LoRA above all, which changes the hidden states every router sees) can move
the routing away from that choice. Every N steps this re-profiles the same calibration samples
(collective under expert parallelism, like the first profile) and compares, per MoE layer:

- ``coverage``: the share of the layer's routed (token, expert) assignments that reach the
  selected experts, against its value in the first profile;
- ``jaccard``: the overlap between the selection and today's hottest experts (as many as the
  layer selected).

A layer whose coverage fell by more than ``warn_points`` percentage points is reported; with
``reselect`` the caller grows adapters on the experts that became hot (``newly_hot``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .profiling import RoutingProfile, profile_routing


def coverage(counts: list[int], selected: list[int]) -> float:
    """Share of ``counts`` (one layer's routed assignments per expert) on the ``selected`` experts."""
    total = sum(counts)
    return sum(counts[e] for e in selected) / total if total else 0.0


def hottest(counts: list[int], k: int) -> list[int]:
    """The ``k`` experts with the most routed assignments (ties: the lower id), ascending."""
    return sorted(sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:k])


def jaccard(a: list[int], b: list[int]) -> float:
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else 1.0


def drift_record(step: int, profile: RoutingProfile, baseline: RoutingProfile, selection: dict) -> dict:
    """The log record of one re-profile: per selected layer, its coverage now and at the start, and
    the Jaccard overlap of the selection with today's hottest experts."""
    record = {"step": step, "event": "routing_drift"}
    for layer, chosen in sorted(selection.items()):
        now, start = profile.counts[layer], baseline.counts[layer]
        record[f"drift/coverage/layer_{layer}"] = coverage(now, chosen)
        record[f"drift/coverage_start/layer_{layer}"] = coverage(start, chosen)
        record[f"drift/jaccard/layer_{layer}"] = jaccard(hottest(now, len(chosen)), chosen)
    return record


def falling_layers(record: dict, warn_points: float) -> dict[int, tuple[float, float]]:
    """``{layer: (coverage at the start, now)}`` of the layers whose coverage fell by more than
    ``warn_points`` percentage points."""
    fallen = {}
    for key, now in record.items():
        if key.startswith("drift/coverage/layer_"):
            layer = int(key.rpartition("_")[2])
            start = record[f"drift/coverage_start/layer_{layer}"]
            if (start - now) * 100 > warn_points:
                fallen[layer] = (start, now)
    return fallen


def newly_hot(profile: RoutingProfile, selection: dict, layers) -> dict[int, list[int]]:
    """Per layer of ``layers``: today's hottest experts (as many as it selected) not yet selected."""
    return {
        layer: [e for e in hottest(profile.counts[layer], len(selection[layer])) if e not in selection[layer]]
        for layer in layers
    }


@dataclass
class RoutingDrift:
    """Re-profiles ``batches()`` every ``every`` steps (see the module docstring). ``baseline``:
    the profile the selection came from; ``seconds``: the time spent re-profiling, which the
    caller leaves out of the training time it reports."""

    every: int
    batches: Callable[[], list[dict]]
    selection: dict[int, list[int]]
    baseline: RoutingProfile
    warn_points: float = 10.0
    reselect: bool = False
    log: Callable[[str], None] = print
    seconds: float = 0.0
    grown: list[dict] = field(default_factory=list)  # {step, experts} of every reselection
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.history.append(drift_record(0, self.baseline, self.baseline, self.selection))  # where it starts

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def measure(self, step: int, model: nn.Module) -> tuple[dict, dict[int, list[int]]]:
        """Re-profile (every rank must call this); returns the log record and, with ``reselect``,
        the experts to grow adapters on (``{}`` when nothing drifted)."""
        start = time.perf_counter()
        profile = profile_routing(model, self.batches(), progress=False)
        record = drift_record(step, profile, self.baseline, self.selection)
        fallen = falling_layers(record, self.warn_points)
        grow = {}
        if fallen:
            lines = ", ".join(f"layer {layer} {a:.2f} -> {b:.2f}" for layer, (a, b) in sorted(fallen.items()))
            message = (
                f"routing drift at step {step}: the selected experts' share of routed tokens fell by more than "
                f"{self.warn_points:g} points ({lines})"
            )
            self.log(f"warning: {message}")
            record["drift/warned_layers"] = sorted(fallen)
            if self.reselect:
                grow = {layer: ids for layer, ids in newly_hot(profile, self.selection, fallen).items() if ids}
        self.seconds += time.perf_counter() - start
        self.history.append(record)
        return record, grow

    def grew(self, step: int, experts: dict[int, list[int]]) -> None:
        """Record that adapters were added on ``experts``; the selection now includes them."""
        self.selection = {
            layer: sorted(set(ids) | set(experts.get(layer, []))) for layer, ids in self.selection.items()
        }
        self.grown.append({"step": step, "experts": {str(k): v for k, v in experts.items()}})


def plot_drift(history: list[dict], path) -> None:
    """Coverage and Jaccard overlap per layer against the step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    layers = sorted({int(k.rpartition("_")[2]) for r in history for k in r if k.startswith("drift/coverage/")})
    steps = [r["step"] for r in history]
    for layer in layers:
        axes[0].plot(steps, [r[f"drift/coverage/layer_{layer}"] for r in history], marker="o", label=f"layer {layer}")
        axes[1].plot(steps, [r[f"drift/jaccard/layer_{layer}"] for r in history], marker="o", label=f"layer {layer}")
    axes[0].set(xlabel="step", ylabel="selected experts' share of routed tokens", title="coverage")
    axes[1].set(xlabel="step", ylabel="Jaccard(selection, hottest now)", title="overlap", ylim=(0, 1.05))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
