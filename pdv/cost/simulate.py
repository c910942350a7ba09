"""Event-driven simulation of one training step of a plan.

Model (each choice is what the simulator charges; the sources are next to the formulas):

- Each rank group (the ranks of a stage; with virtual stages, of all its stages) is one compute
  resource that runs its ops one at a time in the schedule's order (:mod:`pdv.cost.schedules`).
  An op starts when its group is free and its inputs are there: a forward needs the previous
  stage's forward of that micro-batch plus the activation transfer; a backward needs its own
  forward and the next stage's backward plus the gradient transfer.
- A transfer starts when both ends have posted it: its sender has produced it, and its receiver
  has reached the op that consumes it (gloo and NCCL point-to-point are rendezvous: a send
  completes only once the matching receive is posted, measured on gloo in
  docs/design-notes.md; torch's schedules post each receive just before the op that needs it,
  after the rank's previous op). So a transfer overlaps its sender's later compute, never its
  receiver's earlier compute. Its time is StageCost.send_s / grad_send_s on the actual ordered
  links (α + S/β per message, and once per exchange between two ranks what one measured
  after compute adds: Links.exchange_latency_s); transfers do not queue behind each other.
  A send's completion does not hold its sender (in 1F1B's steady state the sender waits for a
  gradient that the same exchange brings anyway).
- After a stage's last backward its gradient sync (StageCost.grad_sync_s, with the excess its
  first collective measured after compute) runs on the group's collective lane; it does not
  overlap the backward (conservative: DDP and FSDP overlap part of it). Then the optimizer
  step (StageCost.optimizer_s, measured per layer by the profiler) runs on the compute lane,
  as ``pdv run`` calls it after the schedule and the sync. Parameters that layers in several
  stages share (a tied embedding and LM head) are first summed over every rank holding a copy
  (pdv.run.tied), one all-reduce per shared tensor on the holders' measured ring, each after
  every holder stage's sync and the rank's earlier such sums: their stages step after it.
- Ranks that share a host's cores (CPU ranks; measured by ``pdv profile cluster`` as each
  rank's matmul rate with all the host's ranks probing at once over its rate alone) are
  processor-shared: while n of a host's ranks compute, each op there progresses at
  min(1, C / n) of its alone speed, C the host's measured capacity (the sum of the shares); a
  rank group spanning hosts moves at its slowest rank's rate. Pipeline fill and drain leave
  cores to the ranks that are busy; a full pipeline is bound by the host's total work / C.
  There a transfer's exchange excess is the host's load's too: the cluster measures it with
  all the host's ranks at work (Links.exchange_latency_s) and with the host's other ranks
  idle (Links.exchange_latency_alone_s), and a transfer pays between the two by how many of
  the receiver's host's ranks compute or exchange when it starts, beyond its own pair
  (Sharing.busy_share; the sender's and receiver's groups count whole: their replicas
  exchange at the same time). Re-priced on a recorded 4-rank round, a pipeline of 4 stages
  on 2 cores had paid the busy excess (2.1 ms) at every exchange and read +74%.
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

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from pdv.artifacts import (
    ClusterArtifact,
    Links,
    ModelProfile,
    Plan,
    Predicted,
    Schedule,
    StagePrediction,
)
from pdv.cost.comm import all_reduce_time, ring_of
from pdv.cost.compute import (
    fsdp_heap_note,
    fsdp_unpriced_note,
    smallest_batch,
    spell_notes,
    unpriced_note,
    unsteady_note,
)
from pdv.cost.schedules import Op, StageLayout, rank_orders, splits_backward
from pdv.cost.stage import StageCost, stage_cost
from pdv.cost.validity import check_plan
from pdv.errors import PdvError

__all__ = [
    "Event",
    "Simulation",
    "simulate",
    "simulate_costs",
    "tied_syncs",
    "stage_tied_syncs",
    "TiedSync",
    "stage_costs",
    "peak_memory",
    "host_capacity",
    "to_predicted",
]

_ZB_SPLIT_NOTE = (
    "zero-bubble backward split estimated as half input-grad (I), half weight-grad (W): "
    "the profile times backward as one op"
)


@dataclass(frozen=True)
class Event:
    """One interval of the simulated step on one rank group."""

    name: str
    """F, B, I, W, opt (compute), send-act, send-grad (p2p), sync, tied-sync (collective)"""
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


def simulate(
    plan: Plan,
    profiles: Mapping[str, ModelProfile],
    cluster: ClusterArtifact,
    trace: bool = True,
) -> Simulation:
    """Simulate one training step of the plan on the cluster, priced by the profiles.

    With ``trace=False`` the simulation keeps no events (the search needs only the step time,
    bubble and memory; a step of thousands of micro-batches has hundreds of thousands).
    """
    layout, costs = _priced(plan, profiles, cluster)
    schedule = plan.schedule
    capacity = host_capacity(cluster)
    hosts = [[cluster.devices[r].host for r in ranks] for ranks in layout.group_ranks]
    ties = tied_syncs(plan, profiles, cluster)
    per_host = Counter(d.host for d in cluster.devices)
    sim = simulate_costs(costs, layout, schedule, plan.num_micro_batches,
                         Sharing(capacity, hosts, per_host) if capacity else None, trace, ties)
    notes = [n for n in (unpriced_note(cluster), unsteady_note(cluster),
                         fsdp_unpriced_note(plan, cluster), fsdp_heap_note(plan, cluster),
                         _extrapolated_note(plan, profiles), *map(_tied_note, ties),
                         *spell_notes(profiles, cluster)) if n]
    return replace(sim, notes=(*sim.notes, *notes)) if notes else sim


def peak_memory(plan: Plan, profiles: Mapping[str, ModelProfile],
                cluster: ClusterArtifact) -> dict[int, float]:
    """Per rank, the peak bytes :func:`simulate` predicts, without running its event loop.

    Memory follows each group's op order alone, not the ops' times, so a search can rule out a
    plan over a rank's memory for the price of its order (interleaved forms of thousands of
    micro-batches take 0.1-0.4 s to simulate).
    """
    layout, costs = _priced(plan, profiles, cluster)
    orders = rank_orders(layout, plan.schedule, plan.num_micro_batches)
    return _peak_memory(costs, layout, orders, splits_backward(plan.schedule))


def stage_costs(plan: Plan, profiles: Mapping[str, ModelProfile],
                cluster: ClusterArtifact) -> list[StageCost]:
    """Each stage's priced cost (per micro-batch forward and backward, sync, optimizer), as
    :func:`simulate` schedules them."""
    return _priced(plan, profiles, cluster)[1]


def _priced(plan: Plan, profiles: Mapping[str, ModelProfile],
            cluster: ClusterArtifact) -> tuple[StageLayout, list[StageCost]]:
    """The plan's layout (checked) and each stage's cost."""
    if not profiles:
        raise PdvError("no model profile given; pass one per device kind (--profile)")
    counts = {kind: len(p.layers) for kind, p in profiles.items()}
    if len(set(counts.values())) > 1:
        raise PdvError(f"profiles disagree on the number of layers: {counts}")
    layout = check_plan(plan, next(iter(counts.values())), len(cluster.devices))
    n = len(plan.stages)
    costs = [
        stage_cost(
            profiles,
            cluster,
            st,
            plan.stages[i + 1] if i + 1 < n else None,
            mbs=plan.micro_batch_size,
            schedule=plan.schedule,
            stage_index=i,
            num_stages=n,
            num_micro=plan.num_micro_batches,
            prev_stage=plan.stages[i - 1] if i > 0 else None,
        )
        for i, st in enumerate(plan.stages)
    ]
    return layout, costs


@dataclass(frozen=True)
class TiedSync:
    """Per step: the all-reduces that sum one shared parameter set's copies over the stages
    that hold them."""

    stages: tuple[int, ...]
    seconds: float
    layers: tuple[int, ...] = ()
    """the layers that share the parameters"""
    ranks: tuple[int, ...] = ()
    """every rank holding a copy"""
    param_bytes: int = 0


def _tied_note(tie: TiedSync) -> str:
    return (f"layers {', '.join(map(str, tie.layers))} share {tie.param_bytes / 2**20:.1f} MiB "
            f"of parameters across stages {', '.join(map(str, tie.stages))}: their copies' "
            f"gradients are summed over ranks {list(tie.ranks)} every step, priced "
            f"{tie.seconds * 1e3:.3g} ms before those stages step")


def tied_syncs(plan: Plan, profiles: Mapping[str, ModelProfile],
               cluster: ClusterArtifact) -> tuple[TiedSync, ...]:
    """Each shared parameter set whose places the plan puts in more than one stage, priced as
    pdv.run.tied sums it: one all-reduce of each tensor's gradient over every holder's ranks."""
    return stage_tied_syncs(next(iter(profiles.values())),
                       [(st.layers[0], st.layers[1], st.ranks) for st in plan.stages],
                       cluster.links)


def stage_tied_syncs(profile: ModelProfile, stages: Sequence[tuple[int, int, Sequence[int]]],
                links: Links) -> tuple[TiedSync, ...]:
    """:func:`tied_syncs` of stages given as (first layer, end layer, ranks)."""
    stage_of = {i: s for s, (lo, hi, _) in enumerate(stages) for i in range(lo, hi)}
    out = []
    for group in profile.shared:
        held = tuple(sorted({stage_of[i] for i in group.layers}))
        if len(held) < 2 or group.param_bytes == 0:
            continue
        holders = sorted({r for s in held for r in stages[s][2]})
        per_tensor = group.param_bytes / group.tensors  # frozen ones are summed as zeros
        seconds = group.tensors * float(all_reduce_time(ring_of(links, holders), per_tensor))
        out.append(TiedSync(held, seconds, tuple(group.layers), tuple(holders),
                            group.param_bytes))
    return tuple(out)


def _extrapolated_note(plan: Plan, profiles: Mapping[str, ModelProfile]) -> str | None:
    """A note naming the stages whose replicas run fewer samples than any profiled size."""
    smallest = smallest_batch(profiles)
    shares = {i: plan.micro_batch_size // st.dp for i, st in enumerate(plan.stages)}
    low = [i for i, n in shares.items() if n < smallest]
    if not low:
        return None
    return (f"stage(s) {low} run {min(shares[i] for i in low)} sample(s) per replica, below "
            f"the smallest profiled micro-batch ({smallest}): their times extrapolate the "
            "profile's fit (profile with --micro-batch-sizes including it; pdv plan does not "
            "search such stages)")


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


@dataclass(frozen=True)
class Sharing:
    """Hosts whose ranks share cores: measured capacity per host, and each group's rank hosts."""

    capacity: Mapping[str, float]
    group_hosts: Sequence[Sequence[str]]
    host_ranks: Mapping[str, int] = field(default_factory=dict)
    """every host's ranks in the cluster: how many took part in the busy exchange probe"""

    def busy_share(self, active: Collection[int], receiver: int) -> float:
        """How far toward the exchange probe's busy condition (every rank of the host at work
        at once) the receiving group's hosts are while the `active` groups compute or
        exchange: the ranks at work beyond one pair's two, over the probe's; 0 where a host
        has no more than one pair (its probe had nobody else)."""
        share = 0.0
        for h in set(self.group_hosts[receiver]):
            n = self.host_ranks.get(h, 0)
            if n <= 2:
                continue
            busy = sum(hosts.count(h) for g, hosts in enumerate(self.group_hosts) if g in active)
            share = max(share, min(1.0, max(0, busy - 2) / (n - 2)))
        return share

    def rates(self, active: Sequence[int]) -> dict[int, float]:
        """Speed (fraction of alone) of each computing group, given who computes now."""
        load: dict[str, int] = {}
        for g in active:
            for h in self.group_hosts[g]:
                load[h] = load.get(h, 0) + 1
        return {
            g: min(
                (min(1.0, self.capacity[h] / load[h]) for h in self.group_hosts[g]
                 if h in self.capacity),
                default=1.0,
            )
            for g in active
        }

    def note(self) -> str:
        """What the simulation assumed, for Simulation.notes."""
        held = ", ".join(f"{h} {c:.2f}" for h, c in sorted(self.capacity.items()))
        return (f"ranks share their host's cores (processor sharing); measured capacity in "
                f"ranks at full speed: {held}. Not priced there: the CPU the backend's own "
                "threads and the pipeline's message handling take off the ops (gloo on CPU; "
                "docs/design-notes.md, \"Where a 4-rank pipeline's CPU goes\"), which makes "
                "such steps run longer than predicted")


