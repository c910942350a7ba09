"""gloo's event-loop threads, set alike wherever pdv measures or runs ranks on CPU.

gloo's TCP pair writes a message (a send, or the notice that a receive is posted) while it holds
the pair's lock. On loopback that write wakes the peer's event-loop thread, and the kernel lets
the woken thread preempt the writer on its core (wake-up preemption). The writer's own loop
thread, woken by the data already on its socket, then finds the lock taken: its handler only
``try_lock``s and returns, and the socket stays readable, so it spins through ``epoll_wait``
until the writer gets the core back, a scheduler slice later. On cores the ranks fill, a send
or a posted receive then costs milliseconds. Measured on this 2-core machine (2026-12-05,
``perf record -e sched:sched_switch -g`` on a rank's main thread): 440 of 1,430 preemptions in
2 s were inside ``writev`` under ``Pair::sendAsyncMode``, and in ``perf sched timehist`` the
pipeline group's loop thread ran 1.6-6.7 ms at a time while its main thread slept.

``SCHED_BATCH`` threads do not preempt on wake-up; they run on an idle core or when the running
thread's slice ends, and the pair's lock holder is not pushed off its core mid-write. Measured
with the loop threads so (``PDV_GLOO_LOOPS=batch``) against as torch leaves them (``normal``),
``pdv run --steps 30``, same plans and profiles: gpt_tiny pp2 x dp2 on 4 ranks 30.1/29.6 ms
against 40.5/41.9 ms; convnet pp2 x dp2 13.1 against 19.5 ms; mlp interleaved on 2 ranks
57.3-63.3 against 65.8-66.6 ms. Losses are the same bit for bit: only when threads run changes.

Why it is not the default. The cluster probes read much lower under it (one 2-rank file's send
CPU per message 291 -> 39 µs; a 4-rank host ring's α 653 -> 154 µs): what they had measured
was largely this spin. The runs did not speed up as much, so every prediction fell below its
run. The model zoo (benchmarks/prediction_check.py), fresh files each: on 2 ranks median
|error| 5.5% -> 21.7%, on 4 ranks 22.3% -> 33.2%, nearly every plan predicted low. Until a probe
prices what a run still pays beyond the spin, the default leaves the threads as torch starts
them, and ``PDV_GLOO_LOOPS=batch`` is for runs that want the speed more than the prediction.

The cluster probes and every run rank call :func:`settle_gloo_loops` once their groups exist,
so a profile measures the backend as the run will use it when both see the same
``PDV_GLOO_LOOPS``; the cluster file's and the run report's notes say which. No privilege is
needed: a thread may always lower itself to ``SCHED_BATCH``. NCCL ranks have no such threads.
"""

from __future__ import annotations

import os
from pathlib import Path

from pdv.errors import PdvError

__all__ = ["LOOP_THREAD", "POLICY_ENV", "loop_policy", "settle_gloo_loops"]

LOOP_THREAD = "gloo_tcp_loop"
"""the name gloo gives each TCP device's event-loop thread"""

POLICY_ENV = "PDV_GLOO_LOOPS"
"""normal (the default: as torch starts them) or batch"""

_TASKS = Path("/proc/self/task")


def loop_policy() -> str:
    """The policy asked for in PDV_GLOO_LOOPS: 'normal' (default) or 'batch'."""
    value = os.environ.get(POLICY_ENV, "normal").strip().lower() or "normal"
    if value not in ("batch", "normal"):
        raise PdvError(f"{POLICY_ENV}={value!r}: use 'batch' or 'normal'")
    return value


def loop_threads() -> list[int]:
    """Thread ids of this process's gloo event loops (none where /proc is not Linux's)."""
    tids = []
    try:
        entries = list(_TASKS.iterdir())
    except OSError:
        return []
    for task in entries:
        try:
            if (task / "comm").read_text().strip() == LOOP_THREAD:
                tids.append(int(task.name))
        except (OSError, ValueError):
            continue  # the thread ended between the listing and the read
    return sorted(tids)


def settle_gloo_loops() -> str | None:
    """Put this process's gloo loop threads in SCHED_BATCH when PDV_GLOO_LOOPS=batch; a note of
    the policy they run under, or None where there are no such threads."""
    tids = loop_threads()
    if not tids or not hasattr(os, "SCHED_BATCH"):
        return None
    policy = loop_policy()
    if policy == "normal":
        return f"gloo event-loop threads as torch starts them ({POLICY_ENV}=normal)"
    for tid in tids:
        try:
            if os.sched_getscheduler(tid) != os.SCHED_BATCH:
                os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except (ProcessLookupError, PermissionError):
            continue  # ended meanwhile; lowering one's own policy needs no privilege
    return (f"gloo event-loop threads SCHED_BATCH, each group's as it is made "
            f"({POLICY_ENV}=batch; pdv.profile.loops)")
