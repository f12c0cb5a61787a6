"""A run killed with SIGKILL (mid-run, or in the middle of writing a training state or the
adapter) resumes to the adapter of the uninterrupted run, bit for bit, keeps every logged step,
and never leaves a half-written file that loads."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from moe_peft_ds.checkpoint import AdapterMismatchError, read_adapter

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
FLAGS = ["--model", "tiny-mixtral", "--data", "demo:arithmetic", "--max-steps", str(STEPS), "--batch-size", "2"]
FLAGS += ["--calibration-samples", "8", "--save-every", "10", "--no-progress"]
# Runs the launcher with safetensors' writer of `module` replaced by one that writes half a file
# and then SIGKILLs the process, at the `nth` write: a kill in the middle of a save.
KILL_DURING_SAVE = """
import os, signal, sys
import moe_peft_ds.{module} as target
nth, calls, write = {nth}, [], target.save_file
def half_then_die(tensors, path, metadata=None):
    calls.append(path)
    write(tensors, path, metadata=metadata)
    if len(calls) == nth:
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
target.save_file = half_then_die
sys.argv = ["train.py"] + {argv!r}
import runpy
runpy.run_path({train!r}, run_name="__main__")
"""


def train(out: Path, *extra: str, driver: str | None = None) -> subprocess.Popen:
    argv = FLAGS + ["--output-dir", str(out), *extra]
    cmd = (
        [sys.executable, str(ROOT / "launch" / "train.py"), *argv]
        if driver is None
        else [sys.executable, "-c", driver]
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def finished(proc: subprocess.Popen) -> int:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode is not None, err
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run: its adapter and its loss at every step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert finished(train(out)) == 0
    return {"adapter": load_file(str(out / "adapter_model.safetensors")), "losses": _logged(out)}


def _logged(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def _steps_in_log(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines() if "train_loss" in x]


def _resume_and_compare(out: Path, reference: dict) -> None:
    assert finished(train(out, "--resume", str(out / "checkpoints"))) == 0
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter.keys() == reference["adapter"].keys()
    assert all(adapter[k].equal(reference["adapter"][k]) for k in adapter)  # bit for bit
    steps = _steps_in_log(out)
    assert set(steps) == set(range(1, STEPS + 1))  # every step is in the log, those before the kill included
    assert _logged(out) == {s: reference["losses"][s] for s in steps}  # the resumed ones are the same losses


def test_kill_9_mid_run_resumes_bit_identical_and_keeps_the_log(tmp_path, reference):
    out = tmp_path / "run"
    proc = train(out)
    while not (out / "checkpoints" / "step_20" / "rank0.safetensors").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert finished(proc) == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()
    _resume_and_compare(out, reference)


@pytest.mark.parametrize("nth", [2, 4])
def test_kill_during_a_training_state_save_leaves_the_previous_one_to_resume(tmp_path, reference, nth):
    """Killed while writing step 10*nth's state: that step's file never appears complete."""
    out = tmp_path / "run"
    driver = KILL_DURING_SAVE.format(
        module="state_file", nth=nth, argv=FLAGS + ["--output-dir", str(out)], train=str(ROOT / "launch" / "train.py")
    )
    assert finished(train(out, driver=driver)) == -signal.SIGKILL
    assert not (out / "checkpoints" / f"step_{10 * nth}" / "rank0.safetensors").exists()
    assert (out / "checkpoints" / f"step_{10 * (nth - 1)}" / "rank0.safetensors").exists()
    _resume_and_compare(out, reference)


def test_kill_during_the_adapter_save_leaves_no_adapter_that_loads(tmp_path, reference):
    out = tmp_path / "run"
    driver = KILL_DURING_SAVE.format(
        module="checkpoint", nth=1, argv=FLAGS + ["--output-dir", str(out)], train=str(ROOT / "launch" / "train.py")
    )
    assert finished(train(out, driver=driver)) == -signal.SIGKILL
    with pytest.raises((AdapterMismatchError, FileNotFoundError)):  # no adapter, rather than half of one
        read_adapter(out)
    _resume_and_compare(out, reference)
