"""Adapter and sieve configuration: dataclasses with help text, validated on creation.

Every field carries ``metadata={"help": ...}`` (the same text the launchers show in
``--help``), and ``__post_init__`` rejects bad values naming the field and what is allowed,
before any model is touched.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

METHODS = ("lora", "dora", "sieve")
MIXLORA_METHODS = ("mixlora", "mixdora")
POLICIES = ("topk", "coverage", "random", "greedy", "all")
# Attention projections LoRA may target; a model has some of them (standard: the first four; MLA:
# q_a/q_b/kv_a/kv_b; fused: qkv_proj); naming one the model lacks is an error at injection.
ATTENTION_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "out_proj",
    "dense",
)
STANDARD_ATTENTION = ATTENTION_TARGETS[:4]
ROUTINGS = ("topk", "dynamic", "switch")
AUX_LOSS_POOLINGS = ("pooled", "per_layer_sum")
CAPACITY_SCOPES = ("batch", "sequence")
ADAPTER_DTYPES = ("float32", "base")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


@dataclass
class LoRAConfig:
    """The LoRA/DoRA settings every method shares; ``AdapterConfig`` and ``MixLoRAConfig`` add theirs."""

    METHODS = ()  # the ``method`` values a subclass accepts
    REQUIRED = ("method", "r", "alpha", "model_type")  # keys a saved config must have

    method: str = field(default="", metadata={"help": "adapter method"})
    r: int = field(default=8, metadata={"help": "LoRA rank r (> 0)"})
    alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha; scaling is alpha/r, or alpha/sqrt(r) with rsLoRA"}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input, in [0, 1)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha/sqrt(r)"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: train a per-output magnitude vector as well"})
    attention_targets: list[str] = field(
        default_factory=list,
        metadata={"help": f"attention projections that get plain LoRA, any of {ATTENTION_TARGETS}"},
    )
    adapter_dtype: str = field(
        default="float32",
        metadata={
            "help": f"dtype of the adapter parameters, one of {ADAPTER_DTYPES}: float32 whatever the base's dtype (as PEFT "
            "and the MixLoRA reference: a bf16/fp16 base computes its LoRA updates in fp32), or the base's own"
        },
    )
    base_model: str = field(
        default="", metadata={"help": "name or path of the base model (recorded, checked on load)"}
    )
    model_type: str = field(default="", metadata={"help": "transformers model_type of the base model (filled in)"})
    hidden_size: int = field(default=0, metadata={"help": "hidden size of the base model (filled in)"})
    expert_placement: dict[int, list[list[int]]] = field(
        default_factory=dict,
        metadata={
            "help": "expert parallelism with a load-aware placement: per MoE layer, the experts each rank held in "
            "training (filled in; informative: an adapter loads under any placement and EP degree)"
        },
    )

    def __post_init__(self):
        self.expert_placement = {
            int(k): [list(map(int, held)) for held in v] for k, v in self.expert_placement.items()
        }
        if self.method not in self.METHODS:
            raise ConfigError(
                f"method={self.method!r} is not supported by {type(self).__name__}; choose one of {self.METHODS}"
            )
        check_rank_alpha("", self.r, self.alpha)
        if not (_is_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1)")
        bad = set(self.attention_targets) - set(ATTENTION_TARGETS)
        if bad:
            raise ConfigError(f"attention_targets has {sorted(bad)}; allowed: {ATTENTION_TARGETS}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(f"adapter_dtype={self.adapter_dtype!r} is unknown; choose one of {ADAPTER_DTYPES}")

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.r, self.alpha)

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def rank_of(self, expert: int) -> int:
        """LoRA rank of one expert (the same for all unless a subclass overrides it)."""
        return self.r

    def scaling_of(self, expert: int) -> float:
        return self.scaling

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "LoRAConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read adapter config {path}: {err}") from err
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "adapter config") -> "LoRAConfig":
        """The config class that ``raw["method"]`` names, built from ``raw``; unknown or missing keys fail."""
        method = raw.get("method")
        target = (
            next((c for c in (AdapterConfig, MixLoRAConfig) if method in c.METHODS), None)
            if cls is LoRAConfig
            else cls
        )
        if target is None:
            raise ConfigError(f"{source} has method={method!r}; known: {METHODS + MIXLORA_METHODS}")
        known = {f.name for f in fields(target)}
        missing = sorted(set(target.REQUIRED) - raw.keys())
        if missing:
            raise ConfigError(f"{source} lacks required keys {missing}; it was not written by save_adapter")
        unknown = sorted(raw.keys() - known)
        if unknown:
            raise ConfigError(f"{source} has unknown keys {unknown}; known keys: {sorted(known)}")
        return target(**{**target.written_before(raw), **raw})

    @classmethod
    def written_before(cls, raw: dict) -> dict:
        """The values a saved config that lacks a later key was trained with (it reloads as it
        trained): before ``adapter_dtype`` the adapters took the base's dtype."""
        return {"adapter_dtype": "base"}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_rank_alpha(where: str, r, alpha) -> None:
    if not _is_int(r) or r <= 0:
        raise ConfigError(f"{where}r={r!r} must be a positive integer")
    if not (_is_real(alpha) and alpha > 0):
        raise ConfigError(f"{where}alpha={alpha!r} must be a finite number > 0")


