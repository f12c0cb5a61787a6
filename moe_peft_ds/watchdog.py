"""Liveness of a multi-rank run: a rank that stops (SIGSTOP, a frozen node) or dies ends the whole
job within ``--dist-timeout``, with one line naming the rank and the collective the others wait in.

A collective's own timeout does not do this: gloo and NCCL wait for a stopped peer far past it
(a stopped process keeps its sockets open), and DeepSpeed's launcher gives a rank that ignores
SIGTERM 30 more seconds. Each rank runs a thread that bumps its heartbeat counter in the
rendezvous store (the ``MASTER_ADDR:MASTER_PORT`` TCPStore) and watches the next rank's
(ranks in a ring: store traffic grows with the number of ranks, not its square). A counter
that does not move for ``timeout`` less two heartbeats, or a store that stops answering (it
lives in rank 0), means that rank stopped or died: the watcher prints the line, kills the stopped
rank when it runs on the same host (a stopped process ignores SIGTERM) and exits; the launcher
then ends the other ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import sys
import threading
import time

EXIT_STATUS = 3  # not 2: the input was fine, a rank was lost
_DIST_FILES = (os.sep.join(("torch", "distributed", "")), os.sep.join(("deepspeed", "comm", "")))


def _collective_of(frame) -> tuple[str, str] | None:
    """``(collective, caller)`` when ``frame``'s stack is inside torch.distributed or deepspeed.comm:
    the outermost such function, and the code that called it."""
    names = []
    while frame is not None:
        in_dist = any(part in frame.f_code.co_filename for part in _DIST_FILES)
        if in_dist:
            names.append(frame.f_code.co_name)
        elif names:
            public = [n for n in names if not n.startswith("_") and n != "wrapper"] or names
            return public[-1], f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return None


def waiting_in(skip: int | None = None) -> str:
    """Where this process waits: the collective some thread is in (and who called it), else the
    main thread's innermost frame."""
    frames = sys._current_frames()
    for ident, frame in frames.items():
        found = _collective_of(frame) if ident != skip else None
        if found:
            return f"{found[0]} (called at {found[1]})"
    main = frames.get(threading.main_thread().ident)
    return f"no collective (at {main.f_code.co_filename}:{main.f_lineno})" if main else "no collective"


class Watchdog:
    """Start with ``Watchdog(timeout_s).start()`` after the process group exists; ``stop()`` marks
    this rank done (its watcher then leaves it alone) and ends the thread."""

    def __init__(self, timeout_s: float, rank: int, world: int, host: str | None = None, port: int | None = None):
        self.timeout, self.rank, self.world = float(timeout_s), rank, world
        self.interval = max(0.5, min(5.0, self.timeout / 10))
        self.host = host or os.environ.get("MASTER_ADDR", "127.0.0.1")
        self.port = port or int(os.environ["MASTER_PORT"])
        self.watched = (rank + 1) % world
        self.pids: dict[int, str] = {}  # "host:pid" of the ranks this one may have to end
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moe_peft_ds-watchdog", daemon=True)

    def _key(self, kind: str, rank: int) -> str:
        return f"moe_peft_ds/watchdog/{kind}/{rank}"

    def start(self) -> Watchdog:
        import torch.distributed as dist

        self.store = dist.TCPStore(
            self.host,
            self.port,
            is_master=False,
            timeout=datetime.timedelta(seconds=self.interval),
            wait_for_workers=False,
        )
        self.store.set(self._key("pid", self.rank), f"{socket.gethostname()}:{os.getpid()}")
        self.store.add(self._key("beat", self.rank), 1)
        # Every rank starts its watchdog right after the process group: the two ranks this one may
        # have to end have published their pids before any collective can have stopped them.
        ends = [self._key("pid", r) for r in sorted({0, self.watched})]
        self.store.wait(ends, datetime.timedelta(seconds=self.timeout))
        self.pids = {r: self.store.get(self._key("pid", r)).decode() for r in sorted({0, self.watched})}
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            # first, so that the rank watching this one does not take the end of its beats for a stop;
            # a RuntimeError: the store's rank has finished already, and nobody watches any more
            with contextlib.suppress(RuntimeError):
                self.store.set(self._key("done", self.rank), "1")
            self._stop.set()
            self._thread.join()

    def _beat(self) -> None:
        """Store round-trips (which can block for good when rank 0, the store's host, is stopped):
        bump this rank's counter, note when the watched rank's last moved."""
        last_seen = None
        while not self._stop.wait(self.interval):
            try:
                self.store.add(self._key("beat", self.rank), 1)
                done = self.store.check([self._key("done", self.watched)])
                seen = self.store.add(self._key("beat", self.watched), 0)
            except RuntimeError:  # the store timed out: the watcher below counts the silence
                continue
            now = time.monotonic()
            self.store_ok = now
            if done or seen != last_seen:
                last_seen, self.last_change = seen, now

    def _run(self) -> None:
        """Decide from what ``_beat`` saw; never touches the store, so it cannot block."""
        self.store_ok = self.last_change = time.monotonic()
        threading.Thread(target=self._beat, name="moe_peft_ds-heartbeat", daemon=True).start()
        limit = self.timeout - 2 * self.interval
        while not self._stop.wait(self.interval / 2):
            now = time.monotonic()
            if now - self.store_ok > limit:
                self._end(0, now - self.store_ok, "the rendezvous store it holds does not answer")
            elif now - self.last_change > limit:
                self._end(self.watched, now - self.last_change, "its heartbeat stopped")

    def _end(self, rank: int, silent_s: float, why: str) -> None:
        print(
            f"error: rank {rank} stopped or died ({why} {silent_s:.0f} s ago, --dist-timeout {self.timeout:g} s); "
            f"rank {self.rank} waits in {waiting_in(skip=threading.get_ident())}: ending the job",
            file=sys.stderr,
            flush=True,
        )
        self._kill_if_local(rank)
        os._exit(EXIT_STATUS)

    def _kill_if_local(self, rank: int) -> None:
        """SIGKILL a stopped rank on this host: it would ignore the launcher's SIGTERM."""
        host, _, pid = self.pids.get(rank, "").rpartition(":")
        if host == socket.gethostname():
            with contextlib.suppress(ProcessLookupError, PermissionError):  # gone already, or not ours
                os.kill(int(pid), signal.SIGKILL)
