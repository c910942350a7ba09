"""Per-stage sharding with OR-Tools CP-SAT: a choice per layer, under the stage's memory.

After the stage DP fixed a stage (layers, ranks, TP degree T, dp = |ranks| / T), each layer may
run TP-sharded (k = T) or replicated inside its TP group (k = 1), with or without FSDP over the
replicas, with or without recompute — the per-layer overrides the runtime and pdv.cost.stage
accept (``layer_sharding``). Costs per layer are the planner's prices (pdv.plan.costs): profiled
compute at the shard shape times the slowest rank's speed, TP all-reduces on each replica's
measured ring, the DP all-reduce on the replicas' rings (its α counted once), each FSDP
layer's per-micro-batch all-gathers and per-step reduce-scatter (α per layer: each FSDP layer is
its own unit), memory as pdv.cost.compute counts it. Resharding between consecutive layers with
different choices costs nothing extra here: the boundary tensor of every layer is replicated
over the TP group (a row-parallel layer ends in the all-reduce already priced), so switching
between k = 1 and k = T needs no transfer.

CP-SAT works on integers: times are scaled to integer nanoseconds and bytes stay bytes. The
model minimizes the stage's busy time M·t + sync subject to peak memory ≤ capacity·(1 − margin)
and t, (M−1)·t + sync no larger than the DP's uniform choice (given as a hint), so a refined
stage can only improve the pipeline objective. One worker, a fixed seed and a limit in
CP-SAT's deterministic time (not wall clock) keep it deterministic. The solver status and the
relative gap (objective − bound) / objective are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import product

import numpy as np
from ortools.sat.python import cp_model

from pdv.plan.costs import (
    StagePrice,
    _gather_of,
    _group,
    _ring,
    _send,
    _sync_of,
    layer_arrays,
)
from pdv.plan.problem import Choice, PlanProblem, StageSpec, in_flight

__all__ = ["ShardingResult", "layered_price", "refine_stage", "NS"]

NS = 1e9
"""CP-SAT time unit: integer nanoseconds"""


@dataclass(frozen=True)
class ShardingResult:
    """A stage after CP-SAT, with the solver's verdict."""

    stage: StageSpec
    status: str
    gap: float | None


@dataclass(frozen=True)
class _Terms:
    """One layer under one per-layer choice: per kind and per ring, for one micro-batch."""

    fwd: dict[str, float]
    bwd: dict[str, float]
    static: dict[str, float]
    live: dict[str, float]
    transient: dict[str, float]
    tp_f: list[float]
    tp_b: list[float]
    grads_dp: dict[str, float]
    reduce_scatter: list[float]
    """per replica ring: this layer's FSDP reduce-scatter seconds (per step)"""
    gather: list[float]
    """per replica ring: this layer's FSDP all-gather seconds (per micro-batch, fwd and bwd)"""
    out: float
    opt: dict[str, float]
    """optimizer step seconds per device kind"""


def _layer_options(problem: PlanProblem, spec: StageSpec) -> list[Choice]:
    tps = (spec.choice.tp, 1) if spec.choice.tp > 1 else (1,)
    fsdps = (False, True) if spec.dp > 1 and problem.allow_fsdp else (False,)
    recomputes = (False, True) if problem.allow_recompute else (False,)
    # The DP's own choice stays an option (the refinement starts from it).
    options = [Choice(t, f, r) for t, f, r in product(tps, fsdps, recomputes)]
    return options if spec.choice in options else [*options, spec.choice]


def _terms(problem: PlanProblem, spec: StageSpec, mbs: int, i: int, ch: Choice) -> _Terms:
    g = _group(problem, spec.ranks, spec.choice.tp)
    rmbs = mbs // g.dp
    fwd, bwd, static, live, trans, gdp, opt = ({} for _ in range(7))
    out = 0.0
    fsdp = ch.fsdp and g.dp > 1
    shard = g.dp if fsdp else 1
    for kind, sf, _cap, _over in g.kinds:
        arr = layer_arrays(problem.profiles[kind], rmbs, ch.tp)
        fwd[kind] = sf * arr.fwd[i]
        bwd[kind] = sf * (arr.bwd[i] + (arr.fwd[i] if ch.recompute else 0.0))
        static[kind] = arr.state[i] / shard
        opt[kind] = sf * arr.opt[i] / shard
        live[kind] = arr.out[i] if ch.recompute else arr.act[i]
        trans[kind] = arr.act[i] if ch.recompute else 0.0
        gdp[kind] = 0.0 if fsdp else arr.grads[i]
        out = max(out, arr.out[i])
    rs, gather = [], []
    for alpha, beta, kind in g.dp_rings:
        arr = layer_arrays(problem.profiles[kind], rmbs, ch.tp)
        layer = np.array([1.0 if arr.params[i] > 0 else 0.0])
        rs.append(float(_sync_of(g, alpha, beta, np.array([arr.grads[i]]), layer, fsdp)[0])
                  if fsdp else 0.0)
        gather.append(float(_gather_of(g, alpha, beta, np.array([arr.params[i]]), layer,
                                       fsdp)[0]))
    tp_f, tp_b = [], []
    for a, b in g.tp_rings:
        t = 2 * float(_ring(a, b, ch.tp, np.array([out]), 2.0)[0]) if ch.tp > 1 else 0.0
        tp_f.append(t)
        tp_b.append(t * (2 if ch.recompute else 1))
    return _Terms(fwd, bwd, static, live, trans, tp_f, tp_b, gdp, rs, gather, out, opt)


