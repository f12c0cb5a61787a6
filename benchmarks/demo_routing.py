"""How skewed the bundled demo model's routing is on each demo task.

For every bundled task, profiles routing on the calibration split the demo uses and
reports per layer the share of routed tokens that the top 25% of experts receive (0.25
means uniform routing; the sieve is only useful well above that) and the normalised
entropy (1.0 = uniform). Also copies each task's heatmap next to the results.

    python benchmarks/demo_routing.py      # writes benchmarks/results/demo_routing.{json,md,png per task}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_peft_ds import profile_routing  # noqa: E402
from moe_peft_ds.data import load_examples, make_loader  # noqa: E402
from moe_peft_ds.demo import TASKS  # noqa: E402
from moe_peft_ds.models import load_model  # noqa: E402
from moe_peft_ds.profiling import plot_heatmap  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--calibration-samples", type=int, default=256, help="samples per task, as in the demo (default 256)"
    )
    p.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results", help="where results go")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_model("tiny-mixtral")
    result = {
        "benchmark": "demo_routing",
        "date": dt.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "model": "tiny-mixtral",
        "calibration_samples": args.calibration_samples,
        "tasks": {},
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        examples = load_examples(f"demo:{task}", tokenizer, 128, limit=args.calibration_samples)
        profile = profile_routing(model, make_loader(examples, tokenizer, 16), progress=False)
        plot_heatmap(profile, args.output_dir / f"demo_routing_{task}.png")
        result["tasks"][task] = {"tokens": profile.tokens, "skew": {str(k): v for k, v in profile.skew().items()}}
    (args.output_dir / "demo_routing.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (args.output_dir / "demo_routing.md").write_text(table)
    print(table)
    return 0


def markdown(result: dict) -> str:
    tasks = result["tasks"]
    layers = list(next(iter(tasks.values()))["skew"])
    head = " | ".join(f"{t}: top-25% coverage | {t}: entropy" for t in tasks)
    lines = [f"| layer | {head} |", "|---|" + "---:|" * (2 * len(tasks))]
    for layer in layers:
        cells = " | ".join(
            f"{tasks[t]['skew'][layer]['top_coverage']:.3f} | {tasks[t]['skew'][layer]['entropy']:.3f}" for t in tasks
        )
        lines.append(f"| {layer} | {cells} |")
    return (
        "\n".join(lines) + f"\n\n(uniform routing: coverage 0.25, entropy 1.0; {result['calibration_samples']} "
        f"calibration samples per task; {result['date']})\n"
    )


if __name__ == "__main__":
    sys.exit(main())
