"""Event-driven simulation of one training step of a plan, and the closed form the planner uses.

Model (each choice is what the simulator charges; the sources are next to the formulas):

- Each rank group (the ranks of a stage; with virtual stages, of all its stages) is one compute
  resource that runs its ops one at a time in the schedule's order (:mod:`pdv.cost.schedules`).
  An op starts when its group is free and its inputs are there: a forward needs the previous
  stage's forward of that micro-batch plus the activation transfer; a backward needs its own
  forward and the next stage's backward plus the gradient transfer.
- Transfers run on the sending group's send lane, one message at a time, in the order they were
  produced, and overlap compute (torch's isend/irecv). Their time is StageCost.send_s /
  grad_send_s on the actual ordered links.
- After a stage's last backward its gradient sync (StageCost.grad_sync_s) runs on the group's
  collective lane; it does not overlap the backward (conservative: DDP and FSDP overlap part of
  it). Then the optimizer step (StageCost.optimizer_s, measured per layer by the profiler) runs
  on the compute lane, as ``pdv run`` calls it after the schedule and the sync.
- Zero-bubble schedules split each backward into an input-grad op I and a weight-grad op W. The
  profile times backward as one, so pdv assumes I = W = bwd/2 (an estimate, noted in
  Simulation.notes); I carries the recompute and the TP collectives' halves alike.
- Peak memory per rank follows the simulated op order: static bytes of all the group's stages
  plus, at each forward, the activations of every micro-batch forwarded and not yet fully
  backwarded (W for zero bubble), plus the largest recompute transient.
- Bubble fraction: 1 − Σ_groups busy / (groups × span), span = end of the last compute op; busy
  counts forward/backward ops (with their TP collectives). For uniform GPipe/1F1B with free
  transfers this is the textbook (p − 1)/(M + p − 1) (Huang et al. 2019).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from pdv.artifacts import ClusterArtifact, ModelProfile, Plan, Predicted, StagePrediction
from pdv.cost.schedules import (
    Op,
    StageLayout,
    canonical_schedule,
    rank_orders,
    splits_backward,
    stage_layout,
)
from pdv.cost.stage import StageCost, stage_cost
from pdv.errors import PdvError

__all__ = [
    "Event",
    "Simulation",
    "simulate",
    "simulate_costs",
    "apply_host_bound",
    "host_capacity",
    "to_predicted",
    "analytic_step_time",
    "check_plan",
]

_ZB_SPLIT_NOTE = (
    "zero-bubble backward split estimated as half input-grad (I), half weight-grad (W): "
    "the profile times backward as one op"
)


@dataclass(frozen=True)
class Event:
    """One interval of the simulated step on one rank group."""

    name: str
    """F, B, I, W, opt (compute), send-act, send-grad (p2p), sync (collective)"""
    lane: str
    """compute | p2p | collective"""
    group: int
    """rank group (pipeline rank) index"""
    stage: int
    micro: int | None
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Simulation:
    """The simulated step of one plan."""

    schedule: str
    step_time_s: float
    bubble_fraction: float
    """1 − busy/(groups·span) over the pipeline span (see module docstring)"""
    stages: tuple[StagePrediction, ...]
    peak_memory_bytes: dict[int, float]
    """global rank -> bytes"""
    events: tuple[Event, ...]
    costs: tuple[StageCost, ...]
    group_ranks: tuple[tuple[int, ...], ...]
    """ranks of each rank group, for the trace"""
    stage_group: tuple[int, ...]
    """rank group of each stage"""
    notes: tuple[str, ...] = ()


def check_plan(plan: Plan, profiles: Mapping[str, ModelProfile], cluster: ClusterArtifact) -> None:
    """PdvError unless the plan's batch, layers and ranks fit its profiles and cluster."""
    if plan.micro_batch_size * plan.num_micro_batches != plan.global_batch_size:
        raise PdvError(
            f"global_batch_size {plan.global_batch_size} != micro_batch_size "
            f"{plan.micro_batch_size} x num_micro_batches {plan.num_micro_batches}"
        )
    if not profiles:
        raise PdvError("no model profile given; pass one per device kind (--profile)")
    counts = {kind: len(p.layers) for kind, p in profiles.items()}
    if len(set(counts.values())) > 1:
        raise PdvError(f"profiles disagree on the number of layers: {counts}")
    n_layers = next(iter(counts.values()))
    expect = 0
    for i, s in enumerate(plan.stages):
        if s.layers[0] != expect:
            raise PdvError(
                f"stage {i} starts at layer {s.layers[0]} but the previous stage ends at {expect}; "
                f"stages must cover the layers in order without gaps"
            )
        expect = s.layers[1]
    if expect != n_layers:
        raise PdvError(f"the stages end at layer {expect} but the model has {n_layers} layers")
    n = len(cluster.devices)
    for i, s in enumerate(plan.stages):
        bad = [r for r in s.ranks if r >= n]
        if bad:
            raise PdvError(f"stage {i} uses ranks {bad} but the cluster has ranks 0..{n - 1}")


