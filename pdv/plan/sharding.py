"""Per-stage sharding with OR-Tools CP-SAT: a choice per layer, under the stage's memory.

After the stage DP fixed a stage (layers, ranks, TP degree T, dp = |ranks| / T), each layer may
run TP-sharded (k = T) or replicated inside its TP group (k = 1), with or without FSDP over the
replicas, with or without recompute — the per-layer overrides the runtime and pdv.cost.stage
accept (``layer_sharding``). The coefficients of each layer's options are its terms from
pdv.cost.terms (compute, collectives, memory), on the reduced view of the stage's ranks that
pdv.plan.objective prices; the DP all-reduce of the plain gradients is one call per stage (its
per-call term counted once, pdv.cost.comm.all_reduce_linear). Resharding between consecutive
layers with
different choices costs nothing extra here: the boundary tensor of every layer is replicated over
the TP group (a row-parallel layer ends in the all-reduce already priced), so switching
between k = 1 and k = T needs no transfer.

CP-SAT works on integers: times are scaled to integer nanoseconds and bytes stay bytes. The
model minimizes the stage's busy time M·t + sync subject to peak memory ≤ capacity·(1 − margin)
and t, (M−1)·t + sync no larger than the DP's uniform choice (given as a hint), so a refined
stage can only improve the pipeline objective. One worker, a fixed seed and a limit in
CP-SAT's deterministic time (not wall clock) keep it deterministic. The solver status and the
relative gap (objective − bound) / objective are reported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import lru_cache
from itertools import product
from typing import cast

import numpy as np
from ortools.sat.python import cp_model

from pdv.artifacts import LayerChoice
from pdv.cost.comm import all_reduce_linear
from pdv.cost.compute import shared_places
from pdv.cost.schedules import in_flight
from pdv.cost.terms import ONE_COPY, LayerTerms, StageGroup, grad_passes_per_byte
from pdv.plan.objective import stage_group, stage_price, terms_of
from pdv.plan.problem import PlanProblem, StageSpec

__all__ = ["ShardingResult", "refine_stage", "NS"]

NS = 1e9
"""CP-SAT time unit: integer nanoseconds"""


@dataclass(frozen=True)
class ShardingResult:
    """A stage after CP-SAT, with the solver's verdict."""

    stage: StageSpec
    status: str
    gap: float | None


def _layer_options(problem: PlanProblem, spec: StageSpec) -> list[LayerChoice]:
    tps = (spec.choice.tp, 1) if spec.choice.tp > 1 else (1,)
    sparse = problem.holds_sparse(spec.lo, spec.hi)
    fsdps = (False, True) if spec.dp > 1 and problem.allow_fsdp and not sparse else (False,)
    recomputes = (False, True) if problem.allow_recompute else (False,)
    # The DP's own choice stays an option (the refinement starts from it).
    options = [LayerChoice(tp=t, fsdp=f, recompute=r)
               for t, f, r in product(tps, fsdps, recomputes)]  # fmt: skip
    return options if spec.choice in options else [*options, spec.choice]


def _ns(x: float) -> int:
    return int(round(x * NS))


def _ns_times(rate: float, x: float) -> int:
    return _ns(rate * x)


class _CpModel(cp_model.CpModel):
    """CpModel without its camelCase aliases: ortools adds one per method to every new model
    (about 2 ms each), and a search builds dozens of small models."""

    def _add_pre_pep8_methods(self) -> None:
        pass


