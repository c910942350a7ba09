"""`pdv plan` as a library call: a problem in, ranked plans out (by the simulator's step time).

Generators (all return ranked :class:`Candidate` lists): ``pdv`` (groups and order from the
measured matrix, stage DP, CP-SAT sharding), ``hierarchy``, ``uniform``, ``pipedream``
(pdv.plan.baselines). The best few candidates of a generator are refined stage by stage with
CP-SAT (pdv and hierarchy), turned into Plan artifacts, and every plan — baselines included — is
evaluated by the simulator on the *measured* matrix, whose prediction goes into ``predicted``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from pdv.artifacts import (
    ClusterArtifact,
    LayerChoice,
    ModelProfile,
    Plan,
    Planner,
    Provenance,
    digest,
)
from pdv.cost.compute import speed_factor, unpriced_note
from pdv.cost.simulate import simulate, to_predicted
from pdv.errors import PdvError
from pdv.plan import baselines
from pdv.plan.groups import device_order, islands
from pdv.plan.objective import followers, pipeline_objective, stage_price
from pdv.plan.problem import Candidate, PlanProblem, StageSpec, plan_stage
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
    - ``speed-first``: the same, per speed class, fastest class first, so a pipeline can leave
      slow devices in the unused tail;
    - ``host``: ranks grouped by host name. Only the *layout* comes from the hosts; it is priced
      on the measured links like the others, so every layout a host-hierarchy planner can pick
      is in pdv's search space too, and pdv is not worse than it where the hosts do match the
      network. Only up to HOST_ORDER_LIMIT devices: beyond, a third DP pass costs more search
      time than the 64-GPU target allows, and the DP there is on sampled caps anyway.
    """
    slowness = [speed_factor(problem.profile_of(d.rank), d) for d in problem.cluster.devices]
    by_bandwidth = islands(problem.cluster.links)
    host_chain, host_parts = baselines.host_order(problem.cluster)
    orders = [
        (device_order(problem.cluster.links), by_bandwidth),
        (device_order(problem.cluster.links, slowness=slowness), by_bandwidth),
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
    unpriced = unpriced_note(cluster)
    if unpriced:
        notes.append(unpriced)
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
        devices=list(problem.cluster.devices),
    )
    sim = simulate(plan, problem.profiles, problem.cluster)
    return plan.model_copy(update={"predicted": to_predicted(sim)})


def search(
    problem: PlanProblem,
    planner: str = "pdv",
    top: int = 1,
    progress: Progress | None = None,
    provenance: Provenance | None = None,
) -> SearchResult:
    """Run one planner; return up to `top` distinct plans ranked by predicted step time.

    `provenance` (input digests) may be computed once by the caller: hashing a big cluster's
    N×N matrices takes longer than searching it.
    """
    say = progress or (lambda _msg: None)
    if planner not in PLANNERS:
        raise PdvError(f"unknown planner {planner!r}; choose one of: {', '.join(PLANNERS)}")
    say(f"{planner}: searching stages")
    result = PLANNERS[planner](problem)
    if not result.candidates:
        raise PdvError(_tightest(problem))
    few = REFINE_TOP if len(problem.cluster.devices) <= REFINE_ALL_LIMIT else 1
    shortlist = result.candidates[: max(top, few)]
    provenance = provenance or plan_provenance(problem.profiles, problem.cluster)
    plans: list[tuple[float, float, int, Plan]] = []
    for n, cand in enumerate(shortlist):
        status, gap = ("n/a", None)
        if planner in _REFINED:
            say(f"{planner}: CP-SAT sharding of candidate {n + 1}/{len(shortlist)}")
            cand, status, gap = _refine(problem, cand)
        if not result.exact:
            status = f"{status} (caps sampled)" if status != "n/a" else "caps sampled"
        plan = _to_plan(problem, cand, status, gap, result.evaluated, provenance)
        assert plan.predicted is not None
        plans.append((plan.predicted.step_time_s, cand.objective_s, n, plan))
    plans.sort(key=lambda x: (x[0], x[1], x[2]))
    distinct: list[Plan] = []
    seen: set[str] = set()
    for *_, plan in plans:
        key = repr((plan.stages, plan.micro_batch_size))
        if key not in seen:
            seen.add(key)
            distinct.append(plan)
    return SearchResult(distinct[:top], planner, result.exact)


def _tightest(problem: PlanProblem) -> str:
    """The one-line reason nothing fits: the least-over layout's worst stage, rank and bytes."""
    order = device_order(problem.cluster.links)
    best: tuple[float, str] | None = None
    for mbs, pp, width, tp in baselines.uniform_layouts(problem, len(order)):
        M = problem.global_batch // mbs
        ch = LayerChoice(tp=tp, fsdp=problem.allow_fsdp and width // tp > 1,
                         recompute=problem.allow_recompute)
        stages = [
            StageSpec(lo, hi, tuple(order[s * width : (s + 1) * width]), ch)
            for s, (lo, hi) in enumerate(baselines._split(problem.num_layers, pp))
        ]
        worst: tuple[float, str] | None = None
        for s, spec in enumerate(stages):
            nxt = tuple(order[(s + 1) * width :]) if s + 1 < pp else None
            price = stage_price(problem, spec, mbs, pp - s, M, nxt)
            for kind, mem in price.memory_bytes.items():
                over = mem - price.capacity_bytes[kind]
                rank = min(
                    (r for r in spec.ranks if problem.cluster.devices[r].kind == kind),
                    key=lambda r: (problem.capacity(r), r),
                )
                msg = (
                    f"no plan fits in memory: tightest is stage {s} (layers "
                    f"[{spec.lo}, {spec.hi})) on rank {rank} ({kind}): {over:,.0f} bytes "
                    f"over its {problem.capacity(rank):,.0f}-byte budget "
                    f"({over / 2**30:.1f} GiB too much) with pp={pp} "
                    f"tp={tp} dp={width // tp} fsdp={ch.fsdp} recompute={ch.recompute} "
                    f"micro-batch {mbs}; add devices, lower --memory-margin, or use a "
                    f"smaller model or micro-batch"
                )
                if worst is None or over > worst[0]:
                    worst = (over, msg)
        if worst is not None and (best is None or worst[0] < best[0]):
            best = worst
    return best[1] if best else "no plan fits: no layout of the devices is possible"
