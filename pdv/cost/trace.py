"""Chrome / Perfetto trace (Trace Event Format) and a small text timeline of a simulation.

One process per rank (pid = global rank, named "rank r · stage s"), with one lane (tid) per kind
of work, so that events in a lane never overlap and the trace nests cleanly in Perfetto:
tid 0 compute (F, B, I, W), tid 1 p2p sends, tid 2 collectives (gradient sync, the sum of
shared parameters' copies).
Times are microseconds, as the format requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pdv.artifacts import Plan
from pdv.cost.simulate import Simulation

__all__ = ["chrome_trace", "text_timeline", "ranks_label", "LANES"]

LANES = {"compute": 0, "p2p": 1, "collective": 2}
_NAMES = {
    "F": "forward",
    "B": "backward",
    "I": "backward (input grad)",
    "W": "backward (weight grad)",
    "send-act": "send activations",
    "send-grad": "send gradients",
    "sync": "grad sync",
    "tied-sync": "shared parameters' sum",
    "opt": "optimizer step",
}


def chrome_trace(sim: Simulation, plan: Plan) -> dict[str, Any]:
    """The simulated step as a Trace Event Format object (open in ui.perfetto.dev)."""
    events: list[dict[str, Any]] = []
    for g, ranks in enumerate(sim.group_ranks):
        stages = [s for s, grp in enumerate(sim.stage_group) if grp == g]
        for r in sorted(ranks):
            label = f"rank {r} · stage {', '.join(map(str, stages))}"
            events.append(_meta("process_name", r, 0, {"name": label}))
            events.append(_meta("process_sort_index", r, 0, {"sort_index": r}))
            for lane, tid in LANES.items():
                events.append(_meta("thread_name", r, tid, {"name": lane}))
    for e in sim.events:
        st = plan.stages[e.stage]
        name = _NAMES.get(e.name, e.name)
        if e.micro is not None:
            name += f" mb{e.micro}"
        args = {"stage": e.stage, "layers": list(st.layers), "micro_batch": e.micro}
        for r in sorted(sim.group_ranks[e.group]):
            events.append(
                {
                    "name": name,
                    "cat": e.lane,
                    "ph": "X",
                    "pid": r,
                    "tid": LANES[e.lane],
                    "ts": e.start_s * 1e6,
                    "dur": (e.end_s - e.start_s) * 1e6,
                    "args": args,
                }
            )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "schedule": sim.schedule,
            "step_time_s": sim.step_time_s,
            "bubble_fraction": sim.bubble_fraction,
        },
    }


def _meta(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


def ranks_label(ranks: Sequence[int]) -> str:
    """Ranks with consecutive runs folded: [0, 1, 2, 3, 8] -> '0-3,8'."""
    out: list[str] = []
    rs = sorted(ranks)
    i = 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        out.append(str(rs[i]) if j == i else f"{rs[i]}-{rs[j]}")
        i = j + 1
    return ",".join(out)


def text_timeline(sim: Simulation, width: int = 72) -> list[str]:
    """One line per rank group: F/B/I/W/O cells over the step, '.' idle, '~' sync, O optimizer."""
    if sim.step_time_s <= 0:
        return []
    scale = width / sim.step_time_s
    lines = []
    for g, ranks in enumerate(sim.group_ranks):
        row = ["."] * width
        for e in sim.events:
            if e.group != g or e.lane == "p2p":
                continue
            ch = "~" if e.lane == "collective" else "O" if e.name == "opt" else e.name
            lo = min(width - 1, int(e.start_s * scale))
            hi = max(lo + 1, min(width, round(e.end_s * scale)))
            for i in range(lo, hi):
                row[i] = ch
        lines.append(f"ranks {ranks_label(ranks):<10} |{''.join(row)}|")
    return lines
