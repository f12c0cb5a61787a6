#!/usr/bin/env python
"""Start this node's share of a multi-node DeepSpeed run inside a Slurm allocation, without
passwordless ssh between nodes: one ``deepspeed --no_ssh --node_rank <this node>`` per node.

Run it once per node (``srun --ntasks-per-node=1``; see train.sbatch). It reads the Slurm
environment (SLURM_JOB_NODELIST, SLURM_NODEID, SLURM_GPUS_ON_NODE), writes the MPI-style
hostfile DeepSpeed expects (``<host> slots=<gpus>``, node 0 first) and replaces itself with

    deepspeed --hostfile <file> --no_ssh --node_rank <SLURM_NODEID> --master_addr <node 0> \\
        --master_port <port> <script> <script args>

    python launch/slurm/node_launch.py --dry-run -- launch/train.py --model ... # print, do not run
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list, e.g. ``gpu[01-03,07],cpu5`` -> gpu01 gpu02 gpu03 gpu07 cpu5.

    Uses ``scontrol show hostnames`` where Slurm is installed; the same rules otherwise.
    """
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pass  # no Slurm tools on this machine: expand by the same rules below
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    if not hosts:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    return hosts


def hostfile_text(hosts: list[str], gpus_per_node: int) -> str:
    return "".join(f"{h} slots={gpus_per_node}\n" for h in hosts)


def node_command(hosts: list[str], node_rank: int, hostfile: Path, port: int, script_args: list[str]) -> list[str]:
    """The deepspeed launcher call for node ``node_rank``."""
    if not 0 <= node_rank < len(hosts):
        raise ValueError(f"node rank {node_rank} is outside the {len(hosts)} nodes {hosts}")
    return [
        "deepspeed",
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        str(node_rank),
        "--master_addr",
        hosts[0],
        "--master_port",
        str(port),
        *script_args,
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--gpus-per-node", type=int, default=None, help="accelerators per node (default: $SLURM_GPUS_ON_NODE, else 8)"
    )
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port on node 0 (default 29500)")
    p.add_argument(
        "--hostfile", type=Path, default=None, help="where to write the hostfile (default: ./hostfile.$SLURM_JOB_ID)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the hostfile and the command instead of running")
    p.add_argument("script", nargs=argparse.REMAINDER, help="-- then the training script and its flags")
    args = p.parse_args(argv)
    args.script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not args.script:
        p.error("give the training script after --, e.g. -- launch/train.py --model ...")
    return args


def main(argv=None, env=os.environ) -> int:
    args = parse_args(argv)
    missing = [k for k in ("SLURM_JOB_NODELIST", "SLURM_NODEID") if k not in env]
    if missing:
        print(
            f"error: {', '.join(missing)} not set; run inside a Slurm allocation (srun, one task per node)",
            file=sys.stderr,
        )
        return 2
    try:
        hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
        gpus = args.gpus_per_node or int(env.get("SLURM_GPUS_ON_NODE", "8"))
        hostfile = args.hostfile or Path(f"hostfile.{env.get('SLURM_JOB_ID', 'local')}")
        cmd = node_command(hosts, int(env["SLURM_NODEID"]), hostfile, args.master_port, args.script)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(hostfile_text(hosts, gpus), end="")
        print(shlex.join(cmd))
        return 0
    hostfile.write_text(hostfile_text(hosts, gpus))  # every node writes the same content
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