def simulate(
    plan: Plan, profiles: Mapping[str, ModelProfile], cluster: ClusterArtifact
) -> Simulation:
    """Simulate one training step of the plan on the cluster, priced by the profiles."""
    check_plan(plan, profiles, cluster)
    schedule = canonical_schedule(plan.schedule)
    n = len(plan.stages)
    costs = [
        stage_cost(
            profiles,
            cluster,
            st,
            plan.stages[i + 1] if i + 1 < n else None,
            mbs=plan.micro_batch_size,
            schedule=schedule,
            stage_index=i,
            num_stages=n,
            num_micro=plan.num_micro_batches,
        )
        for i, st in enumerate(plan.stages)
    ]
    layout = stage_layout([st.ranks for st in plan.stages], schedule)
    sim = simulate_costs(costs, layout, schedule, plan.num_micro_batches)
    return apply_host_bound(sim, cluster)


def host_capacity(cluster: ClusterArtifact) -> dict[str, float]:
    """Per host: how many of its ranks compute at full speed at once (measured), or none.

    Each rank's share is its matmul throughput with all the host's ranks probing at once over
    the same probe alone (pdv profile cluster measures both); the host carries the sum. Four
    CPU ranks on two cores measure about 0.5 each, a capacity of 2. A host whose ranks lack the
    alone probe, or whose ranks all keep full speed (one GPU each), is left out: no bound.
    """
    shares: dict[str, list[float]] = {}
    for d in cluster.devices:
        if not (d.matmul_flops and d.matmul_flops_alone):
            shares.setdefault(d.host, []).append(float("inf"))
            continue
        shares.setdefault(d.host, []).append(min(1.0, d.matmul_flops / d.matmul_flops_alone))
    return {h: sum(v) for h, v in shares.items() if sum(v) < len(v)}


def apply_host_bound(sim: Simulation, cluster: ClusterArtifact) -> Simulation:
    """Stretch the compute span to what each host's cores can carry, where that is longer.

    The simulator runs every rank group at its alone speed, as if each had its own cores. When
    ranks share a host's cores (CPU ranks), the step's compute cannot finish before the
    host's total compute seconds (each rank's busy time: forwards, backwards and the TP
    collectives inside them, which also run on those cores) divided by its measured capacity
    (:func:`host_capacity`). That is the throughput bound of a processor-shared resource; the
    step is the later of it and the schedule's critical path, with the transfers and gradient
    syncs that follow the last compute op kept after it.
    """
    capacity = host_capacity(cluster)
    if not capacity:
        return sim
    busy = [0.0] * len(sim.group_ranks)
    for e in sim.events:
        if e.lane == "compute":
            busy[e.group] += e.end_s - e.start_s
    work: dict[str, float] = {}
    for g, ranks in enumerate(sim.group_ranks):
        for r in ranks:
            host = cluster.devices[r].host
            work[host] = work.get(host, 0.0) + busy[g]
    span = max((e.end_s for e in sim.events if e.lane == "compute"), default=0.0)
    host, bound = max(((h, w / capacity[h]) for h, w in work.items() if h in capacity),
                      key=lambda hb: hb[1], default=("", 0.0))
    if bound <= span:
        return sim
    note = (f"host {host}: {work[host]:.3f} s of rank compute on a measured capacity of "
            f"{capacity[host]:.2f} ranks at full speed bounds the compute span at {bound:.3f} s "
            f"(schedule alone: {span:.3f} s)")
    return replace(sim, step_time_s=sim.step_time_s + bound - span, notes=(*sim.notes, note))


def _durations(cost: StageCost, split: bool) -> dict[str, float]:
    if split:
        return {"F": cost.fwd_s, "I": cost.bwd_s / 2, "W": cost.bwd_s / 2}
    return {"F": cost.fwd_s, "B": cost.bwd_s}