def check_selection(selection, num_experts: int = 0) -> dict[int, list[int]]:
    """``selection`` as ``{layer: sorted expert ids}``; refuses layer keys that are not integers
    (JSON's strings of digits are), ids that are not integers (floats, bools), negative, repeated
    or (given ``num_experts``) out-of-range ids, instead of rounding or dropping them."""
    if not isinstance(selection, dict):
        raise ConfigError(f"selection must map MoE layer -> expert ids, not {type(selection).__name__}")
    out = {}
    for key, ids in selection.items():
        layer = int(key) if _is_int(key) or (isinstance(key, str) and key.isdigit()) else None
        if layer is None:
            raise ConfigError(f"selection has layer {key!r}; layers are integers >= 0")
        if not isinstance(ids, (list, tuple)):
            raise ConfigError(f"selection for layer {layer} must be a list of expert ids, not {ids!r}")
        bound = f"in [0, {num_experts})" if num_experts else ">= 0"
        bad = [e for e in ids if not _is_int(e) or e < 0 or (num_experts and e >= num_experts)]
        if bad:
            raise ConfigError(f"selection for layer {layer} has expert ids {bad}; expert ids are integers {bound}")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"selection for layer {layer} names an expert more than once: {list(ids)}")
        out[layer] = sorted(int(e) for e in ids)
    return out


@dataclass
class AdapterConfig(LoRAConfig):
    """LoRA/DoRA on the experts of an MoE model: the sieve (selected experts) or all experts."""

    METHODS = METHODS
    REQUIRED = LoRAConfig.REQUIRED + ("selection", "num_experts")

    method: str = field(default="sieve", metadata={"help": f"adapter method, one of {METHODS}"})
    expert_targets: list[str] = field(
        default_factory=lambda: ["gate_up_proj", "down_proj"],
        metadata={"help": "fused expert tensors that get LoRA: gate_up_proj and/or down_proj"},
    )
    shared_expert_lora: bool = field(
        default=False, metadata={"help": "plain LoRA on the shared experts' gate/up/down projections"}
    )
    selection: dict[int, list[int]] = field(
        default_factory=dict, metadata={"help": "layer index -> sorted global expert ids that carry LoRA"}
    )
    num_experts: int = field(default=0, metadata={"help": "experts per MoE layer of the base model (filled in)"})

    def __post_init__(self):
        super().__post_init__()
        bad = set(self.expert_targets) - {"gate_up_proj", "down_proj"}
        if bad or not self.expert_targets:
            raise ConfigError(
                f"expert_targets={self.expert_targets!r}; allowed: a non-empty subset of gate_up_proj, down_proj"
            )
        # JSON turns int keys into strings; normalise so a loaded config equals the saved one.
        self.selection = check_selection(self.selection, self.num_experts if _is_int(self.num_experts) else 0)


