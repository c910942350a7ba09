"""Start one process per rank on this host, watch them, and say how the group ended (no torch).

The elastic launcher is its own agent: it starts each rank's process itself, with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so it sees every rank's own exit
status. torchrun's agent would restart the same world; an elastic run needs a different world
after each change, and needs to know which rank vanished.

Each rank runs on a *device*: a stable number (the rank it had in the first plan's cluster)
that survives renumbering. A rank's command may be prefixed per device (``{device}`` in the
prefix is replaced), which is how a rank keeps its place across relaunches: ``taskset -c
{device}``, ``numactl``, a cgroup, a namespace. CUDA ranks see the survivors' GPUs through
CUDA_VISIBLE_DEVICES in rank order, so rank i's ``cuda:i`` is its device's GPU.

How a group ends (`classify`): every rank exits 0 (done); every rank exits 0 or EXIT_REPLAN with
at least one EXIT_REPLAN (the ranks stopped, checkpointed, for a replan); a rank was ended by a
signal nobody here sent, other than SIGABRT (a process aborting itself is a failure, not a lost
device): that rank is lost and the others are ended; anything else is a failure, reported with
the first failing rank's last error line.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pdv.profile.launch_local import free_port, kill_tree

__all__ = ["EXIT_REPLAN", "GroupEnd", "Workers", "classify", "rank_command"]

EXIT_REPLAN = 3
"""A rank's exit code when the run stopped, checkpointed, for a replan (pdv.run.runtime)."""
GRACE_S = 3.0
"""how long the others may take to exit on their own once one rank has ended badly"""


@dataclass(frozen=True)
class GroupEnd:
    """How a group of ranks ended."""

    kind: str
    """done | replan | lost | failed"""
    lost: tuple[int, ...] = ()
    """ranks (of this group) ended by a signal from outside"""
    codes: tuple[int | None, ...] = ()
    message: str = ""


def classify(codes: list[int | None], killed_by_us: set[int]) -> GroupEnd:
    """The end of a group from its ranks' exit codes (None: still running, about to be killed)."""
    frozen = tuple(codes)
    if all(c == 0 for c in codes):
        return GroupEnd("done", codes=frozen)
    if all(c in (0, EXIT_REPLAN) for c in codes) and EXIT_REPLAN in codes:
        return GroupEnd("replan", codes=frozen)
    lost = tuple(i for i, c in enumerate(codes) if c is not None and c < 0
                 and i not in killed_by_us and -c != signal.SIGABRT)
    if lost:
        return GroupEnd("lost", lost=lost, codes=frozen)
    return GroupEnd("failed", codes=frozen)


def rank_command(prefix: str | None, device: int, argv: list[str]) -> list[str]:
    """The rank's command line: the per-device prefix ({device} replaced), then argv."""
    if not prefix:
        return argv
    return [w.replace("{device}", str(device)) for w in shlex.split(prefix)] + argv


def _visible(devices: list[int], env: dict[str, str]) -> str:
    own = env.get("CUDA_VISIBLE_DEVICES")
    if own:
        ids = own.split(",")
        return ",".join(ids[d] for d in devices if d < len(ids))
    return ",".join(map(str, devices))


class Workers:
    """One process per rank, `python <argv>` on its device; `wait()` says how they ended."""

    def __init__(self, argv: list[str], devices: list[int], logs: Path, prefix: str | None,
                 env: dict[str, str] | None = None) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = [logs / f"rank-{i}.log" for i in range(len(devices))]
        self.devices = devices
        port = free_port()
        base = {**os.environ, **(env or {})}
        base.setdefault("OMP_NUM_THREADS", "1")
        common = {"WORLD_SIZE": str(len(devices)), "LOCAL_WORLD_SIZE": str(len(devices)),
                  "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                  "CUDA_VISIBLE_DEVICES": _visible(devices, base)}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.killed: set[int] = set()
        # When each rank exited, to the thread scheduler's precision: the first to fail is the
        # cause, the others fail because it went away (a poll loop would see them at once).
        self.exited_at: dict[int, float] = {}
        try:
            for i, device in enumerate(devices):
                env_i = {**base, **common, "RANK": str(i), "LOCAL_RANK": str(i),
                         "PDV_DEVICE": str(device)}
                cmd = rank_command(prefix, device, [sys.executable, *argv])
                with self.logs[i].open("wb") as log:
                    self.procs.append(subprocess.Popen(
                        cmd, env=env_i, stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, start_new_session=True))
                threading.Thread(target=self._reap, args=(i,), daemon=True).start()
        except BaseException:
            self.kill()
            raise

    def _reap(self, rank: int) -> None:
        self.procs[rank].wait()
        self.exited_at.setdefault(rank, time.monotonic())

    def pids(self) -> list[int]:
        """Process ids, by rank."""
        return [p.pid for p in self.procs]

    def wait(self, poll_s: float = 0.1) -> GroupEnd:
        """Block until the group ends; the ranks still running then are killed."""
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                if all(c is not None for c in codes):
                    break
                if any(c not in (None, 0, EXIT_REPLAN) for c in codes):
                    deadline = time.monotonic() + GRACE_S
                    while time.monotonic() < deadline and any(p.poll() is None
                                                              for p in self.procs):
                        time.sleep(poll_s)
                    codes = [p.poll() for p in self.procs]
                    break
                time.sleep(poll_s)
        finally:
            self.kill()
        end = classify(codes, self.killed)
        if end.kind == "failed":
            failed = [i for i, c in enumerate(codes) if c not in (None, 0, EXIT_REPLAN)] or [0]
            first = min(failed, key=lambda i: (self.exited_at.get(i, float("inf")), i))
            end = GroupEnd("failed", codes=end.codes,
                           message=f"rank {first} exited with {_code(codes[first])}: "
                           f"{_last_error(self.logs[first])}")
        return end

    def kill(self) -> None:
        """Kill every rank still running (and what it started)."""
        for i, p in enumerate(self.procs):
            if p.poll() is None:
                self.killed.add(i)
                with contextlib.suppress(Exception):
                    kill_tree(p)


def _code(code: int | None) -> str:
    if code is None:
        return "no exit (killed)"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"code {code}"


def _last_error(log: Path) -> str:
    """The line that says what went wrong: pdv's own error line, else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    ours = [ln for ln in lines if ln.startswith("pdv: error:")]
    return (ours or lines or ["(empty log)"])[-1][:300] + f" (log: {log})"
