"""`pdv plan` as a library call: a problem in, ranked plans out (by the simulator's step time).

pdv's own candidates also compete in their interleaved forms (pdv.plan.interleave: each rank
group holding v model chunks under Interleaved1F1B, for v in ``problem.virtual_stages``), priced
by the same simulator; the baselines keep their schedules.

Generators (all return ranked :class:`Candidate` lists): ``pdv`` (groups and order from the
measured matrix, stage DP, CP-SAT sharding), ``hierarchy``, ``uniform``, ``pipedream``
(pdv.plan.baselines). The best few candidates of a generator are refined stage by stage with
CP-SAT (pdv and hierarchy), turned into Plan artifacts, and every plan — baselines included — is
evaluated by the simulator on the *measured* matrix, whose prediction goes into ``predicted``.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

from pdv.artifacts import (
    ClusterArtifact,
    ClusterDevice,
    ModelProfile,
    Plan,
    Planner,
    Provenance,
    digest,
)
from pdv.cost.compute import speed_factor, spell_notes, unpriced_note, unsteady_note
from pdv.cost.schedules import rank_orders, splits_backward, warmup_forwards
from pdv.cost.simulate import host_capacity, peak_memory, simulate, stage_tied_syncs, to_predicted
from pdv.cost.stage import stage_cost
from pdv.cost.validity import check_plan
from pdv.errors import PdvError
from pdv.plan import ahead, baselines
from pdv.plan.groups import device_order, folded, islands
from pdv.plan.interleave import interleaved, recomputing
from pdv.plan.objective import followers, pipeline_objective
from pdv.plan.problem import Candidate, PlanProblem, plan_stage
from pdv.plan.reasons import closest_layout, why_no_plan
from pdv.plan.sharding import refine_stage
from pdv.plan.stages import GENERAL_LIMIT, DPResult, rank_key, stage_dp

__all__ = [
    "PLANNERS",
    "SearchResult",
    "search",
    "check_plan_dtype",
    "check_profiles",
    "plan_provenance",
    "pdv_orders",
    "step_floor",
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
    - ``folded``: for a model whose layers share parameters, the bandwidth order folded in
      two (pdv.plan.groups.folded), so a pipeline's first and last stages, which sum a tied
      embedding's and head's copies every step, are neighbours there;
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
    if any(p.shared for p in problem.profiles.values()):
        # The bandwidth order folded, so a pipeline's ends sit on a good link: its copies of
        # shared parameters (a tied embedding and head) are summed there every step.
        units = None if len(problem.cluster.devices) <= GENERAL_LIMIT else by_bandwidth
        orders.append((folded(orders[0][0], units), by_bandwidth))
    unique: list[tuple[list[int], list[list[int]]]] = []
    for order in orders:
        if order[0] not in [u[0] for u in unique]:
            unique.append(order)
    return unique


def _pdv(problem: PlanProblem) -> DPResult:
    runs = [stage_dp(problem, order, parts, search="pdv") for order, parts in pdv_orders(problem)]
    found: dict[tuple, Candidate] = {}
    for run in runs:
        for cand in map(functools.partial(_with_tied_syncs, problem), run.candidates):
            key = (cand.micro_batch_size, cand.stages)
            if key not in found or found[key].objective_s > cand.objective_s:
                found[key] = cand
    ranked = sorted(found.values(), key=rank_key)
    return DPResult(ranked, all(r.exact for r in runs), sum(r.evaluated for r in runs))


def _with_tied_syncs(problem: PlanProblem, cand: Candidate) -> Candidate:
    """The candidate with the per-step sums of the shared parameters it splits over stages
    added to its objective: the DP prices each stage alone and cannot see them."""
    sums = stage_tied_syncs(next(iter(problem.profiles.values())),
                            [(s.lo, s.hi, s.ranks) for s in cand.stages], problem.cluster.links)
    if not sums:
        return cand
    return replace(cand, objective_s=cand.objective_s + sum(t.seconds for t in sums))


PLANNERS: dict[str, Callable[[PlanProblem], DPResult]] = {
    "pdv": _pdv,
    "hierarchy": baselines.hierarchy,
    "uniform": baselines.uniform,
    "pipedream": baselines.pipedream,
}
BASELINES = ("hierarchy", "uniform", "pipedream")
_REFINED = {"pdv", "hierarchy"}
REFINE_TOP = 10
"""candidates refined and simulated on clusters up to REFINE_ALL_LIMIT devices"""
REFINE_ALL_LIMIT = 32
BIG_REFINE_TOP = 4
"""pdv's candidates refined and simulated beyond REFINE_ALL_LIMIT devices (a baseline's: 1):
J misranks plans by 10% and more there (a 1024-GPU GPT-3 plan third by J simulates 12% faster
than the first)"""


def _few(problem: PlanProblem, planner: str, top: int) -> int:
    """How many of a generator's candidates are refined and simulated."""
    if len(problem.cluster.devices) <= REFINE_ALL_LIMIT:
        return max(top, REFINE_TOP)
    return max(top, BIG_REFINE_TOP if planner == "pdv" else 1)


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
    dtypes = {k: p.dtype for k, p in profiles.items()}
    if len(set(dtypes.values())) > 1:
        raise PdvError(f"profiles disagree on the dtype: {dict(sorted(dtypes.items()))}; a plan "
                       "trains in one: re-profile every kind with the same --dtype")
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


