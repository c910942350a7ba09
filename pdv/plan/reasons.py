"""Why no plan was found: a claim about every plan the search could form, with its numbers.

When neither pdv's search nor any baseline finds a plan, the user gets one line that is true
and says what to change. The checks run from the most specific claim to the most general, and
the first that holds is the message; each names a positive excess that the simulator confirms
on a plan that exhibits it (tests/test_plan_reasons.py):

1. **A layer fits no stage.** Every stage that holds layer ℓ holds at least ℓ's own state, its
   activations for one micro-batch in flight and the rank's constant bytes; the claim is made
   when even the most frugal stage of ℓ alone — the widest sharding any choice allows (TP
   degree, FSDP over the most replicas a micro-batch splits into), recompute where allowed,
   the last stage of a pipeline (fewest micro-batches in flight), on the roomiest ranks —
   exceeds its budget. The message names that stage's excess and what would shard ℓ further:
   TP degrees the profile lacks, larger micro-batches (more replicas for FSDP), a switch that
   was turned off, a smaller memory margin.
2. **The model's state exceeds all devices together.** Parameters, gradients and optimizer
   state are held in full across a stage's ranks (TP and FSDP shards add up to the layer,
   replicas without FSDP hold more), so their sum over the layers must fit in the sum of every
   device's budget less its constant bytes.
3. **The closest layout.** Otherwise the search's space had plans, none of which fit; the
   message names the layout (equal-width stages on the roomiest devices, layers balanced by
   state, the most frugal choice) whose tightest stage is least over its budget, and by how
   much. :func:`closest_layout` also serves the search: a layout there that fits is a plan.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pdv.artifacts import LayerChoice
from pdv.cost.compute import rank_overhead_bytes
from pdv.cost.schedules import in_flight, max_stages
from pdv.plan.objective import PlannedStage, pipeline_objective, stage_price, stage_table
from pdv.plan.problem import Candidate, PlanProblem, StageSpec, choices_for
from pdv.plan.stages import widths

__all__ = ["Excess", "why_no_plan", "layer_fit", "closest_layout", "frugal_choice"]

_CLOSEST_STAGE_COUNTS = 8
"""stage counts tried per width by closest_layout (powers of two up to the most, and the most)"""


@dataclass(frozen=True)
class Excess:
    """One stage over its budget: where, by how much, and the stage itself."""

    bytes: float
    """peak minus budget on the tightest rank (positive: over)"""
    rank: int
    kind: str
    budget: float
    spec: StageSpec
    mbs: int
    stages_to_end: int
    num_stages: int


def _room(problem: PlanProblem, rank: int) -> float:
    device = problem.cluster.devices[rank]
    return problem.capacity(rank) - rank_overhead_bytes(problem.profile_of(rank), device)


def _roomiest(problem: PlanProblem) -> list[int]:
    return sorted(range(len(problem.cluster.devices)), key=lambda r: (-_room(problem, r), r))


def _excess(problem: PlanProblem, spec: StageSpec, price: PlannedStage,
            mbs: int, stages_to_end: int, num_stages: int) -> Excess:  # fmt: skip
    over = {k: b - price.capacity_bytes[k] for k, b in price.memory_bytes.items()}
    kind = max(over, key=lambda k: (over[k], k))
    rank = min((r for r in spec.ranks if problem.cluster.devices[r].kind == kind),
               key=lambda r: (problem.capacity(r), r))  # fmt: skip
    return Excess(over[kind], rank, kind, problem.capacity(rank), spec, mbs, stages_to_end,
                  num_stages)


def frugal_choice(problem: PlanProblem, width: int, mbs: int) -> LayerChoice | None:
    """The choice that holds the least per rank on `width` ranks: the widest TP, FSDP over the
    replicas, recompute (each where allowed); None if no choice fits the width."""
    options = list(choices_for(problem, width, mbs))
    if not options:
        return None
    return max(options, key=lambda c: (c.tp, c.fsdp, c.recompute))


def _groups(problem: PlanProblem, width: int) -> Iterator[tuple[int, ...]]:
    # The roomiest `width` ranks, and the roomiest of each device kind (profiles may differ).
    order = _roomiest(problem)
    yield tuple(order[:width])
    for kind in sorted(problem.kinds()):
        of_kind = [r for r in order if problem.cluster.devices[r].kind == kind]
        if len(of_kind) >= width and len(problem.kinds()) > 1:
            yield tuple(of_kind[:width])


def layer_fit(problem: PlanProblem) -> tuple[int, Excess] | None:
    """The layer whose most frugal stage is furthest over its budget, if some layer fits no
    stage at all (check 1 of the module docstring); None when every layer fits somewhere."""
    L = problem.num_layers
    n = len(problem.cluster.devices)
    fits = np.zeros(L, dtype=bool)
    tried: list[tuple[tuple[int, ...], int, LayerChoice]] = []
    for mbs in problem.mbs_options():
        need = in_flight(problem.schedule, 1, problem.global_batch // mbs)
        for w in widths(problem, mbs, n):
            for ranks in _groups(problem, w):
                for ch in choices_for(problem, w, mbs):
                    tab = stage_table(problem, ranks, mbs, ch)
                    fits |= np.diagonal(tab.max_in_flight, offset=1) >= need
                    tried.append((ranks, mbs, ch))
    if fits.all():
        return None
    worst: tuple[int, Excess] | None = None
    for layer in np.flatnonzero(~fits):
        least = min(
            (_excess(problem, spec, stage_price(problem, spec, mbs, 1, M, None), mbs, 1, 1)
             for ranks, mbs, ch in tried
             if not (ch.fsdp and problem.holds_sparse(int(layer), int(layer) + 1))
             for spec, M in [(StageSpec(int(layer), int(layer) + 1, ranks, ch),
                              problem.global_batch // mbs)]),
            key=lambda e: (e.bytes, e.mbs, len(e.spec.ranks)),
        )  # fmt: skip
        if worst is None or least.bytes > worst[1].bytes:
            worst = (int(layer), least)
    return worst


def _state_short(problem: PlanProblem) -> tuple[float, float] | None:
    """(state bytes, room of all devices) when the model's state cannot fit (check 2)."""
    # Shared parameters once: a plan keeping their places in one stage holds one copy.
    state = min(float(p.model_state_bytes()) for p in problem.profiles.values())
    room = sum(max(0.0, _room(problem, r)) for r in range(len(problem.cluster.devices)))
    return (state, room) if state > room else None


