"""Interleaved pipelines: each rank group holds v model chunks (Narayanan et al., 2021, §2.2).

torch's Interleaved1F1B places stage i on the ranks of stage i mod p (p rank groups, v stages
each); the fill and drain shrink by v, at the price of v times the point-to-point messages. A
found pipeline of p stages on p rank groups is turned into its interleaved form by re-cutting
the layers into p·v chunks: chunk c runs on group c mod p with that group's choice (TP degree,
FSDP, recompute). The cut minimizes the slowest chunk (each chunk priced on its own group by
pdv.cost.terms, the simulator's pricing), then the slowest group's total over its chunks. An
interleaved group holds more micro-batches in flight than its plain stage did: where the
simulated peak of a group is over its budget, the group recomputes (:func:`recomputing`) and
the layers are cut again. The simulator then decides whether an interleaved plan beats the
plain one -- more messages, a wrap-around transfer from the last group to the first, and
recomputation can each lose what the smaller bubble wins.

Only pipelines torch can interleave are offered: every stage of the same width and TP degree,
and ranks increasing along every chain (:func:`torch_places`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

import numpy as np

from pdv.plan.objective import stage_table
from pdv.plan.problem import Candidate, PlanProblem, StageSpec

__all__ = ["balanced_cuts", "group_balanced_cuts", "interleaved", "recomputing", "torch_places"]


def balanced_cuts(costs: list[np.ndarray], chunks: int) -> list[int] | None:
    """Layer boundaries of `chunks` contiguous chunks, chunk c priced by costs[c % p].

    costs[g][x, y] is the time of layers [x, y) on group g (inf where empty). Minimizes the
    largest chunk time exactly (a DP over chunk count and end layer); None if the layers are
    fewer than the chunks.
    """
    n = costs[0].shape[0] - 1
    if chunks > n:
        return None
    p = len(costs)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    arg = np.zeros((chunks, n + 1), dtype=int)
    for c in range(chunks):
        # worst[x, y]: the largest chunk so far if chunk c is layers [x, y).
        worst = np.maximum(best[:, None], costs[c % p])
        arg[c] = np.argmin(worst, axis=0)
        best = worst[arg[c], np.arange(n + 1)]
    if not np.isfinite(best[n]):
        return None
    cuts = [n]
    for c in range(chunks - 1, -1, -1):
        cuts.append(int(arg[c][cuts[-1]]))
    return cuts[::-1]


def _loads(costs: list[np.ndarray], cuts: list[int]) -> tuple[float, float]:
    """(slowest group's total over its chunks, slowest chunk) of a cut."""
    p = len(costs)
    chunk = [float(costs[c % p][cuts[c], cuts[c + 1]]) for c in range(len(cuts) - 1)]
    groups = [sum(chunk[g::p]) for g in range(p)]
    return max(groups), max(chunk)


def group_balanced_cuts(costs: list[np.ndarray], chunks: int) -> list[int] | None:
    """:func:`balanced_cuts`, then boundaries moved one layer at a time while that lowers the
    slowest group's total (then the slowest chunk).

    In the steady state a group runs all its chunks once per micro-batch, so the slowest
    group's total sets the pace; the slowest chunk sets the fill and drain. The exact DP
    minimizes the second; with whole layers a group can end up a layer heavier than the
    others, which this local search removes where one move does it.
    """
    cuts = balanced_cuts(costs, chunks)
    if cuts is None:
        return None
    best = _loads(costs, cuts)
    improved = True
    while improved:
        improved = False
        for i in range(1, len(cuts) - 1):
            for step in (-1, 1):
                moved = cuts[i] + step
                if not cuts[i - 1] < moved < cuts[i + 1]:
                    continue
                trial = [*cuts[:i], moved, *cuts[i + 1:]]
                loads = _loads(costs, trial)
                if loads < best:
                    cuts, best, improved = trial, loads, True
    return cuts


def torch_places(stages: tuple[StageSpec, ...]) -> bool:
    """True when torch can place these p stages' interleaved chunks: along every chain (the
    k-th rank of each stage, pdv.run.dims), the ranks increase from stage to stage.

    torch numbers a pipeline group's members by global rank and puts stage i on member
    i mod p, so a chain whose ranks are not increasing cannot be interleaved (`pdv run`
    refuses it); re-ordering the ranks would move stages onto other links.
    """
    for k in range(len(stages[0].ranks)):
        chain = [s.ranks[k] for s in stages]
        if any(a >= b for a, b in zip(chain, chain[1:], strict=False)):
            return False
    return True


def interleaved(problem: PlanProblem, cand: Candidate, v: int) -> Candidate | None:
    """The candidate with each of its p rank groups holding v chunks, or None if it cannot be.

    The objective_s of the result is its steady-state work: M micro-batches times the slowest
    group's forward and backward over its chunks (collectives included, transfers not). On
    ranks that do not share cores, where the simulator runs every op at its priced time, no
    schedule finishes sooner, so the search skips simulating a form this bound already loses;
    the simulator ranks the rest.
    """
    stages = cand.stages
    p = len(stages)
    if v < 2 or p < 2:
        return None
    widths = {(len(s.ranks), s.choice.tp) for s in stages}
    if len(widths) > 1:
        return None  # torch's interleaved schedules need one stage shape on every group
    if not torch_places(stages):
        return None
    costs = [stage_table(problem, s.ranks, cand.micro_batch_size, s.choice).time
             for s in stages]
    cuts = group_balanced_cuts(costs, p * v)
    if cuts is None:
        return None
    chunks = tuple(
        StageSpec(cuts[c], cuts[c + 1], stages[c % p].ranks, stages[c % p].choice)
        for c in range(p * v)
    )
    steady = cand.num_micro_batches * _loads(costs, cuts)[0]
    return Candidate(chunks, cand.micro_batch_size, cand.num_micro_batches, steady,
                     search=cand.search, order=cand.order, schedule="Interleaved1F1B")


def recomputing(cand: Candidate, ranks: Collection[int]) -> Candidate | None:
    """The candidate with every stage on any of these ranks recomputing its activations, or
    None if those stages recompute already (nothing left to free)."""
    changed = False
    stages = []
    for s in cand.stages:
        if set(s.ranks) & set(ranks) and not s.choice.recompute:
            s = replace(s, choice=s.choice.model_copy(update={"recompute": True}),
                        layer_choices=None)
            changed = True
        stages.append(s)
    return replace(cand, stages=tuple(stages)) if changed else None


