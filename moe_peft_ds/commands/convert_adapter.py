"""Convert a sieve adapter between Megatron-core and transformers.

    python launch/convert_adapter.py out/megatron-sieve out/sieve-hf --to mixtral
    python launch/convert_adapter.py out/sieve-demo out/sieve-megatron --to megatron

Both layouts store expert e of layer L as layers.L.experts.e.{gate_up_proj|down_proj} ([out, in];
Megatron's linear_fc1 is [gate; up] like the fused tensor of Mixtral-style families), so only the
config changes: the tensors are copied as they are. Adapters with LoRA outside the routed experts
(attention, shared experts), MixLoRA adapters and families laid out otherwise (GPT-OSS) are refused.
"""

from __future__ import annotations

import argparse
import sys

from moe_peft_ds.checkpoint import convert_adapter
from moe_peft_ds.cli import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="adapter directory to convert (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("output_dir", help="where the converted adapter is written")
    p.add_argument(
        "--to",
        required=True,
        help="'megatron', or the transformers model_type to convert to (mixtral, qwen2_moe, ...)",
    )
    p.add_argument(
        "--base-model", default="", help="the base model the converted adapter belongs to (recorded in its config)"
    )
    return p.parse_args(argv)


def run(args) -> int:
    out = convert_adapter(args.adapter, args.output_dir, args.to, base_model=args.base_model)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
