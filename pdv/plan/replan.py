"""Replanning for a changed cluster: a rank gone, slowed or added, a link degraded (no torch).

A thin layer on the planner's public entry (pdv.plan.search.search): the same problem as the
old plan's (global batch, so the data order is unchanged; schedule; what the search was allowed
to try) on the new cluster, plus what a person deciding to switch needs to see:

- what changed, device by device (pdv.plan.replan.describe_change), given which new rank is
  which old one (`match_devices`: by host and position on the host, or an explicit list);
- the old plan's predicted step time, the old plan's on the new cluster where all of its ranks
  remain (the same simulator), and the new plan's;
- the cost of the switch (`switch_cost`): the model and optimizer state each new rank must hold
  that its device did not hold before, where it can come from, and the time to move it on the
  new cluster's measured links.

When the search finds nothing predicted faster than the old plan on the new cluster (and the old
plan still fits), the old plan is kept: an equally fast layout with its replicas in another
order would move state for nothing.

Shards are modelled as fractions of each layer's state along two axes: the TP shard (1/tp of the
layer, by shard index) and, inside it, the FSDP shard (1/dp, by replica; a stage with any FSDP
layer shards all of its layers, as the runtime does). Two holdings overlap by the product of
their overlaps on the two axes: exact when both plans shard a layer the same way, and an
overestimate of what moves when one shards by TP and the other by FSDP along the same tensor
dimension (the overlap there is not counted). Grads are not state at a step boundary; a layer's
state is its profile's ``param_bytes + optimizer_bytes``. The time is an estimate: each
transfer costs α + S/β on its link (pdv.cost.comm.p2p_time), a rank's sends and its receives
each run one after another, and ranks run concurrently, so the switch takes the longest of any
rank's send and receive totals.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from pdv.artifacts import ClusterArtifact, ClusterDevice, Links, ModelProfile, Plan, digest
from pdv.cost.comm import p2p_time
from pdv.cost.simulate import simulate, to_predicted
from pdv.errors import PdvError
from pdv.plan.problem import PlanProblem
from pdv.plan.search import check_plan_dtype, check_profiles, plan_provenance, search
from pdv.sample_models import sample_spec

__all__ = [
    "ReplanResult",
    "SwitchCost",
    "describe_change",
    "match_devices",
    "remap_plan",
    "replan",
    "switch_cost",
]

SPEED_CHANGE = 0.1
"""a device's matmul rate that moved by more than this fraction is reported as changed"""
LINK_CHANGE = 0.25
"""a link whose 1 MiB transfer time moved by more than this fraction is reported as changed"""
_PROBE_BYTES = 2**20

Interval = tuple[Fraction, Fraction]


@dataclass(frozen=True)
class SwitchCost:
    """State the new plan's ranks need that their devices did not hold, and moving it."""

    held_bytes: int
    """state the new plan's ranks hold, all together"""
    moved_bytes: int
    """of that, what their devices did not hold under the old plan"""
    checkpoint_only_bytes: int
    """of the moved, what no surviving device held (only the checkpoint has it)"""
    estimate_s: float
    """time to move the rest between devices on the new cluster's links (see module doc)"""
    transfers: tuple[tuple[int, int, int], ...]
    """(source new rank, destination new rank, bytes), sorted"""


@dataclass(frozen=True)
class ReplanResult:
    """The new plan and what the switch to it means."""

    plan: Plan
    old_predicted_s: float | None
    """the old plan's prediction, on the cluster it was made for"""
    old_on_new_s: float | None
    """the old plan simulated on the new cluster (None when some of its ranks are gone)"""
    cost: SwitchCost
    changes: list[str]
    mapping: dict[int, int]
    """old rank -> new rank of the same device"""


# --------------------------------------------------------------------------- devices