def _price_from(
    problem: PlanProblem,
    spec: StageSpec,
    mbs: int,
    stages_to_end: int,
    num_micro: int,
    following: tuple[int, ...] | None,
    terms: list[_Terms],
) -> StagePrice:
    g = _group(problem, spec.ranks, spec.choice.tp)
    n_in = in_flight(problem.schedule, stages_to_end, num_micro)
    kinds = [k[0] for k in g.kinds]
    fwd = max(sum(t.fwd[k] for t in terms) for k in kinds)
    bwd = max(sum(t.bwd[k] for t in terms) for k in kinds)
    tp_f = max(sum(t.tp_f[r] for t in terms) for r in range(len(g.tp_rings)))
    tp_b = max(sum(t.tp_b[r] for t in terms) for r in range(len(g.tp_rings)))
    memory, capacity = {}, {}
    for kind, _sf, cap, over in g.kinds:
        memory[kind] = (
            over
            + sum(t.static[kind] for t in terms)
            + sum(t.live[kind] for t in terms) * n_in
            + max(t.transient[kind] for t in terms)
        )
        capacity[kind] = cap
    sync = gather = 0.0
    for r, (alpha, beta, kind) in enumerate(g.dp_rings):
        gd = np.array([sum(t.grads_dp[kind] for t in terms)])
        dp_sync = float(_sync_of(g, alpha, beta, gd, gd * 0, False)[0])
        sync = max(sync, dp_sync + sum(t.reduce_scatter[r] for t in terms))
        gather = max(gather, sum(t.gather[r] for t in terms))
    opt = max(sum(t.opt[k] for t in terms) for k in kinds)
    send = _send(problem.net, spec.ranks, following, terms[-1].out)
    return StagePrice(fwd + tp_f + gather, bwd + tp_b + gather, send, sync + opt, memory,
                      capacity)


def layered_price(
    problem: PlanProblem,
    spec: StageSpec,
    mbs: int,
    stages_to_end: int,
    num_micro: int,
    following: tuple[int, ...] | None,
) -> StagePrice:
    """Price a stage whose layers carry their own choices (spec.layer_choices)."""
    assert spec.layer_choices is not None and len(spec.layer_choices) == spec.hi - spec.lo
    terms = [
        _terms(problem, spec, mbs, i, ch)
        for i, ch in zip(range(spec.lo, spec.hi), spec.layer_choices, strict=True)
    ]
    return _price_from(problem, spec, mbs, stages_to_end, num_micro, following, terms)


def _ns(x: float) -> int:
    return int(round(x * NS))


