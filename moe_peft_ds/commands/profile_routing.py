"""Profile expert routing of an MoE model on a calibration set, without training.

Writes routing_profile.json (per layer, per expert routed-token counts and gate sums) and
routing_heatmap.png to --output-dir, prints the per-layer skew (share of tokens covered by
the top 25% of experts, normalised entropy) and the experts a policy would select.

    python launch/profile_routing.py --model tiny-mixtral --data demo:arithmetic --output-dir out/profile
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_peft_ds import SieveConfig, profile_routing, select_experts
from moe_peft_ds.cli import add_model_data_args, check_output_dir, check_positive, data_format, run_cli
from moe_peft_ds.config import POLICIES
from moe_peft_ds.data import load_examples, make_loader, resolve_data
from moe_peft_ds.models import load_model
from moe_peft_ds.profiling import format_skew, plot_heatmap


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_data_args(p)
    p.add_argument(
        "--calibration-samples", type=int, default=256, help="samples of --data used for profiling (default 256)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default 16)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sample after truncation (default 128)")
    p.add_argument(
        "--selection-policy",
        default="topk",
        choices=POLICIES,
        help="policy whose selection is previewed (default topk)",
    )
    p.add_argument(
        "--sieve-fraction", type=float, default=0.25, help="share of experts per layer for the preview (default 0.25)"
    )
    p.add_argument(
        "--sieve-coverage", type=float, default=None, help="routed-token share for the coverage policy preview"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    return p.parse_args(argv)


def run(args) -> int:
    check_positive(
        calibration_samples=args.calibration_samples, batch_size=args.batch_size, max_length=args.max_length
    )
    sieve = SieveConfig(policy=args.selection_policy, fraction=args.sieve_fraction, coverage=args.sieve_coverage)
    resolve_data(args.data, args.train_split)  # a missing file fails now, before the model is loaded
    check_output_dir(Path(args.output_dir))
    model, tokenizer = load_model(args.model, tokenizer=args.tokenizer)
    examples = load_examples(
        args.data, tokenizer, args.max_length, args.train_split, limit=args.calibration_samples, fmt=data_format(args)
    )
    profile = profile_routing(
        model,
        make_loader(examples, tokenizer, args.batch_size),
        model_id=args.model,
        data_id=args.data,
        progress=not args.no_progress,
    )
    selection = select_experts(profile, sieve)  # before writing: a bad policy setting writes nothing
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    profile.save(out / "routing_profile.json")
    plot_heatmap(profile, out / "routing_heatmap.png")
    print(f"{profile.tokens} tokens from {profile.samples} samples\n{format_skew(profile)}")
    print(f"{args.selection_policy} selection: {json.dumps(selection)}")
    print(f"wrote {out / 'routing_profile.json'} and {out / 'routing_heatmap.png'}")
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
