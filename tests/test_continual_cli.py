"""launch/continual.py: a task sequence in one process and on 2 DeepSpeed ranks; bad input."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from distributed import run_deepspeed
from safetensors.torch import load_file
from tiny_models import save_tiny_llama

from moe_peft_ds import MixLoRAConfig, load_adapter
from moe_peft_ds.models import load_model

ROOT = Path(__file__).resolve().parents[1]
continual_main = runpy.run_path(str(ROOT / "launch" / "continual.py"), run_name="not_main")["main"]
TASKS = ["--task", "arith=demo:arithmetic", "--task", "code=demo:code"]
SMALL = [
    "--train-samples",
    "48",
    "--eval-samples",
    "8",
    "--steps-per-task",
    "4",
    "--batch-size",
    "4",
    "--no-progress",
    "--lora-r",
    "4",
    "--lora-alpha",
    "8",
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


def _frozen_experts_unchanged(run: Path, first: str, second: str, old_experts: list[int]) -> None:
    a, b = (
        load_file(str(run / first / "adapter_model.safetensors")),
        load_file(str(run / second / "adapter_model.safetensors")),
    )
    experts = [k for k in a if ".experts." in k]
    assert experts and all(torch.equal(a[k], b[k]) for k in experts), "an earlier expert changed"
    for key in (k for k in a if k.endswith("router.weight")):
        assert torch.equal(a[key], b[key][: len(old_experts)]) and b[key].shape[0] > a[key].shape[0]


def test_sequence_with_protection_baselines_metrics_and_checkpoints(llama, tmp_path):
    out = tmp_path / "run"
    rc = continual_main(
        [
            "--model",
            llama,
            *TASKS,
            *SMALL,
            "--strategies",
            "dynamic",
            "lora",
            "--kl-coef",
            "1",
            "--replay-size",
            "4",
            "--kl-samples",
            "4",
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 0
    record = json.loads((out / "dynamic" / "metrics.json").read_text())
    assert record["tasks"] == ["arith", "code"] and [len(row) for row in record["accuracy"]] == [1, 2]
    assert set(record["metrics"]) >= {"average_accuracy", "average_forgetting", "backward_transfer", "forgetting"}
    params = record["adapter_parameters"]
    assert params[1]["total"] == 2 * params[0]["total"] and params[1]["trainable"] == params[0]["trainable"]
    cfg = MixLoRAConfig.from_json(out / "dynamic" / "stage_1_code" / "adapter_config.json")
    assert cfg.num_experts == 4 and cfg.expert_tasks == ["arith", "arith", "code", "code"]
    _frozen_experts_unchanged(out / "dynamic", "stage_0_arith", "stage_1_code", [0, 1])
    model, _ = load_model(llama)
    load_adapter(model, out / "dynamic" / "stage_1_code")  # the grown pool is a plain MixLoRA checkpoint
    lora = json.loads((out / "lora" / "metrics.json").read_text())
    assert lora["adapter_parameters"][0] == lora["adapter_parameters"][1]  # one adapter, trained on and on
    a = load_file(str(out / "lora" / "stage_0_arith" / "adapter_model.safetensors"))
    b = load_file(str(out / "lora" / "stage_1_code" / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the baseline's weights move (and may forget)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["strategies"]) == {"dynamic", "lora"}
    assert (out / "accuracy_vs_params.png").stat().st_size > 0 and (
        out / "dynamic" / "accuracy_vs_params.png"
    ).exists()


@pytest.mark.parametrize(
    "flags, match",
    [
        ([], "no tasks"),
        (["--task", "a=demo:arithmetic", "--task", "a=demo:code"], "unique"),
        (["--task", "demo:arithmetic"], "NAME=DATA"),
        ([*TASKS, "--experts-per-task", "0"], "--experts-per-task=0 must be > 0"),
        ([*TASKS, "--experts-per-task", "1"], "--top-k 2 must be at most"),
        ([*TASKS, "--kl-coef", "-1"], "--kl-coef=-1.0 must be >= 0"),
        ([*TASKS, "--merge-threshold", "1.5"], "at most 1"),
        (["--task", "a=/nonexistent/a.jsonl"], "does not exist"),
        ([*TASKS, "--deepspeed_config", str(ROOT / "ds_configs" / "zero3_fp32.json")], "ZeRO-3"),
        ([*TASKS, "--ep-size", "2"], "--ep-size > 1 needs --deepspeed_config"),
        (
            [
                *TASKS,
                "--experts-per-task",
                "3",
                "--ep-size",
                "2",
                "--deepspeed_config",
                str(ROOT / "ds_configs" / "zero2_fp32.json"),
            ],
            "must be a multiple of --ep-size 2",
        ),
        ([*TASKS, "--ep-size", "0"], "--ep-size=0 must be > 0"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(llama, tmp_path, capsys, flags, match):
    out = tmp_path / "out"
    assert continual_main(["--model", llama, *SMALL, *flags, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith("error:"), err
    assert not out.exists()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        continual_main(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--task",
        "--experts-per-task",
        "--kl-coef",
        "--replay-size",
        "--prune-threshold",
        "--merge-threshold",
        "--strategies",
        "--train-old-router",
        "--ep-size",
        "--expert-placement",
        "--dtype",
    ):
        assert flag in text


@pytest.mark.slow
def test_deepspeed_ranks_data_and_expert_parallel_train_what_one_process_trains(llama, tmp_path):
    """ZeRO-2 on 2 ranks x 4 samples, data parallel and with every task's experts split over the
    ranks (EP=2), and on 4 ranks x 2 (EP=2 x 2 expert-data-parallel replicas), against one process
    x 8: the same stage checkpoints, accuracies and losses (KL penalty and replay on), and earlier
    experts unchanged. The load-balancing loss is per rank (a nonlinear function of the batch)
    and so differs between the layouts: it is off here."""
    # Each step's KL term takes one batch of --batch-size (per rank) KL samples: 2 samples are one
    # batch in every layout here.
    flags = [
        "--model",
        llama,
        *TASKS,
        *SMALL,
        "--kl-coef",
        "1",
        "--replay-size",
        "4",
        "--kl-samples",
        "2",
        "--router-aux-loss-coef",
        "0",
    ]
    runs = {0: tmp_path / "single"}
    assert continual_main([*flags, "--batch-size", "8", "--output-dir", str(runs[0])]) == 0
    # ranks, ep size, port, placement: EP=2 with the experts of each task placed by the routers' loads
    layouts = {
        "dp2": (2, 1, 29611, []),
        "ep2": (2, 2, 29612, ["--expert-placement", "balanced"]),
        "ep2x2": (4, 2, 29613, []),
    }
    for name, (ranks, ep, port, placement) in layouts.items():
        out = runs[name] = tmp_path / name
        cmd = [
            "deepspeed",
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(port),
            str(ROOT / "launch" / "continual.py"),
            *flags,
            "--batch-size",
            str(8 // ranks),
            "--deepspeed_config",
            str(ROOT / "ds_configs" / "zero2_fp32.json"),
            "--ep-size",
            str(ep),
            *placement,
            "--output-dir",
            str(out),
        ]
        proc = run_deepspeed(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _frozen_experts_unchanged(runs["dp2"] / "dynamic", "stage_0_arith", "stage_1_code", [0, 1])
    placed = json.loads((runs["ep2"] / "dynamic" / "stage_1_code" / "adapter_config.json").read_text())
    tasks = placed["expert_tasks"]
    for layer in placed["expert_placement"].values():  # every rank holds an equal share of each task's experts
        assert sorted(layer[0] + layer[1]) == list(range(len(tasks)))
        assert all(sum(tasks[e] == t for e in held) * 2 == tasks.count(t) for held in layer for t in set(tasks))
    single = json.loads((runs[0] / "dynamic" / "metrics.json").read_text())
    assert [len(row) for row in single["accuracy"]] == [1, 2]
    for ep in layouts:
        record = json.loads((runs[ep] / "dynamic" / "metrics.json").read_text())
        assert (
            record["accuracy"] == single["accuracy"] and record["adapter_parameters"] == single["adapter_parameters"]
        )
        for got, expected in zip(record["losses"], single["losses"], strict=True):
            assert got == pytest.approx(expected, rel=1e-4), ep
        for stage in ("stage_0_arith", "stage_1_code"):
            a, b = (
                load_file(str(run / "dynamic" / stage / "adapter_model.safetensors")) for run in (runs[0], runs[ep])
            )
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{ep} {stage} {key}")
