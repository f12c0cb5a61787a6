"""One rank of the watchdog tests: ``python watchdog_worker.py RANK WORLD PORT SCENARIO TIMEOUT``."""

import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_peft_ds.watchdog import Watchdog


def main(rank: int, world: int, port: int, scenario: str, timeout: float) -> int:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # gloo's own timeout is far longer: what ends the job here is the watchdog
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    watchdog = Watchdog(timeout, rank, world).start()
    print(f"rank {rank} started", flush=True)
    if scenario.startswith("stop"):
        stopped = int(scenario[-1])
        for step in range(10_000):
            if rank == stopped and step == 3:
                os.kill(os.getpid(), signal.SIGSTOP)
            x = torch.ones(4)
            dist.all_reduce(x)
            time.sleep(0.05)
    elif scenario == "finish_early":  # rank 1 leaves long before rank 0: no alarm
        if rank == 0:
            time.sleep(2.5 * timeout)
    elif scenario == "busy":  # a long stretch without collectives (a slow model load): no alarm
        time.sleep(2.5 * timeout)
        dist.barrier()
    watchdog.stop()
    print(f"rank {rank} done", flush=True)
    return 0


if __name__ == "__main__":
    rank, world, port, scenario, timeout = sys.argv[1:]
    sys.exit(main(int(rank), int(world), int(port), scenario, float(timeout)))