@dataclass
class _Model:
    """The CP-SAT model of one stage: x[c, o] layers of class c take option o.

    A class is a run of layers whose terms are equal under every option (a transformer's
    blocks): they are interchangeable, so the model counts how many take each option instead
    of choosing per layer, which removes the symmetry that made CP-SAT prove the same optimum
    once per permutation. z[c, o] is set when any layer of class c takes option o.
    """

    m: cp_model.CpModel
    x: dict[tuple[int, int], cp_model.IntVar]
    z: dict[tuple[int, int], cp_model.IntVar]
    terms: list[LayerTerms]
    """per option: every layer's terms"""
    classes: list[list[int]]
    """layers of each class, in order; the first stands for the class"""
    shared: list[tuple[list[tuple[int, float]], bool, float]] = field(default_factory=list)
    """per shared parameter set with places in the stage: (class of each place, the set's
    share of that layer's parameters), whether the stage holds every place, one whole copy's
    state bytes (each place is a class of its own)"""

    def lin(self, name: str, row: int, scale: Callable[[float], int]) -> cp_model.LinearExpr:
        """Σ over classes and options of the field's scaled coefficient (one row) · x, less
        what it counts of shared parameters beyond the stage's one copy."""
        total = sum(scale(getattr(t, name)[row, c[0]]) * self.x[k, o]
                    for k, c in enumerate(self.classes)
                    for o, t in enumerate(self.terms))  # fmt: skip
        return cast(cp_model.LinearExpr, total - self.beyond_one_copy(name, row, scale))

    def beyond_one_copy(self, name: str, row: int,
                        scale: Callable[[float], int]) -> cp_model.LinearExpr:  # fmt: skip
        """pdv.cost.terms' correction for shared parameters, linear: the copy kept is the
        first place's rather than the largest (so the DP's own choice prices no higher here
        than there, and the float price judges the result)."""
        if name not in ONE_COPY:
            return cast(cp_model.LinearExpr, 0)
        out: cp_model.LinearExpr | int = 0
        for places, every, whole in self.shared:
            keep_first = every or name == "optimizer_s"
            for j, (k, share) in enumerate(places):
                if j == 0 and keep_first:
                    continue
                out += sum(scale(share * getattr(t, name)[row, self.classes[k][0]])
                           * self.x[k, o] for o, t in enumerate(self.terms))
            if name == "state_bytes" and not every:
                out -= scale(whole)
        return cast(cp_model.LinearExpr, out)

    def at_least(self, bounds: Sequence[tuple[cp_model.IntVar, str]]) -> None:
        """Each var ≥ its field's sum over the layers (ns), for every row (view or ring)."""
        for row in range(getattr(self.terms[0], bounds[0][1]).shape[0]):
            for var, name in bounds:
                self.m.add(var >= self.lin(name, row, _ns))

    def chosen(self, value: Callable[[cp_model.IntVar], int],
               opts: Sequence[LayerChoice]) -> tuple[LayerChoice, ...]:  # fmt: skip
        """Per layer (in order), the option of a solution: a class's layers take its options
        in option order."""
        pick: dict[int, LayerChoice] = {}
        for k, members in enumerate(self.classes):
            it = iter(members)
            for o, ch in enumerate(opts):
                for _ in range(value(self.x[k, o])):
                    pick[next(it)] = ch
        return tuple(pick[i] for i in sorted(pick))


def _classes(terms: list[LayerTerms], layers: list[int],
             alone: frozenset[int] = frozenset()) -> list[list[int]]:  # fmt: skip
    """Layers grouped by equal terms under every option (first appearance order); each layer
    in `alone` is a class of its own."""
    out: dict[bytes, list[int]] = {}
    for i in layers:
        key = b"".join(np.ascontiguousarray(getattr(t, f)[:, i]).tobytes()
                       for t in terms for f in _USED)  # fmt: skip
        out.setdefault(str(i).encode() if i in alone else key, []).append(i)
    return list(out.values())


def _shared_in(problem: PlanProblem, group: StageGroup,
               layers: list[int]) -> list[tuple[list[int], list[float], bool, float]]:  # fmt: skip
    """The shared parameter sets with places among `layers`: places there, their shares,
    whether every place is there, one whole copy's state."""
    lo, hi = layers[0], layers[-1] + 1
    out = []
    for places in shared_places(problem.profiles[group.ranks[0].kind]):
        inside = (places.layers >= lo) & (places.layers < hi)
        if inside.any():
            out.append(([int(i) for i in places.layers[inside]],
                        [float(x) for x in places.share[inside]], bool(inside.all()),
                        places.state_bytes))
    return out


