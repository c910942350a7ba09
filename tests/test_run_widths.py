"""Stages of different widths: routes are consistent, and the loss still equals one process's."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from pdv.artifacts import Plan
from pdv.run.dims import ParallelDims
from pdv.run.reference import reference_losses
from pdv.run.widths import grad_routes_in, grad_routes_out, routes_in, routes_out
from tests.conftest import run_pdv
from tests.test_run_loss import MODEL, assert_close, write_plan


def make_dims(widths: list[tuple[int, int]], m: int = 12) -> ParallelDims:
    stages, rank = [], 0
    for i, (dp, tp) in enumerate(widths):
        stages.append({"layers": [i, i + 1], "ranks": list(range(rank, rank + dp * tp)),
                       "dp": dp, "tp": tp})
        rank += dp * tp
    plan = Plan.model_validate({"stages": stages, "micro_batch_size": m, "num_micro_batches": 2,
                                "global_batch_size": 2 * m})
    return ParallelDims.from_plan(plan)


def messages(dims: ParallelDims, out_fn, in_fn, src: int, dst: int) -> tuple[set, set]:
    """(sent, expected) messages (sender, receiver, lo, hi) between two consecutive stages."""
    sent, expected = set(), set()
    sides = ((src, out_fn, sent, True), (dst, in_fn, expected, False))
    for stage, fn, acc, sender_is_self in sides:
        s = dims.stages[stage]
        for k, rank in enumerate(s.ranks):
            for r in fn(dims, stage, k // s.tp, k % s.tp):
                pair = (rank, r.peer) if sender_is_self else (r.peer, rank)
                acc.add((*pair, r.lo, r.hi))
    return sent, expected


WIDTHS = [w for w in itertools.product([(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (4, 1)], repeat=2)]


@pytest.mark.parametrize("widths", WIDTHS)
def test_routes_match_both_ways_and_cover_rows(widths) -> None:
    dims = make_dims(list(widths))
    sent, expected = messages(dims, routes_out, routes_in, 0, 1)
    assert sent == expected
    gsent, gexpected = messages(dims, grad_routes_out, grad_routes_in, 1, 0)
    assert gsent == gexpected
    # Every rank of stage 1 receives each row of its replica exactly once; stage 0 gets a
    # gradient for each of its rows exactly once.
    for stage, fn in ((1, routes_in), (0, grad_routes_in)):
        s = dims.stages[stage]
        for k in range(len(s.ranks)):
            rows = [i for r in fn(dims, stage, k // s.tp, k % s.tp) for i in range(r.lo, r.hi)]
            n = dims.replica_rows(stage)
            assert rows == list(range((k // s.tp) * n, (k // s.tp + 1) * n))


PLANS = {
    "dp2-dp1": [{"layers": [0, 2], "ranks": [0, 1], "dp": 2}, {"layers": [2, 4], "ranks": [2]}],
    "dp1-dp2tp1-dp1": [{"layers": [0, 1], "ranks": [0]},
                       {"layers": [1, 3], "ranks": [1, 2], "dp": 2},
                       {"layers": [3, 4], "ranks": [3]}],
    "dp2-tp2": [{"layers": [0, 2], "ranks": [0, 1], "dp": 2},
                {"layers": [2, 4], "ranks": [2, 3], "tp": 2}],
}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("name,schedule", [("dp2-dp1", "1F1B"), ("dp1-dp2tp1-dp1", "GPipe"),
                                           ("dp2-tp2", "1F1B")])
def test_different_widths_match_single_process(tmp_path: Path, name: str, schedule: str) -> None:
    want = reference_losses(MODEL, {"n_layer": 2}, steps=4, global_batch_size=16,
                            num_micro_batches=4)
    plan = write_plan(tmp_path / "plan.json", PLANS[name], schedule=schedule)
    report = tmp_path / "r.json"
    res = run_pdv("run", str(plan), "--steps", "4", "--model", MODEL, "--model-arg", "n_layer=2",
                  "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(report.read_text())
    assert "WidthPipeline" in " ".join(data["provenance"]["notes"])
    assert_close(data["loss"], want)


@pytest.mark.e2e
@pytest.mark.slow
def test_fsdp_with_different_widths_matches(tmp_path: Path) -> None:
    want = reference_losses(MODEL, {"n_layer": 2}, steps=3, global_batch_size=16,
                            num_micro_batches=4)
    stages = [{**PLANS["dp2-dp1"][0], "fsdp": True}, PLANS["dp2-dp1"][1]]
    stages = [stages[1] | {"layers": [0, 2], "ranks": [0]},
              stages[0] | {"layers": [2, 4], "ranks": [1, 2]}]
    plan = write_plan(tmp_path / "plan.json", stages)
    report = tmp_path / "r.json"
    res = run_pdv("run", str(plan), "--steps", "3", "--model", MODEL, "--model-arg", "n_layer=2",
                  "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_close(json.loads(report.read_text())["loss"], want)


def _gathers_per_step(tmp_path: Path, stages: list[dict], nmb: int) -> dict[int, list[int]]:
    """All-gathers each rank issued in each training step of a real run (tests/instrument)."""
    out = tmp_path / f"gathers-{nmb}"
    out.mkdir()
    plan = write_plan(tmp_path / f"plan-{nmb}.json", stages, nmb=nmb, mbs=4)
    res = run_pdv("run", str(plan), "--steps", "3", "--warmup", "1", "--model", MODEL,
                  "--model-arg", "n_layer=2", "--report", str(tmp_path / f"r-{nmb}.json"),
                  env={"PDV_TEST_GATHERS": str(out),
                       "PYTHONPATH": str(Path(__file__).parent / "instrument")})
    assert res.returncode == 0, res.stderr[-3000:]
    return {int(f.stem[4:]): json.loads(f.read_text()) for f in out.glob("rank*.json")}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("widths", ["uniform", "different"])
def test_fsdp_gathers_m_plus_one_times_per_step(tmp_path: Path, widths: str) -> None:
    """What pdv.cost.terms prices: an FSDP stage all-gathers its layers M + 1 times a step
    (a forward after a backward finds them unsharded), under torch's PipelineStage
    (uniform widths) and pdv's own executor (different widths) alike; 2M would be 3x at
    M = 3 what M = 1 gathers, M + 1 is 2x."""
    if widths == "uniform":
        stages = [{"layers": [0, 4], "ranks": [0, 1], "dp": 2, "fsdp": True}]
    else:
        stages = [{"layers": [0, 2], "ranks": [0]},
                  {"layers": [2, 4], "ranks": [1, 2], "dp": 2, "fsdp": True}]
    one, three = (_gathers_per_step(tmp_path, stages, m) for m in (1, 3))
    fsdp_ranks = stages[-1]["ranks"]
    for rank in fsdp_ranks:
        assert len(one[rank]) == len(three[rank]) == 3
        assert len(set(one[rank])) == 1 and len(set(three[rank])) == 1, (one, three)
        per_pass = one[rank][0] / 2
        assert per_pass >= 1 and three[rank][0] == 4 * per_pass, (one, three)
    for rank in set(one) - set(fsdp_ranks):
        assert set(one[rank]) == {0}