@dataclass
class MixLoRAConfig(LoRAConfig):
    """MixLoRA / MixDoRA on a dense model: each FFN becomes a routed mixture of LoRA experts
    over the frozen FFN, with plain LoRA on attention."""

    METHODS = MIXLORA_METHODS
    REQUIRED = LoRAConfig.REQUIRED + ("num_experts", "top_k", "routing")

    method: str = field(default="mixlora", metadata={"help": f"one of {MIXLORA_METHODS} (mixdora: DoRA experts)"})
    attention_targets: list[str] = field(
        default_factory=lambda: list(STANDARD_ATTENTION),
        metadata={"help": f"attention projections with plain LoRA (default {STANDARD_ATTENTION}; [] for none)"},
    )
    num_experts: int = field(default=8, metadata={"help": "LoRA experts per FFN (>= 1)"})
    top_k: int = field(default=2, metadata={"help": "experts per token (topk), the most experts per token (dynamic)"})
    routing: str = field(
        default="topk",
        metadata={
            "help": f"routing strategy, one of {ROUTINGS}: softmax top-k "
            "renormalised; dynamic: top-p; switch: top-1 with capacity"
        },
    )
    top_p: float = field(
        default=0.8,
        metadata={
            "help": "dynamic routing: experts in order of probability up to the first at which "
            "their cumulative probability exceeds this, in (0, 1]"
        },
    )
    top_p_renormalize: bool = field(
        default=False,
        metadata={
            "help": "dynamic routing: renormalise the kept experts' weights to sum to 1 (default: the router probabilities, as the reference)"
        },
    )
    top_p_max_experts: int | None = field(
        default=None,
        metadata={
            "help": "dynamic routing: keep at most this many experts per token (default: no cap, as the reference)"
        },
    )
    router_temperature: float = field(
        default=0.0,
        metadata={"help": "softmax temperature of the router, probabilities = softmax(logits / t) (0: off, i.e. 1)"},
    )
    capacity_factor: float = field(
        default=1.0, metadata={"help": "switch routing: tokens per expert = ceil(factor x tokens / experts)"}
    )
    capacity_scope: str = field(
        default="batch",
        metadata={
            "help": f"switch routing, one of {CAPACITY_SCOPES}: the tokens a capacity counts, the whole batch or each sequence"
        },
    )
    router_init_range: float = field(default=0.02, metadata={"help": "std of the router's N(0, std) initialisation"})
    router_aux_loss_coef: float = field(
        default=0.01, metadata={"help": "load-balancing loss coef x E x sum_e f_e P_e (>= 0)"}
    )
    router_aux_loss_pooling: str = field(
        default="pooled",
        metadata={
            "help": f"one of {AUX_LOSS_POOLINGS}: one loss over all layers' tokens (as transformers and the reference), "
            "or each layer's loss summed (about num_layers times stronger)"
        },
    )
    router_z_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "router z-loss coef x mean(logsumexp(logits)^2) (>= 0; default 0.001 with switch routing, else 0)"
        },
    )
    jitter_noise: float = field(
        default=0.0,
        metadata={
            "help": "training only: input x U(1-eps, 1+eps), eps in [0, 1); the router's and the experts' input "
            "(topk/dynamic, as the reference), the router's only (switch)"
        },
    )
    expert_r: dict[int, int] = field(default_factory=dict, metadata={"help": "per-expert rank overrides {expert: r}"})
    expert_alpha: dict[int, float] = field(
        default_factory=dict, metadata={"help": "per-expert alpha overrides {expert: alpha}"}
    )
    expert_tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "continual learning (filled in): the task each expert was trained on, by expert id ('a+b' after a merge)"
        },
    )

    def __post_init__(self):
        self.use_dora = self.use_dora or self.method == "mixdora"
        super().__post_init__()
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ConfigError(f"num_experts={self.num_experts!r} must be an integer >= 1")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k={self.top_k!r} must be in [1, num_experts={self.num_experts}]")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing={self.routing!r} is unknown; choose one of {ROUTINGS}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p!r} must be in (0, 1]")
        cap = self.top_p_max_experts
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or not 1 <= cap):
            raise ConfigError(f"top_p_max_experts={cap!r} must be a positive integer (or None: no cap)")
        if not (isinstance(self.router_temperature, (int, float)) and 0.0 <= self.router_temperature < math.inf):
            raise ConfigError(f"router_temperature={self.router_temperature!r} must be a finite number >= 0 (0: off)")
        for name, allowed in (("capacity_scope", CAPACITY_SCOPES), ("router_aux_loss_pooling", AUX_LOSS_POOLINGS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is unknown; choose one of {allowed}")
        if self.router_z_loss_coef is None:  # Switch Transformers train their router with a z-loss
            self.router_z_loss_coef = 0.001 if self.routing == "switch" else 0.0
        if not self.capacity_factor > 0:
            raise ConfigError(f"capacity_factor={self.capacity_factor!r} must be > 0")
        for name in ("router_init_range", "router_aux_loss_coef", "router_z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not 0.0 <= self.jitter_noise < 1.0:
            raise ConfigError(f"jitter_noise={self.jitter_noise!r} must be in [0, 1)")
        self.expert_r = {int(k): v for k, v in self.expert_r.items()}
        self.expert_alpha = {int(k): float(v) for k, v in self.expert_alpha.items()}
        outside = sorted(e for e in {**self.expert_r, **self.expert_alpha} if not 0 <= e < self.num_experts)
        if outside:
            raise ConfigError(f"per-expert overrides name experts {outside} outside [0, {self.num_experts})")
        for e in range(self.num_experts):
            check_rank_alpha(f"expert {e}: ", self.rank_of(e), self.expert_alpha.get(e, self.alpha))
        if self.expert_tasks and len(self.expert_tasks) != self.num_experts:
            raise ConfigError(f"expert_tasks names {len(self.expert_tasks)} experts, num_experts={self.num_experts}")

    @classmethod
    def written_before(cls, raw: dict) -> dict:
        """Before 2026-12-01 (issue 18) dynamic routing renormalised and kept at most ``top_k``
        experts, and the balancing loss was summed over the layers."""
        return {
            **super().written_before(raw),
            "top_p_renormalize": True,
            "top_p_max_experts": raw.get("top_k", 2),
            "router_aux_loss_pooling": "per_layer_sum",
        }

    def rank_of(self, expert: int) -> int:
        return self.expert_r.get(expert, self.r)

    def scaling_of(self, expert: int) -> float:
        return self.scaling_for(self.rank_of(expert), self.expert_alpha.get(expert, self.alpha))


@dataclass
class SieveConfig:
    """How experts are chosen from a routing profile."""

    policy: str = field(default="topk", metadata={"help": f"selection policy, one of {POLICIES}"})
    fraction: float | None = field(
        default=0.25, metadata={"help": "share of experts per layer for topk/random/greedy, in (0, 1]"}
    )
    k: int | None = field(
        default=None, metadata={"help": "experts per layer for topk/random/greedy (overrides fraction)"}
    )
    coverage: float | None = field(
        default=None, metadata={"help": "routed-token share to reach per layer for the coverage policy, in (0, 1]"}
    )
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
