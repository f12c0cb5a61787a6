"""launch/slurm/node_launch.py: the hostfile and per-node deepspeed command for a Slurm job."""

import importlib
import runpy
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE = runpy.run_path(str(ROOT / "launch" / "slurm" / "node_launch.py"), run_name="not_main")
TRAIN = ["launch/train.py", "--model", "tiny-mixtral", "--data", "demo:arithmetic"]


def test_compact_node_lists_expand_like_slurm():
    assert NODE["expand_nodelist"]("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert NODE["expand_nodelist"]("a-node9") == ["a-node9"]


def test_dry_run_prints_hostfile_and_this_nodes_command(capsys):
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "42"}
    assert NODE["main"](["--dry-run", "--", *TRAIN], env=env) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["gpu07 slots=4", "gpu08 slots=4"]
    cmd = shlex.split(lines[2])
    assert cmd[:10] == [
        "deepspeed",
        "--hostfile",
        "hostfile.42",
        "--no_ssh",
        "--node_rank",
        "1",
        "--master_addr",
        "gpu07",
        "--master_port",
        "29500",
    ]
    assert cmd[10:] == TRAIN


@pytest.mark.parametrize(
    "env, match",
    [
        ({}, "SLURM_JOB_NODELIST"),
        ({"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NODEID": "5"}, "outside"),
    ],
)
def test_outside_an_allocation_or_a_bad_node_rank_fails_clearly(env, match, capsys):
    assert NODE["main"](["--dry-run", "--", *TRAIN], env=env) == 2
    assert match in capsys.readouterr().err


@pytest.mark.slow
def test_one_node_run_through_the_slurm_path(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "SLURM_JOB_NODELIST": "localhost", "SLURM_NODEID": "0", "SLURM_JOB_ID": "t"}
    cmd = [
        sys.executable,
        "launch/slurm/node_launch.py",
        "--gpus-per-node",
        "2",
        "--master-port",
        "29541",
        "--hostfile",
        str(tmp_path / "hostfile"),
        "--",
        *TRAIN,
        "--output-dir",
        str(tmp_path / "out"),
        "--deepspeed_config",
        "ds_configs/zero2_fp32.json",
        "--ep-size",
        "2",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--calibration-samples",
        "16",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "2 rank(s)" in proc.stdout


@pytest.mark.parametrize("sbatch", sorted((ROOT / "launch" / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_every_sbatch_script_passes_flags_its_launcher_accepts(sbatch):
    """The command after ``node_launch.py ... --`` parses with the launcher's own argument parser."""
    command = shlex.split(sbatch.read_text().split("node_launch.py", 1)[1].replace("\\\n", " "), comments=True)
    script, *args = command[command.index("--") + 1 :]
    assert (ROOT / script).is_file(), script
    parse_args = importlib.import_module(f"moe_peft_ds.commands.{Path(script).stem}").parse_args  # what it runs
    parsed = parse_args(args)
    assert parsed.deepspeed_config and Path(ROOT / parsed.deepspeed_config).is_file() and parsed.ep_size > 1
