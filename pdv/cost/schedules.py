"""Pipeline schedules as per-rank-group op orders, following torch.distributed.pipelining.

A plan's stages are the pipeline's (virtual) stages. A schedule with several stages per rank
(Interleaved1F1B, LoopedBFS, InterleavedZeroBubble) is written as a plan whose stage i runs on
the same ranks as stage i mod p, p being the number of distinct rank groups: torch's
``stage_index = local_index · pp_group_size + rank`` placement. ZBVZeroBubble takes torch's "v"
placement instead: 2p stages, stage i on group i and stage 2p − 1 − i on group i. GPipe and 1F1B
need one stage per rank group.

An op is ``(kind, stage, micro)`` with kind ``F`` (forward), ``B`` (full backward), ``I``
(backward for inputs) or ``W`` (backward for weights). The orders reproduce torch 2.x's
``_calculate_single_rank_operations`` / ``_step_microbatches`` (their idle slots dropped: the
simulator waits on dependencies instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from pdv.artifacts import SCHEDULES, Schedule
from pdv.errors import PdvError

__all__ = [
    "Op",
    "StageLayout",
    "in_flight",
    "max_stages",
    "stage_layout",
    "rank_orders",
    "warmup_forwards",
    "check_rounds",
    "splits_backward",
]

Op = tuple[str, int, int]

# Schedule -> (several stages per rank allowed, backward split into I and W).
_TRAITS: dict[Schedule, tuple[bool, bool]] = {
    "GPipe": (False, False),
    "1F1B": (False, False),
    "Interleaved1F1B": (True, False),
    "LoopedBFS": (True, False),
    "InterleavedZeroBubble": (True, True),
    "ZBVZeroBubble": (True, True),
}
assert set(_TRAITS) == set(SCHEDULES), "every schedule a plan may name is simulated"


def splits_backward(schedule: Schedule) -> bool:
    """True when the schedule runs backward as separate input-grad and weight-grad ops."""
    return _TRAITS[schedule][1]


def in_flight(schedule: Schedule, stages_to_end: int, num_micro: int) -> int:
    """Micro-batches whose activations a stage holds at its peak, for memory budgets.

    GPipe (and LoopedBFS, its looped form) runs all forwards before any backward: every
    micro-batch is in flight. 1F1B (Narayanan et al., 2021, §2.2) caps the stage with
    ``stages_to_end`` stages from it to the last (itself included) at that many; the interleaved
    and zero-bubble schedules are charged the same here (the simulator counts every schedule
    exactly from its op order).
    """
    if schedule in ("GPipe", "LoopedBFS"):
        return num_micro
    return max(1, min(num_micro, stages_to_end))


def max_stages(schedule: Schedule, num_micro: int, limit: int) -> int:
    """Most pipeline stages a schedule can run with num_micro micro-batches (at most `limit`).

    torch.distributed.pipelining's 1F1B refuses fewer micro-batches than stages; GPipe does not.
    """
    return min(limit, num_micro) if schedule == "1F1B" else limit


@dataclass(frozen=True)
class StageLayout:
    """Which rank group runs each stage, and the stages of each group in local order."""

    group_of_stage: tuple[int, ...]
    stages_of_group: tuple[tuple[int, ...], ...]
    group_ranks: tuple[tuple[int, ...], ...]

    @property
    def num_groups(self) -> int:
        """Pipeline ranks (rank groups) p."""
        return len(self.stages_of_group)

    @property
    def local_stages(self) -> int:
        """Stages per rank group v."""
        return len(self.stages_of_group[0])


def stage_layout(stage_ranks: Sequence[Sequence[int]], schedule: Schedule) -> StageLayout:
    """Map stages to rank groups; a PdvError when the placement does not fit the schedule."""
    multi = _TRAITS[schedule][0]
    groups: list[frozenset[int]] = []
    group_of: list[int] = []
    for i, ranks in enumerate(stage_ranks):
        key = frozenset(ranks)
        if key in groups:
            group_of.append(groups.index(key))
            continue
        for g, other in enumerate(groups):
            if key & other:
                raise PdvError(
                    f"stage {i} ranks {sorted(key)} overlap stage group {g} ranks {sorted(other)} "
                    f"without being the same ranks; a rank belongs to one pipeline rank group"
                )
        groups.append(key)
        group_of.append(len(groups) - 1)
    p, s = len(groups), len(stage_ranks)
    if not multi and p != s:
        raise PdvError(
            f"{schedule} runs one stage per rank group, but {s} stages share {p} groups; "
            f"give each stage its own ranks or use Interleaved1F1B"
        )
    if schedule == "ZBVZeroBubble":
        want = [i if i < p else 2 * p - 1 - i for i in range(2 * p)]
        if group_of != want:
            raise PdvError(
                f"ZBVZeroBubble runs 2 stages per rank group in a V: stage i and stage 2p − 1 − i "
                f"on group i (p = {p}); the plan's stages run on groups {group_of}, "
                f"expected {want}"
            )
    elif multi:
        want = [i % p for i in range(s)]
        if s % p or group_of != want:
            raise PdvError(
                f"{schedule} places stage i on the ranks of stage i mod p (p = {p} rank groups); "
                f"the plan's stages run on groups {group_of}, expected {want}"
            )
    by_group = tuple(tuple(i for i in range(s) if group_of[i] == g) for g in range(p))
    group_ranks = tuple(tuple(stage_ranks[by_group[g][0]]) for g in range(p))
    return StageLayout(tuple(group_of), by_group, group_ranks)


def _gpipe(stage: int, m: int) -> list[Op]:
    # ScheduleGPipe: every forward, then every backward, micro-batches in order.
    return [("F", stage, i) for i in range(m)] + [("B", stage, i) for i in range(m)]


def _one_f_one_b(stage: int, num_stages: int, m: int) -> list[Op]:
    # Schedule1F1B (Narayanan et al. 2021, §2.2): stage s warms up with min(M, p − s) forwards,
    # then alternates one backward and one forward, then drains the backwards.
    warm = min(m, num_stages - stage)
    ops: list[Op] = [("F", stage, i) for i in range(warm)]
    for i in range(m):
        ops.append(("B", stage, i))
        if warm + i < m:
            ops.append(("F", stage, warm + i))
    return ops


def check_rounds(layout: StageLayout, schedule: Schedule, num_micro: int) -> None:
    """PdvError unless an interleaved schedule can split the micro-batches into its rounds."""
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        _rounds(num_micro, layout.num_groups, schedule)


def _rounds(m: int, p: int, schedule: str) -> int:
    rounds = max(1, m // p)
    if m % rounds:
        raise PdvError(
            f"{schedule} needs num_micro_batches ({m}) to be a multiple of its rounds "
            f"max(1, M // p) = {rounds} (p = {p} rank groups), as torch requires"
        )
    return m // rounds


# A search prices a form's memory from its orders and then simulates it: the same orders twice.
@lru_cache(maxsize=256)
def _interleaved(rank: int, p: int, v: int, m: int, zero_bubble: bool,
                 name: str) -> tuple[Op, ...]:
    # ScheduleInterleaved1F1B / ScheduleInterleavedZeroBubble (torch's _get_warmup_ops and
    # _get_1f1b_rank_ops): forwards walk the local stages round by round, backwards walk them in
    # reverse; zero bubble warms up with one op fewer per hop and defers each W by `rank` steps.
    per_round = _rounds(m, p, name)
    factor = 1 if zero_bubble else 2
    warm = min((v - 1) * per_round + factor * (p - 1 - rank), m * v)
    total = m * v
    lap = per_round * v

    # The n-th forward (backward) of the step goes to local stage (n // per_round) % v (walked
    # in reverse for backwards), as its ((n // lap) · per_round + n % per_round)-th micro-batch.
    def fwd(n: int) -> Op:
        return ("F", ((n // per_round) % v) * p + rank, (n // lap) * per_round + n % per_round)

    def bwd(kind: str, n: int) -> Op:
        return (kind, (v - 1 - (n // per_round) % v) * p + rank,
                (n // lap) * per_round + n % per_round)

    back = "I" if zero_bubble else "B"
    ops: list[Op] = [fwd(n) for n in range(warm)]
    weights_done = 0
    for step in range(warm, total + warm):  # steady 1F1B, then `warm` cool-down steps
        if step < total:
            ops.append(fwd(step))
        ops.append(bwd(back, step - warm))
        if zero_bubble and step - warm >= rank:
            ops.append(bwd("W", weights_done))
            weights_done += 1
    while zero_bubble and weights_done < total:
        ops.append(bwd("W", weights_done))
        weights_done += 1
    return tuple(ops)


def _looped_bfs(rank: int, p: int, v: int, m: int) -> list[Op]:
    # ScheduleLoopedBFS (Lamy-Poirier 2023): all forwards of each local stage in turn, then the
    # backwards of the local stages in reverse, micro-batches in reverse.
    local = [rank + k * p for k in range(v)]
    ops: list[Op] = [("F", s, i) for s in local for i in range(m)]
    ops += [("B", s, i) for s in reversed(local) for i in reversed(range(m))]
    return ops


def _zbv(rank: int, p: int, m: int) -> list[Op]:
    # ScheduleZBVZeroBubble (Qi et al. 2024, §6, ZB-V): chunk 0 is stage `rank` on the way down,
    # chunk 1 stage 2p − 1 − rank on the way back; warm-up fills the V, the steady state runs
    # F I W on each chunk in turn, the cool-down drains inputs grads then weight grads. torch pads
    # to 2p − 1 micro-batches and drops the padding afterwards; so does this.
    n = max(2 * p - 1, m)
    c0, c1 = rank, 2 * p - 1 - rank
    ops: list[Op] = []
    f0 = f1 = b0 = b1 = 0
    for _ in range(2 * (p - rank) - 1):
        ops.append(("F", c0, f0))
        f0 += 1
    for _ in range(rank):
        ops += [("F", c1, f1), ("F", c0, f0)]
        f1, f0 = f1 + 1, f0 + 1
    for _ in range(p - rank):
        ops += [("F", c1, f1), ("I", c1, b1), ("W", c1, b1)]
        f1, b1 = f1 + 1, b1 + 1
    while f1 < f0 or f0 < n:
        if f0 < n:
            ops.append(("F", c0, f0))
            f0 += 1
        ops += [("I", c0, b0), ("W", c0, b0), ("F", c1, f1), ("I", c1, b1), ("W", c1, b1)]
        b0, f1, b1 = b0 + 1, f1 + 1, b1 + 1
    w0, w1 = b0, b1
    for _ in range(rank):
        ops += [("I", c0, b0), ("I", c1, b1)]
        b0, b1 = b0 + 1, b1 + 1
    for _ in range(p - rank):
        ops += [("I", c0, b0), ("W", c0, w0)]
        b0, w0 = b0 + 1, w0 + 1
    ops += [("W", c1, i) for i in range(w1, b1)]
    ops += [("W", c0, i) for i in range(w0, b0)]
    return [op for op in ops if op[2] < m]


def rank_orders(layout: StageLayout, schedule: Schedule, num_micro: int) -> list[list[Op]]:
    """The op order of each rank group for one training step."""
    p, v, m = layout.num_groups, layout.local_stages, num_micro
    if schedule == "GPipe":
        return [_gpipe(layout.stages_of_group[g][0], m) for g in range(p)]
    if schedule == "1F1B":
        return [_one_f_one_b(layout.stages_of_group[g][0], p, m) for g in range(p)]
    if schedule == "LoopedBFS":
        return [_looped_bfs(g, p, v, m) for g in range(p)]
    if schedule == "ZBVZeroBubble":
        return [_zbv(g, p, m) for g in range(p)]
    zero_bubble = schedule == "InterleavedZeroBubble"
    return [list(_interleaved(g, p, v, m, zero_bubble, schedule)) for g in range(p)]


def warmup_forwards(layout: StageLayout, schedule: Schedule, num_micro: int) -> list[int]:
    """Per rank group, how many ops its order runs before its first backward.

    The search's step floor needs only this count; building the whole order of a step with
    thousands of micro-batches costs more than the rest of the bound."""
    p, m = layout.num_groups, num_micro
    if schedule == "GPipe":
        return [m] * p
    if schedule == "1F1B":
        return [min(m, p - layout.stages_of_group[g][0]) for g in range(p)]
    return [next(k for k, op in enumerate(order) if op[0] in ("B", "I"))
            for order in rank_orders(layout, schedule, num_micro)]  # fmt: skip
