"""What the GPU tests share: tiny adapted models, batches, loss-and-gradient runs, tolerance
checks and ``launch/train.py`` runs. Importable without CUDA (nothing here touches a GPU at
import time)."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import randomize_adapters
from distributed import _free_port, run_deepspeed
from tiny_models import tiny_model

from moe_peft_ds import AdapterConfig, MixLoRAConfig, apply_mixlora, apply_sieve_lora
from moe_peft_ds.backends.hf import find_moe_blocks

ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))

# The sieve on three layouts: plain fused experts (mixtral), transposed experts with biases
# (gpt_oss), and shared experts next to the routed ones, with LoRA on them too (qwen2_moe).
SIEVE_FAMILIES = {"mixtral": {}, "gpt_oss": {}, "qwen2_moe": {"shared_expert_lora": True}}
SELECTED = [0, 2, 5, 7]  # 4 of the 8 experts of every MoE layer
MIXLORA = {"num_experts": 4, "top_k": 2, "router_z_loss_coef": 1e-3}


def sieve_model(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny CPU model of ``family``, its base in ``dtype``, with LoRA (r=8, fp32 whatever ``dtype``)
    on 4 experts per layer, adapters randomized (B is zero after init: every adapter tensor then
    gets a gradient)."""
    model = tiny_model(family).to(dtype)
    layers = {b.layer for b in find_moe_blocks(model)}
    apply_sieve_lora(model, {layer: SELECTED for layer in layers}, AdapterConfig(r=8, **SIEVE_FAMILIES[family]))
    randomize_adapters(model)  # CPU generator: before the model moves to the GPU
    return model