_USED = ("fwd_s", "bwd_s", "tp_fwd_s", "tp_bwd_s", "transient_bytes", "state_bytes", "live_bytes",
         "optimizer_s", "gather_s", "dp_grad_bytes", "reduce_scatter_s")
"""the LayerTerms fields the model reads"""


def _build(
    problem: PlanProblem,
    layers: list[int],
    base: int,
    group: StageGroup,
    opts: Sequence[LayerChoice],
    mbs: int,
    n_in: int,
    num_micro: int,
) -> tuple[_Model, cp_model.LinearExpr, cp_model.LinearExpr]:
    """The model, the stage's per-micro-batch time and its per-step terms (sync + optimizer);
    option `base` is the hint."""
    terms = [terms_of(problem, group, mbs, ch) for ch in opts]
    m = _CpModel()
    shared = _shared_in(problem, group, layers)
    classes = _classes(terms, layers, frozenset(i for at, _, _, _ in shared for i in at))
    x, z = {}, {}
    for k, members in enumerate(classes):
        n = len(members)
        for o in range(len(opts)):
            x[k, o] = m.new_int_var(0, n, f"x{k}_{o}")
            z[k, o] = m.new_bool_var(f"z{k}_{o}")
            m.add(x[k, o] <= n * z[k, o])
            m.add_hint(x[k, o], n if o == base else 0)
        m.add(sum(x[k, o] for o in range(len(opts))) == n)
    first = {c[0]: k for k, c in enumerate(classes)}
    model = _Model(m, x, z, terms, classes,
                   [([(first[i], share) for i, share in zip(at, shares, strict=True)], every,
                     whole) for at, shares, every, whole in shared])
    # The places of shared parameters in one stage take one option: FSDP would shard the one
    # parameter for one place and not the other.
    for places, _, _ in model.shared:
        for k, _ in places[1:]:
            for o in range(len(opts)):
                m.add(x[k, o] == x[places[0][0], o])
    views = range(len(group.ranks))
    big = (
        sum(max(_ns(t.fwd_s[v, i] + t.bwd_s[v, i]) for t in terms for i in layers) for v in views)
        * len(layers)
        + sum(max(_ns(v) for v in [*t.tp_fwd_s[:, i], *t.tp_bwd_s[:, i]])
              for t in terms for i in layers)
        + 1
    )  # fmt: skip
    fwd, bwd = m.new_int_var(0, big, "fwd"), m.new_int_var(0, big, "bwd")
    tpf, tpb = m.new_int_var(0, big, "tp_f"), m.new_int_var(0, big, "tp_b")
    model.at_least([(fwd, "fwd_s"), (bwd, "bwd_s")])
    model.at_least([(tpf, "tp_fwd_s"), (tpb, "tp_bwd_s")])
    for v, view in enumerate(group.ranks):
        top = max(int(t.transient_bytes[v, i]) for t in terms for i in layers)
        peak_t = m.new_int_var(0, top + 1, "tr")
        for k, members in enumerate(classes):
            for o, t in enumerate(terms):
                m.add(peak_t >= int(t.transient_bytes[v, members[0]])).only_enforce_if(z[k, o])
        m.add(
            int(view.overhead_bytes)
            + model.lin("state_bytes", v, int)
            + n_in * model.lin("live_bytes", v, int)
            + peak_t
            <= int(view.capacity_bytes)
        )
    sync = _sync_var(model, group, num_micro, fwd + bwd, 2 * big)
    # The optimizer step follows the sync; its time depends on the FSDP choice of each layer.
    top = sum(max(_ns(t.optimizer_s[v, i]) for v in views) for t in terms for i in layers)
    opt = m.new_int_var(0, top + 1, "opt")
    model.at_least([(opt, "optimizer_s")])
    # FSDP layers' all-gathers: in every micro-batch's backward and once more per step
    # (pdv.cost.terms: a forward after a backward finds the layers still unsharded).
    top = sum(max(_ns(t.gather_s[d, i]) for d in range(len(group.dp_rings)))
              for t in terms for i in layers)  # fmt: skip
    gather = m.new_int_var(0, top + 1, "gather")
    model.at_least([(gather, "gather_s")])
    return model, fwd + bwd + tpf + tpb + gather, sync + opt + gather