def _balanced(problem: PlanProblem, k: int) -> list[tuple[int, int]]:
    # k contiguous layer ranges with about equal state each (every range non-empty).
    prof = problem.profiles[sorted(problem.profiles)[0]]
    weight = np.array([x.param_bytes + x.grad_bytes + x.optimizer_bytes + x.activation_bytes
                       for x in prof.layers], dtype=float) + 1.0  # fmt: skip
    cum = np.concatenate([[0.0], np.cumsum(weight)])
    L = len(weight)
    cuts = [0]
    for s in range(1, k):
        target = cum[-1] * s / k
        cut = int(np.searchsorted(cum, target))
        cuts.append(min(max(cut, cuts[-1] + 1), L - (k - s)))
    cuts.append(L)
    return [(cuts[i], cuts[i + 1]) for i in range(k)]


def _stage_counts(most: int) -> list[int]:
    counts, k = {most}, 1
    while k < most and len(counts) < _CLOSEST_STAGE_COUNTS:
        counts.add(k)
        k *= 2
    return sorted(counts)


def closest_layout(problem: PlanProblem) -> tuple[Excess | None, Candidate | None]:
    """Of equal-width layouts on the roomiest devices (layers balanced by state, the most
    frugal choice), the one whose tightest stage is least over its budget: its excess, and the
    layout as a candidate when it fits (excess ≤ 0)."""
    order = _roomiest(problem)
    n, L = len(order), problem.num_layers
    best: tuple[Excess, Candidate] | None = None
    for mbs in problem.mbs_options():
        M = problem.global_batch // mbs
        for w in widths(problem, mbs, n):
            ch = frugal_choice(problem, w, mbs)
            assert ch is not None, "widths() lists only widths some choice fits"
            for k in _stage_counts(min(n // w, max_stages(problem.schedule, M, L))):
                # FSDP cannot shard a stage holding a sparse embedding: plain replicas there.
                stages = tuple(StageSpec(lo, hi, tuple(order[s * w : (s + 1) * w]),
                                         ch.model_copy(update={"fsdp": False})
                                         if problem.holds_sparse(lo, hi) else ch)
                               for s, (lo, hi) in enumerate(_balanced(problem, k)))  # fmt: skip
                worst = max(
                    (_excess(problem, spec,
                             stage_price(problem, spec, mbs, k - s, M,
                                         tuple(order[(s + 1) * w :]) if s + 1 < k else None),
                             mbs, k - s, k)
                     for s, spec in enumerate(stages)),
                    key=lambda e: e.bytes,
                )  # fmt: skip
                if best is None or worst.bytes < best[0].bytes:
                    j = pipeline_objective(problem, stages, mbs, order)
                    best = (worst, Candidate(stages, mbs, M, j, "pdv", tuple(order)))
    if best is None:
        return None, None
    return best[0], (best[1] if best[0].bytes <= 0 else None)


def _describe(e: Excess) -> str:
    s = e.spec
    return (f"layers [{s.lo}, {s.hi}) on {len(s.ranks)} rank(s) with tp={s.choice.tp} "
            f"dp={s.dp} fsdp={s.choice.fsdp} recompute={s.choice.recompute} at micro-batch "
            f"{e.mbs} needs {e.bytes:,.0f} bytes more than rank {e.rank} ({e.kind}) may use "
            f"({e.budget:,.0f}; {e.bytes / 2**30:.2f} GiB over)")


def _layer_advice(problem: PlanProblem, e: Excess) -> str:
    tips = []
    if all(set(p.tp_degrees) <= {1} for p in problem.profiles.values()):
        tips.append("TP is not in the profile and no stage fits this layer's state without it: "
                    "profile with --tp-degrees (for a model with a TP plan)")
    most = max(problem.mbs_options())
    if problem.holds_sparse(e.spec.lo, e.spec.hi):
        tips.append("its gradients are sparse (an embedding with sparse=True), which FSDP does "
                    "not shard: make it sparse=False to let FSDP shard it")
    elif not problem.allow_fsdp:
        tips.append("plan with --fsdp to shard it over replicas")
    elif most < len(problem.cluster.devices) // max(problem.tp_options()):
        tips.append(f"FSDP shards over at most {most} replicas here (replicas must divide the "
                    f"micro-batch, at most {most}): allow larger --micro-batch-sizes")
    if not problem.allow_recompute:
        tips.append("plan with --recompute")
    margin = problem.memory_margin
    device = problem.cluster.devices[e.rank].memory_bytes
    if margin > 0 and e.bytes <= device * margin:
        tips.append(f"it fits with --memory-margin {max(0.0, margin - e.bytes / device):.3f}")
    tips.append("or use devices with more memory, or a smaller model")
    return "; ".join(tips)


def why_no_plan(problem: PlanProblem, planner: str = "pdv") -> str:
    """The one-line reason `planner` found no plan (see the module docstring)."""
    n = len(problem.cluster.devices)
    if not any(widths(problem, mbs, n) for mbs in problem.mbs_options()):
        smallest = problem.smallest_batch()
        return (f"no plan found: every allowed micro-batch size {problem.mbs_options()} is below "
                f"the smallest size the profiles measured ({smallest}), and a time there would "
                f"extrapolate their fit; allow --micro-batch-sizes of {smallest} or more, or "
                f"profile with --micro-batch-sizes including the smaller ones")
    stuck = layer_fit(problem)
    if stuck is not None:
        layer, e = stuck
        name = problem.profiles[e.kind].layers[layer].name
        return (f"no plan fits in memory: layer {layer} ({name}) fits no stage; its most frugal "
                f"stage, {_describe(e)}; {_layer_advice(problem, e)}")
    short = _state_short(problem)
    if short is not None:
        state, room = short
        return (f"no plan fits in memory: the model's parameters, gradients and optimizer state "
                f"take {state:,.0f} bytes, {state - room:,.0f} more than all "
                f"{len(problem.cluster.devices)} devices may hold together ({room:,.0f}, less "
                f"the margin and each rank's constant bytes); add devices or use a smaller model")
    closest, _ = closest_layout(problem)
    if closest is None:
        return "no plan found: no stage width fits the micro-batch sizes allowed"
    e = closest
    if e.bytes <= 0:  # memory is not what stops it: the planner's space or the schedule is
        return (f"no plan found: {planner}'s search has no layout that fits in memory and that "
                f"the {problem.schedule} schedule can run, though {e.num_stages} stage(s) of "
                f"{len(e.spec.ranks)} rank(s) fit in memory; "
                + ("plan with --planner pdv" if planner != "pdv" else
                   "try another --schedule or other --micro-batch-sizes"))
    return (f"no plan fits in memory: the search found no layout within every rank's budget; "
            f"the closest, {e.num_stages} stage(s) of {len(e.spec.ranks)} rank(s), has its "
            f"tightest stage {_describe(e)}; add devices, allow larger --micro-batch-sizes, "
            f"lower --memory-margin, or use a smaller model")
