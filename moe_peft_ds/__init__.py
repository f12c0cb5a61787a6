"""moe_peft_ds: parameter-efficient fine-tuning of Mixture-of-Experts models under DeepSpeed.

The data path, one module per step: load (``models``) -> inject (``backends`` for the sieve:
transformers, DeepSpeed-MoE and Megatron-core expert layers;
``mixlora`` for MixLoRA) -> profile (``profiling``) -> select (``selection``) -> train
(``train``) -> checkpoint (``checkpoint``).
"""
from .backends.hf import all_experts_selection, apply_sieve_lora
from .backends.hf_families import supported_model_types
from .checkpoint import convert_adapter, load_adapter, merge_adapter, remove_adapter, save_adapter
from .config import AdapterConfig, ConfigError, MixLoRAConfig, SieveConfig
from .mixlora import apply_mixlora
from .profiling import RoutingProfile, profile_routing
from .selection import select_experts

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig", "ConfigError", "MixLoRAConfig", "RoutingProfile", "SieveConfig", "all_experts_selection",
    "apply_mixlora", "apply_sieve_lora", "convert_adapter",
    "load_adapter", "merge_adapter", "profile_routing", "remove_adapter", "save_adapter", "select_experts",
    "supported_model_types",
]
