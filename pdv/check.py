"""pdv check: do the predictions rank and price plans as the runs measure them?

A set of plans is priced by the simulator on the given profiles and cluster, each is run for a
few steps with ``pdv run`` (its own machinery: torchrun, the report), and the predicted step
times are compared with the measured ones: signed and absolute error per plan, their median and
maximum, Spearman's rank correlation over the set, and where the planner's pick ranked among the
measured times. The default set is the planner's top K, each baseline planner's pick, and plans
of deliberately different shape (every stage equally wide: pure pipeline, pure data parallel and
what lies between, at each allowed micro-batch size) added until the predicted times span the
asked ratio, so that a ranking has something to rank.

This module imports no torch: the runs are ``pdv run`` processes.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdv import artifacts
from pdv.artifacts import ClusterArtifact, ModelProfile, Plan, Planner, PlanStage
from pdv.cost.simulate import simulate, stage_costs, to_predicted
from pdv.errors import PdvError
from pdv.plan.baselines import even_split, uniform_layouts
from pdv.plan.groups import device_order
from pdv.plan.problem import PlanProblem
from pdv.plan.search import PLANNERS, search
from pdv.run.slow import rank_predictions

__all__ = [
    "Candidate",
    "Tolerances",
    "compute_drift",
    "ops_compute",
    "spearman",
    "even_split",
    "plan_key",
    "predict",
    "shape_plans",
    "default_plans",
    "memory_error",
    "run_plan",
    "round_stderr",
    "steps_for",
    "summarize",
    "without_message_cpu",
    "without_schedule_work",
    "write_json_atomic",
]

SCHEMA = "pdv.check/v1"


@dataclass
class Candidate:
    """One plan of the checked set, the names it goes by, and (once run) its measurement."""

    plan: Plan
    labels: list[str]
    measured_s: float | None = None
    spread_s: float | None = None
    error: str | None = None
    load: float | None = None
    report: str | None = None
    file: str | None = None
    notes: list[str] = field(default_factory=list)
    runs_s: list[float] = field(default_factory=list)
    """each round's median step (measured_s is their median)"""
    spreads_s: list[float] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    ops_compute_s: list[float] = field(default_factory=list)
    """each stage's predicted compute from its layers alone (ops_compute); empty: not priced"""
    compute_drifts: list[float] = field(default_factory=list)
    """each round's compute drift (compute_drift): the ranks' own compute against the profile's"""
    steps: int | None = None
    """steps each run of this plan took (--steps, or more by --min-seconds)"""
    memory_errors: list[float] = field(default_factory=list)
    """each round's peak-memory error: the rank whose |predicted - measured| / measured is
    largest, signed"""

    @property
    def predicted_s(self) -> float:
        """The simulator's step time for this plan."""
        assert self.plan.predicted is not None
        return self.plan.predicted.step_time_s


@dataclass(frozen=True)
class Tolerances:
    """Limits past which the check fails (None: not checked)."""

    max_median_error: float | None = None
    max_error: float | None = None
    min_spearman: float | None = None
    max_pick_gap: float | None = None
    """the pick's measured time over the set's measured best, minus 1"""
    max_failures: int = 0
    max_memory_error: float | None = None
    """any plan's peak-memory |error| (its worst rank)"""


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's over average ranks); None when undefined."""
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of one length")
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return float(sxy / (sxx * syy) ** 0.5)


def plan_key(plan: Plan) -> str:
    """What makes two plans the same plan to run."""
    return repr(([s.model_dump() for s in plan.stages], plan.micro_batch_size, plan.schedule))


def predict(plan: Plan, profiles: dict[str, ModelProfile], cluster: ClusterArtifact) -> Plan:
    """The plan with the simulator's prediction on these profiles and this cluster."""
    sim = simulate(plan, profiles, cluster)
    return plan.model_copy(update={"predicted": to_predicted(sim)})


def _fits(plan: Plan, cluster: ClusterArtifact) -> bool:
    assert plan.predicted is not None
    return all(b <= cluster.devices[int(r)].memory_bytes
               for r, b in plan.predicted.peak_memory_bytes.items())  # fmt: skip