def check_plan_dtype(plan: Plan, profiles: Mapping[str, ModelProfile]) -> None:
    """The profiles were taken in the dtype the plan trains in: they price what runs."""
    for kind, p in sorted(profiles.items()):
        if p.dtype != plan.dtype:
            raise PdvError(
                f"the plan trains in {plan.dtype} but the {kind} profile was taken in "
                f"{p.dtype}; pass profiles taken with --dtype {plan.dtype}, or plan again from "
                "these (a plan that records no dtype trains in float32)"
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
    notes += [n for n in (unpriced_note(cluster), unsteady_note(cluster)) if n]
    notes += spell_notes(profiles, cluster)
    return Provenance(method="estimated", inputs=inputs, notes=notes)


def _to_plan(
    problem: PlanProblem,
    cand: Candidate,
    status: str,
    gap: float | None,
    evaluated: int,
    provenance: Provenance,
    simulated: bool = True,
) -> Plan:
    profile = next(iter(sorted(problem.profiles.items())))[1]
    plan = Plan(
        provenance=provenance,
        model=profile.model,
        stages=[plan_stage(s) for s in cand.stages],
        micro_batch_size=cand.micro_batch_size,
        num_micro_batches=cand.num_micro_batches,
        global_batch_size=problem.global_batch,
        schedule=cand.schedule or problem.schedule,
        dtype=profile.dtype,  # the profiles' one (check_profiles refuses two)
        planner=Planner(
            name=cand.search,
            status=status,
            optimality_gap=None if gap is None else round(gap, 9),
            candidates=evaluated,
        ),
        devices=_plan_devices(problem),
    )
    if not simulated:
        return plan
    sim = simulate(plan, problem.profiles, problem.cluster, trace=False)
    return plan.model_copy(update={"predicted": to_predicted(sim)})


def _plan_devices(problem: PlanProblem) -> list[ClusterDevice]:
    """The cluster's devices as a plan lists them: without the probe's details."""
    memo = _memo(problem)
    if ("devices",) not in memo:
        memo["devices",] = [d.model_copy(update={"details": {}})
                            for d in problem.cluster.devices]  # fmt: skip
    return cast(list[ClusterDevice], memo["devices",])


def step_floor(plan: Plan, problem: PlanProblem) -> float:
    """A lower bound on the simulated step time, from the stage costs alone (no event loop).

    What pdv.cost.simulate charges makes each of these a bound: a rank group runs its ops one
    at a time, each at least its alone duration (shared cores only slow it); a stage's first
    forward waits for one forward on every stage before it; a stage's gradient sync follows
    its last backward and its optimizer step follows the sync. With one stage per group and
    no split backward, a stage's first backward also waits for its micro-batch's forward on
    every stage and backward on the later ones, the micro-batch of its last backward then runs
    backward on every earlier stage, and stage 0 syncs and steps after that. With several
    stages per group (interleaved) and no split backward, the micro-batch of a group's last op
    (a backward) still runs backward on every earlier stage while the group steps. Transfers
    count as free.
    """
    n = len(plan.stages)
    layout = check_plan(plan, problem.num_layers, len(problem.cluster.devices))
    costs = [
        stage_cost(problem.profiles, problem.cluster, st, plan.stages[i + 1] if i + 1 < n else None,
                   mbs=plan.micro_batch_size, schedule=plan.schedule, stage_index=i,
                   num_stages=n, num_micro=plan.num_micro_batches)
        for i, st in enumerate(plan.stages)
    ]  # fmt: skip
    M = plan.num_micro_batches
    lead = [sum(c.fwd_s for c in costs[:s]) for s in range(n)]
    floor = 0.0
    for stages in layout.stages_of_group:
        busy = sum(M * (costs[s].fwd_s + costs[s].bwd_s) + costs[s].optimizer_s for s in stages)
        floor = max(floor, min(lead[s] for s in stages) + busy)
    if splits_backward(plan.schedule):
        return floor
    tail0 = costs[0].grad_sync_s + costs[0].optimizer_s
    if layout.local_stages > 1:
        # The ramp down that interleaving shortens but cannot remove: without it an interleaved
        # form's floor is its steady-state work alone, and the search simulates forms that
        # cannot win (each 0.1-0.4 s at thousands of micro-batches).
        for order, stages in zip(rank_orders(layout, plan.schedule, M),
                                 layout.stages_of_group, strict=True):
            kind, last, _ = order[-1]
            if kind != "B":
                continue
            work = sum(M * (costs[s].fwd_s + costs[s].bwd_s) for s in stages)
            after = sum(c.bwd_s for c in costs[:last]) + (tail0 if last else 0.0)
            steps = sum(costs[s].optimizer_s for s in stages)
            floor = max(floor, min(lead[s] for s in stages) + work + max(after, steps))
        return floor
    all_fwd = sum(c.fwd_s for c in costs)
    for s, (c, warm) in enumerate(zip(costs, warmup_forwards(layout, plan.schedule, M),
                                      strict=True)):  # fmt: skip
        # The stage's first backward waits for its micro-batch's forward through every stage
        # and backward through the later ones; before it the stage can only run the forwards
        # its schedule puts first.
        first_bwd = max(lead[s] + warm * c.fwd_s,
                        all_fwd + sum(x.bwd_s for x in costs[s + 1 :]))  # fmt: skip
        last_bwd = first_bwd + (M - warm) * c.fwd_s + M * c.bwd_s
        floor = max(floor, last_bwd + c.grad_sync_s + c.optimizer_s,
                    last_bwd + sum(x.bwd_s for x in costs[:s]) + (tail0 if s else 0.0))
    return floor


@dataclass(frozen=True)
class _Simulated:
    """A generator's candidate as a simulated plan, with what it scored inside the search."""

    plan: Plan
    step_s: float
    objective_s: float
    """J on the measured links (the generator's own, for pdv; recomputed for baselines)"""
    by_objective: int
    """its place among its generator's candidates by J (0 = first)"""


_MEMO: weakref.WeakKeyDictionary[PlanProblem, dict[tuple, Any]] = weakref.WeakKeyDictionary()
"""per problem: each generator's DP result, refined candidates and simulations, so pdv's
search and `--compare` run each generator and simulate each plan once"""


def _memo(problem: PlanProblem) -> dict[tuple, Any]:
    return _MEMO.setdefault(problem, {})


def _dp(problem: PlanProblem, planner: str, say: Progress) -> DPResult:
    memo = _memo(problem)
    child = memo.get(("ahead",))
    if ("dp", planner) not in memo and child is not None and planner in child.names:
        say(f"{planner}: searched in a second process")
        entries = child.result(planner)
        if isinstance(entries, dict):
            for key, value in entries.items():
                memo.setdefault(key, value)
    if ("dp", planner) not in memo:
        say(f"{planner}: searching stages")
        try:
            memo["dp", planner] = PLANNERS[planner](problem)
        except PdvError as exc:
            memo["dp", planner] = exc
    found = memo["dp", planner]
    if isinstance(found, PdvError):
        raise found
    return cast(DPResult, found)


def _planned(problem: PlanProblem, planner: str, n: int, shown: int,
             say: Progress) -> tuple[Candidate, Plan]:  # fmt: skip
    """Candidate n of a generator, refined (pdv, hierarchy) and as a plan, not yet simulated."""
    memo = _memo(problem)
    if ("plan", planner, n) not in memo:
        result = _dp(problem, planner, say)
        cand, status, gap = result.candidates[n], "n/a", None
        if planner in _REFINED:
            say(f"{planner}: CP-SAT sharding of candidate {n + 1}/{shown}")
            cand, status, gap = _refine(problem, cand)
        if not result.exact:
            status = f"{status} (caps sampled)" if status != "n/a" else "caps sampled"
        plan = _to_plan(problem, cand, status, gap, result.evaluated, Provenance(), False)
        memo["plan", planner, n] = (cand, plan)
    return cast(tuple[Candidate, Plan], memo["plan", planner, n])


def _evaluate(problem: PlanProblem, planner: str, n: int, shown: int, say: Progress,
              beat: float | None = None) -> _Simulated | None:  # fmt: skip
    """Candidate n of a generator, refined and simulated; None when `beat` is given and the
    plan's step_floor shows it cannot be faster than that."""
    memo = _memo(problem)
    if ("sim", planner, n) in memo:
        return cast(_Simulated, memo["sim", planner, n])
    cand, plan = _planned(problem, planner, n, shown, say)
    if beat is not None and step_floor(plan, problem) > beat * (1 + 1e-9):
        return None
    # Generators often reach the same layout (a baseline's is pdv's on a regular cluster):
    # a layout is simulated once.
    layout = ("layout", repr(plan.stages), plan.micro_batch_size, plan.num_micro_batches,
              plan.schedule)  # fmt: skip
    if layout not in memo:
        memo[layout] = simulate(plan, problem.profiles, problem.cluster, trace=False)
    sim = memo[layout]
    plan = plan.model_copy(update={"predicted": to_predicted(sim)})
    j = cand.objective_s if planner == "pdv" else pipeline_objective(
        problem, cand.stages, cand.micro_batch_size, cand.order or None)
    memo["sim", planner, n] = _Simulated(plan, sim.step_time_s, j, n)
    return cast(_Simulated, memo["sim", planner, n])


def _fits(problem: PlanProblem, plan: Plan) -> bool:
    """Whether the simulated peak memory of every rank is within its budget."""
    assert plan.predicted is not None
    return all(peak <= problem.capacity(int(r)) * (1 + 1e-9)
               for r, peak in plan.predicted.peak_memory_bytes.items())  # fmt: skip


def _generate(
    problem: PlanProblem,
    planner: str,
    few: int,
    say: Progress,
    beat: float | None = None,
    prune: bool = False,
) -> tuple[list[_Simulated], int]:
    """The first `few` candidates of a generator, simulated, and how many were not: with
    `prune`, a candidate whose step_floor is above `beat` or above the generator's best so far
    is left out (it cannot be the fastest). Plans the simulator finds over a rank's memory
    budget are left out too."""
    result = _dp(problem, planner, say)
    shown = min(few, len(result.candidates))
    out, skipped = [], 0
    invalid: PdvError | None = None
    for n in range(shown):
        try:
            x = _evaluate(problem, planner, n, shown, say, beat if prune else None)
        except PdvError as exc:  # a layout the schedule cannot run (the simulator says why)
            invalid = invalid or exc
            continue
        if x is None:
            skipped += 1
            continue
        if not _fits(problem, x.plan):  # the search's memory model is looser for some schedules
            continue
        out.append(x)
        if prune:
            beat = x.step_s if beat is None else min(beat, x.step_s)
    if invalid is not None and not out and not skipped:
        raise invalid
    return out, skipped


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
    memo = _memo(problem)
    started = None
    if planner == "pdv" and not any(("dp", name) in memo for name in BASELINES):
        started = ahead.start(problem, BASELINES, functools.partial(_baseline_ahead, problem))
        if started is not None:
            memo["ahead",] = started
    try:
        return _search(problem, planner, top, say, provenance)
    finally:
        if started is not None:
            started.close()
            memo.pop(("ahead",), None)


def _baseline_ahead(problem: PlanProblem, name: str) -> dict[tuple, Any]:
    """In the forked child (pdv.plan.ahead): a baseline's DP and its first candidates as
    (refined) plans; the memo entries that made. Not simulated: the parent simulates only
    those its step_floor cannot rule out, so speculative simulating there would be mostly
    wasted, and the parent decides as it would have (the plan it writes does not depend on
    whether this ran)."""
    memo = _memo(problem)
    before = set(memo)

    def quiet(_msg: str) -> None:
        return None

    try:
        shown = min(_few(problem, name, 1), len(_dp(problem, name, quiet).candidates))
        for n in range(shown):
            _planned(problem, name, n, shown, quiet)
    except PdvError:
        pass  # kept as the ("dp", name) entry, or raised again where the parent plans it
    return {k: v for k, v in memo.items() if k not in before and k[0] in ("dp", "plan")}


def _search(problem: PlanProblem, planner: str, top: int, say: Progress,
            provenance: Provenance | None) -> SearchResult:  # fmt: skip
    try:
        own = _generate(problem, planner, _few(problem, planner, top), say, prune=top == 1)[0]
        exact = _dp(problem, planner, say).exact
    except PdvError:
        if planner != "pdv":
            raise
        own, exact = [], True
    forms = _interleaved_forms(problem, own, top) if planner == "pdv" else []
    pool = [(x, planner) for x in own + forms]
    ruled_out = 0
    if planner == "pdv":
        for name in BASELINES:
            beat = min((x.step_s for x, _ in pool), default=None)
            try:
                found, skipped = _generate(problem, name, _few(problem, name, 1), say, beat,
                                           prune=True)  # fmt: skip
            except PdvError:
                continue  # a baseline that cannot plan here adds nothing
            pool += [(x, name) for x in found]
            ruled_out += skipped
    if not pool and planner == "pdv":
        pool = [(x, planner) for x in _fallback(problem)]
    if not pool:
        raise PdvError(why_no_plan(problem, planner))
    order = {name: k for k, name in enumerate(PLANNERS)}
    pool.sort(key=lambda x: (x[0].step_s, x[0].objective_s, order[x[1]], x[0].by_objective))
    distinct: list[tuple[_Simulated, str]] = []
    seen: set[str] = set()
    for item in pool:
        key = repr((item[0].plan.stages, item[0].plan.micro_batch_size, item[0].plan.schedule))
        if key not in seen:
            seen.add(key)
            distinct.append(item)
    provenance = provenance or plan_provenance(problem.profiles, problem.cluster)
    plans = [_reported(x, source, planner, own, provenance, ruled_out)
             for x, source in distinct[:top]]  # fmt: skip
    return SearchResult(plans, planner, exact)


def _interleaved_forms(problem: PlanProblem, own: list[_Simulated],
                       top: int) -> list[_Simulated]:
    """pdv's simulated pipelines in their interleaved forms (pdv.plan.interleave), kept where
    they fit in memory; where a form's peak (from its op order) is over a rank's budget, that
    rank's group recomputes and the layers are cut again. A form whose steady-state work (its
    objective, a lower bound of its step where ranks do not share cores) is not under the
    top-`top` step of pdv's plain pipelines is not cut again: recomputing would only add work.
    The forms that fit are simulated in step_floor order while one could still enter the top."""
    memo = _memo(problem)
    shared = bool(host_capacity(problem.cluster))

    def bar(done: list[_Simulated]) -> float:
        times = sorted(o.step_s for o in done)
        return times[top - 1] if len(times) >= top and not shared else float("inf")

    # A simulation of thousands of micro-batches takes 0.1-0.4 s; an op order, milliseconds.
    fitting: list[tuple[float, int, Candidate, Plan, _Simulated]] = []
    for x in list(own):
        cand, _ = memo["plan", "pdv", x.by_objective]
        info = x.plan.planner
        for v in problem.virtual_stages if problem.schedule == "1F1B" else ():
            base: Candidate | None = cand
            while base is not None:
                form = interleaved(problem, base, v)
                if form is None or form.objective_s >= bar(own):
                    break
                try:
                    plan = _to_plan(problem, form, info.status, info.optimality_gap,
                                    info.candidates or 0, Provenance(), simulated=False)
                    # The simulator's own peak, as its plan would carry it (whole bytes).
                    peak = {r: int(b) for r, b in
                            peak_memory(plan, problem.profiles, problem.cluster).items()}
                except PdvError:
                    break  # e.g. torch's rounds do not divide the micro-batches
                over = [r for r, b in peak.items() if float(b) > problem.capacity(r)]
                if not over:
                    fitting.append((step_floor(plan, problem), len(fitting), form, plan, x))
                    break
                base = recomputing(base, over) if problem.allow_recompute else None
    out: list[_Simulated] = []
    for floor, _, form, plan, x in sorted(fitting, key=lambda f: f[:2]):
        if floor > bar(own + out) * (1 + 1e-9):
            break  # and so is every later floor
        sim = simulate(plan, problem.profiles, problem.cluster, trace=False)
        plan = plan.model_copy(update={"predicted": to_predicted(sim)})
        assert _fits(problem, plan)
        out.append(_Simulated(plan, sim.step_time_s, form.objective_s, x.by_objective))
    return out


def _fallback(problem: PlanProblem) -> list[_Simulated]:
    """The layout pdv.plan.reasons finds closest to fitting, when it fits: a plan the DP's
    restricted spaces (layer atoms, equal widths, a few orders) left out."""
    _, cand = closest_layout(problem)
    if cand is None:
        return []
    try:
        plan = _to_plan(problem, cand, "n/a", None, 0, Provenance())
    except PdvError:  # a layout the schedule cannot run
        return []
    assert plan.predicted is not None
    if not _fits(problem, plan):
        return []
    return [_Simulated(plan, plan.predicted.step_time_s, cand.objective_s, 0)]


def _reported(x: _Simulated, source: str, planner: str, own: list[_Simulated],
              provenance: Provenance, ruled_out: int = 0) -> Plan:  # fmt: skip
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
    if ruled_out:
        notes.append(f"{ruled_out} baseline plan(s) not simulated: a lower bound on their step "
                     f"time (pdv.plan.search.step_floor) is above a plan already simulated")
    planner_block = x.plan.planner.model_copy(update={"name": planner, "notes": notes})
    return x.plan.model_copy(update={"planner": planner_block, "provenance": provenance})
