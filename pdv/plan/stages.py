"""Stage DP: layer ranges × contiguous slices of the device order, exact under the objective.

For a micro-batch size m (M = B/m micro-batches) and a cap U on the bottleneck term
u_s = (M−1)·t_s + sync_s, the DP minimizes Σ t_s over pipelines whose stages all have u_s ≤ U:

    f(i, a, k) = min over slice size g, choice c, end layer j of
                 t(i, j, a, g, c) + f(j, a + g, k − 1)

where the stage holds layers [i, j) on devices order[a : a+g] (in units), k counts the stages
from this one to the end (so the 1F1B in-flight count min(k, M) is known and stages that do not
fit are skipped), t includes the transfer to the next stage over the link between the last
device of this slice and the first of the next, and the last stage (k = 1) takes all remaining
layers. A pipeline may leave the tail of the order unused (a slow device can sit out).

J(U) = U + min Σ t; as in Alpa the caps are enumerated. The useful caps lie in [U*, J_best − S∞]
(U* from a bottleneck DP, S∞ the uncapped Σ t): all distinct values there when they are at most
``MAX_CAPS`` (exact), otherwise ``MAX_CAPS`` quantiles of them (``BIG_CAPS`` on big
instances), reported as "caps sampled".

Deep models: with more than ``LAYER_ATOMS`` layers, stage boundaries are restricted to
``LAYER_ATOMS`` + 1 boundaries that split the forward+backward time evenly (Alpa clusters layers
the same way before its stage DP); small models keep every boundary.

Big clusters: devices move in units of one island when islands are equal (a node of 8 GPUs is
one unit), and the DP above runs when there are at most ``GENERAL_LIMIT`` units. Beyond
``GENERAL_LIMIT`` devices it also runs with all stages of one width w (one DP per width, so the
state drops the device position): w is any stage width some choice allows (tp·dp with dp
dividing a micro-batch size), and a pipeline of K stages takes the first K·w devices of the
order, K the most stages the order, the layer atoms and the schedule allow. The rest of the
order is left unused: a model of 98 layers on 1024 devices with replicas limited by the
micro-batch size cannot use them all, and the order puts the slowest and smallest devices last.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pdv.artifacts import LayerChoice, Schedule
from pdv.cost.comm import pairs_time
from pdv.cost.schedules import in_flight, max_stages
from pdv.cost.stage import boundary_tensors
from pdv.plan.objective import (
    StageTable,
    pipeline_objective,
    send_pairs,
    stage_group,
    stage_table,
)
from pdv.plan.problem import Candidate, PlanProblem, StageSpec, choices_for

__all__ = ["MAX_CAPS", "GENERAL_LIMIT", "DPResult", "stage_dp", "rank_key", "widths"]

MAX_CAPS = 1024
BIG_CAPS = 8
"""caps sampled per micro-batch size when the instance is big (more than BIG_WORK cells)"""
BIG_WORK = 200_000
GENERAL_LIMIT = 16
LAYER_ATOMS = 24
"""beyond this many layers, stage boundaries fall on balanced atoms (Alpa's layer clustering)"""


@dataclass(frozen=True)
class DPResult:
    """Ranked candidates of the stage DP and whether the cap enumeration was exhaustive."""

    candidates: list[Candidate]
    exact: bool
    evaluated: int
    """stage tables priced (deterministic count, for the plan's `candidates` field)"""


@dataclass
class _Option:
    a: int
    g: int
    choice: LayerChoice
    t_send: np.ndarray
    t_last: np.ndarray
    sync: np.ndarray
    kmax: np.ndarray


def _unit(problem: PlanProblem, order: list[int], islands: list[list[int]]) -> int:
    sizes = {len(x) for x in islands}
    if len(problem.cluster.devices) > GENERAL_LIMIT and len(sizes) == 1:
        size = sizes.pop()
        # Only when the order keeps each island contiguous (it does: islands are chained whole).
        return size
    return 1


def atom_bounds(problem: PlanProblem) -> np.ndarray:
    """Layer boundaries the DP may cut at: all of them, or LAYER_ATOMS balanced ones."""
    L = problem.num_layers
    if L <= LAYER_ATOMS:
        return np.arange(L + 1)
    prof = problem.profiles[sorted(problem.profiles)[0]]
    work = np.array([x.fwd_s + x.bwd_s for x in prof.layers], dtype=float) + 1e-12
    cum = np.concatenate([[0.0], np.cumsum(work)])
    targets = cum[-1] * np.arange(1, LAYER_ATOMS) / LAYER_ATOMS
    cuts = np.searchsorted(cum, targets, side="left")
    return np.unique(np.concatenate([[0], np.clip(cuts, 1, L - 1), [L]]))


def _options(
    problem: PlanProblem,
    order: list[int],
    unit: int,
    slices: list[tuple[int, int]],
    mbs: int,
    bounds: np.ndarray,
) -> tuple[list[_Option], int]:
    out: list[_Option] = []
    evaluated = 0
    cache: dict[tuple, list[tuple[LayerChoice, StageTable]]] = {}
    # Messages per slice at each boundary (a boundary of several tensors sends each on its own).
    counts = [boundary_tensors(problem.profiles, int(h) - 1) if h > 0 else (1, 1) for h in bounds]
    tensors = (np.array([c[0] for c in counts], dtype=float),
               np.array([c[1] for c in counts], dtype=float))
    for a, g in slices:
        ranks = tuple(order[a * unit : (a + g) * unit])
        following = tuple(order[(a + g) * unit :])
        # Slices with the same kinds, speeds and ring links price alike (declared clusters repeat
        # one node many times): price one of them.
        key = (_group_key(problem, ranks), mbs)
        if key not in cache:
            tables = [
                (ch, stage_table(problem, ranks, mbs, ch, bounds))
                for ch in choices_for(problem, len(ranks), mbs)
            ]
            evaluated += len(tables)
            cache[key] = _undominated(tables)
        kept = cache[key]
        if not kept:
            continue
        # Every choice's transfer at once: pairs_time works element by element.
        sends = pairs_time(problem.net, send_pairs(ranks, following),
                           np.stack([tab.out for _, tab in kept]), *tensors)  # fmt: skip
        for (ch, tab), send in zip(kept, sends, strict=True):
            out.append(
                _Option(a, g, ch, tab.time + send[None, :], tab.time, tab.sync, tab.max_in_flight)
            )
    return out, evaluated


def _group_key(problem: PlanProblem, ranks: tuple[int, ...]) -> tuple:
    return tuple(
        stage_group(problem, ranks, tp) for tp in problem.tp_options() if len(ranks) % tp == 0
    )


def _undominated(
    tables: list[tuple[LayerChoice, StageTable]],
) -> list[tuple[LayerChoice, StageTable]]:
    # A choice no faster, no cheaper to sync and no roomier than another everywhere never helps.
    keep = []
    for i, (ch, t) in enumerate(tables):
        dominated = False
        for j, (_, o) in enumerate(tables):
            if j == i:
                continue
            if (
                np.all(o.time <= t.time)
                and np.all(o.sync <= t.sync)
                and np.all(o.max_in_flight >= t.max_in_flight)
                and np.all(o.out <= t.out)
                and (
                    np.any(o.time < t.time)
                    or np.any(o.sync < t.sync)
                    or np.any(o.max_in_flight > t.max_in_flight)
                    or np.any(o.out < t.out)
                    or j < i
                )
            ):
                dominated = True
                break
        if not dominated:
            keep.append((ch, t))
    return keep


@dataclass
class _Solution:
    value: float
    stages: list[tuple[int, int, int, int, LayerChoice]]  # (lo, hi, a, g, choice)
    max_u: float = 0.0
    """the largest per-stage u = (M−1)·t + sync of these stages"""


def _solve(*args, **kwargs) -> list[_Solution]:
    """One DP pass (see _solve_pass); infinities from empty ranges are expected, not warnings."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _solve_pass(*args, **kwargs)


def _solve_pass(
    prepared: _Prepared,
    n_units: int,
    n_layers: int,
    num_micro: int,
    schedule: Schedule,
    cap: float,
    bottleneck: bool,
    *,
    equal: int | None,
) -> list[_Solution]:
    """One DP pass: min Σ t under the cap (or min max u when bottleneck); best per stage count."""
    L = n_layers
    kmax_stages = max_stages(schedule, num_micro, min(n_units, L))
    by_pos, slices = prepared.by_pos, prepared.slices
    # Which layer ranges keep u = (M−1)·t + sync under this pass's cap, per slice.
    within = {id(sl): (sl.u <= cap, sl.u_last <= cap) for sls in slices.values() for sl in sls}
    # f[k][a]: values over start layer i; arg[k][a][i] = (option index, end layer j)
    f: dict[tuple[int, int], np.ndarray] = {}
    arg: dict[tuple[int, int], list[tuple[int, int] | None]] = {}
    for k in range(1, kmax_stages + 1):
        need = in_flight(schedule, k, num_micro)
        for a in range(n_units - 1, -1, -1):
            # Equal slices use the whole order, so the stage at a has (units − a)/g stages to go.
            if equal is not None and (a % equal or (n_units - a) // equal != k):
                continue
            best = np.full(L + 1, np.inf)
            choice: list[tuple[int, int] | None] = [None] * (L + 1)
            for sl in slices.get(a, []):
                if equal is not None and sl.g != equal:
                    continue
                nxt = f.get((k - 1, a + sl.g))
                if k > 1 and nxt is None:
                    continue
                vals, which, ends = sl.extend(k, L, need, bottleneck, nxt, *within[id(sl)])
                better = vals < best
                if np.any(better):
                    best = np.where(better, vals, best)
                    for row in np.flatnonzero(better):
                        choice[int(row)] = (sl.first + int(which[row]), int(ends[row]))
            f[(k, a)] = best
            arg[(k, a)] = choice
    return _solutions(f, arg, by_pos, kmax_stages, L, num_micro)


_ROWS = [np.arange(n + 1) for n in range(LAYER_ATOMS + 1)]
"""start-layer indices 0..L, made once"""


@dataclass(frozen=True)
class _Slice:
    """The options of one slice (first unit a, g units), stacked, with their bottleneck terms
    u = (M−1)·t + sync over every layer range: one numpy call prices every choice of the
    slice at once."""

    a: int
    g: int
    first: int
    """index of the slice's first option among the options at a"""
    t_send: np.ndarray
    """(choices, L+1, L+1)"""
    t_last: np.ndarray
    """(choices, L+1): the last stage, layers i to the end"""
    kmax: np.ndarray
    u: np.ndarray
    u_last: np.ndarray

    def extend(
        self, k: int, L: int, need: int, bottleneck: bool, nxt: np.ndarray | None,
        within: np.ndarray, within_last: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Best value of starting k stages on this slice, per start layer; which choice; end.

        `within` (`within_last` for the last stage) marks the layer ranges under the cap."""
        if k == 1:  # the last stage takes every remaining layer
            ok = (self.kmax[:, :, L] >= need) & within_last
            own = np.maximum(self.u_last, 0) if bottleneck else self.t_last
            vals = np.where(ok, own, np.inf)
            which = np.argmin(vals, axis=0)
            ends = np.full(L + 1, L)
        else:
            assert nxt is not None
            ok = (self.kmax >= need) & within
            own = np.where(ok, self.u if bottleneck else self.t_send, np.inf)
            total = np.maximum(own, nxt) if bottleneck else own + nxt
            at = np.argmin(total, axis=2)  # (choices, L+1): the best end per choice and start
            vals = total.min(axis=2)
            which = np.argmin(vals, axis=0)
            ends = at[which, _ROWS[L]]
        return vals[which, _ROWS[L]], which, ends


@dataclass(frozen=True)
class _Prepared:
    """A DP layout's options by position and stacked per slice, built once for all its passes."""

    by_pos: dict[int, list[_Option]]
    slices: dict[int, list[_Slice]]

    @classmethod
    def of(cls, options: list[_Option], num_micro: int) -> _Prepared:
        """Group the options by position, and stack each slice's choices (in their order)."""
        by_pos: dict[int, list[_Option]] = {}
        for opt in options:
            by_pos.setdefault(opt.a, []).append(opt)
        slices: dict[int, list[_Slice]] = {}
        with np.errstate(invalid="ignore", over="ignore"):
            for a, opts in by_pos.items():
                first = 0
                for g, run in itertools.groupby(opts, key=lambda o: o.g):
                    group = list(run)
                    t_send = np.stack([o.t_send for o in group])
                    sync = np.stack([o.sync for o in group])
                    t_last = np.stack([o.t_last[:, -1] for o in group])
                    slices.setdefault(a, []).append(_Slice(
                        a, g, first, t_send, t_last, np.stack([o.kmax for o in group]),
                        (num_micro - 1) * t_send + sync,
                        (num_micro - 1) * t_last + sync[:, :, -1]))  # fmt: skip
                    first += len(group)
        return cls(by_pos, slices)


def _solutions(
    f: dict[tuple[int, int], np.ndarray],
    arg: dict[tuple[int, int], list[tuple[int, int] | None]],
    by_pos: dict[int, list[_Option]],
    kmax_stages: int,
    L: int,
    num_micro: int,
) -> list[_Solution]:
    """The best pipeline of each stage count, walked back from the DP's recorded choices."""
    out = []
    for k in range(1, kmax_stages + 1):
        v = f.get((k, 0))
        if v is None or not np.isfinite(v[0]):
            continue
        stages: list[tuple[int, int, int, int, LayerChoice]] = []
        i, a, kk = 0, 0, k
        max_u = 0.0
        while kk >= 1:
            step = arg[(kk, a)][i]
            assert step is not None, "a finite DP value always has a recorded choice"
            idx, j = step
            opt = by_pos[a][idx]
            stages.append((i, j, a, opt.g, opt.choice))
            t = opt.t_last[i, L] if kk == 1 else opt.t_send[i, j]
            max_u = max(max_u, float((num_micro - 1) * t + opt.sync[i, j]))
            i, a, kk = j, a + opt.g, kk - 1
        out.append(_Solution(float(v[0]), stages, max_u))
    return out


def _slices(n_units: int, equal: int | None) -> list[tuple[int, int]]:
    if equal is not None:
        return [(a, equal) for a in range(0, n_units - equal + 1, equal)]
    return [(a, g) for a in range(n_units) for g in range(1, n_units - a + 1)]


@dataclass(frozen=True)
class _Layout:
    """The device side of one DP run: the order it slices, in units, and which slices."""

    order: list[int]
    unit: int
    """devices per unit"""
    slices: list[tuple[int, int]]
    """(first unit, units) of every stage the run may form"""
    equal: int | None
    """all stages this many units wide, the whole order used (None: any slices)"""


def widths(problem: PlanProblem, mbs: int, n: int) -> list[int]:
    """Stage widths (devices) some choice allows at micro-batch size mbs: tp·dp, dp | mbs."""
    return sorted({tp * dp for tp in problem.tp_options() for dp in range(1, mbs + 1)
                   if problem.replica_batch_ok(mbs, dp) and tp * dp <= n})  # fmt: skip


def _layouts(
    problem: PlanProblem, order: list[int], islands: list[list[int]], mbs: int, n_layers: int
) -> list[_Layout]:
    """Every slice and choice on few units; one width per stage on many devices."""
    unit = _unit(problem, order, islands)
    n_units = len(order) // unit
    out = []
    if n_units <= GENERAL_LIMIT:
        out.append(_Layout(order, unit, _slices(n_units, None), None))
    if len(order) > GENERAL_LIMIT:
        most = max_stages(problem.schedule, problem.global_batch // mbs, n_layers)
        for w in widths(problem, mbs, len(order)):
            k = min(len(order) // w, most)
            out.append(_Layout(order[: k * w], w, _slices(k, 1), 1))
    return out


def stage_dp(
    problem: PlanProblem,
    order: list[int],
    islands: list[list[int]],
    search: str = "pdv",
    bottleneck_only: bool = False,
) -> DPResult:
    """Run the stage DP for every micro-batch size; candidates ranked by the objective J."""
    bounds = atom_bounds(problem)
    L = len(bounds) - 1
    found: dict[tuple, Candidate] = {}
    exact = True
    evaluated = 0
    for mbs in problem.mbs_options():
        M = problem.global_batch // mbs
        for lay in _layouts(problem, order, islands, mbs, L):
            n_units = len(lay.order) // lay.unit
            options, n_eval = _options(problem, lay.order, lay.unit, lay.slices, mbs, bounds)
            evaluated += n_eval
            if not options:
                continue
            run = functools.partial(_solve, _Prepared.of(options, M), n_units, L, M,
                                    problem.schedule, equal=lay.equal)  # fmt: skip
            bottleneck = run(np.inf, True)
            if not bottleneck:
                continue
            u_star = min(s.value for s in bottleneck)

            def make(s: _Solution, M: int = M, mbs: int = mbs, lay: _Layout = lay) -> Candidate:
                return _candidate(problem, s, M, mbs, lay.order, lay.unit, bounds, search)

            if bottleneck_only:  # PipeDream: the slowest stage sets the throughput
                pool = [make(s) for s in bottleneck if s.value <= u_star * (1 + 1e-12)]
            else:
                budget = BIG_CAPS if len(options) * (L + 1) ** 2 > BIG_WORK else MAX_CAPS
                pool, is_exact = _capped(run, options, M, u_star, budget, make)
                exact &= is_exact
            for cand in pool:
                key = (cand.micro_batch_size, cand.stages)
                if key not in found or found[key].objective_s > cand.objective_s:
                    found[key] = cand
    ranked = sorted(found.values(), key=rank_key)
    return DPResult(ranked, exact, evaluated)


def _capped(
    run: Callable[[float, bool], list[_Solution]],
    options: list[_Option],
    M: int,
    u_star: float,
    budget: int,
    make: Callable[[_Solution], Candidate],
) -> tuple[list[Candidate], bool]:
    """Candidates of the DP under every useful cap on the bottleneck term (Alpa's enumeration),
    and whether the caps were all of them (not sampled)."""
    free = run(np.inf, False)
    s_inf = min(s.value for s in free)
    # Each solution becomes a priced candidate once; `best` is the lowest J so far.
    pool = [make(s) for s in free]
    best = min(c.objective_s for c in pool)
    caps, is_exact = _caps(options, M, u_star, best - s_inf, budget)
    # Caps from the largest down: the solutions found under a cap stay optimal for every cap
    # down to their own largest u, so those caps need no pass of their own; and no smaller cap
    # can beat `best` once Σ t (which only grows as the cap shrinks) + u* reaches it.
    caps = [c for c in caps if c + s_inf < best]
    i = len(caps) - 1
    while i >= 0:
        sols = run(caps[i] * (1 + 1e-12), False)
        if not sols:
            break
        for s in sols:
            pool.append(make(s))
            best = min(best, pool[-1].objective_s)
        if min(s.value for s in sols) + u_star >= best:
            break
        reached = max(s.max_u for s in sols)
        while i >= 0 and caps[i] >= reached * (1 - 1e-12):
            i -= 1
    return pool, is_exact


def rank_key(c: Candidate) -> tuple:
    """Sort key of candidates: objective, then fewer stages, smaller micro-batch, then layout."""
    return (round(c.objective_s, 15), len(c.stages), c.micro_batch_size, repr(c.stages))


def _caps(
    options: list[_Option], M: int, lo: float, hi: float, budget: int
) -> tuple[list[float], bool]:
    values = []
    for opt in options:
        for t in (opt.t_send, opt.t_last):
            with np.errstate(invalid="ignore"):
                u = (M - 1) * t + opt.sync
            sel = u[(u >= lo) & (u <= hi) & np.isfinite(u)]
            values.append(sel)
    allv = np.unique(np.concatenate(values)) if values else np.array([])
    if allv.size <= budget:
        return [float(x) for x in allv], True
    picks = np.unique(np.quantile(allv, np.linspace(0, 1, budget), method="lower"))
    return [float(x) for x in picks], False


def _stage_specs(
    s: _Solution, order: list[int], unit: int, bounds: np.ndarray
) -> tuple[StageSpec, ...]:
    return tuple(
        StageSpec(int(bounds[lo]), int(bounds[hi]), tuple(order[a * unit : (a + g) * unit]), ch)
        for lo, hi, a, g, ch in s.stages
    )


def _candidate(
    problem: PlanProblem,
    s: _Solution,
    M: int,
    mbs: int,
    order: list[int],
    unit: int,
    bounds: np.ndarray,
    search: str,
) -> Candidate:
    stages = _stage_specs(s, order, unit, bounds)
    j = pipeline_objective(problem, stages, mbs, order)
    return Candidate(stages, mbs, M, j, search, tuple(order))