class _Run:
    """Mutable state of one simulation (local to simulate_costs; never escapes)."""

    def __init__(self, costs: Sequence[StageCost], layout: StageLayout, split: bool) -> None:
        self.costs = costs
        self.layout = layout
        self.split = split
        self.back = "I" if split else "B"
        self.done: dict[Op, float] = {}
        self.act_arrival: dict[tuple[int, int], float] = {}
        self.grad_arrival: dict[tuple[int, int], float] = {}
        self.free = [0.0] * layout.num_groups
        self.send_free = [0.0] * layout.num_groups
        self.events: list[Event] = []

    def ready(self, op: Op) -> float | None:
        """When op's inputs are all there, or None while a dependency has not run."""
        kind, s, m = op
        last = len(self.costs) - 1
        if kind == "F":
            return 0.0 if s == 0 else self.act_arrival.get((s, m))
        if kind == "W":
            return self.done.get(("I", s, m))
        own = self.done.get(("F", s, m))
        if own is None:
            return None
        if s == last:
            return own
        grad = self.grad_arrival.get((s, m))
        return None if grad is None else max(own, grad)

    def run(self, g: int, op: Op, start: float) -> None:
        kind, s, m = op
        end = start + _durations(self.costs[s], self.split)[kind]
        self.free[g] = end
        self.done[op] = end
        self.events.append(Event(kind, "compute", g, s, m, start, end))
        if kind == "F" and s + 1 < len(self.costs):
            self._send(g, s, m, end, self.costs[s].send_s, "send-act", self.act_arrival, s + 1)
        if kind == self.back and s > 0:
            t = self.costs[s - 1].grad_send_s
            self._send(g, s, m, end, t, "send-grad", self.grad_arrival, s - 1)

    def _send(self, g: int, s: int, m: int, t0: float, dur: float, name: str,
              arrival: dict[tuple[int, int], float], to: int) -> None:  # fmt: skip
        if dur <= 0:
            arrival[(to, m)] = t0
            return
        start = max(t0, self.send_free[g])
        self.send_free[g] = start + dur
        arrival[(to, m)] = start + dur
        self.events.append(Event(name, "p2p", g, s, m, start, start + dur))


def simulate_costs(
    costs: Sequence[StageCost], layout: StageLayout, schedule: str, num_micro: int
) -> Simulation:
    """Run the event-driven simulation on priced stages (the planner can call this directly)."""
    schedule = canonical_schedule(schedule)
    split = splits_backward(schedule)
    orders = rank_orders(layout, schedule, num_micro)
    state = _Run(costs, layout, split)
    # Each group runs its ops in a fixed order, and a group's sends are produced by its own ops
    # in that order, so times do not depend on which ready group is advanced first: advance any
    # group whose next op has all its inputs, and recheck its pipeline neighbours.
    pos = [0] * layout.num_groups
    remaining = sum(len(o) for o in orders)
    todo = list(range(layout.num_groups))
    queued = [True] * layout.num_groups
    while todo:
        g = todo.pop()
        queued[g] = False
        order = orders[g]
        while pos[g] < len(order):
            op = order[pos[g]]
            r = state.ready(op)
            if r is None:
                break
            state.run(g, op, max(r, state.free[g]))
            pos[g] += 1
            remaining -= 1
            for t in (op[1] - 1, op[1] + 1):
                if 0 <= t < len(costs):
                    h = layout.group_of_stage[t]
                    if h != g and not queued[h]:
                        queued[h] = True
                        todo.append(h)
    if remaining:
        stuck = {g: orders[g][pos[g]] for g in range(len(orders)) if pos[g] < len(orders[g])}
        raise PdvError(
            f"{schedule} with {num_micro} micro-batches on {layout.num_groups} rank groups "
            f"deadlocks (waiting ops {stuck}); use more micro-batches or another schedule"
        )
    return _finish(state, orders, schedule, num_micro)


def _finish(state: _Run, orders: list[list[Op]], schedule: str, num_micro: int) -> Simulation:
    costs, layout = state.costs, state.layout
    coll_free = [0.0] * layout.num_groups
    last_bwd = "W" if state.split else "B"
    step_end = max(e.end_s for e in state.events)
    span = max(e.end_s for e in state.events if e.lane == "compute")
    synced: dict[int, float] = {}
    for s, cost in enumerate(costs):
        g = layout.group_of_stage[s]
        t0 = max(state.done[(last_bwd, s, m)] for m in range(num_micro))
        synced[s] = t0
        if cost.grad_sync_s > 0:
            start = max(t0, coll_free[g])
            coll_free[g] = start + cost.grad_sync_s
            synced[s] = coll_free[g]
            state.events.append(Event("sync", "collective", g, s, None, start, coll_free[g]))
            step_end = max(step_end, coll_free[g])
    # The bubble is the schedule's: measured over fwd/bwd, before the optimizer steps.
    busy = sum(e.end_s - e.start_s for e in state.events if e.lane == "compute")
    for s, cost in enumerate(costs):
        if cost.optimizer_s > 0:
            g = layout.group_of_stage[s]
            start = max(synced[s], state.free[g])
            state.free[g] = start + cost.optimizer_s
            state.events.append(Event("opt", "compute", g, s, None, start, state.free[g]))
            step_end = max(step_end, state.free[g])

    bubble = 1.0 - busy / (layout.num_groups * span) if span > 0 else 0.0
    peak = _peak_memory(costs, layout, orders, state.split)
    stages = tuple(
        StagePrediction(
            compute_s=num_micro * (c.fwd_s + c.bwd_s - c.tp_comm_s) + c.optimizer_s,
            p2p_s=num_micro * (c.send_s + c.grad_send_s),
            collective_s=num_micro * c.tp_comm_s + c.grad_sync_s,
            peak_memory_bytes=int(max(peak[r] for r in c.peak_memory_bytes)),
        )
        for c in costs
    )
    events = tuple(sorted(state.events, key=lambda e: (e.start_s, e.group, e.lane, e.stage)))
    return Simulation(
        schedule=schedule,
        step_time_s=step_end,
        bubble_fraction=max(0.0, bubble),
        stages=stages,
        peak_memory_bytes=peak,
        events=events,
        costs=tuple(costs),
        group_ranks=layout.group_ranks,
        stage_group=layout.group_of_stage,
        notes=(_ZB_SPLIT_NOTE,) if state.split else (),
    )