def _arrival(sent: float | None, posted: float, dur: float) -> float | None:
    """When a transfer lands: it starts once sent and posted (rendezvous), None if unsent."""
    return None if sent is None else max(sent, posted) + dur


def _durations(cost: StageCost, split: bool) -> dict[str, float]:
    if split:
        return {"F": cost.fwd_s, "I": cost.bwd_s / 2, "W": cost.bwd_s / 2,
                "O": cost.optimizer_s}
    return {"F": cost.fwd_s, "B": cost.bwd_s, "O": cost.optimizer_s}


class _Run:
    """Mutable state of one simulation (local to simulate_costs; never escapes)."""

    def __init__(self, costs: Sequence[StageCost], layout: StageLayout, split: bool,
                 num_micro: int, trace: bool = True,
                 tied: Sequence[TiedSync] = ()) -> None:  # fmt: skip
        self.costs = costs
        self.tied = tied
        self.tied_end: list[float | None] = [None] * len(tied)
        self.durations = [_durations(c, split) for c in costs]
        self.send_s = [c.send_s for c in costs]
        self.grad_send_s = [c.grad_send_s for c in costs]
        # Where ranks share cores, a transfer's excess depends on the host's load when it
        # starts (_run_shared sets it and memoises each transfer's time; None: send_s).
        self.sharing: Sharing | None = None
        self.at_work: frozenset[int] = frozenset()
        self.took: dict[tuple[str, int, int], float] = {}
        self.layout = layout
        self.group_of_stage = layout.group_of_stage
        self.split = split
        self.num_micro = num_micro
        self.back = "I" if split else "B"
        self.last_bwd = "W" if split else "B"
        # Per stage, per micro-batch (None until it happens): lists, not dicts keyed by op,
        # because the search simulates steps of 10^5 ops and these are read once per op.
        n = len(costs)
        self.fwd_end: list[list[float | None]] = [[None] * num_micro for _ in range(n)]
        self.input_grad_end: list[list[float | None]] = [[None] * num_micro for _ in range(n)]
        # When the sender produced each stage's incoming activation / gradient (the transfer
        # itself waits for the receiver to post, see _arrival).
        self.act_sent: list[list[float | None]] = [[None] * num_micro for _ in range(n)]
        self.grad_sent: list[list[float | None]] = [[None] * num_micro for _ in range(n)]
        self.synced: list[float | None] = [None] * n
        # When each stage may step: its sync's end, then its shared copies' sums.
        self.stepping: list[float | None] = [None] * n
        self.free = [0.0] * layout.num_groups
        self.coll_free = [0.0] * layout.num_groups
        self.backwards_left = [num_micro] * len(costs)
        self.events: list[Event] = []
        self.trace = trace
        # What _finish needs from the events, kept as they are recorded (in the same order,
        # so the sums are the same to the last bit with or without the trace).
        self.step_end = float("-inf")
        self.span = float("-inf")
        self.busy = 0.0

    def record(self, name: str, lane: str, g: int, s: int, m: int | None, start: float,
               end: float) -> None:  # fmt: skip
        """One interval of the step: tallied, and kept as an Event when tracing."""
        if end > self.step_end:
            self.step_end = end
        if lane == "compute" and name != "opt":
            if end > self.span:
                self.span = end
            self.busy += end - start
        if self.trace:
            self.events.append(Event(name, lane, g, s, m, start, end))

    def ready(self, op: Op) -> float | None:
        """When op's inputs are all there, or None while a dependency has not run."""
        kind, s, m = op
        # Asked only of a group's next op, so free[g] is when the group posted the op's
        # receive: the end of its previous op.
        posted = self.free[self.group_of_stage[s]]
        if kind == "F":
            if s == 0:
                return 0.0
            dur = self.send_s[s - 1] if self.sharing is None else self._loaded("F", s, m)
            return _arrival(self.act_sent[s][m], posted, dur)
        if kind == "O":
            return self.stepping[s]
        if kind == "W":
            return self.input_grad_end[s][m]
        own = self.fwd_end[s][m]
        if own is None:
            return None
        if s == len(self.costs) - 1:
            return own
        dur = self.grad_send_s[s] if self.sharing is None else self._loaded("B", s, m)
        grad = _arrival(self.grad_sent[s][m], posted, dur)
        return None if grad is None else max(own, grad)

    def _loaded(self, kind: str, s: int, m: int) -> float:
        """The transfer stage s receives for micro-batch m (an activation for "F", a gradient
        otherwise): between its time with the host's other ranks idle and busy, by the load
        when it is first asked for, which _run_shared does at its start (both ends posted)."""
        key = (kind, s, m)
        took = self.took.get(key)
        if took is None:
            frm = s - 1 if kind == "F" else s + 1
            cost = self.costs[frm] if kind == "F" else self.costs[s]
            busy, quiet = ((cost.send_s, cost.send_quiet_s) if kind == "F"
                           else (cost.grad_send_s, cost.grad_send_quiet_s))
            g, h = self.group_of_stage[s], self.group_of_stage[frm]
            assert self.sharing is not None
            share = self.sharing.busy_share(self.at_work | {g, h}, g) if busy != quiet else 0.0
            took = self.took[key] = quiet + (busy - quiet) * share
        return took

    def duration(self, op: Op) -> float:
        """Seconds the op takes at its group's alone speed."""
        return self.durations[op[1]][op[0]]

    def complete(self, g: int, op: Op, start: float, end: float) -> None:
        """Record op on group g over [start, end) and start what its end releases."""
        kind, s, m = op
        posted = self.free[g]
        self.free[g] = end
        if kind == "O":
            if end > start:  # stages without a measured optimizer step leave no event
                self.record("opt", "compute", g, s, None, start, end)
            return
        if self.trace:
            self._record_transfer(op, posted)
        self.record(kind, "compute", g, s, m, start, end)
        if kind == "F":
            self.fwd_end[s][m] = end
            if s + 1 < len(self.costs):
                self.act_sent[s + 1][m] = end
            return
        if kind == "I":
            self.input_grad_end[s][m] = end
        if kind == self.back and s > 0:
            self.grad_sent[s - 1][m] = end
        if kind == self.last_bwd:
            self.backwards_left[s] -= 1
            if self.backwards_left[s] == 0:
                self._sync(g, s, end)

    def _sync(self, g: int, s: int, t0: float) -> None:
        # The stage's gradient sync follows its last backward on the group's collective lane.
        dur = self.costs[s].grad_sync_s
        if dur <= 0:
            self.synced[s] = t0
        else:
            start = max(t0, self.coll_free[g])
            self.coll_free[g] = start + dur
            self.synced[s] = start + dur
            self.record("sync", "collective", g, s, None, start, start + dur)
        self._sum_copies()

    def _sum_copies(self) -> None:
        # A rank sums its shared copies in order after its whole schedule: each sum starts
        # once every holder has synced and finished the sums before it that it takes part in.
        done: dict[int, float | None] = {}  # per stage, its sums' end so far; None: waiting
        for k, tie in enumerate(self.tied):
            synced = [self.synced[s] for s in tie.stages]
            before = [done.get(s, 0.0) for s in tie.stages]
            if any(t is None for t in synced + before):
                done.update(dict.fromkeys(tie.stages))
                continue
            end = self.tied_end[k]
            if end is None:
                start = max(t for t in synced + before if t is not None)
                end = self.tied_end[k] = start + tie.seconds
                for s in tie.stages:
                    g = self.group_of_stage[s]
                    self.coll_free[g] = max(self.coll_free[g], end)
                    self.record("tied-sync", "collective", g, s, None, start, end)
            done.update(dict.fromkeys(tie.stages, end))
        for s, synced_at in enumerate(self.synced):
            if self.stepping[s] is None and synced_at is not None:
                if s not in done:
                    self.stepping[s] = synced_at
                elif (end := done[s]) is not None:
                    self.stepping[s] = max(synced_at, end)

    def _record_transfer(self, op: Op, posted: float) -> None:
        # The transfer an op received, on its sender's p2p lane, from when both ends posted.
        # The same choice of message as ready(), which stays inline: the search runs it
        # for every op of every simulated step; this runs only when tracing.
        kind, s, m = op
        group_of = self.group_of_stage
        if kind == "F" and s > 0:
            sent, dur, name, frm = self.act_sent[s][m], self.send_s[s - 1], "send-act", s - 1
        elif kind == self.back and s < len(self.costs) - 1:
            sent, dur, name, frm = self.grad_sent[s][m], self.grad_send_s[s], "send-grad", s + 1
        else:
            return
        dur = self.took.get(("F" if name == "send-act" else "B", s, m), dur)
        if sent is None or dur <= 0:
            return
        start = max(sent, posted)
        self.record(name, "p2p", group_of[frm], frm, m, start, start + dur)


