"""What ``make demo`` prints: the sieve demo (tiny-mixtral, 25% of the experts, demo:arithmetic)
trained in one process, its first and last losses, trainable parameters and adapter size
against LoRA on all experts, so the demo figures in docs/results.md come from a results file.

    python benchmarks/demo_train.py            # the make-demo settings (300 steps)
    python benchmarks/demo_train.py --quick    # 10 steps

Writes ``benchmarks/results/demo_train.json`` and ``demo_train.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from measure import write_result  # noqa: E402

from moe_peft_ds.commands.train import main as train_main  # noqa: E402

DEMO = [
    "--model",
    "tiny-mixtral",
    "--method",
    "sieve",
    "--sieve-fraction",
    "0.25",
    "--data",
    "demo:arithmetic",
    "--no-progress",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10 steps instead of the demo's 300")
    p.add_argument(
        "--output", default=str(ROOT / "benchmarks" / "results" / "demo_train.json"), help="result JSON path"
    )
    return p.parse_args(argv)


def markdown(result: dict) -> str:
    log, sizes = result["log"], result["log"]["sizes"]
    losses = log["losses"]
    head, tail = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    return (
        "\n".join(
            [
                f"`python launch/train.py {' '.join(result['flags'])}` (as `make demo`; {result['date']}, {result['machine']}):",
                "",
                "```",
                f"adapters on {sizes['selected_experts']} of {sizes['all_experts']} experts",
                f"loss {head:.3f} -> {tail:.3f} over {len(losses)} steps ({log['seconds']:.1f} s, {log['world_size']} rank(s))",
                f"trainable parameters: {sizes['trainable_params']:,} (LoRA on all experts: {sizes['all_experts_trainable_params']:,}, "
                f"ratio {sizes['param_ratio']:.3f})",
                f"adapter size: {sizes['adapter_bytes'] / 1e6:.2f} MB (all experts: {sizes['all_experts_adapter_bytes'] / 1e6:.2f} MB)",
                "```",
            ]
        )
        + "\n"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    flags = DEMO + (["--max-steps", "10"] if args.quick else [])
    with tempfile.TemporaryDirectory() as out:
        if train_main([*flags, "--output-dir", out]) != 0:
            raise RuntimeError("the demo run failed")
        log = json.loads((Path(out) / "train_log.json").read_text())
    log.pop("args", None)
    result = {
        "benchmark": "demo_train",
        "date": _dt.date.today().isoformat(),
        "flags": flags,
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
        "log": log,
    }
    write_result(args.output, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