def _peak_memory(
    costs: Sequence[StageCost], layout: StageLayout, orders: list[list[Op]], split: bool
) -> dict[int, float]:
    """Per-rank peak bytes along each group's op order (activations live from F to B or W)."""
    freed_by = "W" if split else "B"
    peak: dict[int, float] = {}
    for g, order in enumerate(orders):
        stages = layout.stages_of_group[g]
        ranks = costs[stages[0]].static_bytes.keys()
        live = dict.fromkeys(stages, 0)
        most: dict[int, float] = dict.fromkeys(ranks, 0.0)
        for kind, s, _m in order:
            if kind == "F":
                live[s] += 1
                for r in ranks:
                    held = sum(live[t] * costs[t].activation_bytes[r] for t in stages)
                    most[r] = max(most[r], held)
            elif kind == freed_by:
                live[s] -= 1
        for r in ranks:
            static = sum(costs[t].static_bytes[r] for t in stages)
            transient = max(costs[t].transient_bytes[r] for t in stages)
            peak[r] = static + most[r] + transient
    return dict(sorted(peak.items()))


def to_predicted(sim: Simulation) -> Predicted:
    """The plan's `predicted` block from a simulation."""
    return Predicted(
        step_time_s=sim.step_time_s,
        peak_memory_bytes={str(r): int(b) for r, b in sim.peak_memory_bytes.items()},
        bubble_fraction=sim.bubble_fraction,
        stages=list(sim.stages),
    )


def analytic_step_time(
    costs: Sequence[StageCost],
    num_micro: int,
    schedule: str,
    groups: Sequence[int] | None = None,
) -> float:
    """Closed-form step time: Σ stage time + (M − 1)·max stage time, plus transfers and sync.

    Alpa's inter-op objective (Zheng et al. 2022, §5.2) generalized to pdv's costs: with t_g the
    per-micro-batch fwd+bwd of rank group g (summed over its stages), GPipe and 1F1B take
    M·max t + (Σ t − max t) — exact for uniform stages with free transfers; one fill/drain
    traversal of the transfers (Σ send + grad_send) is added. Interleaved schedules with v stages
    per group shrink the fill/drain term by v (Narayanan et al. 2021, §2.2); zero bubble keeps
    only the forwards in it, (p − 1)·F for I = W (Qi et al. 2024, ZB-H1), shrunk by v as well.
    It is never below one micro-batch's trip down and back. The slowest group's gradient sync is
    added at the end, with its optimizer step. The simulator is the reference; this is the
    planner's fast objective.
    """
    if not costs:
        return 0.0
    schedule = canonical_schedule(schedule)
    groups = list(range(len(costs))) if groups is None else list(groups)
    p = max(groups) + 1
    v = len(costs) // p
    t = [0.0] * p
    f = [0.0] * p
    sync = [0.0] * p
    for c, g in zip(costs, groups, strict=True):
        t[g] += c.fwd_s + c.bwd_s
        f[g] += c.fwd_s
        sync[g] += c.grad_sync_s + c.optimizer_s
    slowest = max(range(p), key=lambda g: t[g])
    fill = sum(f) - f[slowest] if splits_backward(schedule) else sum(t) - t[slowest]
    if schedule in ("GPipe", "1F1B"):
        v = 1
    transfers = sum(c.send_s + c.grad_send_s for c in costs)
    # One micro-batch must still travel down and back: with few micro-batches that trip, not
    # the steady state, bounds the step (weight grads off the path except the first stage's).
    trip = sum(c.fwd_s + c.bwd_s for c in costs)
    if splits_backward(schedule):
        trip -= sum(c.bwd_s / 2 for c in costs[1:])
    return max(num_micro * t[slowest] + fill / v, trip) + transfers + max(sync)
