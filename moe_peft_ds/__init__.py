"""moe_peft_ds: parameter-efficient fine-tuning of Mixture-of-Experts models under DeepSpeed.

Layers, each importing only those below it: core (``config``, ``lora``, ``routing``, ``routes``,
``dispatch``, ``modules``) <- backends (``backends``: the model layouts of transformers, DeepSpeed-MoE
and Megatron-core, one ``backend_for(model)``) <- methods (``sieve``, ``mixlora``, ``continual``,
``multi_adapter``, ``profiling``, ``selection``) <- API (``checkpoint``, ``parallel``, ``train``, ``export``, ``importing``,
this package) <- launchers (``launch/``).
"""

import contextlib as _contextlib
import sys as _sys

# DeepSpeed's logger writes to the stdout it finds when first imported (below): bind it to stderr,
# so that a program's stdout holds only what it prints (``plan --json``).
with _contextlib.redirect_stdout(_sys.stderr):
    from .backends.hf_families import supported_model_types
    from .checkpoint import convert_adapter, load_adapter, merge_adapter, remove_adapter, save_adapter
    from .config import AdapterConfig, ConfigError, MixLoRAConfig, SieveConfig
    from .export import export_adapter
    from .importing import import_esft, import_peft
    from .mixlora import apply_mixlora
    from .profiling import RoutingProfile, profile_routing
    from .selection import select_experts
    from .sieve import all_experts_selection, apply_sieve_lora

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig",
    "ConfigError",
    "MixLoRAConfig",
    "RoutingProfile",
    "SieveConfig",
    "all_experts_selection",
    "apply_mixlora",
    "apply_sieve_lora",
    "convert_adapter",
    "export_adapter",
    "import_esft",
    "import_peft",
    "load_adapter",
    "merge_adapter",
    "profile_routing",
    "remove_adapter",
    "save_adapter",
    "select_experts",
    "supported_model_types",
]