def simulate_costs(
    costs: Sequence[StageCost],
    layout: StageLayout,
    schedule: Schedule,
    num_micro: int,
    sharing: Sharing | None = None,
    trace: bool = True,
    tied: Sequence[TiedSync] = (),
) -> Simulation:
    """Run the event-driven simulation on priced stages (events kept when `trace`), with the
    per-step sums of shared parameters' copies `tied` (:func:`tied_syncs`)."""
    split = splits_backward(schedule)
    orders = rank_orders(layout, schedule, num_micro)
    # Each group ends its step with the optimizer step of each of its stages.
    steps = [order + [("O", s, -1) for s in layout.stages_of_group[g]]
             for g, order in enumerate(orders)]
    state = _Run(costs, layout, split, num_micro, trace, tied)
    if sharing is None:
        _run_alone(state, steps, layout, schedule, num_micro)
    else:
        _run_shared(state, steps, sharing, schedule, num_micro)
    sim = _finish(state, orders, schedule)
    if sharing is not None:
        sim = replace(sim, notes=(*sim.notes, sharing.note()))
    return sim


def _deadlock(schedule: str, num_micro: int, layout: StageLayout, steps: list[list[Op]],
              pos: list[int]) -> PdvError:  # fmt: skip
    stuck = {g: steps[g][pos[g]] for g in range(len(steps)) if pos[g] < len(steps[g])}
    return PdvError(
        f"{schedule} with {num_micro} micro-batches on {layout.num_groups} rank groups "
        f"deadlocks (waiting ops {stuck}); use more micro-batches or another schedule"
    )


