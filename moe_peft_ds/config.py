"""Adapter and sieve configuration: dataclasses with help text, validated on creation.

Every field carries ``metadata={"help": ...}`` (the same text the launchers show in
``--help``), and ``__post_init__`` rejects bad values naming the field and what is allowed,
before any model is touched.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

METHODS = ("lora", "dora", "sieve")
POLICIES = ("topk", "coverage", "random", "greedy", "all")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


@dataclass
class AdapterConfig:
    """LoRA/DoRA settings shared by every method of this project."""

    method: str = field(default="sieve", metadata={"help": f"adapter method, one of {METHODS}"})
    r: int = field(default=8, metadata={"help": "LoRA rank r (> 0)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling is alpha/r, or alpha/sqrt(r) with rsLoRA"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input, in [0, 1)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha/sqrt(r)"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: train a per-output magnitude vector as well"})
    expert_targets: list[str] = field(
        default_factory=lambda: ["gate_up_proj", "down_proj"],
        metadata={"help": "fused expert tensors that get LoRA: gate_up_proj and/or down_proj"},
    )
    attention_targets: list[str] = field(
        default_factory=list,
        metadata={"help": f"attention projections that get plain LoRA, any of {ATTENTION_TARGETS} (off for the sieve)"},
    )
    shared_expert_lora: bool = field(
        default=False, metadata={"help": "plain LoRA on the shared experts' gate/up/down projections"}
    )
    base_model: str = field(default="", metadata={"help": "name or path of the base model (recorded, checked on load)"})
    model_type: str = field(default="", metadata={"help": "transformers model_type of the base model (filled in)"})
    selection: dict[int, list[int]] = field(
        default_factory=dict, metadata={"help": "layer index -> sorted global expert ids that carry LoRA"}
    )
    num_experts: int = field(default=0, metadata={"help": "experts per MoE layer of the base model (filled in)"})
    hidden_size: int = field(default=0, metadata={"help": "hidden size of the base model (filled in)"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not supported; choose one of {METHODS}")
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r={self.r!r} must be a positive integer")
        if not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1)")
        bad = set(self.expert_targets) - {"gate_up_proj", "down_proj"}
        if bad or not self.expert_targets:
            raise ConfigError(f"expert_targets={self.expert_targets!r}; allowed: a non-empty subset of gate_up_proj, down_proj")
        bad = set(self.attention_targets) - set(ATTENTION_TARGETS)
        if bad:
            raise ConfigError(f"attention_targets has {sorted(bad)}; allowed: {ATTENTION_TARGETS}")
        # JSON turns int keys into strings; normalise so a loaded config equals the saved one.
        self.selection = {int(k): sorted(int(e) for e in v) for k, v in self.selection.items()}

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "AdapterConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read adapter config {path}: {err}") from err
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "adapter config") -> "AdapterConfig":
        known = {f.name for f in fields(cls)}
        required = {"method", "r", "alpha", "selection", "model_type", "num_experts"}
        missing = sorted(required - raw.keys())
        if missing:
            raise ConfigError(f"{source} lacks required keys {missing}; it was not written by save_adapter")
        unknown = sorted(raw.keys() - known)
        if unknown:
            raise ConfigError(f"{source} has unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**raw)


@dataclass
class SieveConfig:
    """How experts are chosen from a routing profile."""

    policy: str = field(default="topk", metadata={"help": f"selection policy, one of {POLICIES}"})
    fraction: float | None = field(default=0.25, metadata={"help": "share of experts per layer for topk/random/greedy, in (0, 1]"})
    k: int | None = field(default=None, metadata={"help": "experts per layer for topk/random/greedy (overrides fraction)"})
    coverage: float | None = field(default=None, metadata={"help": "routed-token share to reach per layer for the coverage policy, in (0, 1]"})
    seed: int = field(default=0, metadata={"help": "seed of the random policy"})

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy!r} is unknown; choose one of {POLICIES}")
        if self.k is not None and (not isinstance(self.k, int) or self.k <= 0):
            raise ConfigError(f"k={self.k!r} must be a positive integer")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction={self.fraction!r} must be in (0, 1]")
        if self.coverage is not None and not 0.0 < self.coverage <= 1.0:
            raise ConfigError(f"coverage={self.coverage!r} must be in (0, 1]")
        if self.policy == "coverage" and self.coverage is None:
            raise ConfigError("policy='coverage' needs coverage=P (e.g. 0.5)")
        if self.policy in ("topk", "random", "greedy") and self.k is None and self.fraction is None:
            raise ConfigError(f"policy={self.policy!r} needs k or fraction")

    def per_layer_budget(self, num_experts: int) -> int:
        """Experts per layer for topk/random/greedy: k, or ceil(fraction * E)."""
        if self.k is not None:
            if self.k > num_experts:
                raise ConfigError(f"k={self.k} exceeds the {num_experts} experts per layer")
            return self.k
        return max(1, math.ceil(self.fraction * num_experts - 1e-9))
