"""The watchdog ends a job whose rank stopped (SIGSTOP) or died, naming the rank and the
collective the others wait in; it never ends a healthy one (a rank that finished first, or one
that computes for longer than the timeout)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_peft_ds.cli import free_port
from moe_peft_ds.watchdog import EXIT_STATUS

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 6.0  # --dist-timeout of these runs


def start(scenario: str, world: int = 2) -> list[subprocess.Popen]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "watchdog_worker.py"),
                str(r),
                str(world),
                str(port),
                scenario,
                str(TIMEOUT),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]


def finish(procs: list[subprocess.Popen], deadline: float) -> list[tuple[int, str]]:
    """``(exit status, stderr)`` of every rank; a rank still running at ``deadline`` s is a hang."""
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=deadline)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("stopped, watcher", [(1, 0), (0, 1)])
def test_a_stopped_rank_ends_the_job_naming_the_rank_and_the_collective(stopped, watcher):
    """Rank 1 stopped: rank 0 sees its heartbeat stop. Rank 0 stopped: the store it holds stops
    answering. Either way the watcher kills the stopped rank (SIGKILL: it ignores SIGTERM) and exits."""
    procs = start(f"stop{stopped}")
    # the deadline is a hang check (model start-up included), not a timing assertion
    (rc0, err0), (rc1, err1) = finish(procs, deadline=TIMEOUT + 60)
    codes, errs = {0: rc0, 1: rc1}, {0: err0, 1: err1}
    assert codes[watcher] == EXIT_STATUS and codes[stopped] == -9, errs
    [line] = error_lines(errs[watcher])
    assert line.startswith(f"error: rank {stopped} stopped or died (")
    assert f"rank {watcher} waits in all_reduce (called at {ROOT / 'tests' / 'watchdog_worker.py'}" in line
    assert "Traceback" not in errs[watcher]


@pytest.mark.parametrize("scenario", ["finish_early", "busy"])
def test_healthy_runs_are_left_alone(scenario):
    results = finish(start(scenario), deadline=3 * TIMEOUT + 60)
    assert [rc for rc, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    assert not any(error_lines(err) for _, err in results)


@pytest.mark.slow
def test_deepspeed_training_with_a_stopped_rank_ends_within_dist_timeout(tmp_path):
    """`deepspeed --num_gpus 2 launch/train.py --dist-timeout 20`, rank 1 stopped mid-training:
    the launcher ends (rank 0's watchdog names rank 1 and kills it) instead of hanging."""
    import time

    import psutil
    from distributed import _drop_deepspeed_shm

    out, port, timeout = tmp_path / "run", free_port(), 20
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), str(ROOT / "launch" / "train.py")]
    cmd += ["--model", "tiny-mixtral", "--data", "demo:arithmetic", "--output-dir", str(out), "--max-steps", "100000"]
    cmd += ["--batch-size", "2", "--calibration-samples", "8", "--no-progress", "--dist-timeout", str(timeout)]
    cmd += ["--deepspeed_config", str(ROOT / "ds_configs" / "zero2_fp32.json"), "--ep-size", "2"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        log = out / "train_log.jsonl"
        while not (log.exists() and log.read_text().count("\n") >= 2):  # training is under way
            assert launcher.poll() is None, launcher.stdout.read()[-3000:]
            time.sleep(0.5)
        [rank1] = [
            p
            for p in psutil.process_iter(["cmdline"])
            if str(out) in " ".join(p.info["cmdline"] or []) and p.environ().get("RANK") == "1"
        ]
        rank1.suspend()  # SIGSTOP
        output, _ = launcher.communicate(timeout=timeout + 60)  # a hang check, not a timing assertion
    finally:
        if launcher.poll() is None:
            launcher.kill()
        _drop_deepspeed_shm(str(port))
    assert launcher.returncode != 0
    [line] = [x for x in output.splitlines() if x.startswith("error:")]
    assert line.startswith("error: rank 1 stopped or died (its heartbeat stopped") and "rank 0 waits in " in line
    assert not rank1.is_running() or rank1.status() == psutil.STATUS_ZOMBIE