def shape_plans(problem: PlanProblem) -> list[Plan]:
    """Every equal-width dp × tp × pp layout over all devices, plain (no FSDP, no recompute),
    layers split evenly, ranks in the measured device order; priced, those that fit."""
    order = device_order(problem.cluster.links)
    profile = next(iter(problem.profiles.values()))
    out = []
    for mbs, pp, width, tp in uniform_layouts(problem, len(order)):
        stages = [PlanStage(layers=span, ranks=list(order[s * width:(s + 1) * width]),
                            dp=width // tp, tp=tp)
                  for s, span in enumerate(even_split(problem.num_layers, pp))]  # fmt: skip
        plan = Plan(model=profile.model, stages=stages, micro_batch_size=mbs,
                    num_micro_batches=problem.global_batch // mbs,
                    global_batch_size=problem.global_batch, schedule=problem.schedule,
                    dtype=profile.dtype, planner=Planner(name="shape"),
                    devices=list(problem.cluster.devices))  # fmt: skip
        try:
            plan = predict(plan, dict(problem.profiles), problem.cluster)
        except PdvError:
            continue  # a layout the schedule cannot run (deadlock, too few micro-batches)
        if _fits(plan, problem.cluster):
            out.append(plan)
    return out


def _add(pool: list[Candidate], plan: Plan, label: str) -> None:
    key = plan_key(plan)
    for c in pool:
        if plan_key(c.plan) == key:
            c.labels.append(label)
            return
    pool.append(Candidate(plan, [label]))


def span_of(pool: Sequence[Candidate]) -> float:
    """Slowest over fastest predicted step time of the set (1 for one plan)."""
    times = [c.predicted_s for c in pool]
    return max(times) / min(times) if times and min(times) > 0 else 1.0


def default_plans(problem: PlanProblem, top: int, baselines: bool, shapes: int, span: float,
                  say: Callable[[str], None] = lambda _m: None) -> list[Candidate]:  # fmt: skip
    """pdv's top K, each baseline's pick, then other shapes until the set spans `span`.

    Shapes are added slowest first (each widens the span most) while the span is short, and
    then, up to `shapes` in all, those whose predicted times lie furthest from the set's.
    """
    pool: list[Candidate] = []
    for k, plan in enumerate(search(problem, "pdv", top, say).plans, 1):
        _add(pool, plan, f"pdv #{k}")
    if baselines:
        for name in PLANNERS:
            if name == "pdv":
                continue
            try:
                _add(pool, search(problem, name, 1, say).plans[0], name)
            except PdvError as exc:
                say(f"{name}: no plan ({exc})")
    others = [p for p in shape_plans(problem)
              if all(plan_key(p) != plan_key(c.plan) for c in pool)]  # fmt: skip
    added = 0
    while others and added < shapes:
        if span_of(pool) < span:
            pick = max(others, key=lambda p: (p.predicted.step_time_s if p.predicted else 0))
        else:
            def gap(p: Plan) -> float:
                assert p.predicted is not None
                return min(abs(p.predicted.step_time_s - c.predicted_s) for c in pool)
            pick = max(others, key=gap)
        others.remove(pick)
        added += 1
        _add(pool, pick, f"shape {added}")
    return pool


STEP_CAP = 1000
"""most steps --min-seconds may ask of one run (a plan predicted far too fast would otherwise
run for ages)"""


def steps_for(predicted_s: float, steps: int, warmup: int, min_seconds: float) -> int:
    """Steps for one run: `steps`, or more when the steps after warm-up, at the predicted step
    time, would measure for less than `min_seconds` (never more than STEP_CAP unless asked)."""
    if min_seconds <= 0 or predicted_s <= 0:
        return steps
    wanted = warmup + math.ceil(min_seconds / predicted_s)
    return max(steps, min(wanted, STEP_CAP))


def round_stderr(runs_s: Sequence[float]) -> float | None:
    """The standard error of a plan's rounds (stdev / sqrt(n)) over their median: how far the
    measured step itself may be off; None for fewer than two rounds."""
    if len(runs_s) < 2:
        return None
    return statistics.stdev(runs_s) / math.sqrt(len(runs_s)) / statistics.median(runs_s)


def run_plan(cand: Candidate, folder: Path, index: int, run_args: Sequence[str],
             steps: int, warmup: int, timeout_s: float, round_: int = 1) -> None:  # fmt: skip
    """Run one plan with ``pdv run`` and record its measured step time (or why it failed).

    Called once per round (`round_` from 1): the plan's measured step is the median of its
    rounds' medians, and a plan that fails any round is a failure."""
    plan_file = folder / f"plan-{index}.json"
    report = folder / (f"report-{index}.json" if round_ == 1
                       else f"report-{index}-round{round_}.json")  # fmt: skip
    if round_ == 1:
        artifacts.write(plan_file, cand.plan)
        cand.file, cand.report = str(plan_file), str(report)
    cand.reports.append(str(report))
    cand.steps = steps
    before = os.getloadavg()[0]
    argv = [sys.executable, "-m", "pdv", "run", str(plan_file), "--steps", str(steps),
            "--warmup", str(warmup), "--report", str(report), *run_args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _failed(cand, f"pdv run took longer than {timeout_s:.0f} s")
        return
    cand.load = max(before, os.getloadavg()[0], cand.load or 0.0)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()
        _failed(cand, f"pdv run exit {res.returncode}: {tail[-1] if tail else 'no output'}")
        return
    rep = artifacts.load_as(report, "run-report")
    cand.runs_s.append(rep.measured.step_time_s)
    cand.spreads_s.append(rep.measured.step_time_spread_s)
    cand.measured_s = statistics.median(cand.runs_s)
    cand.spread_s = statistics.median(cand.spreads_s)
    assert cand.plan.predicted is not None
    cand.memory_errors.append(memory_error(cand.plan.predicted.peak_memory_bytes,
                                           rep.measured.peak_memory_bytes))
    drift = compute_drift(cand.plan, cand.ops_compute_s, rep.measured.compute_s)
    if drift is not None:
        cand.compute_drifts.append(drift)


def ops_compute(plan: Plan, profiles: dict[str, ModelProfile],
                cluster: ClusterArtifact) -> list[float]:
    """Each stage's predicted compute per step from its layers alone, priced as a run's ranks
    time it (the stage modules' forward and backward spans, TP collectives inside them, plus
    the optimizer step: pdv.run.watch): every micro-batch's forward and backward and the step's
    optimizer, without the schedule's bookkeeping (RankOverheads fwd_s, bwd_s, step_s) or the
    boundary messages' CPU (send_cpu, recv_cpu, which stage pricing adds to a stage's forward
    and backward), which run outside those spans."""
    bare = without_message_cpu(without_schedule_work(cluster))
    return [plan.num_micro_batches * (c.fwd_s + c.bwd_s) + c.optimizer_s
            for c in stage_costs(plan, profiles, bare)]


def _overheads_without(cluster: ClusterArtifact, update: dict[str, Any]) -> ClusterArtifact:
    bare = [d if d.overheads is None else d.model_copy(update={
        "overheads": d.overheads.model_copy(update=update)}) for d in cluster.devices]
    return cluster.model_copy(update={"devices": bare})


def without_schedule_work(cluster: ClusterArtifact) -> ClusterArtifact:
    """The cluster with its ranks' measured schedule bookkeeping (RankOverheads fwd_s, bwd_s,
    step_s) set to nothing, every other measurement kept."""
    return _overheads_without(cluster, {"fwd_s": 0.0, "bwd_s": 0.0, "step_s": 0.0})


def without_message_cpu(cluster: ClusterArtifact) -> ClusterArtifact:
    """The cluster with its ranks' measured per-message send and receive CPU (RankOverheads
    send_cpu, recv_cpu) unmeasured, every other measurement kept."""
    return _overheads_without(cluster, {"send_cpu": None, "recv_cpu": None})


def compute_drift(plan: Plan, stage_compute_s: Sequence[float],
                  measured: dict[str, float] | None) -> float | None:
    """The ranks' measured compute per step over their stages' predicted (`stage_compute_s`,
    summed per rank: ops_compute), less 1, the median over ranks: how far the run's ops ran
    from their profile, apart from everything between them. None when the run did not time
    its compute."""
    if not measured or not stage_compute_s:
        return None
    world = 1 + max(r for s in plan.stages for r in s.ranks)
    predicted = rank_predictions(list(stage_compute_s), [s.ranks for s in plan.stages], world)
    ratios = [m / predicted[int(r)] - 1 for r, m in measured.items()
              if int(r) < world and predicted[int(r)] > 0]  # fmt: skip
    return statistics.median(ratios) if ratios else None


def memory_error(predicted: dict[str, int], measured: dict[str, int]) -> float:
    """The signed peak-memory error of the rank it is largest for, over the ranks measured."""
    errs = [(predicted[r] - m) / m for r, m in measured.items() if r in predicted and m > 0]
    return max(errs, key=abs) if errs else 0.0


def _failed(cand: Candidate, why: str) -> None:
    # A failed round fails the plan: earlier rounds' steps are not reported as its measurement.
    cand.error = why
    cand.measured_s = cand.spread_s = None


def _row(c: Candidate) -> dict[str, Any]:
    err = None if c.measured_s is None else (c.predicted_s - c.measured_s) / c.measured_s
    mem = statistics.median(c.memory_errors) if c.memory_errors and c.measured_s else None
    drift = statistics.median(c.compute_drifts) if c.compute_drifts and c.measured_s else None
    return {
        "labels": c.labels,
        "layout": [f"{s.layers[0]}-{s.layers[1]}:dp{s.dp}tp{s.tp}"
                   + ("+fsdp" if s.fsdp else "") + ("+rc" if s.recompute else "")
                   for s in c.plan.stages],
        "micro_batch_size": c.plan.micro_batch_size,
        "num_micro_batches": c.plan.num_micro_batches,
        "schedule": c.plan.schedule,
        "predicted_s": c.predicted_s,
        "measured_s": c.measured_s,
        "measured_spread_s": c.spread_s,
        "measured_runs_s": c.runs_s,
        "measured_stderr": round_stderr(c.runs_s),
        "steps": c.steps,
        "error": err,
        "abs_error": None if err is None else abs(err),
        "memory_error": mem,
        "compute_drift": drift,
        "load": c.load,
        "plan": c.file,
        "report": c.report,
        "reports": c.reports,
        "failure": c.error,
    }


def summarize(pool: Sequence[Candidate], tol: Tolerances, pick_label: str = "pdv #1",
              ) -> dict[str, Any]:  # fmt: skip
    """Rows, the set's statistics, the pick's place, and which tolerances it misses."""
    rows = [_row(c) for c in pool]
    ran = [r for r in rows if r["measured_s"] is not None]
    errs = [r["abs_error"] for r in ran]
    mems = [abs(r["memory_error"]) for r in ran if r["memory_error"] is not None]
    noise = [r["measured_stderr"] for r in ran if r["measured_stderr"] is not None]
    drifts = [r["compute_drift"] for r in ran if r["compute_drift"] is not None]
    rho = spearman([r["predicted_s"] for r in ran], [r["measured_s"] for r in ran])
    pick = next((r for r in ran if pick_label in r["labels"]), None)
    pick_info = None
    if pick is not None:
        best = min(r["measured_s"] for r in ran)
        faster = sum(r["measured_s"] < pick["measured_s"] for r in ran)
        pick_info = {"label": pick_label, "measured_rank": faster + 1, "of": len(ran),
                     "vs_best": pick["measured_s"] / best,
                     "predicted_rank": 1 + sum(r["predicted_s"] < pick["predicted_s"]
                                               for r in ran)}  # fmt: skip
    times = [r["predicted_s"] for r in rows]
    summary = {
        "plans": len(rows),
        "ran": len(ran),
        "failed": len(rows) - len(ran),
        "predicted_span": max(times) / min(times) if times and min(times) > 0 else None,
        "median_abs_error": statistics.median(errs) if errs else None,
        "max_abs_error": max(errs) if errs else None,
        "mean_signed_error": statistics.fmean(r["error"] for r in ran) if ran else None,
        "spearman": rho,
        "compute_drift_median": statistics.median(drifts) if drifts else None,
        "compute_drift_range": [min(drifts), max(drifts)] if drifts else None,
        "measured_stderr_median": statistics.median(noise) if noise else None,
        "measured_stderr_max": max(noise) if noise else None,
        "memory_median_abs_error": statistics.median(mems) if mems else None,
        "memory_max_abs_error": max(mems) if mems else None,
        "pick": pick_info,
        "max_load": max((r["load"] for r in ran if r["load"] is not None), default=None),
        "cpus": os.cpu_count(),
        "ranks": max((len({r for st in c.plan.stages for r in st.ranks}) for c in pool),
                     default=0),
    }
    misses = []

    def over(name: str, value: float | None, limit: float | None, above: bool = True) -> None:
        if limit is None:
            return
        if value is None:
            misses.append(f"{name}: not measured (limit {limit:g})")
        elif (value > limit) if above else (value < limit):
            misses.append(f"{name} {value:.4g} {'>' if above else '<'} {limit:g}")

    over("median |error|", summary["median_abs_error"], tol.max_median_error)
    over("max |error|", summary["max_abs_error"], tol.max_error)
    over("Spearman", rho, tol.min_spearman, above=False)
    over("pick vs measured best - 1",
         None if pick_info is None else pick_info["vs_best"] - 1, tol.max_pick_gap)
    over("max peak-memory |error|", summary["memory_max_abs_error"], tol.max_memory_error)
    if summary["failed"] > tol.max_failures:
        misses.append(f"{summary['failed']} plans failed to run (allowed {tol.max_failures})")
    return {"rows": rows, "summary": summary, "misses": misses, "passed": not misses}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temp file in the same folder, fsync, rename (no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
