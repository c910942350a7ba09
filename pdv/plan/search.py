"""`pdv plan` as a library call: a problem in, ranked plans out (by the simulator's step time).

Generators (all return ranked :class:`Candidate` lists): ``pdv`` (groups and order from the
measured matrix, stage DP, CP-SAT sharding), ``hierarchy``, ``uniform``, ``pipedream``
(pdv.plan.baselines). The best few candidates of a generator are refined stage by stage with
CP-SAT (pdv and hierarchy), turned into Plan artifacts, and every plan — baselines included — is
evaluated by the simulator on the *measured* matrix, whose prediction goes into ``predicted``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from pdv.artifacts import (
    ClusterArtifact,
    ModelProfile,
    Plan,
    Planner,
    Provenance,
    digest,
)
from pdv.cost.compute import speed_factor
from pdv.cost.simulate import simulate, to_predicted
from pdv.errors import PdvError
from pdv.plan import baselines
from pdv.plan.groups import device_order, islands
from pdv.plan.objective import followers, pipeline_objective
from pdv.plan.problem import Candidate, PlanProblem, plan_stage
from pdv.plan.reasons import closest_layout, why_no_plan
from pdv.plan.sharding import refine_stage
from pdv.plan.stages import DPResult, rank_key, stage_dp

__all__ = [
    "PLANNERS",
    "SearchResult",
    "search",
    "check_profiles",
    "plan_provenance",
    "pdv_orders",
]

Progress = Callable[[str], None]
HOST_ORDER_LIMIT = 32
"""largest cluster on which the DP also runs on host order"""


def pdv_orders(problem: PlanProblem) -> list[tuple[list[int], list[list[int]]]]:
    """Device orders the pdv stage DP runs on (named generators, duplicates dropped).

    - ``bandwidth``: islands chained to maximize neighbour bandwidth (pdv.plan.groups);
    - ``speed-first``: the same, per class of speed and memory (pdv.plan.groups.classes),
      fastest class first and the roomiest among equally fast, so a pipeline can leave slow or
      small devices in the unused tail;
    - ``host``: ranks grouped by host name. Only the *layout* comes from the hosts; it is priced
      on the measured links like the others, so every layout a host-hierarchy planner can pick
      is in pdv's search space too, and pdv is not worse than it where the hosts do match the
      network. Only up to HOST_ORDER_LIMIT devices: beyond, a third DP pass costs more search
      time than the 64-GPU target allows, and the DP there is on sampled caps anyway.
    """
    slowness = [speed_factor(problem.profile_of(d.rank), d) for d in problem.cluster.devices]
    capacity = [problem.capacity(d.rank) for d in problem.cluster.devices]
    by_bandwidth = islands(problem.cluster.links)
    host_chain, host_parts = baselines.host_order(problem.cluster)
    orders = [
        (device_order(problem.cluster.links), by_bandwidth),
        (device_order(problem.cluster.links, slowness=slowness, capacity=capacity), by_bandwidth),
    ]
    if len(problem.cluster.devices) <= HOST_ORDER_LIMIT:
        orders.append((host_chain, host_parts))
    unique: list[tuple[list[int], list[list[int]]]] = []
    for order in orders:
        if order[0] not in [u[0] for u in unique]:
            unique.append(order)
    return unique


def _pdv(problem: PlanProblem) -> DPResult:
    runs = [stage_dp(problem, order, parts, search="pdv") for order, parts in pdv_orders(problem)]
    found: dict[tuple, Candidate] = {}
    for run in runs:
        for cand in run.candidates:
            key = (cand.micro_batch_size, cand.stages)
            if key not in found or found[key].objective_s > cand.objective_s:
                found[key] = cand
    ranked = sorted(found.values(), key=rank_key)
    return DPResult(ranked, all(r.exact for r in runs), sum(r.evaluated for r in runs))


PLANNERS: dict[str, Callable[[PlanProblem], DPResult]] = {
    "pdv": _pdv,
    "hierarchy": baselines.hierarchy,
    "uniform": baselines.uniform,
    "pipedream": baselines.pipedream,
}
BASELINES = ("hierarchy", "uniform", "pipedream")
_REFINED = {"pdv", "hierarchy"}
REFINE_TOP = 10
"""candidates refined and simulated on clusters up to REFINE_ALL_LIMIT devices (1 beyond)"""
REFINE_ALL_LIMIT = 32


@dataclass(frozen=True)
class SearchResult:
    """Plans ranked by predicted step time, best first."""

    plans: list[Plan]
    planner: str
    exact_caps: bool


def check_profiles(
    profiles: Mapping[str, ModelProfile],
    cluster: ClusterArtifact,
    dtype: str | None,
    optimizer: str | None,
) -> None:
    """One profile per device kind, all of the same model, dtype and optimizer as asked."""
    kinds = {d.kind for d in cluster.devices}
    missing = sorted(kinds - set(profiles))
    if missing:
        raise PdvError(
            f"no model profile for device kind(s) {missing} in the cluster; pass one profile "
            f"per kind (have: {sorted(profiles)})"
        )
    lengths = {k: len(p.layers) for k, p in profiles.items()}
    if len(set(lengths.values())) > 1:
        raise PdvError(f"profiles disagree on the number of layers: {lengths}")
    specs = {p.model.spec for p in profiles.values()}
    if len(specs) > 1:
        raise PdvError(f"profiles are of different models: {sorted(specs)}")
    for kind, p in sorted(profiles.items()):
        if dtype is not None and p.dtype != dtype:
            raise PdvError(
                f"--dtype {dtype} but the {kind} profile was taken in {p.dtype}; "
                f"re-profile with --dtype {dtype} or plan with --dtype {p.dtype}"
            )
        if optimizer is not None and p.optimizer != optimizer:
            raise PdvError(
                f"--optimizer {optimizer} but the {kind} profile counts {p.optimizer} state; "
                f"re-profile with --optimizer {optimizer} or plan with --optimizer {p.optimizer}"
            )


def _refine(problem: PlanProblem, cand: Candidate) -> tuple[Candidate, str, float | None]:
    stages = list(cand.stages)
    statuses, gaps = [], []
    M = cand.num_micro_batches
    pairs = zip(cand.stages, followers(cand.stages, cand.order), strict=True)
    for s, (spec, nxt) in enumerate(pairs):
        res = refine_stage(problem, spec, cand.micro_batch_size, len(stages) - s, M, nxt)
        stages[s] = res.stage
        statuses.append(res.status)
        if res.gap is not None:
            gaps.append(res.gap)
    j = pipeline_objective(problem, stages, cand.micro_batch_size, cand.order)
    status = (
        "OPTIMAL"
        if all(x == "OPTIMAL" for x in statuses)
        else ("FEASIBLE" if all(x in ("OPTIMAL", "FEASIBLE") for x in statuses) else statuses[0])
    )
    if j > cand.objective_s:  # never let the refinement make the pipeline worse
        return cand, status, max(gaps, default=None)
    return replace(cand, stages=tuple(stages), objective_s=j), status, max(gaps, default=None)


def plan_provenance(profiles: Mapping[str, ModelProfile], cluster: ClusterArtifact) -> Provenance:
    inputs = {f"profile:{k}": digest(p) for k, p in sorted(profiles.items())}
    inputs["cluster"] = digest(cluster)
    methods = {p.provenance.method for p in profiles.values()} | {cluster.provenance.method}
    notes = ["predicted by pdv.cost.simulate on the cluster's links"]
    if "estimated" in methods or "declared" in methods:
        notes.append(f"inputs include {sorted(methods - {'measured'})} artifacts")
    return Provenance(method="estimated", inputs=inputs, notes=notes)


def _to_plan(
    problem: PlanProblem,
    cand: Candidate,
    status: str,
    gap: float | None,
    evaluated: int,
    provenance: Provenance,
) -> Plan:
    profile = next(iter(sorted(problem.profiles.items())))[1]
    used = {r for spec in cand.stages for r in spec.ranks}
    plan = Plan(
        provenance=provenance,
        model=profile.model,
        stages=[plan_stage(s) for s in cand.stages],
        micro_batch_size=cand.micro_batch_size,
        num_micro_batches=cand.num_micro_batches,
        global_batch_size=problem.global_batch,
        schedule=problem.schedule,
        planner=Planner(
            name=cand.search,
            status=status,
            optimality_gap=None if gap is None else round(gap, 9),
            candidates=evaluated,
        ),
        devices=[d.model_copy(update={"details": {}})
                 for d in problem.cluster.devices if d.rank in used],  # fmt: skip
    )
    sim = simulate(plan, problem.profiles, problem.cluster)
    return plan.model_copy(update={"predicted": to_predicted(sim)})


@dataclass(frozen=True)
class _Simulated:
    """A generator's candidate as a simulated plan, with what it scored inside the search."""

    plan: Plan
    step_s: float
    objective_s: float
    """J on the measured links (the generator's own, for pdv; recomputed for baselines)"""
    by_objective: int
    """its place among its generator's candidates by J (0 = first)"""


