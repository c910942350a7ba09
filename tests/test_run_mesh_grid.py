"""The stage meshes' rank order: every axis ascending where the plan's TP groups allow it,
checked against brute force over every arrangement of small grids."""

from __future__ import annotations

import itertools
import random

from pdv.artifacts import PlanStage
from pdv.run.dims import checkpoint_blocker, in_group_order, mesh_grid


def _groups(grid: list[list[int]]) -> list[frozenset[int]]:
    return sorted((frozenset(row) for row in grid), key=min)


def _arrangeable(rows: list[list[int]]) -> bool:
    """Whether any order of the rows and of the ranks in each row ascends on both axes."""
    for order in itertools.permutations(rows):
        for inner in itertools.product(*(itertools.permutations(r) for r in order)):
            if in_group_order([list(r) for r in inner]):
                return True
    return False


def test_mesh_grid_keeps_tp_groups_and_ascends_whenever_some_layout_does() -> None:
    rng = random.Random(7)
    for _ in range(300):
        dp, tp = rng.randint(1, 3), rng.randint(1, 3)
        ranks = rng.sample(range(12), dp * tp)
        rows = [ranks[r * tp:(r + 1) * tp] for r in range(dp)]
        grid = mesh_grid(ranks, dp, tp)
        assert _groups(grid) == _groups(rows)
        assert in_group_order(grid) == _arrangeable(rows), (ranks, dp, tp, grid)


def test_reversed_replicas_become_ascending() -> None:
    assert mesh_grid([1, 0], 2, 1) == [[0], [1]]
    assert mesh_grid([3, 2, 1, 0], 2, 2) == [[0, 1], [2, 3]]


def test_checkpoints_are_refused_only_for_sharded_stages_without_an_ascending_layout() -> None:
    crossed = PlanStage(layers=(0, 2), ranks=[0, 3, 1, 2], dp=2, tp=2)
    message = checkpoint_blocker([crossed])
    assert message is not None and "{0, 3}, {1, 2}" in message
    assert checkpoint_blocker([PlanStage(layers=(0, 2), ranks=[0, 3, 1, 2], dp=4)]) is None
    assert checkpoint_blocker([PlanStage(layers=(0, 2), ranks=[3, 1, 2, 0], dp=2, tp=2)]) is None
