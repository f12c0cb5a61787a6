"""moe_peft_ds: parameter-efficient fine-tuning of Mixture-of-Experts models under DeepSpeed.

The data path, one module per step: load (``models``) -> inject (``backends``) -> profile
(``profiling``) -> select (``selection``) -> train (``train``) -> checkpoint (``checkpoint``).
"""
from .backends.hf import all_experts_selection, apply_sieve_lora, supported_model_types
from .checkpoint import load_adapter, merge_adapter, remove_adapter, save_adapter
from .config import AdapterConfig, ConfigError, SieveConfig
from .profiling import RoutingProfile, profile_routing
from .selection import select_experts

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig", "ConfigError", "RoutingProfile", "SieveConfig", "all_experts_selection", "apply_sieve_lora",
    "load_adapter", "merge_adapter", "profile_routing", "remove_adapter", "save_adapter", "select_experts",
    "supported_model_types",
]