_GENERATED: weakref.WeakKeyDictionary[PlanProblem, dict[tuple[str, int], tuple]] = (
    weakref.WeakKeyDictionary()
)


def _generate(problem: PlanProblem, planner: str, few: int, say: Progress) -> tuple:
    """(simulated candidates, exact, evaluated) of one generator; memoized per problem, so
    pdv's search and `--compare` run each baseline once."""
    memo = _GENERATED.setdefault(problem, {})
    key = (planner, few)
    if key not in memo:
        memo[key] = _generate_now(problem, planner, few, say)
    return memo[key]


def _generate_now(problem: PlanProblem, planner: str, few: int, say: Progress) -> tuple:
    say(f"{planner}: searching stages")
    result = PLANNERS[planner](problem)
    out: list[_Simulated] = []
    for n, cand in enumerate(result.candidates[:few]):
        status, gap = ("n/a", None)
        if planner in _REFINED:
            shown = min(few, len(result.candidates))
            say(f"{planner}: CP-SAT sharding of candidate {n + 1}/{shown}")
            cand, status, gap = _refine(problem, cand)
        if not result.exact:
            status = f"{status} (caps sampled)" if status != "n/a" else "caps sampled"
        plan = _to_plan(problem, cand, status, gap, result.evaluated, Provenance())
        assert plan.predicted is not None
        j = cand.objective_s if planner == "pdv" else pipeline_objective(
            problem, cand.stages, cand.micro_batch_size, cand.order or None)
        out.append(_Simulated(plan, plan.predicted.step_time_s, j, n))
    return out, result.exact, result.evaluated