def mixlora_model(method: str = "mixlora", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny dense LLaMA (tests/test_mixlora.dense_model) in ``dtype`` turned into MixLoRA
    (4 LoRA experts, top-2, LoRA on attention too); its adapters and routers are fp32 whatever ``dtype``."""
    from test_mixlora import dense_model

    return apply_mixlora(dense_model().to(dtype), MixLoRAConfig(method=method, **MIXLORA))


def make_batch(seed: int, rows: int = 4, length: int = 16, pad: bool = True) -> dict:
    """Random token ids (CPU); with ``pad`` the first row is right-padded (labels -100 there)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, length * 2 // 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass
class Run:
    loss: float
    logits: torch.Tensor  # fp32, CPU
    grads: dict[str, torch.Tensor]  # trainable parameters' gradients, fp32, CPU


def run(model: torch.nn.Module, batch: dict) -> Run:
    """One training-mode forward and backward of ``model`` on ``batch`` (on the model's device)."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return Run(out.loss.item(), out.logits.detach().float().cpu(), grads)


def assert_grads_close(got: dict, ref: dict, rtol: float, what: str) -> None:
    """Every gradient within ``rtol``; elements far below their tensor's largest get an absolute
    slack of ``rtol / 10`` times that largest magnitude (their relative error is set by
    cancellation in sums of much larger terms, not by their own size)."""
    assert got.keys() == ref.keys(), (what, sorted(got.keys() ^ ref.keys()))
    assert ref, f"{what}: no gradients at all"
    for name, g in ref.items():
        atol = rtol / 10 * float(g.abs().max())
        torch.testing.assert_close(got[name], g, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{what}: {name}: {m}")


def assert_bf16_follows_fp32(
    low: Run, ref: Run, what: str, cosine: bool = True, loss_rtol: float = 2e-2, min_cosine: float = 0.99
) -> None:
    """bf16 against fp32 on the same weights: the loss within ``loss_rtol``, every gradient finite
    and (``cosine``) pointing the same way: cosine similarity above ``min_cosine``."""
    assert abs(low.loss - ref.loss) <= loss_rtol * abs(ref.loss), (what, low.loss, ref.loss)
    assert low.grads.keys() == ref.grads.keys(), (what, sorted(low.grads.keys() ^ ref.grads.keys()))
    for name, g in low.grads.items():
        assert torch.isfinite(g).all(), f"{what}: {name} has non-finite gradients in bf16"
        if not cosine or (not g.any() and not ref.grads[name].any()):
            continue  # zero in both (no token reached any of its experts): nothing to compare
        cos = torch.nn.functional.cosine_similarity(g.flatten().double(), ref.grads[name].flatten().double(), dim=0)
        assert cos > min_cosine, f"{what}: {name}: cosine {float(cos):.5f} between bf16 and fp32 gradients"


class PinnedRouting:
    """The routing of one run (per MoE layer), replayed in another: bf16 against fp32 at the
    same routing. A token whose top-k choice flips between them (near-tied router scores; one
    such token of 64 takes the tiny models' adapter gradients to cosine ~0.97) is a discrete
    change, not bf16 arithmetic error. ``kind`` "experts": the sieve's experts modules, called
    ``(hidden, top_k_index, top_k_weights)`` by every family; their index and weights are
    replaced. "router": MixLoRA's router linears; their logits take the recorded values
    straight-through (the router's gradient still flows through its own output)."""

    def __init__(self, kind: str, top_k: int = 2):
        self.kind, self.top_k = kind, top_k
        self.saved: list = []
        self.flips = 0  # tokens whose expert set differed from the recorded one, over all layers

    @staticmethod
    def _expert_sets(index: torch.Tensor) -> torch.Tensor:
        return index.reshape(-1, index.shape[-1]).sort(-1).values

    def _count(self, own: torch.Tensor, ref: torch.Tensor) -> None:
        self.flips += int((self._expert_sets(own) != self._expert_sets(ref)).any(-1).sum())

    @contextlib.contextmanager
    def record(self, modules):
        self.saved = []
        if self.kind == "experts":
            hooks = [
                m.register_forward_pre_hook(lambda mod, args: self.saved.append((args[1].detach(), args[2].detach())))
                for m in modules
            ]
        else:
            hooks = [m.register_forward_hook(lambda mod, args, out: self.saved.append(out.detach())) for m in modules]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    @contextlib.contextmanager
    def replay(self, modules):
        calls = iter(range(len(self.saved)))
        self.flips = 0

        def experts(mod, args):
            index, weights = self.saved[next(calls)]
            self._count(args[1], index)
            return (args[0], index.to(args[1].device), weights.to(args[2].device, args[2].dtype), *args[3:])

        def router(mod, args, out):
            ref = self.saved[next(calls)].to(out.device, out.dtype)
            self._count(out.topk(self.top_k, dim=-1).indices, ref.topk(self.top_k, dim=-1).indices)
            return out + (ref - out).detach()

        hooks = [
            m.register_forward_pre_hook(experts) if self.kind == "experts" else m.register_forward_hook(router)
            for m in modules
        ]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()
        assert next(calls, None) is None, "the replayed run called fewer routed layers than the recorded one"


def assert_frozen_without_grads(model: torch.nn.Module, what: str) -> None:
    """The fused expert tensors (and every other frozen parameter) got no gradient."""
    experts = [n for n, _ in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    assert experts, f"{what}: no fused expert tensors found"
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"{what}: frozen {name} has a gradient"
    assert not any(model.get_parameter(n).requires_grad for n in experts), what


def launch(out: Path, *flags: str, ranks: int = 0, timeout: float = 300) -> dict:
    """``launch/train.py`` with ``flags``: a plain ``python`` process (``ranks`` 0) or under
    ``deepspeed --num_gpus ranks``. Asserts exit status 0, an adapter file and finite losses
    and weights; returns the adapter config, weights and training log."""
    from safetensors.torch import load_file

    args = [str(ROOT / "launch" / "train.py"), *flags, "--output-dir", str(out), "--no-progress"]
    if ranks:
        cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(_free_port()), *args]
        proc = run_deepspeed(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    else:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert (out / "adapter_model.safetensors").is_file(), proc.stdout[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["losses"] and all(math.isfinite(x) for x in log["losses"]), log["losses"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    return {"config": json.loads((out / "adapter_config.json").read_text()), "weights": weights, "log": log}
