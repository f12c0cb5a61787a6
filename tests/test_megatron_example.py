"""launch/megatron_sieve.py end to end on CPU: one process, and two ranks with expert parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import _free_port
from safetensors.torch import load_file

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "megatron_example_on_cpu.py"
FLAGS = ["--data", "demo:arithmetic", "--max-steps", "4", "--calibration-samples", "32", "--no-progress"]


def _run(cmd, timeout=600):
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }  # one process: a port of its own
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _check(out: Path, ranks: int):
    summary = json.loads((out / "train_summary.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["model_type"] == "megatron" and cfg["method"] == "sieve"
    assert {int(k): len(v) for k, v in cfg["selection"].items()} == {0: 2, 1: 2}, "a quarter of 8 experts per layer"
    state = load_file(str(out / "adapter_model.safetensors"))
    assert {(int(k.split(".")[1]), int(k.split(".")[3])) for k in state} == {
        (int(L), e) for L, ids in cfg["selection"].items() for e in ids
    }
    assert len(state) == 2 * 2 * 2 * 2, "layers x experts x (fc1, fc2) x (A, B)"
    assert all(state[k].abs().sum() > 0 for k in state if k.endswith("lora_B")), "every selected expert was trained"
    profile = json.loads((out / "routing_profile.json").read_text())
    assert profile["samples"] == 32 and summary["world"] == ranks
    assert len(summary["losses"]) == 4 and all(x == x for x in summary["losses"])


def test_megatron_example_one_process(tmp_path):
    done = _run([sys.executable, str(SCRIPT), *FLAGS, "--output-dir", str(tmp_path / "one")])
    assert "loss" in done.stdout
    _check(tmp_path / "one", 1)


def test_megatron_example_expert_parallel_on_two_ranks(tmp_path):
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            str(SCRIPT),
            *FLAGS,
            "--ep-size",
            "2",
            "--output-dir",
            str(tmp_path / "ep2"),
        ]
    )
    _check(tmp_path / "ep2", 2)  # the selected experts of both ranks (0-3 and 4-7), gathered into one file


def test_megatron_example_help_and_bad_input():
    done = _run([sys.executable, str(ROOT / "launch" / "megatron_sieve.py"), "--help"])
    assert "--ep-size" in done.stdout and "--sieve-fraction" in done.stdout
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", "demo:arithmetic", "--output-dir", "/tmp/x", "--max-steps", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "--max-steps=0 must be > 0" in bad.stderr


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the example as users run it needs CUDA")
def test_megatron_example_on_gpus_without_shims(tmp_path):  # pragma: no cover - runs where CUDA exists
    import torch

    ranks = min(2, torch.cuda.device_count())
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "--master-port",
            str(_free_port()),
            str(ROOT / "launch" / "megatron_sieve.py"),
            *FLAGS,
            "--ep-size",
            str(ranks),
            "--dispatcher",
            "alltoall",
            "--output-dir",
            str(tmp_path / "gpu"),
        ]
    )
    _check(tmp_path / "gpu", ranks)