def _run_alone(state: _Run, steps: list[list[Op]], layout: StageLayout, schedule: str,
               num_micro: int) -> None:  # fmt: skip
    # Each group runs its ops in a fixed order, and a group's sends are produced by its own ops
    # in that order, so times do not depend on which ready group is advanced first: advance any
    # group whose next op has all its inputs, and recheck its pipeline neighbours.
    n_stages = len(state.costs)
    pos = [0] * layout.num_groups
    remaining = sum(len(o) for o in steps)
    todo = list(range(layout.num_groups))
    queued = [True] * layout.num_groups
    # Bound once: this loop runs every op of the step (tens of thousands in a 1,000-micro-batch
    # step) and the search simulates several plans.
    ready, complete, free = state.ready, state.complete, state.free
    durations, group_of = state.durations, layout.group_of_stage
    # The groups an op of stage s may unblock: those holding its pipeline neighbours.
    # and, when its sync ends a sum of shared copies, those of the copies' other holders.
    partners = [{t for tie in state.tied if s in tie.stages for t in tie.stages}
                for s in range(n_stages)]  # fmt: skip
    woken = [tuple(dict.fromkeys(group_of[t] for t in sorted({s - 1, s + 1} | partners[s])
                                 if 0 <= t < n_stages and t != s))
             for s in range(n_stages)]  # fmt: skip
    while todo:
        g = todo.pop()
        queued[g] = False
        order = steps[g]
        i, n = pos[g], len(order)
        while i < n:
            op = order[i]
            r = ready(op)
            if r is None:
                break
            start = max(r, free[g])
            complete(g, op, start, start + durations[op[1]][op[0]])
            i += 1
            remaining -= 1
            for h in woken[op[1]]:
                if h != g and not queued[h]:
                    queued[h] = True
                    todo.append(h)
        pos[g] = i
    if remaining:
        raise _deadlock(schedule, num_micro, layout, steps, pos)


