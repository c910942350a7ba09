"""A pipeline's exchanges as a waiting rank sees them: simulated against measured.

    PDV_OP_TRACE=DIR pdv run PLAN --steps 6          # DIR/ops-rank*.json: the last step's ops
    python benchmarks/pipeline_gaps.py PLAN -p PROFILE -c CLUSTER DIR [DIR ...]

For each boundary between consecutive stages and each direction, the gaps from the op that
made a micro-batch's message (the sending stage's forward of it; the receiving stage's
backward of it, for its gradient) to the op that took it, counted only where the taking rank
had nothing else to do: its previous op had ended before the making op did. That is what the
exchange costs a step when it is on the critical path: the link, the landing, and the
message handling of both sides between the two ops.

The simulator's events give the same gaps by the same rule: the link's α + S/β and the
exchange's measured excess (pdv.cost.comm). Its ops carry the message CPU of both sides
(pdv.cost.stage.message_cpu), which a clocked op does not: a run spends it between its ops,
in a waited gap or not, so the table shows it beside the simulated gap, and per rank group
the ops' time and the time between them, simulated and measured. Measured gaps pool over
the DIRs (one `pdv run` each). Nothing is run here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pdv import artifacts  # noqa: E402
from pdv.cost.compute import profile_arrays  # noqa: E402
from pdv.cost.schedules import stage_layout  # noqa: E402
from pdv.cost.simulate import simulate  # noqa: E402
from pdv.cost.stage import boundary_tensors, message_cpu  # noqa: E402

Op = tuple[str, int, int, float, float]
"""(kind, stage, micro-batch, start, end), as pdv.run.pipeline.OpRecorder writes them"""

Key = tuple[int, str]
"""(boundary after stage s, "act" or "grad")"""


def waited_gaps(ops: dict[int, Sequence[Op]], stage_group: Sequence[int]) -> dict[Key, list[float]]:
    """Per boundary and direction, the gaps where the taking rank group waited (see the module
    docstring). `ops` holds each rank group's ops on one clock; stages on one group have no
    exchange between them and are skipped."""
    where: dict[tuple[str, int, int], tuple[int, float, float]] = {}
    for g, seq in ops.items():
        for kind, stage, micro, t0, t1 in seq:
            where[(kind, stage, micro)] = (g, t0, t1)
    starts = {g: sorted(seq, key=lambda o: o[3]) for g, seq in ops.items()}
    out: dict[Key, list[float]] = {}

    def take(key: Key, made: tuple[int, float, float] | None,
             taken: tuple[int, float, float] | None) -> None:
        if made is None or taken is None or made[0] == taken[0]:
            return
        g, t0, _ = taken
        before = [o[4] for o in starts[g] if o[3] < t0]
        if before and max(before) > made[2]:
            return  # the taker was still busy when the message was made
        out.setdefault(key, []).append(t0 - made[2])

    for (kind, stage, micro), taken in where.items():
        if kind == "F" and stage > 0 and stage_group[stage - 1] != stage_group[stage]:
            take((stage - 1, "act"), where.get(("F", stage - 1, micro)), taken)
        if kind in ("B", "I") and stage + 1 < len(stage_group):
            made = where.get(("B", stage + 1, micro)) or where.get(("I", stage + 1, micro))
            take((stage, "grad"), made, taken)
    return out


def measured_ops(trace: Path, group_ranks: Sequence[Sequence[int]]) -> dict[int, list[Op]]:
    """Each rank group's ops from one traced run (its first rank's file)."""
    out: dict[int, list[Op]] = {}
    for g, ranks in enumerate(group_ranks):
        doc = json.loads((trace / f"ops-rank{ranks[0]}.json").read_text())
        out[g] = [(str(k), int(s), int(m), float(t0), float(t1)) for k, s, m, t0, t1 in doc["ops"]]
    return out


def timeline(ops: dict[int, Sequence[Op]]) -> dict[int, tuple[float, float]]:
    """Per rank group: (its ops' time, the time between its first op's start and last op's
    end that no op of it filled)."""
    out = {}
    for g, seq in ops.items():
        busy = sum(t1 - t0 for *_, t0, t1 in seq)
        span = max(o[4] for o in seq) - min(o[3] for o in seq)
        out[g] = (busy, span - busy)
    return out


def _pooled(groups: Iterable[dict[Key, list[float]]]) -> dict[Key, list[float]]:
    out: dict[Key, list[float]] = {}
    for one in groups:
        for key, gaps in one.items():
            out.setdefault(key, []).extend(gaps)
    return out


def rows(plan_path: Path, profiles: list[Path], cluster_path: Path,
         traces: list[Path]) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """One row per boundary and direction (the simulated gap and the measured ones), and one
    per rank group (its ops' time and the time between them, simulated and measured)."""
    plan = artifacts.load_as(plan_path, "plan")
    profs = artifacts.load_profiles(profiles)
    cluster = artifacts.load_as(cluster_path, "cluster")
    sim = simulate(plan, profs, cluster)
    layout = stage_layout([s.ranks for s in plan.stages], plan.schedule)
    sim_ops: dict[int, list[Op]] = {}
    for e in sim.events:
        if e.lane == "compute" and e.micro is not None and e.name in ("F", "B", "I"):
            sim_ops.setdefault(e.group, []).append((e.name, e.stage, e.micro, e.start_s, e.end_s))
    simulated = waited_gaps(sim_ops, sim.stage_group)
    runs = [measured_ops(t, layout.group_ranks) for t in traces]
    measured = _pooled(waited_gaps(r, sim.stage_group) for r in runs)
    sim_line, run_lines = timeline(sim_ops), [timeline(r) for r in runs]
    groups = [{"group": g, "ranks": list(layout.group_ranks[g]),
               "simulated_ops_s": sim_line[g][0], "simulated_between_s": sim_line[g][1],
               "measured_ops_s": statistics.median(r[g][0] for r in run_lines),
               "measured_between_s": statistics.median(r[g][1] for r in run_lines)}
              for g in sorted(sim_line)]
    outputs = profile_arrays(next(iter(profs.values())), 1, 1).outputs  # bytes per sample
    out = []
    for s in range(len(plan.stages) - 1):
        src, dst = plan.stages[s], plan.stages[s + 1]
        last = src.layers[1] - 1
        per_sample = float(outputs[last])
        ahead, back = boundary_tensors(profs, last)
        for direction, frm, to, tensors in (("act", src, dst, ahead), ("grad", dst, src, back)):
            cpu = message_cpu(cluster, frm, to, plan.micro_batch_size, per_sample, tensors)
            handling = (max(cpu.get(r, 0.0) for r in frm.ranks)
                        + max(cpu.get(r, 0.0) for r in to.ranks))
            sim_gaps = simulated.get((s, direction), [])
            got = measured.get((s, direction), [])
            out.append({
                "boundary": f"{s}->{s + 1}", "direction": direction,
                "simulated_n": len(sim_gaps),
                "simulated_s": statistics.median(sim_gaps) if sim_gaps else None,
                "message_cpu_s": handling, "measured_n": len(got),
                "measured_mean_s": statistics.mean(got) if got else None,
                "measured_median_s": statistics.median(got) if got else None,
                "measured_p90_s": sorted(got)[int(0.9 * len(got))] if got else None,
            })
    return out, groups


def _ms(v: object) -> str:
    return "-" if v is None else f"{float(v) * 1e3:.3f}"  # type: ignore[arg-type]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("traces", type=Path, nargs="+", help="PDV_OP_TRACE folders of runs")
    ap.add_argument("-p", "--profile", type=Path, action="append", required=True)
    ap.add_argument("-c", "--cluster", type=Path, required=True)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = ap.parse_args()
    table, groups = rows(a.plan, a.profile, a.cluster, a.traces)
    if a.json:
        print(json.dumps({"exchanges": table, "groups": groups}, indent=1))
        return 0
    print(f"{'boundary':<10}{'dir':<6}{'sim n':>6}{'sim ms':>9}{'msg CPU':>9}"
          f"{'meas n':>8}{'mean ms':>9}{'median':>9}{'p90':>9}{'mean/sim':>10}")
    for r in table:
        ratio = ("-" if r["simulated_s"] is None or r["measured_mean_s"] is None
                 else f"{float(r['measured_mean_s']) / float(r['simulated_s']):.2f}")  # type: ignore[arg-type]
        print(f"{r['boundary']:<10}{r['direction']:<6}{r['simulated_n']:>6}"
              f"{_ms(r['simulated_s']):>9}{_ms(r['message_cpu_s']):>9}{r['measured_n']:>8}"
              f"{_ms(r['measured_mean_s']):>9}{_ms(r['measured_median_s']):>9}"
              f"{_ms(r['measured_p90_s']):>9}{ratio:>10}")
    print(f"\n{'ranks':<10}{'ops sim/meas ms':>18}{'between ops sim/meas ms':>26}"
          "   (medians over the runs; simulated ops carry the message CPU)")
    for g in groups:
        print(f"{','.join(map(str, g['ranks'])):<10}"  # type: ignore[call-overload]
              f"{_ms(g['simulated_ops_s']):>9}/{_ms(g['measured_ops_s']):<8}"
              f"{_ms(g['simulated_between_s']):>17}/{_ms(g['measured_between_s']):<8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
