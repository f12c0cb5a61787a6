"""launch/train.py and launch/profile_routing.py end to end on the bundled demo model and data."""

import json
import runpy
from pathlib import Path

import pytest
import torch

from moe_peft_ds import load_adapter
from moe_peft_ds.models import load_model

ROOT = Path(__file__).resolve().parents[1]
train_main = runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="not_main")["main"]
profile_main = runpy.run_path(str(ROOT / "launch" / "profile_routing.py"), run_name="not_main")["main"]
BASE = ["--model", "tiny-mixtral", "--data", "demo:arithmetic", "--no-progress"]


@pytest.mark.slow
def test_sieve_run_profiles_selects_trains_and_saves(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_main(
        BASE
        + [
            "--output-dir",
            str(out),
            "--max-steps",
            "40",
            "--calibration-samples",
            "64",
            "--batch-size",
            "8",
            "--sieve-fraction",
            "0.25",
        ]
    )
    assert rc == 0
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "routing_profile.json",
        "routing_heatmap.png",
        "train_log.json",
    ):
        assert (out / name).is_file(), name
    log = json.loads((out / "train_log.json").read_text())
    losses = log["losses"]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10  # the loss falls
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert all(len(ids) == 4 for ids in cfg["selection"].values())  # 25% of 16 experts
    assert log["sizes"]["param_ratio"] == pytest.approx(0.25)
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and "LoRA on all experts" in printed
    model, tok = load_model("tiny-mixtral")
    load_adapter(model, out)  # the saved adapter loads onto a fresh base model
    ids = tok("Q: What is 2 + 3?\nA:", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()


def test_profile_cli_writes_profile_and_heatmap(tmp_path, capsys):
    rc = profile_main(
        [
            "--model",
            "tiny-mixtral",
            "--data",
            "demo:arithmetic",
            "--output-dir",
            str(tmp_path),
            "--calibration-samples",
            "32",
        ]
    )
    assert rc == 0 and (tmp_path / "routing_profile.json").is_file() and (tmp_path / "routing_heatmap.png").is_file()
    assert "coverage" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--sieve-fraction", "1.5"], "fraction"),
        (["--sieve-fraction", "0"], "fraction"),
        (["--sieve-k", "0"], "k="),
        (["--sieve-k", "99"], "exceeds"),
        (["--calibration-samples", "0"], "calibration-samples"),
        (["--selection-policy", "coverage"], "coverage"),
        (["--lora-r", "0"], "r="),
        (["--lora-dropout", "1.0"], "dropout"),
        (["--data", "demo:nope"], "no bundled demo task"),
        (["--data", "/does/not/exist.jsonl"], "does not exist"),
        (["--max-length", "0"], "max-length"),
        (["--model", "/does/not/exist"], "does/not/exist"),
        (["--lr", "nan"], "--lr=nan must be > 0 and finite"),
        (["--lr", "inf"], "--lr=inf must be > 0 and finite"),
        (["--lr=-1e-3"], "--lr=-0.001 must be > 0 and finite"),
        (["--max-grad-norm", "nan"], "--max-grad-norm=nan must be >= 0"),
        (["--max-grad-norm", "inf"], "--max-grad-norm=inf must be >= 0"),
    ],
)
def test_bad_flags_fail_clearly_and_write_nothing(tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    argv = BASE + ["--output-dir", str(out), "--max-steps", "2"] + flags
    assert train_main(argv) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_a_diverging_run_stops_at_the_first_nan_and_writes_no_adapter(tmp_path, capsys):
    out = tmp_path / "run"
    argv = BASE + ["--output-dir", str(out), "--max-steps", "20", "--lr", "1e30", "--max-grad-norm", "0"]
    assert train_main(argv + ["--calibration-samples", "16", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the loss is ") and "training stopped and no adapter was written" in err[-1]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()


def test_empty_data_file_fails(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc = train_main(["--model", "tiny-mixtral", "--data", str(empty), "--output-dir", str(tmp_path / "run")])
    assert rc == 2 and not (tmp_path / "run").exists()


def test_existing_adapter_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert train_main(BASE + ["--output-dir", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "adapter_config.json").read_text() == "{}"


def test_unsupported_model_fails_clearly(tmp_path, capsys):
    import transformers as tf

    from moe_peft_ds.demo import DEMO_MODEL_DIR

    llama = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=600, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    llama.save_pretrained(tmp_path / "llama")
    tf.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).save_pretrained(tmp_path / "llama")
    rc = train_main(
        ["--model", str(tmp_path / "llama"), "--data", "demo:arithmetic", "--output-dir", str(tmp_path / "run")]
    )
    assert rc == 2 and "supported" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_malformed_json_fails_clearly(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response"\n')
    rc = train_main(["--model", "tiny-mixtral", "--data", str(bad), "--output-dir", str(tmp_path / "run")])
    assert rc == 2 and "not readable" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_continues_with_the_uninterrupted_losses(tmp_path):
    flags = BASE + ["--max-steps", "8", "--batch-size", "4", "--calibration-samples", "32"]
    assert train_main(flags + ["--output-dir", str(tmp_path / "full"), "--save-every", "4"]) == 0
    assert (tmp_path / "full" / "checkpoints" / "step_4" / "rank0.safetensors").is_file()
    assert (
        train_main(
            flags + ["--output-dir", str(tmp_path / "resumed"), "--resume", str(tmp_path / "full" / "checkpoints")]
        )
        == 0
    )
    full, resumed = (json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("full", "resumed"))
    assert resumed["first_step"] == 4 and resumed["losses"] == pytest.approx(full["losses"][4:], rel=1e-6)
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("full", "resumed"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)


def test_resume_into_the_same_dir_keeps_the_log_and_overwrite_clears_a_stale_run(tmp_path):
    out = tmp_path / "run"
    flags = BASE + ["--max-steps", "6", "--batch-size", "4", "--calibration-samples", "16", "--output-dir", str(out)]
    assert train_main(flags + ["--save-every", "3"]) == 0
    assert train_main(flags + ["--resume", str(out / "checkpoints"), "--overwrite"]) == 0
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 4, 5, 6]  # every step logged before, then the resumed ones
    assert [r for r in lines if r.get("event") == "resumed"] == [
        {"event": "resumed", "from": str(out / "checkpoints" / "step_3")}
    ]
    (out / "notes.txt").write_text("mine")
    assert train_main(flags + ["--method", "lora", "--overwrite"]) == 0  # a fresh run: no profile, no checkpoints
    assert not (out / "routing_profile.json").exists() and not (out / "checkpoints").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter_model.safetensors").is_file()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 6


def test_single_process_deepspeed_runs_started_together_take_free_ports(tmp_path):
    import subprocess
    import sys

    code = (
        "import os, time; from moe_peft_ds.cli import init_distributed; init_distributed('cfg.json', 60); "
        "print(os.environ['MASTER_PORT']); time.sleep(3)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in results]
    ports = [out.strip().splitlines()[-1] for out, _ in results]
    assert ports[0] != ports[1] and "29500" not in ports


def test_resume_from_nothing_fails_clearly(tmp_path, capsys):
    assert train_main(BASE + ["--output-dir", str(tmp_path / "run"), "--resume", str(tmp_path)]) == 2
    assert "no step_N" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_eval_every_logs_validation_loss_and_task_accuracy_and_keeps_the_best(tmp_path):
    out = tmp_path / "run"
    rc = train_main(
        BASE
        + [
            "--output-dir",
            str(out),
            "--max-steps",
            "6",
            "--batch-size",
            "8",
            "--calibration-samples",
            "32",
            "--eval-every",
            "3",
            "--eval-samples",
            "16",
            "--eval-tasks",
            "arc_easy",
            "piqa",
            "--eval-task-source",
            "fixtures",
            "--keep-best",
        ]
    )
    assert rc == 0
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train_loss" in r] == list(range(1, 7))
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(0 <= r["piqa/acc"] <= 1 for r in evals)
    assert json.loads((out / "train_log.json").read_text())["evaluations"] == evals
    assert (out / "best" / "adapter_model.safetensors").is_file()
    # the validation loss is the model's loss per token on the eval split: recompute it for the final adapter
    from moe_peft_ds.data import load_examples
    from moe_peft_ds.monitor import validation_loss

    model, tok = load_model("tiny-mixtral")
    load_adapter(model, out)
    examples = load_examples("demo:arithmetic", tok, 128, "validation", limit=16)
    assert validation_loss(model, examples, tok, 4) == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)


def test_keep_best_needs_eval_every(tmp_path, capsys):
    assert train_main(BASE + ["--output-dir", str(tmp_path / "run"), "--keep-best"]) == 2
    assert "--eval-every" in capsys.readouterr().err