def search(
    problem: PlanProblem,
    planner: str = "pdv",
    top: int = 1,
    progress: Progress | None = None,
    provenance: Provenance | None = None,
) -> SearchResult:
    """Run one planner; return up to `top` distinct plans ranked by predicted step time.

    pdv's search also simulates the baselines' plans on the same inputs and keeps whichever is
    predicted fastest, so its plan is never predicted slower than a baseline's; its
    ``planner.notes`` say where the layout came from and by how much the DP's objective and
    the simulator disagree on it.

    `provenance` (input digests) may be computed once by the caller: hashing a big cluster's
    N×N matrices takes longer than searching it.
    """
    say = progress or (lambda _msg: None)
    if planner not in PLANNERS:
        raise PdvError(f"unknown planner {planner!r}; choose one of: {', '.join(PLANNERS)}")
    few = max(top, REFINE_TOP if len(problem.cluster.devices) <= REFINE_ALL_LIMIT else 1)
    own, exact, _ = _generate(problem, planner, few, say)
    pool = [(x, planner) for x in own]
    if planner == "pdv":
        for name in BASELINES:
            try:
                pool += [(x, name) for x in _generate(problem, name, few, say)[0]]
            except PdvError:
                continue  # a baseline that cannot plan here adds nothing
    if not pool and planner == "pdv":
        pool = [(x, planner) for x in _fallback(problem)]
    if not pool:
        raise PdvError(why_no_plan(problem))
    order = {name: k for k, name in enumerate(PLANNERS)}
    pool.sort(key=lambda x: (x[0].step_s, x[0].objective_s, order[x[1]], x[0].by_objective))
    distinct: list[tuple[_Simulated, str]] = []
    seen: set[str] = set()
    for item in pool:
        key = repr((item[0].plan.stages, item[0].plan.micro_batch_size))
        if key not in seen:
            seen.add(key)
            distinct.append(item)
    provenance = provenance or plan_provenance(problem.profiles, problem.cluster)
    plans = [_reported(x, source, planner, own, provenance) for x, source in distinct[:top]]
    return SearchResult(plans, planner, exact)


def _fallback(problem: PlanProblem) -> list[_Simulated]:
    """The layout pdv.plan.reasons finds closest to fitting, when it fits: a plan the DP's
    restricted spaces (layer atoms, equal widths, a few orders) left out."""
    _, cand = closest_layout(problem)
    if cand is None:
        return []
    plan = _to_plan(problem, cand, "n/a", None, 0, Provenance())
    assert plan.predicted is not None
    return [_Simulated(plan, plan.predicted.step_time_s, cand.objective_s, 0)]


def _reported(x: _Simulated, source: str, planner: str, own: list[_Simulated],
              provenance: Provenance) -> Plan:  # fmt: skip
    """The plan as the planner reports it, with notes on how the search chose it."""
    notes = [
        f"search objective J {x.objective_s:.6g} s, simulated step {x.step_s:.6g} s "
        f"({(x.objective_s - x.step_s) / x.step_s:+.1%} off)"
    ]
    best_j = min(own, key=lambda o: (o.objective_s, o.by_objective)) if own else None
    if source != planner:
        ours = min((o.step_s for o in own), default=None)
        notes.append(
            f"layout of the {source} baseline: predicted {x.step_s:.6g} s against "
            + (f"{ours:.6g} s for {planner}'s own best" if ours is not None
               else f"no plan of {planner}'s own")
        )
    elif best_j is not None and best_j is not x:
        notes.append(
            f"the simulator re-ranked {planner}'s candidates: the first by J "
            f"({best_j.objective_s:.6g} s) simulates at {best_j.step_s:.6g} s; this one was "
            f"#{x.by_objective + 1} by J"
        )
    planner_block = x.plan.planner.model_copy(update={"name": planner, "notes": notes})
    return x.plan.model_copy(update={"planner": planner_block, "provenance": provenance})
