"""Megatron-core on CPU, for tests only.

megatron-core 0.16.1 assumes CUDA in four places that a CPU run reaches; ``cpu_shims``
patches them for the duration of a test (never in the package):

- ``torch.cuda.current_device()`` (the router moves its weight there, the attention's
  memory buffer allocates there): returns ``"cpu"``;
- ``moe_utils.te_general_gemm`` is referenced without being defined when Transformer Engine
  is absent: defined as None, which selects Megatron's own router GEMM;
- the CUDA RNG tracker's ``fork`` (attention dropout): a no-op context (dropout is 0 here);
- ``torch.compile`` (Megatron's ``jit_fuser``) is turned off: these tests check values, not fusion.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

megatron = pytest.importorskip(
    "megatron.core", reason="megatron-core is an optional extra: pip install -e .[megatron]"
)


@contextlib.contextmanager
def cpu_shims():
    import torch._dynamo
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
    from megatron.core.transformer.moe import moe_utils

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "current_device", lambda: "cpu")
        mp.setattr(moe_utils, "te_general_gemm", None, raising=False)
        mp.setattr(CudaRNGStatesTracker, "fork", lambda self, name=None: contextlib.nullcontext())
        mp.setattr(torch._dynamo.config, "disable", True)
        yield


def init_parallel(ep: int = 1, etp: int = 1) -> None:
    """Megatron's process groups over the already initialised gloo world."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)


def tiny_config(**overrides):
    from megatron.core.transformer import TransformerConfig

    kw = dict(
        num_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        num_moe_experts=4,
        moe_ffn_hidden_size=12,
        ffn_hidden_size=20,
        use_cpu_initialization=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        moe_router_topk=2,
        moe_token_dispatcher_type="allgather",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def pg_collection():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def sequential_experts(config, num_local: int, seed: int = 0):
    """A ``SequentialMLP`` of ``num_local`` experts on CPU (local Megatron linears)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    torch.manual_seed(seed)
    return SequentialMLP(
        num_local,
        config,
        MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        pg_collection=pg_collection(),
    )


def grouped_experts(config, num_local: int):
    """A legacy ``GroupedMLP``: only its constructor needs the grouped_gemm package, which
    moe_peft_ds's wrapper never calls; the check is skipped here."""
    from megatron.core.transformer.moe import experts

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experts.gg, "assert_grouped_gemm_is_available", lambda: None)
        return experts.GroupedMLP(num_local, config, pg_collection=pg_collection())


def gpt_moe(config, vocab: int = 64, seed: int = 0):
    """A small Megatron GPTModel with MoE layers (local spec, SequentialMLP experts)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=64)


def permute(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """Tokens ``x [T, H]`` routed by ``index/weights [T, k]`` -> rows sorted by expert, the expert
    of each row, rows per expert, each row's prob and its token (Megatron's permuted layout)."""
    flat = index.reshape(-1)
    expert, order = torch.sort(flat, stable=True)
    token = order // index.shape[1]
    return x[token], expert, torch.bincount(flat, minlength=num_experts), weights.reshape(-1)[order], token


def gpt_dense(config, vocab: int = 64, seed: int = 0):
    """A small dense Megatron GPTModel (local spec): the base for MixLoRA."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed)
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=vocab, max_sequence_length=64
    )
