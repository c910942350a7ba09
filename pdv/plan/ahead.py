"""The baselines' share of pdv's search, run ahead in a forked process while pdv's own runs.

pdv's search simulates every baseline's plan so that its pick is never predicted slower than
theirs; on a 64-GPU cluster a baseline's stage DP, CP-SAT refinement and simulation are about
as much work as pdv's own, and need nothing from pdv's results. So on a machine with a second
core a forked child does that work at the same time, in the order the search will ask for it,
and sends each generator's results (pickled, over a pipe) as soon as they are done. They are
the results the search would compute in-process: the child runs the same deterministic
functions (CP-SAT on one worker with a fixed seed and a deterministic time limit) on a copy of
the same problem. Anything unusual (no fork, one core, a child that dies or says nothing
within WAIT_S) falls back to computing in-process, so a plan never depends on it.

The child touches no file, socket or device; it only computes and writes to its pipe, and it
leaves with os._exit, so the parent's exit handlers and buffered output are not run twice.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdv.plan.problem import PlanProblem

__all__ = ["Ahead", "start", "AHEAD_FROM"]

AHEAD_FROM = 48
"""fewest devices for which the baselines' DPs run ahead (below, they take milliseconds and a
fork costs more than it saves)"""
WAIT_S = 120.0
"""longest wait for the child once the parent needs its results; then it is killed and the
work done in-process"""

_HEAD = struct.Struct("<Q")
"""each result's frame starts with its length"""


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Ahead:
    """A forked child computing `work(name)` for each of `names`, sent one by one as each ends
    (so the first can be used while the child works on the next)."""

    pid: int
    fd: int
    names: tuple[str, ...]
    _got: dict[str, object] = field(default_factory=dict)

    def result(self, name: str) -> object | None:
        """What the child sent for `name` (None when it sent nothing: compute it here)."""
        while name not in self._got and self.fd >= 0:
            frame = self._frame()
            if frame is None:
                self.close()
                break
            try:
                key, payload = pickle.loads(frame)
            except Exception:  # a garbled frame: whatever it held is recomputed
                self.close()
                break
            self._got[key] = payload
        return self._got.get(name)

    def _frame(self) -> bytes | None:
        head = self._read(_HEAD.size)
        if head is None:
            return None
        return self._read(_HEAD.unpack(head)[0])

    def _read(self, n: int) -> bytes | None:
        chunks, left = [], n
        while left:
            ready, _, _ = select.select([self.fd], [], [], WAIT_S)
            chunk = os.read(self.fd, min(left, 1 << 20)) if ready else b""
            if not chunk:  # the child ended, or said nothing for WAIT_S
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Stop the child if it still runs and reap it (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.pid > 0:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
                if pid == 0:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = 0


def start(problem: PlanProblem, names: Sequence[str],
          work: Callable[[str], object]) -> Ahead | None:  # fmt: skip
    """Fork a child that sends `work(name)` for each name in turn; None where not worth it."""
    if (len(problem.cluster.devices) < AHEAD_FROM or _usable_cores() < 2
            or not hasattr(os, "fork")):  # fmt: skip
        return None
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():  # see the module docstring on threads at fork time
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: compute, write, leave without running the parent's exit hooks
        code = 1
        try:
            os.close(read_fd)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            for name in names:
                data = pickle.dumps((name, work(name)), protocol=pickle.HIGHEST_PROTOCOL)
                view = memoryview(_HEAD.pack(len(data)) + data)
                while view:
                    view = view[os.write(write_fd, view) :]
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    return Ahead(pid, read_fd, tuple(names))
