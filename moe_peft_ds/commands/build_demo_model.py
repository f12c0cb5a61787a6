"""Build the bundled demo MoE model (tiny Mixtral) and its demo task data.

    python launch/build_demo_model.py                # rebuilds tiny-mixtral and demo_data/ in a few minutes on CPU
    python launch/build_demo_model.py --arch llama   # rebuilds the dense tiny-llama (MixLoRA's base)

Deterministic for a given seed; see moe_peft_ds/demo.py for what is built and why.
"""

import argparse
from pathlib import Path

from moe_peft_ds.demo import ARCHS, DEFAULT_STEPS, DEMO_DATA_DIR, build_demo, default_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arch",
        choices=ARCHS,
        default="mixtral",
        help="mixtral: the 16-expert demo MoE; llama: the dense demo model (default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where to save the model, tokenizer and build_info.json (default: moe_peft_ds/assets/tiny-<arch>)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEMO_DATA_DIR,
        help="where to write the task JSONL files (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="pretraining optimizer steps (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for corpus, task data, initialisation and batching (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the demo and print where it went."""
    args = parse_args(argv)
    out = build_demo(
        args.output_dir or default_dir(args.arch), args.data_dir, steps=args.steps, seed=args.seed, arch=args.arch
    )
    print(f"model: {out}\ndata:  {args.data_dir}")


if __name__ == "__main__":
    main()