def _sync_var(model: _Model, group: StageGroup, num_micro: int,
              compute: cp_model.LinearExpr, top: int) -> cp_model.IntVar:  # fmt: skip
    """Per-step sync ≥ each replica ring's DP all-reduce and its plain replicas' gradient
    passes + its FSDP layers' reduce-scatters, plus the sync's measured excess after the
    step's compute (as pdv.cost.terms.compose prices it)."""
    m = model.m
    sync = m.new_int_var(0, 1 << 60, "sync")
    if group.dp < 2:
        m.add(sync == 0)
        return sync
    after = _after_compute_var(model, group, num_micro, compute, top)
    passes = grad_passes_per_byte(group)
    for d, rv in enumerate(group.dp_rings):
        used = m.new_bool_var("use_dp")
        for k, members in enumerate(model.classes):
            for o, t in enumerate(model.terms):
                if t.dp_grad_bytes[d, members[0]] > 0:
                    m.add_implication(model.z[k, o], used)
        per_byte, per_call = all_reduce_linear(rv.ring)
        per_byte += passes
        expr = sum(
            (_ns(per_byte * t.dp_grad_bytes[d, c[0]]) + _ns(t.reduce_scatter_s[d, c[0]]))
            * model.x[k, o]
            for k, c in enumerate(model.classes)
            for o, t in enumerate(model.terms)
        ) - model.beyond_one_copy("dp_grad_bytes", d, functools.partial(_ns_times, per_byte))
        m.add(sync >= expr + _ns(per_call) * used + after)
    return sync