def _run_shared(state: _Run, steps: list[list[Op]], sharing: Sharing, schedule: str,
                num_micro: int) -> None:  # fmt: skip
    """Advance time event by event; computing groups progress at their shared-core rates."""
    groups = len(steps)
    pos = [0] * groups
    running: dict[int, tuple[Op, float, float]] = {}  # group -> (op, start, work left)
    now = 0.0
    state.sharing = sharing
    while any(pos[g] < len(steps[g]) for g in range(groups)):
        # A transfer asked for now starts now: its load is who computes at this instant.
        state.at_work = frozenset(running)
        wake = float("inf")
        for g in range(groups):
            if g in running or pos[g] >= len(steps[g]):
                continue
            op = steps[g][pos[g]]
            r = state.ready(op)
            if r is None:
                continue
            r = max(r, state.free[g])
            if r <= now:
                running[g] = (op, now, state.duration(op))
            else:
                wake = min(wake, r)
        if not running:
            if wake == float("inf"):
                raise _deadlock(schedule, num_micro, state.layout, steps, pos)
            now = wake
            continue
        rate = sharing.rates(sorted(running))
        until = min(wake, min(now + left / rate[g] for g, (_, _, left) in running.items()))
        for g, (op, start, left) in sorted(running.items()):
            left -= rate[g] * (until - now)
            if left <= 1e-12 * max(1.0, until):
                state.complete(g, op, start, until)
                del running[g]
                pos[g] += 1
            else:
                running[g] = (op, start, left)
        now = until


