"""The wheel built from the repository holds every asset and runs from outside the checkout: built
with pip, installed (without dependencies, which this environment has) in a fresh virtual
environment, its console script trains the sieve demo and MixLoRA on the bundled models and data,
plans, and exports; ``python -m moe_peft_ds`` lists the commands."""

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = [
    "tiny-mixtral/model.safetensors",
    "tiny-mixtral/tokenizer.json",
    "tiny-llama/model.safetensors",
    "tiny-llama/tokenizer.json",
    "demo_data/arithmetic_train.jsonl",
    "eval_fixtures/arc_easy.jsonl",
]


def _run(*cmd, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, f"{cmd}: {done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        str(ROOT),
        cwd=tmp_path,
    )
    wheel = next(dist.glob("moe_peft_ds-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [a for a in ASSETS if f"moe_peft_ds/assets/{a}" not in names]
    assert not missing, missing
    assert "moe_peft_ds/commands/train.py" in names and not any(n.startswith(("tests/", "launch/")) for n in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)  # torch & co. from this environment
    python, script = env_dir / "bin" / "python", env_dir / "bin" / "moe-peft-ds"
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel), cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run(str(python), "-c", "import moe_peft_ds; print(moe_peft_ds.__file__)", cwd=work)
    assert where.strip().startswith(str(env_dir)), where  # the wheel's copy, not the checkout's
    assert "export" in _run(str(python), "-m", "moe_peft_ds", "--help", cwd=work)

    quick = ["--data", "demo:arithmetic", "--max-steps", "2", "--batch-size", "4", "--no-progress"]
    _run(
        str(script),
        "train",
        "--model",
        "tiny-mixtral",
        *quick,
        "--calibration-samples",
        "8",
        "--output-dir",
        "sieve",
        cwd=work,
    )
    _run(str(script), "train", "--model", "tiny-llama", "--method", "mixlora", *quick, "--output-dir", "mix", cwd=work)
    assert (work / "sieve" / "adapter_model.safetensors").is_file() and (
        work / "mix" / "adapter_config.json"
    ).is_file()
    assert "total" in _run(str(script), "plan", "--model", "tiny-mixtral", cwd=work)
    _run(str(script), "export", "--adapter", "sieve", "--format", "vllm", "--output-dir", "served", cwd=work)
    assert (work / "served" / "adapter_model.safetensors").is_file()