def match_devices(old: Sequence[ClusterDevice], new: Sequence[ClusterDevice],
                  kept: Sequence[int] | None = None) -> dict[int, int]:
    """Old rank -> new rank of the same device.

    `kept` names, for new ranks 0, 1, ..., the old rank each one is (the new ranks after them
    are added devices). Without it, devices match by host and position on the host: the k-th
    rank of host h before is the k-th rank of host h now (when a host lost a rank, its last
    ranks count as the gone ones).
    """
    if kept is not None:
        if len(set(kept)) != len(kept):
            raise PdvError(f"--kept lists an old rank twice: {list(kept)}")
        if len(kept) > len(new):
            raise PdvError(f"--kept names {len(kept)} old ranks but the new cluster has "
                           f"{len(new)}")
        bad = [r for r in kept if r < 0 or (old and r >= len(old))]
        if bad:
            raise PdvError(f"--kept: old rank(s) {bad} are not in the plan's {len(old)} ranks")
        return {old_rank: new_rank for new_rank, old_rank in enumerate(kept)}
    by_host: dict[str, list[int]] = defaultdict(list)
    for d in sorted(new, key=lambda d: d.rank):
        by_host[d.host].append(d.rank)
    mapping: dict[int, int] = {}
    seen: dict[str, int] = defaultdict(int)
    for d in sorted(old, key=lambda d: d.rank):
        slots = by_host.get(d.host, [])
        k = seen[d.host]
        seen[d.host] += 1
        if k < len(slots):
            mapping[d.rank] = slots[k]
    return mapping


def _speed(d: ClusterDevice) -> float | None:
    return d.matmul_flops_alone or d.matmul_flops


def describe_change(old: Sequence[ClusterDevice], new: ClusterArtifact,
                    mapping: Mapping[int, int], old_links: Links | None = None) -> list[str]:
    """One line per change: ranks gone and added, devices slower or faster, links changed
    (those only when the old cluster's links are known)."""
    lines = []
    kept = set(mapping.values())
    for d in old:
        if d.rank not in mapping:
            lines.append(f"rank {d.rank} ({d.host}, {d.kind}) is gone")
    for d in new.devices:
        if d.rank not in kept:
            lines.append(f"rank {d.rank} ({d.host}, {d.kind}) is new")
    by_rank = {d.rank: d for d in old}
    for o, n in sorted(mapping.items()):
        if o not in by_rank:
            continue  # the old plan lists no devices: nothing to compare
        before, after = _speed(by_rank[o]), _speed(new.devices[n])
        if before and after and abs(after / before - 1) > SPEED_CHANGE:
            word = "slower" if after < before else "faster"
            lines.append(f"rank {o} (now {n}) computes {after / before:.2f}x as fast ({word}): "
                         f"{before / 1e9:.1f} -> {after / 1e9:.1f} GFLOP/s")
        if by_rank[o].memory_bytes != new.devices[n].memory_bytes:
            lines.append(f"rank {o} (now {n}) has {new.devices[n].memory_bytes:,} bytes of "
                         f"memory, was {by_rank[o].memory_bytes:,}")
    if old_links is not None:
        for a, na in sorted(mapping.items()):
            for b, nb in sorted(mapping.items()):
                if a == b:
                    continue
                before = p2p_time(old_links, a, b, _PROBE_BYTES)
                after = p2p_time(new.links, na, nb, _PROBE_BYTES)
                if before > 0 and abs(after / before - 1) > LINK_CHANGE:
                    word = "slower" if after > before else "faster"
                    lines.append(f"link {a}->{b} (now {na}->{nb}) moves 1 MiB in "
                                 f"{after * 1e3:.2f} ms, was {before * 1e3:.2f} ms ({word})")
    return lines or ["no change in devices" + ("" if old_links is not None else
                                                " (pass the old cluster to compare links)")]


def remap_plan(plan: Plan, mapping: Mapping[int, int], cluster: ClusterArtifact) -> Plan | None:
    """The plan on the new cluster's rank numbers, or None when one of its ranks is gone."""
    used = {r for s in plan.stages for r in s.ranks}
    if not used <= set(mapping):
        return None
    data = plan.model_dump(mode="json", by_alias=True)
    for stage in data["stages"]:
        stage["ranks"] = [mapping[r] for r in stage["ranks"]]
    data["devices"] = [d.model_dump(mode="json") for d in cluster.devices]
    data["predicted"] = None
    return Plan.model_validate(data)