def _finish(state: _Run, orders: list[list[Op]], schedule: str) -> Simulation:
    costs, layout = state.costs, state.layout
    step_end = state.step_end
    # The bubble is the schedule's: fwd/bwd ops only, before the optimizer steps.
    span, busy = state.span, state.busy
    bubble = 1.0 - busy / (layout.num_groups * span) if span > 0 else 0.0
    peak = _peak_memory(costs, layout, orders, state.split)
    num_micro = state.num_micro
    stages = tuple(
        StagePrediction(
            compute_s=num_micro * (c.fwd_s + c.bwd_s - c.tp_comm_s) + c.optimizer_s,
            p2p_s=num_micro * (c.send_s + c.grad_send_s),
            collective_s=num_micro * c.tp_comm_s + c.grad_sync_s
            + sum(t.seconds for t in state.tied if s in t.stages),
            peak_memory_bytes=int(max(peak[r] for r in c.peak_memory_bytes)),
        )
        for s, c in enumerate(costs)
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
        ranks = list(costs[stages[0]].static_bytes.keys())
        # One vector over the group's ranks per stage; the sum runs in the same order as a
        # per-rank sum would, so the bytes are the same to the last bit, ranks x faster.
        act = {t: np.array([float(costs[t].activation_bytes[r]) for r in ranks]) for t in stages}
        if len(stages) == 1:
            # One stage: the held bytes grow with its live count alone, so the peak is at the
            # most live micro-batches (0 + n·act, as the general walk would sum it).
            n = most_live = 0
            for kind, _s, _m in order:
                n += (kind == "F") - (kind == freed_by)
                most_live = max(most_live, n)
            most = np.zeros(len(ranks)) + most_live * act[stages[0]]
        else:
            most = _most_held(order, stages, act, freed_by, len(ranks))
        for i, r in enumerate(ranks):
            # Each stage's static bytes include the rank's own overhead (its runtime), which
            # a rank holding several stages (interleaved) has once, not once per stage.
            static = sum(costs[t].static_bytes[r] for t in stages)
            if len(stages) > 1:
                over = [costs[t].overhead_bytes.get(r, 0.0) for t in stages]
                static += max(over) - sum(over)
            transient = max(costs[t].transient_bytes[r] for t in stages)
            peak[r] = static + float(most[i]) + transient
    return dict(sorted(peak.items()))


def _most_held(order: list[Op], stages: Sequence[int], act: dict[int, np.ndarray],
               freed_by: str, n_ranks: int) -> np.ndarray:  # fmt: skip
    """Per rank, the most activation bytes a group of several stages holds along its order."""
    column = {t: i for i, t in enumerate(stages)}
    sign = {"F": 1.0, freed_by: -1.0}
    n = len(order)
    delta = np.zeros((n, len(stages)))
    step = np.fromiter((sign.get(kind, 0.0) for kind, _s, _m in order), dtype=float, count=n)
    delta[np.arange(n), np.fromiter((column[s] for _k, s, _m in order), dtype=np.intp,
                                    count=n)] = step
    forward = step > 0
    # Live micro-batches per stage after each forward (the only ops that add bytes); the held
    # bytes are summed stage by stage in the group's order, as a walk op by op would sum them.
    live = np.cumsum(delta, axis=0)[forward]
    held = np.zeros((len(live), n_ranks))
    for t in stages:
        held = held + live[:, column[t], None] * act[t]
    return held.max(axis=0, initial=0.0)


def to_predicted(sim: Simulation) -> Predicted:
    """The plan's `predicted` block from a simulation."""
    return Predicted(
        step_time_s=sim.step_time_s,
        peak_memory_bytes={str(r): int(b) for r, b in sim.peak_memory_bytes.items()},
        bubble_fraction=sim.bubble_fraction,
        stages=list(sim.stages),
    )
