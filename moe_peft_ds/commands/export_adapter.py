"""Export an adapter for serving: vLLM, SGLang, PEFT, or a model with the adapter merged in.

    python launch/export_adapter.py --adapter out/sieve-demo --format vllm --output-dir out/sieve-vllm
    vllm serve <base model> --enable-lora --lora-modules sieve=out/sieve-vllm

vllm / sglang / peft write a PEFT-style directory (adapter_config.json + adapter_model.safetensors)
on the names and layout that tool reads for the base model's family; every expert of an adapted
layer is present (those without adapters are zero), as vLLM requires. merged writes the whole
model with the adapter folded in (save_pretrained), for any server. DoRA adapters export only as
merged; MixLoRA adapters do not export (their FFN is a routed mixture of LoRA experts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_peft_ds.cli import check_output_dir, run_cli
from moe_peft_ds.export import FORMATS, export_adapter
from moe_peft_ds.models import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--adapter",
        required=True,
        help="adapter directory written by training (adapter_config.json + adapter_model.safetensors)",
    )
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="vllm: vLLM's LoRA (per-expert keys of the checkpoint, or its fused 3D layout); sglang: SGLang's "
        "per-expert MoE LoRA; peft: PEFT LoRA with target_parameters on transformers' fused experts; "
        "merged: the base model with the adapter folded in",
    )
    p.add_argument("--output-dir", required=True, help="where the export is written (must not exist, or be empty)")
    p.add_argument(
        "--base-model",
        default=None,
        help="the base model (hub id or path) whose layout the export follows, and whose weights merged folds "
        "into (default: the one recorded in the adapter)",
    )
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the written tensors (default fp32)")
    return p.parse_args(argv)


def run(args) -> int:
    check_output_dir(Path(args.output_dir))
    out = export_adapter(args.adapter, args.format, args.output_dir, base_model=args.base_model, dtype=args.dtype)
    print(f"wrote {args.format} export to {out}")
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
