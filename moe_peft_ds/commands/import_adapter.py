"""Import an adapter made elsewhere: a PEFT LoRA adapter, or an ESFT expert selection.

    python launch/import_adapter.py --peft path/to/peft-adapter --output-dir out/imported
    python launch/import_adapter.py --esft expert_config.json --base-model deepseek-ai/ESFT-vanilla-lite \
        --output-dir out/esft-sieve

--peft reads a PEFT LoRA directory on a transformers MoE model (target_parameters on the fused
experts, as PEFT and Unsloth save them; LoRA on attention and shared experts) and writes an
adapter of this project with the same logits: experts whose LoRA is zero are left out, so a layer
keeps the experts that carry an update. --esft reads deepseek-ai/ESFT's expert_config.json and
writes an untrained sieve adapter on its experts (B = 0), whose adapter_config.json
`launch/train.py --selection-file` reads to train them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_peft_ds.cli import check_output_dir, check_positive, run_cli
from moe_peft_ds.config import ConfigError
from moe_peft_ds.importing import import_esft, import_peft


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--peft", metavar="DIR", help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)"
    )
    source.add_argument("--esft", metavar="FILE", help="an ESFT expert_config.json (experts per layer to train)")
    p.add_argument("--output-dir", required=True, help="where the adapter is written (must not exist, or be empty)")
    p.add_argument(
        "--base-model",
        default=None,
        help="the base model (hub id or path); default for --peft: the one its config names; required with --esft",
    )
    p.add_argument("--lora-r", type=int, default=8, help="--esft: LoRA rank of the new adapter (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="--esft: LoRA alpha of the new adapter (default 16)")
    p.add_argument("--seed", type=int, default=0, help="--esft: seed of the new adapter's A matrices (default 0)")
    return p.parse_args(argv)


def run(args) -> int:
    check_output_dir(Path(args.output_dir))
    if args.peft:
        out = import_peft(args.peft, args.output_dir, base_model=args.base_model)
    else:
        if not args.base_model:
            raise ConfigError("--esft needs --base-model: an ESFT expert config does not name its model")
        check_positive(lora_r=args.lora_r, lora_alpha=args.lora_alpha)
        out = import_esft(
            args.esft, args.output_dir, args.base_model, r=args.lora_r, alpha=args.lora_alpha, seed=args.seed
        )
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