def refine_stage(
    problem: PlanProblem,
    spec: StageSpec,
    mbs: int,
    stages_to_end: int,
    num_micro: int,
    following: tuple[int, ...] | None,
) -> ShardingResult:
    """Choose per-layer sharding for one stage with CP-SAT (never worse than the DP's choice)."""
    g = _group(problem, spec.ranks, spec.choice.tp)
    layers = list(range(spec.lo, spec.hi))
    opts = _layer_options(problem, spec)
    terms = {(i, o): _terms(problem, spec, mbs, i, ch) for i in layers for o, ch in enumerate(opts)}
    base = opts.index(spec.choice)
    n_in = in_flight(problem.schedule, stages_to_end, num_micro)
    kinds = [k[0] for k in g.kinds]
    m = cp_model.CpModel()
    x = {(i, o): m.new_bool_var(f"x{i}_{o}") for i in layers for o in range(len(opts))}
    for i in layers:
        m.add_exactly_one(x[i, o] for o in range(len(opts)))
        for o in range(len(opts)):
            m.add_hint(x[i, o], int(o == base))  # ortools < 9.12 takes no bool hints
    big = (
        sum(max(_ns(t.fwd[k] + t.bwd[k]) for t in terms.values()) for k in kinds) * len(layers)
        + sum(max(_ns(v) for v in t.tp_f + t.tp_b) for t in terms.values())
        + 1
    )

    def lin(get) -> cp_model.LinearExpr:
        return sum(get(terms[i, o]) * x[i, o] for i in layers for o in range(len(opts)))

    fwd = m.new_int_var(0, big, "fwd")
    bwd = m.new_int_var(0, big, "bwd")
    tpf = m.new_int_var(0, big, "tp_f")
    tpb = m.new_int_var(0, big, "tp_b")
    for k in kinds:
        m.add(fwd >= lin(lambda t, k=k: _ns(t.fwd[k])))
        m.add(bwd >= lin(lambda t, k=k: _ns(t.bwd[k])))
    for r in range(len(g.tp_rings)):
        m.add(tpf >= lin(lambda t, r=r: _ns(t.tp_f[r])))
        m.add(tpb >= lin(lambda t, r=r: _ns(t.tp_b[r])))
    for kind, _sf, cap, over in g.kinds:
        peak_t = m.new_int_var(0, int(max(t.transient[kind] for t in terms.values())) + 1, "tr")
        for i in layers:
            for o in range(len(opts)):
                m.add(peak_t >= int(terms[i, o].transient[kind])).only_enforce_if(x[i, o])
        m.add(
            int(over)
            + lin(lambda t, k=kind: int(t.static[k]))
            + n_in * lin(lambda t, k=kind: int(t.live[k]))
            + peak_t
            <= int(cap)
        )
    sync = _sync_var(m, g, layers, opts, terms, x, big)
    # The optimizer step follows the sync; its time depends on the FSDP choice of each layer.
    opt = m.new_int_var(0, sum(max(_ns(v) for v in t.opt.values()) for t in terms.values()) + 1,
                        "opt")
    for k in kinds:
        m.add(opt >= lin(lambda t, k=k: _ns(t.opt[k])))
    sync = sync + opt
    # FSDP layers' all-gathers, in every micro-batch's forward and again in its backward.
    gather = m.new_int_var(0, sum(max(_ns(v) for v in t.gather) if t.gather else 0
                                  for t in terms.values()) + 1, "gather")
    for r in range(len(g.dp_rings)):
        m.add(gather >= lin(lambda t, r=r: _ns(t.gather[r])))
    time = fwd + bwd + tpf + tpb + 2 * gather
    ref = _price_from(
        problem,
        spec,
        mbs,
        stages_to_end,
        num_micro,
        following,
        [terms[i, base] for i in layers],
    )
    m.add(time <= _ns(ref.fwd_s + ref.bwd_s) + len(layers) * 4)
    m.add(
        (num_micro - 1) * time + sync
        <= _ns((num_micro - 1) * (ref.fwd_s + ref.bwd_s) + ref.sync_s)
        + num_micro * len(layers) * 4
        + 8
    )
    m.minimize(num_micro * time + sync)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    # The limit is CP-SAT's deterministic time (work units calibrated to about a second), so a
    # run stopped by it stops at the same point on any machine; wall clock only as a backstop.
    solver.parameters.max_deterministic_time = problem.time_limit_s
    solver.parameters.max_time_in_seconds = 10 * problem.time_limit_s
    code = solver.solve(m)
    status = solver.status_name(code)
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return ShardingResult(spec, status, None)
    obj, bound = solver.objective_value, solver.best_objective_bound
    gap = abs(obj - bound) / abs(obj) if obj else 0.0
    chosen = tuple(next(opts[o] for o in range(len(opts)) if solver.value(x[i, o])) for i in layers)
    refined = _with_layers(spec, chosen)
    # Accept only when the float price agrees that it is no worse (rounding to ns can mislead).
    full = replace(refined, layer_choices=chosen)
    new = layered_price(problem, full, mbs, stages_to_end, num_micro, following)
    old_busy = num_micro * ref.time_s + ref.sync_s
    new_busy = num_micro * new.time_s + new.sync_s
    if not new.fits or new.time_s > ref.time_s or new_busy >= old_busy:
        return ShardingResult(spec, status, gap)
    return ShardingResult(refined, status, gap)


def _sync_var(m, g, layers, opts, terms, x, big):
    """Per-step sync ≥ each replica ring's DP all-reduce + its FSDP layers' reduce-scatters."""
    sync = m.new_int_var(0, 1 << 60, "sync")
    if g.dp < 2:
        m.add(sync == 0)
        return sync
    n = g.dp
    for r, (alpha, beta, kind) in enumerate(g.dp_rings):
        used = m.new_bool_var("use_dp")
        for i in layers:
            for o in range(len(opts)):
                if terms[i, o].grads_dp[kind] > 0:
                    m.add_implication(x[i, o], used)
        per_byte = 2.0 * (n - 1) / n / beta
        expr = sum(
            (_ns(per_byte * terms[i, o].grads_dp[kind]) + _ns(terms[i, o].reduce_scatter[r]))
            * x[i, o]
            for i in layers
            for o in range(len(opts))
        )
        # α: 2(n−1) once for the stage's one all-reduce (the FSDP layers' are in their terms)
        expr += _ns(2 * (n - 1) * alpha) * used
        m.add(sync >= expr)
    return sync


def _with_layers(spec: StageSpec, chosen: tuple[Choice, ...]) -> StageSpec:
    # The stage-level fields take the most common per-layer value (first on ties), so a stage
    # whose layers all agree carries no per-layer list.
    def common(values: list) -> object:
        return max(dict.fromkeys(values), key=values.count)

    fsdp = bool(common([c.fsdp for c in chosen]))
    recompute = bool(common([c.recompute for c in chosen]))
    stage_choice = Choice(spec.choice.tp, fsdp, recompute)
    if all(c == stage_choice for c in chosen):
        return replace(spec, choice=stage_choice, layer_choices=None)
    return replace(spec, choice=stage_choice, layer_choices=chosen)