# --------------------------------------------------------------------------- switch cost


def _overlap(a: Interval, b: Interval) -> Fraction:
    return max(Fraction(0), min(a[1], b[1]) - max(a[0], b[0]))


def _holdings(plan: Plan, layer: int) -> list[tuple[int, Interval, Interval]]:
    """(rank, TP interval, FSDP interval) of every rank holding state of the layer."""
    out = []
    whole = (Fraction(0), Fraction(1))
    for stage in plan.stages:
        lo, hi = stage.layers
        if not lo <= layer < hi:
            continue
        choices = stage.layer_choices()
        choice = choices[layer - lo]
        sharded = stage.dp > 1 and any(c.fsdp for c in choices)
        for k, rank in enumerate(stage.ranks):
            replica, shard = divmod(k, stage.tp)
            tp = (Fraction(shard, choice.tp), Fraction(shard + 1, choice.tp)) \
                if choice.tp > 1 else whole
            fs = (Fraction(replica, stage.dp), Fraction(replica + 1, stage.dp)) \
                if sharded else whole
            out.append((rank, tp, fs))
    return out


def _cells(regions: list[tuple[Interval, Interval]]) -> list[tuple[Interval, Interval]]:
    """The grid cells the regions' edges cut [0, 1)^2 into."""
    cuts = [sorted({Fraction(0), Fraction(1)} | {x for r in regions for x in r[axis]})
            for axis in (0, 1)]
    return [((a0, a1), (b0, b1)) for a0, a1 in zip(cuts[0], cuts[0][1:], strict=False)
            for b0, b1 in zip(cuts[1], cuts[1][1:], strict=False)]


def _inside(cell: tuple[Interval, Interval], tp: Interval, fs: Interval) -> bool:
    return tp[0] <= cell[0][0] and cell[0][1] <= tp[1] and fs[0] <= cell[1][0] \
        and cell[1][1] <= fs[1]


def switch_cost(old: Plan, new: Plan, profile: ModelProfile, links: Links,
                mapping: Mapping[int, int]) -> SwitchCost:
    """What moving from `old` to `new` costs (old ranks map to new ones by `mapping`)."""
    back = {n: o for o, n in mapping.items()}
    sent: dict[tuple[int, int], Fraction] = defaultdict(Fraction)
    held = moved = ckpt_only = Fraction(0)
    for layer, lp in enumerate(profile.layers):
        size = lp.param_bytes + lp.optimizer_bytes
        before = _holdings(old, layer)
        for rank, tp, fs in _holdings(new, layer):
            held += size * (tp[1] - tp[0]) * (fs[1] - fs[0])
            mine = [(t, f) for r, t, f in before if r == back.get(rank, -1)]
            cells = _cells([(tp, fs)] + [(t, f) for _, t, f in before])
            for cell in cells:
                if not _inside(cell, tp, fs) or any(_inside(cell, t, f) for t, f in mine):
                    continue
                part = size * (cell[0][1] - cell[0][0]) * (cell[1][1] - cell[1][0])
                moved += part
                sources = sorted(
                    (p2p_time(links, mapping[r], rank, float(part)), mapping[r])
                    for r, t, f in before if r in mapping and _inside(cell, t, f)
                )
                if sources:
                    sent[(sources[0][1], rank)] += part
                else:
                    ckpt_only += part
    transfers = tuple(sorted((s, d, round(b)) for (s, d), b in sent.items()))
    busy: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for s, d, b in transfers:
        t = p2p_time(links, s, d, b)
        busy[s][0] += t
        busy[d][1] += t
    return SwitchCost(
        held_bytes=round(held), moved_bytes=round(moved), checkpoint_only_bytes=round(ckpt_only),
        estimate_s=max((max(v) for v in busy.values()), default=0.0), transfers=transfers,
    )


