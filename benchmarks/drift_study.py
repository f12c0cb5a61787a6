"""Routing drift during sieve fine-tuning, on the sieve study's testbed (``benchmarks/testbed.py``).

The sieve selects its experts once, from a profile of the base model. Does routing move away
from that choice while the adapters train, and does adding adapters on the experts that become
hot (``--reselect-on-drift``) change accuracy? For every task and seed, one process fine-tunes
the bundled tiny-mixtral with the sieve study's settings (top-25% per layer) in three variants,
each watched by the drift monitor (``drift.RoutingDrift``, re-profiling the calibration samples
every ``--reprofile-every`` steps):

- ``experts``: LoRA on the selected experts only (the first MoE layer's router sees the base model's
  hidden states; every later one sees what the adapters of the layers below changed);
- ``experts+attn``: plus LoRA on the attention projections (q, k, v, o), which changes the
  hidden states every router sees;
- ``experts+attn+reselect``: the same, growing adapters on newly hot experts whenever a layer's
  coverage falls by more than ``--drift-warn`` points.

Reported per variant: the largest fall of a layer's coverage (the selected experts' share of
routed tokens) below its value before training, at any re-profile and at the end; the lowest
Jaccard overlap of a selection with the hottest experts of the moment; held-out accuracy; the
experts added. Plus a plot of coverage against the step.

    python benchmarks/drift_study.py            # 3 tasks x 2 seeds x 3 variants (~8 min on 2 cores)
    python benchmarks/drift_study.py --quick
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from measure import fill_defaults, write_result  # noqa: E402
from sieve_study import DEFAULTS as SIEVE  # noqa: E402
from testbed import held_out_accuracy, mean_std, profiled_task, study_machine  # noqa: E402

from moe_peft_ds import AdapterConfig, apply_sieve_lora, select_experts  # noqa: E402
from moe_peft_ds.data import make_train_loader  # noqa: E402
from moe_peft_ds.drift import RoutingDrift  # noqa: E402
from moe_peft_ds.models import load_model  # noqa: E402
from moe_peft_ds.monitor import TrainingMonitor  # noqa: E402
from moe_peft_ds.train import train, train_reselecting  # noqa: E402

VARIANTS = ("experts", "experts+attn", "experts+attn+reselect")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULTS = dict(
    tasks=SIEVE["tasks"],
    seeds=[0, 1],
    steps=SIEVE["steps"],
    batch_size=SIEVE["batch_size"],
    lr=SIEVE["lr"],
    n_train=SIEVE["n_train"],
    n_eval=SIEVE["n_eval"],
    calibration=SIEVE["calibration"],
    reprofile_every=40,
    drift_warn=10.0,
)
QUICK = dict(
    tasks=["parity"],
    seeds=[0],
    steps=6,
    batch_size=8,
    lr=3e-3,
    n_train=64,
    n_eval=16,
    calibration=32,
    reprofile_every=3,
    drift_warn=10.0,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 task, 1 seed, a few steps (a smoke run)")
    p.add_argument("--tasks", nargs="+", default=None, help=f"testbed tasks (default {DEFAULTS['tasks']})")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds (default 0 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default the sieve study's 240)")
    p.add_argument("--batch-size", type=int, default=None, help="(default 16)")
    p.add_argument("--lr", type=float, default=None, help="(default 3e-3)")
    p.add_argument("--n-train", type=int, default=None, help="training samples per task (default 1000)")
    p.add_argument("--n-eval", type=int, default=None, help="held-out items per task (default 200)")
    p.add_argument("--calibration", type=int, default=None, help="calibration samples (default 256)")
    p.add_argument("--reprofile-every", type=int, default=None, help="steps between re-profiles (default 40)")
    p.add_argument("--drift-warn", type=float, default=None, help="points of coverage fall that trigger (default 10)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--output",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "drift_study.json",
        help="JSON result path; the Markdown table and the plot go next to it (default %(default)s)",
    )
    return fill_defaults(p.parse_args(argv), DEFAULTS, QUICK)


def run_one(base, tokenizer, examples, items, calib, baseline, selection, variant: str, seed: int, args) -> dict:
    """Fine-tune one variant from the frozen base, watched by the drift monitor."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    cfg = AdapterConfig(attention_targets=ATTENTION if "attn" in variant else [])
    apply_sieve_lora(model, selection, cfg)
    drift = RoutingDrift(
        args.reprofile_every,
        lambda: calib,
        dict(selection),
        baseline,
        warn_points=args.drift_warn,
        reselect=variant.endswith("reselect"),
        log=lambda line: None,
    )
    loader = make_train_loader(examples, tokenizer, args.batch_size, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        monitor = TrainingMonitor(Path(tmp), drift=drift)

        def segment(first: int) -> list[float]:
            return train(
                model, loader, args.steps, args.lr, clip=1.0, progress=False, monitor=monitor, first_step=first
            )

        losses = train_reselecting(segment, model, monitor, log=lambda line: None, seed=seed)
        monitor.close()
    history = drift.history
    falls = [
        max(r[f"drift/coverage_start/layer_{layer}"] - r[f"drift/coverage/layer_{layer}"] for layer in selection)
        for r in history
    ]
    return {
        "accuracy": held_out_accuracy(model, tokenizer, items),
        "largest_fall_points": 100 * max(falls),
        "final_fall_points": 100 * falls[-1],
        "lowest_jaccard": min(r[f"drift/jaccard/layer_{layer}"] for r in history for layer in selection),
        "coverage_by_step": {
            r["step"]: statistics.mean(r[f"drift/coverage/layer_{layer}"] for layer in selection) for r in history
        },
        "experts_added": sum(len(v) for g in drift.grown for v in g["experts"].values()),
        "reselections": drift.grown,
        "final_loss": statistics.mean(losses[-10:]),
    }


def summarise(runs: list[dict]) -> dict:
    table = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        table[variant] = {
            key: mean_std([r[key] for r in mine])
            for key in ("accuracy", "largest_fall_points", "final_fall_points", "lowest_jaccard", "experts_added")
        }
    return table


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    colors = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green")))
    for variant in VARIANTS:
        for i, r in enumerate(x for x in runs if x["variant"] == variant):
            steps = sorted(r["coverage_by_step"], key=int)
            ax.plot(
                [int(s) for s in steps],
                [r["coverage_by_step"][s] for s in steps],
                color=colors[variant],
                alpha=0.6,
                label=variant if i == 0 else None,
            )
    ax.set(xlabel="step", ylabel="selected experts' share of routed tokens", title="coverage, mean over layers")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"tiny-mixtral, top-25% sieve, {s['steps']} steps at lr {s['lr']}, re-profiled every {s['reprofile_every']} "
        f"steps on {s['calibration']} calibration samples; tasks {', '.join(s['tasks'])} x seeds {s['seeds']}; "
        f"reselection when a layer's coverage falls by more than {s['drift_warn']:g} points ({result['date']}).",
        "",
        "| variant | accuracy | largest coverage fall (points) | fall at the end | lowest Jaccard | experts added |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant, row in result["table"].items():
        f = {k: v["mean"] for k, v in row.items()}
        lines.append(
            f"| {variant} | {f['accuracy']:.3f} ± {row['accuracy']['std']:.3f} | {f['largest_fall_points']:.1f} | "
            f"{f['final_fall_points']:.1f} | {f['lowest_jaccard']:.2f} | {f['experts_added']:.1f} |"
        )
    lines += [
        "",
        "| task | seed | variant | accuracy | largest fall | lowest Jaccard | experts added |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['task']} | {r['seed']} | {r['variant']} | {r['accuracy']:.3f} | {r['largest_fall_points']:.1f} | "
            f"{r['lowest_jaccard']:.2f} | {r['experts_added']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tokenizer = load_model("tiny-mixtral")
    base.requires_grad_(False)
    runs = []
    for task in args.tasks:
        examples, items, calib, baseline = profiled_task(
            base, tokenizer, task, args.n_train, args.n_eval, args.calibration
        )
        selection = select_experts(baseline, policy="topk", fraction=0.25)
        for seed in args.seeds:
            for variant in VARIANTS:
                row = run_one(base, tokenizer, examples, items, calib, baseline, selection, variant, seed, args)
                runs.append({"task": task, "seed": seed, "variant": variant, **row})
                print(
                    f"{task:14s} seed {seed} {variant:22s} acc {row['accuracy']:.3f} fall {row['largest_fall_points']:5.1f} "
                    f"jaccard {row['lowest_jaccard']:.2f} added {row['experts_added']}",
                    flush=True,
                )
    result = {
        "benchmark": "drift_study",
        "date": _dt.date.today().isoformat(),
        "machine": study_machine(),
        "settings": {k: getattr(args, k) for k in DEFAULTS},
        "table": summarise(runs),
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, args.output.with_name("drift_study.png"))
    write_result(args.output, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
