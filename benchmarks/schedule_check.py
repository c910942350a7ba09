"""The simulator's pipeline schedules against real torch.distributed.pipelining runs on CPU ranks.

    python benchmarks/schedule_check.py            # table; exit 1 past the tolerance
    python benchmarks/schedule_check.py --keep DIR --tolerance 0.05

The model is benchmarks/sleepy.py: layers that *wait* a fixed time forward and backward, so a
loaded 2-core machine cannot blur what is checked -- the op order of each schedule (GPipe,
1F1B, Interleaved1F1B with 2 and 4 chunks per rank), its dependencies, and the transfers
between ranks. Each plan is profiled (`pdv profile model`), simulated on this machine's links
(`pdv profile cluster`, with every rank's compute speed set equal: waiting ranks do not share
cores), run with `pdv run`, and its measured median step compared with the prediction. With
PDV_OP_TRACE each rank logs the ops torch executed in the last step: the table also says
whether that order is the simulator's, and compares the measured bubble (the same formula as
the simulator's: 1 - busy / (groups x span) over the ranks' forward and backward ops) with the
simulated one -- interleaving must cut it, in the run as in the simulator.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPEC = "benchmarks/sleepy.py:sleepy"
MBS, MICRO = 4, 8

# name: (rank groups, chunks per group, schedule, sleepy kwargs)
PLANS: dict[str, tuple[int, int, str, dict[str, Any]]] = {
    "gpipe-4": (4, 1, "GPipe", {}),
    "1f1b-4": (4, 1, "1F1B", {}),
    "interleaved-4x2": (4, 2, "Interleaved1F1B", {}),
    "1f1b-2": (2, 1, "1F1B", {}),
    "interleaved-2x2": (2, 2, "Interleaved1F1B", {}),
    "interleaved-2x4": (2, 4, "Interleaved1F1B", {}),
    "interleaved-4x2-unequal": (4, 2, "Interleaved1F1B", {"weights": "1,1,1,1,1,1,1,3"}),
}


def _pdv(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run([sys.executable, "-m", "pdv", *args], cwd=cwd, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"pdv {' '.join(args)} failed:\n{r.stderr[-2000:]}")


def _plan(groups: int, chunks: int, schedule: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    n = groups * chunks
    per = 8 // n
    stages = [{"layers": [i * per, (i + 1) * per], "ranks": [i % groups]} for i in range(n)]
    return {"schema": "pdv.plan/v1", "stages": stages, "micro_batch_size": MBS,
            "num_micro_batches": MICRO, "global_batch_size": MBS * MICRO, "schedule": schedule,
            "model": {"spec": SPEC, "kwargs": kwargs}}


def measured_bubble(ops_by_group: list[list[list[Any]]]) -> float:
    """1 - busy / (groups x span) over the logged ops [kind, stage, micro, start, end]."""
    start = min(op[3] for ops in ops_by_group for op in ops)
    end = max(op[4] for ops in ops_by_group for op in ops)
    busy = sum(op[4] - op[3] for ops in ops_by_group for op in ops)
    return 1.0 - busy / (len(ops_by_group) * (end - start))


def _arg(kwargs: dict[str, Any]) -> list[str]:
    return [x for k, v in sorted(kwargs.items()) for x in ("--model-arg", f"{k}={v}")]


def check(out: Path, steps: int) -> list[dict[str, Any]]:
    """Profile, simulate and run every plan; one row per plan."""
    from pdv import artifacts
    from pdv.cost.schedules import rank_orders, stage_layout
    from pdv.cost.simulate import simulate

    cluster_path = out / "cluster.json"
    _pdv("profile", "cluster", "--nproc-per-node", "4", "-o", str(cluster_path))
    rows = []
    for name, (groups, chunks, schedule, kwargs) in PLANS.items():
        profile_path = out / f"{name}.profile.json"
        _pdv("profile", "model", SPEC, *_arg(kwargs), "--micro-batch-sizes", str(MBS),
             "--warmup", "1", "--repeat", "5", "-o", str(profile_path))
        profile = artifacts.load_as(profile_path, "model-profile")
        cluster = artifacts.load_as(cluster_path, "cluster")
        # Waiting is not computing: every rank at the profile's speed, no shared cores.
        speed = profile.device.matmul_flops
        cluster = cluster.model_copy(update={"devices": [
            d.model_copy(update={"matmul_flops": speed, "matmul_flops_alone": speed})
            for d in cluster.devices]})
        plan_path = out / f"{name}.plan.json"
        plan_path.write_text(json.dumps(_plan(groups, chunks, schedule, kwargs)))
        plan = artifacts.load_as(plan_path, "plan")
        sim = simulate(plan, {profile.device.kind: profile}, cluster)
        report_path = out / f"{name}.report.json"
        trace = out / f"{name}.ops"
        trace.mkdir(exist_ok=True)
        _pdv("run", str(plan_path), "--steps", str(steps), "--warmup", "2",
             "--report", str(report_path), env={"PDV_OP_TRACE": str(trace)})
        measured = artifacts.load_as(report_path, "run-report").measured
        layout = stage_layout([st.ranks for st in plan.stages], plan.schedule)
        ran = [json.loads((trace / f"ops-rank{r[0]}.json").read_text())["ops"]
               for r in layout.group_ranks]
        same = [[tuple(op[:3]) for op in ops] for ops in ran] == rank_orders(
            layout, plan.schedule, plan.num_micro_batches)
        err = (sim.step_time_s - measured.step_time_s) / measured.step_time_s
        rows.append({"plan": name, "schedule": schedule, "groups": groups, "chunks": chunks,
                     "predicted_s": sim.step_time_s, "measured_s": measured.step_time_s,
                     "spread_s": measured.step_time_spread_s, "error": err,
                     "order_matches": same, "bubble_predicted": sim.bubble_fraction,
                     "bubble_measured": measured_bubble(ran)})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print predicted, measured and error per plan; non-zero past the tolerance."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tolerance", type=float, default=0.05,
                    help="largest |error| of any plan (default 0.05)")
    ap.add_argument("--steps", type=int, default=8, help="steps per run (2 more warm up)")
    ap.add_argument("--keep", type=Path, help="keep profiles, plans and reports here")
    ap.add_argument("--json", action="store_true", help="one JSON object per plan")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        rows = check(out, args.steps)
    if args.json:
        for r in rows:
            print(json.dumps(r, sort_keys=True))
    else:
        print(f"{'plan':<24} {'schedule':<16} {'predicted':>10} {'measured':>10} {'spread':>8} "
              f"{'error':>7} {'order':>6} {'bubble sim/run':>15}")
        for r in rows:
            print(f"{r['plan']:<24} {r['schedule']:<16} {r['predicted_s'] * 1e3:>8.1f}ms "
                  f"{r['measured_s'] * 1e3:>8.1f}ms {r['spread_s'] * 1e3:>6.1f}ms "
                  f"{r['error']:>+7.1%} {'same' if r['order_matches'] else 'DIFF':>6} "
                  f"{r['bubble_predicted']:>7.1%}/{r['bubble_measured']:<6.1%}")
    worst = max(abs(r["error"]) for r in rows)
    median = statistics.median(abs(r["error"]) for r in rows)
    ok = worst <= args.tolerance and all(r["order_matches"] for r in rows)
    by = {r["plan"]: r for r in rows}
    for plain, inter in (("1f1b-4", "interleaved-4x2"), ("1f1b-2", "interleaved-2x2")):
        if plain in by and inter in by:
            cut = by[inter]["bubble_measured"] < by[plain]["bubble_measured"]
            ok = ok and cut
            print(f"measured bubble {plain} {by[plain]['bubble_measured']:.1%} -> {inter} "
                  f"{by[inter]['bubble_measured']:.1%}: {'cut' if cut else 'NOT CUT'}",
                  file=sys.stderr if args.json else sys.stdout)
    print(f"median |error| {median:.1%}, largest {worst:.1%} (tolerance "
          f"{args.tolerance:.0%}): {'ok' if ok else 'MISSED'}",
          file=sys.stderr if args.json else sys.stdout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