# --------------------------------------------------------------------------- replan


def _spec(spec: str) -> str:
    """A model spec with sample names and their old paths made one (gpt_tiny)."""
    return sample_spec(spec) or spec


def _searched_without(plan: Plan, flag: str) -> bool:
    return any(flag in note for note in plan.provenance.notes if note.startswith("searched with"))


def replan(plan: Plan, profiles: Mapping[str, ModelProfile], cluster: ClusterArtifact,
           mapping: Mapping[int, int], *, memory_margin: float = 0.1, time_limit_s: float = 10.0,
           old_links: Links | None = None, progress: Callable[[str], None] | None = None,
           ) -> ReplanResult:
    """Plan the old plan's training on the new cluster and price the switch."""
    check_profiles(profiles, cluster, None, None)
    check_plan_dtype(plan, profiles)  # the new plan trains in the profiles' dtype
    profile = next(iter(sorted(profiles.items())))[1]
    if plan.model is not None and (_spec(plan.model.spec), plan.model.kwargs) != (
            _spec(profile.model.spec), profile.model.kwargs):
        raise PdvError(f"the plan trains {plan.model.spec} {plan.model.kwargs} but the profiles "
                       f"are of {profile.model.spec} {profile.model.kwargs}; pass its profiles")
    if plan.stages[-1].layers[1] != len(profile.layers):
        raise PdvError(f"the plan covers {plan.stages[-1].layers[1]} layers but the profile has "
                       f"{len(profile.layers)}; pass the profiles the plan was made from")
    no_fsdp, no_rc = _searched_without(plan, "--no-fsdp"), _searched_without(plan, "--no-recompute")
    problem = PlanProblem(
        profiles=profiles, cluster=cluster, global_batch=plan.global_batch_size,
        memory_margin=memory_margin,
        schedule="GPipe" if plan.schedule.lower() == "gpipe" else "1F1B",
        time_limit_s=time_limit_s, allow_fsdp=not no_fsdp, allow_recompute=not no_rc,
    )
    changes = describe_change(plan.devices or [], cluster, mapping, old_links)
    provenance = plan_provenance(profiles, cluster)
    notes = [*provenance.notes, f"replanned from plan {digest(plan)}: " + "; ".join(changes)]
    notes += [f"searched with {flag}" for flag, off in (("--no-fsdp", no_fsdp),
                                                          ("--no-recompute", no_rc)) if off]
    provenance = provenance.model_copy(
        update={"inputs": {**provenance.inputs, "previous-plan": digest(plan)}, "notes": notes})
    try:
        new = search(problem, "pdv", 1, progress, provenance).plans[0]
    except PdvError as exc:
        raise PdvError(f"no plan on the new cluster's {len(cluster.devices)} ranks: {exc}") \
            from None
    old_sim = None
    moved_plan = remap_plan(plan, mapping, cluster)
    if moved_plan is not None:
        with contextlib.suppress(PdvError):  # its stages no longer run there
            old_sim = simulate(moved_plan, profiles, cluster)
    old_on_new = old_sim.step_time_s if old_sim is not None else None
    assert new.predicted is not None
    if moved_plan is not None and old_sim is not None and old_sim.step_time_s <= (
            new.predicted.step_time_s) and all(
            b <= cluster.devices[r].memory_bytes * (1 - memory_margin)
            for r, b in old_sim.peak_memory_bytes.items()):
        # Nothing faster than what runs now: keep it, and move nothing.
        new = moved_plan.model_copy(update={
            "predicted": to_predicted(old_sim),
            "provenance": provenance.model_copy(update={"notes": [
                *provenance.notes, "kept the old plan: the search found none faster on the "
                "new cluster"]}),
        })
    cost = switch_cost(plan, new, profile, cluster.links, mapping)
    return ReplanResult(
        plan=new, old_predicted_s=plan.predicted.step_time_s if plan.predicted else None,
        old_on_new_s=old_on_new, cost=cost, changes=changes, mapping=dict(mapping),
    )