def _after_compute_var(model: _Model, group: StageGroup, num_micro: int,
                       compute: cp_model.LinearExpr, top: int) -> cp_model.IntVar:  # fmt: skip
    """The sync's excess after the step's compute (``num_micro`` times the layers' forward and
    backward, ``compute``, at most ``top`` ns), as pdv.cost.terms.sync_after_compute prices
    it: each rank's at the shorter burst, growing on a line to its excess at the longer one
    and held there. The hold makes the growth min(cap, line), which a minimizing model would
    cut to the line's lower part; one boolean per rank picks which bound holds instead."""
    m = model.m
    # The schedule's own per-micro-batch work is in the stage's compute (compose) but not in
    # the layer vars: the slowest rank's, a constant.
    sched = max(_ns(r.schedule_fwd_s + r.schedule_bwd_s) for r in group.ranks)
    base = max(_ns(r.sync_after_compute_s) for r in group.ranks)
    after = m.new_int_var(base, 1 << 60, "after")
    for r in group.ranks:
        cap = _ns(max(0.0, r.sync_long_excess_s - r.sync_after_compute_s))
        span = r.sync_long_burst_s - r.sync_burst_s
        if cap <= 0 or span <= 0:
            m.add(after >= _ns(r.sync_after_compute_s))
            continue
        grow = m.new_int_var(0, cap, "grow")
        held = m.new_bool_var("held")
        m.add(grow >= cap).only_enforce_if(held)
        # The slope as a ratio of integers: exact while the span's nanoseconds fit the
        # denominator's bound (a span under 0.1 s while num_micro times the compute's bound
        # is under 20 s), else the nearest ratio whose products stay inside int64. A rounded
        # slope was not close enough: 50 µs over a step against the few ns of slack the
        # model allows the reference choice.
        reach = num_micro * (top + sched) + 1
        slope = Fraction(cap, _ns(span)).limit_denominator(
            max(1, min(10**9, (1 << 61) // (reach * (cap // _ns(span) + 1)))))
        m.add(slope.denominator * grow
              >= slope.numerator * (num_micro * (compute + sched) - _ns(r.sync_burst_s))
              ).only_enforce_if(held.Not())  # fmt: skip
        m.add(after >= _ns(r.sync_after_compute_s) + grow)
    return after


def refine_stage(
    problem: PlanProblem,
    spec: StageSpec,
    mbs: int,
    stages_to_end: int,
    num_micro: int,
    following: tuple[int, ...] | None,
) -> ShardingResult:
    """Choose per-layer sharding for one stage with CP-SAT (never worse than the DP's choice)."""
    group = stage_group(problem, spec.ranks, spec.choice.tp)
    opts = tuple(_layer_options(problem, spec))
    n_in = in_flight(problem.schedule, stages_to_end, num_micro)
    ref = stage_price(problem, replace(spec, layer_choices=None), mbs, stages_to_end, num_micro,
                      following)  # fmt: skip
    ref_t = ref.fwd_s + ref.bwd_s
    status, gap, chosen = _solved(problem, group, spec.lo, spec.hi, opts.index(spec.choice), opts,
                                  mbs, n_in, num_micro, _ns(ref_t),
                                  _ns((num_micro - 1) * ref_t + ref.sync_s))  # fmt: skip
    if chosen is None:
        return ShardingResult(spec, status, gap)
    # Accept only when the float price agrees that it is no worse (rounding to ns can mislead).
    new = stage_price(problem, replace(spec, layer_choices=chosen), mbs, stages_to_end,
                      num_micro, following)  # fmt: skip
    old_busy = num_micro * ref.time_s + ref.sync_s
    new_busy = num_micro * new.time_s + new.sync_s
    if not new.fits or new.time_s > ref.time_s or new_busy >= old_busy:
        return ShardingResult(spec, status, gap)
    return ShardingResult(_with_layers(spec, chosen), status, gap)


@lru_cache(maxsize=4096)
def _solved(problem: PlanProblem, group: StageGroup, lo: int, hi: int, base: int,
            opts: tuple[LayerChoice, ...], mbs: int, n_in: int, num_micro: int, ref_t: int,
            ref_busy: int) -> tuple[str, float | None, tuple[LayerChoice, ...] | None]:  # fmt: skip
    """CP-SAT's status, gap and per-layer choice for one stage's model (None: no solution).

    The model depends on the ranks only through their reduced group, so candidates that share
    a stage up to the ranks it sits on (most do) solve it once; the solver is deterministic.
    """
    model, time, per_step = _build(problem, list(range(lo, hi)), base, group, opts, mbs, n_in,
                                   num_micro)
    n = hi - lo
    model.m.add(time <= ref_t + n * 4)
    model.m.add((num_micro - 1) * time + per_step <= ref_busy + num_micro * n * 4 + 8)
    model.m.minimize(num_micro * time + per_step)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    # The limit is CP-SAT's deterministic time (work units calibrated to about a second), so a
    # run stopped by it stops at the same point on any machine; wall clock only as a backstop.
    solver.parameters.max_deterministic_time = problem.time_limit_s
    solver.parameters.max_time_in_seconds = 10 * problem.time_limit_s
    code = solver.solve(model.m)
    status = solver.status_name(code)
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return status, None, None
    obj, bound = solver.objective_value, solver.best_objective_bound
    gap = abs(obj - bound) / abs(obj) if obj else 0.0
    return status, gap, model.chosen(solver.value, opts)


def _with_layers(spec: StageSpec, chosen: tuple[LayerChoice, ...]) -> StageSpec:
    # The stage-level fields take the most common per-layer value (first on ties), so a stage
    # whose layers all agree carries no per-layer list.
    def common(values: list[bool]) -> bool:
        return max(dict.fromkeys(values), key=values.count)

    fsdp = common([c.fsdp for c in chosen])
    recompute = common([c.recompute for c in chosen])
    stage_choice = LayerChoice(tp=spec.choice.tp, fsdp=fsdp, recompute=recompute)
    if all(c == stage_choice for c in chosen):
        return replace(spec, choice=stage_choice, layer_choices=None)
    return replace(spec, choice=stage_choice, layer_choices=chosen)
