"""pdv check: its statistics, its plan set, and (e2e) a real check of a small model."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdv import artifacts
from pdv.artifacts import ClusterArtifact, MessageCost, PlanStage, RankOverheads
from pdv.check import (
    STEP_CAP,
    Candidate,
    Tolerances,
    compute_drift,
    default_plans,
    even_split,
    memory_error,
    ops_compute,
    plan_key,
    predict,
    round_stderr,
    spearman,
    steps_for,
    summarize,
    write_json_atomic,
)
from pdv.cost.compute import spell_ratio, unsteady_ranks
from pdv.cost.simulate import simulate
from pdv.plan.problem import PlanProblem
from tests.conftest import run_pdv
from tests.test_cost_builders import make_cluster, make_plan, make_profile


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=2,
                max_size=12, unique_by=(lambda t: t[0], lambda t: t[1])))  # fmt: skip
def test_spearman_without_ties_is_the_textbook_formula(pairs: list[tuple[int, int]]) -> None:
    """1 − 6 Σ d² / (n (n² − 1)) over the rank differences d (distinct values)."""
    x, y = [float(a) for a, _ in pairs], [float(b) for _, b in pairs]
    rank = {v: i for i, v in enumerate(sorted(x))}
    rank_y = {v: i for i, v in enumerate(sorted(y))}
    n = len(x)
    d2 = sum((rank[a] - rank_y[b]) ** 2 for a, b in zip(x, y, strict=True))
    assert spearman(x, y) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)))


def test_spearman_ties_and_degenerate_sets() -> None:
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # ties take their average rank: x ranks (1.5, 1.5, 3), y ranks (1, 2, 3)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert spearman([1.0], [2.0]) is None
    assert spearman([1, 1], [1, 2]) is None


@pytest.mark.parametrize("n,pp", [(6, 4), (14, 3), (5, 5), (7, 1)])
def test_even_split_covers_every_layer_once(n: int, pp: int) -> None:
    spans = even_split(n, pp)
    assert spans[0][0] == 0 and spans[-1][1] == n and len(spans) == pp
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    sizes = [hi - lo for lo, hi in spans]
    assert max(sizes) - min(sizes) <= 1


def _cand(pred: float, meas: float | None, label: str) -> Candidate:
    # one stage of 2 layers, 2 micro-batches: step = 2 · 2 · (fwd + bwd) = pred
    plan = predict(make_plan([PlanStage(layers=(0, 2), ranks=[0])], num_micro=2),
                   {"cpu": make_profile(n_layers=2, fwd=pred / 8, bwd=pred / 8)},
                   make_cluster(1))  # fmt: skip
    return Candidate(plan, [label], measured_s=meas, error=None if meas else "pdv run exit 1")


def test_summary_statistics_pick_and_misses() -> None:
    """Errors, Spearman, the pick's measured rank, failures and each tolerance's verdict."""
    pool = [_cand(1.0, 1.25, "pdv #1"), _cand(2.0, 1.0, "uniform"), _cand(3.0, 3.0, "shape"),
            _cand(4.0, None, "hierarchy")]  # fmt: skip
    preds = [c.predicted_s for c in pool]
    assert preds == pytest.approx([1.0, 2.0, 3.0, 4.0])
    got = summarize(pool, Tolerances())
    s = got["summary"]
    assert got["passed"] is False  # one failure, none allowed
    assert s["plans"] == 4 and s["ran"] == 3 and s["failed"] == 1
    errs = [abs(p - m) / m for p, m in zip(preds[:3], (1.25, 1.0, 3.0), strict=True)]
    assert s["median_abs_error"] == pytest.approx(statistics.median(errs))
    assert s["max_abs_error"] == pytest.approx(max(errs))
    assert s["spearman"] == pytest.approx(spearman(preds[:3], [1.25, 1.0, 3.0]))
    assert s["pick"]["measured_rank"] == 2 and s["pick"]["vs_best"] == pytest.approx(1.25)
    assert s["predicted_span"] == pytest.approx(max(preds) / min(preds))
    loose = summarize(pool, Tolerances(max_median_error=10, max_error=10, min_spearman=-1,
                                       max_pick_gap=1, max_failures=1))  # fmt: skip
    assert loose["passed"] and not loose["misses"]
    tight = summarize(pool, Tolerances(max_pick_gap=0.2, min_spearman=0.99, max_failures=1))
    assert len(tight["misses"]) == 2 and not tight["passed"]


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-5, 20.0), st.integers(1, 50), st.integers(0, 10),
       st.one_of(st.just(0.0), st.floats(1e-3, 5.0)))
def test_a_run_measures_at_least_min_seconds_and_no_step_more(
        predicted: float, steps: int, warmup: int, min_seconds: float) -> None:  # fmt: skip
    """More steps only where --steps would measure for less than --min-seconds; then the fewest
    that reach it, unless the cap stops them."""
    n = steps_for(predicted, steps, warmup, min_seconds)
    lo, hi = min_seconds * (1 - 1e-9), min_seconds * (1 + 1e-9)  # float division's rounding
    assert n >= steps
    if n > steps:
        assert n == STEP_CAP or (n - warmup) * predicted >= lo
        assert n == STEP_CAP or (n - 1 - warmup) * predicted < hi
    elif min_seconds > 0 and (steps - warmup) * predicted < lo:
        assert steps >= STEP_CAP  # short of the time only where the cap forbids more
    assert steps_for(predicted, steps, warmup, 0.0) == steps


def test_the_rounds_noise_is_their_standard_error_over_the_measured_step() -> None:
    """Each plan's rounds give its measurement's standard error; the summary takes the set's
    median and max; one round gives none."""
    assert round_stderr([0.02]) is None
    runs = [0.020, 0.024, 0.018, 0.030]
    want = statistics.stdev(runs) / 2 / statistics.median(runs)
    assert round_stderr(runs) == pytest.approx(want)
    a, b, c = _cand(1.0, 1.0, "pdv #1"), _cand(2.0, 2.0, "shape"), _cand(3.0, 3.0, "uniform")
    a.runs_s, b.runs_s, c.runs_s = runs, [2.0, 2.0], [3.0]
    got = summarize([a, b, c], Tolerances())
    assert [r["measured_stderr"] for r in got["rows"]] == pytest.approx([want, 0.0, None])
    assert got["summary"]["measured_stderr_median"] == pytest.approx(want / 2)
    assert got["summary"]["measured_stderr_max"] == pytest.approx(want)
    assert summarize([c], Tolerances())["summary"]["measured_stderr_median"] is None


def test_compute_drift_is_the_median_ranks_measured_over_predicted_compute() -> None:
    """Each rank's predicted compute is its stages' from their layers alone (a rank holding
    two virtual stages pays both, optimizer step included; the schedule's measured bookkeeping
    and the boundary messages' CPU, which a run's compute clock does not time, left out); the
    drift is the median rank's measured / predicted - 1; the summary reads it."""
    stages = [PlanStage(layers=(i, i + 1), ranks=[i % 3]) for i in range(6)]
    profiles = {"cpu": make_profile(n_layers=6, fwd=[0.01, 0.02, 0.03, 0.04, 0.05, 0.06],
                                    bwd=[0.02, 0.04, 0.06, 0.08, 0.10, 0.12],
                                    optimizer_s=0.004)}  # fmt: skip
    bare = make_cluster(3)
    messages = RankOverheads(fwd_s=0.0, bwd_s=0.0, step_s=0.0,
                             send_cpu=MessageCost(a_s=0.002, b_s_per_byte=1e-9),
                             recv_cpu=MessageCost(a_s=0.001, b_s_per_byte=2e-9))
    over = messages.model_copy(update={"fwd_s": 0.003, "bwd_s": 0.005, "step_s": 0.007})

    def with_overheads(o: RankOverheads) -> ClusterArtifact:
        return bare.model_copy(update={"devices": [d.model_copy(update={"overheads": o})
                                                   for d in bare.devices]})  # fmt: skip

    cluster = with_overheads(over)
    plan = predict(make_plan(stages, num_micro=6, schedule="Interleaved1F1B"), profiles, cluster)
    assert plan.predicted is not None
    per_stage = ops_compute(plan, profiles, cluster)
    # One layer a stage, at micro-batch 1: 6 forwards and backwards and the layer's optimizer
    # step (0.004 s), as the simulator prices them on a cluster without overheads.
    fwd, bwd = [0.01 * (i + 1) for i in range(6)], [0.02 * (i + 1) for i in range(6)]
    assert per_stage == pytest.approx([6 * (f + b) + 0.004
                                       for f, b in zip(fwd, bwd, strict=True)])
    assert [s.compute_s for s in simulate(plan, profiles, bare).stages] == pytest.approx(
        per_stage)
    # Every stage has a neighbour, so its price holds its messages' CPU, which the clock does
    # not time; and the schedule's bookkeeping: 6 micro-batches' fwd and bwd, one step.
    with_messages = [s.compute_s for s in simulate(plan, profiles,
                                                   with_overheads(messages)).stages]
    assert all(m > c + 6 * 0.0029 for m, c in zip(with_messages, per_stage, strict=True))
    assert [s.compute_s for s in plan.predicted.stages] == pytest.approx(
        [c + 6 * (0.003 + 0.005) + 0.007 for c in with_messages])
    want = [per_stage[r] + per_stage[r + 3] for r in range(3)]
    assert want[2] > want[1] > want[0] > 0
    measured = {"0": want[0] * 1.5, "1": want[1] * 0.9, "2": want[2] * 1.2}
    assert compute_drift(plan, per_stage, measured) == pytest.approx(0.2)
    assert compute_drift(plan, per_stage, {"1": want[1] * 0.9}) == pytest.approx(-0.1)
    assert compute_drift(plan, per_stage, None) is None
    assert compute_drift(plan, per_stage, {}) is None and compute_drift(plan, [], measured) is None
    a, b = _cand(1.0, 1.0, "pdv #1"), _cand(2.0, 2.0, "shape")
    a.compute_drifts, b.compute_drifts = [0.1, 0.3, 0.2], [-0.05]
    s = summarize([a, b], Tolerances())
    assert [r["compute_drift"] for r in s["rows"]] == pytest.approx([0.2, -0.05])
    assert s["summary"]["compute_drift_median"] == pytest.approx(0.075)
    assert s["summary"]["compute_drift_range"] == pytest.approx([-0.05, 0.2])


def test_memory_error_is_the_worst_rank_signed_and_checked() -> None:
    """A plan's peak-memory error is its worst rank's, with its sign; the summary and the
    tolerance read it."""
    assert memory_error({"0": 90, "1": 130}, {"0": 100, "1": 100}) == pytest.approx(0.3)
    assert memory_error({"0": 60, "1": 130}, {"0": 100, "1": 100}) == pytest.approx(-0.4)
    assert memory_error({"0": 100}, {"0": 100, "5": 10}) == 0.0  # rank 5 was not predicted
    a, b = _cand(1.0, 1.0, "pdv #1"), _cand(2.0, 2.0, "shape")
    a.memory_errors, b.memory_errors = [-0.10, -0.30, -0.20], [0.05]
    got = summarize([a, b], Tolerances(max_memory_error=0.15))
    assert [r["memory_error"] for r in got["rows"]] == pytest.approx([-0.20, 0.05])
    s = got["summary"]
    assert s["memory_median_abs_error"] == pytest.approx(0.125)
    assert s["memory_max_abs_error"] == pytest.approx(0.20)
    assert got["misses"] == ["max peak-memory |error| 0.2 > 0.15"]
    assert summarize([a, b], Tolerances(max_memory_error=0.25))["passed"]


def test_the_default_set_spans_the_asked_ratio_with_distinct_plans() -> None:
    """pdv's top plans, the baselines' picks and other shapes; no plan twice."""
    prof = make_profile(n_layers=8, fwd=0.01, bwd=0.02, out=4000, ref_mbs=1)
    cluster = make_cluster(4, bw=1e8, lat=1e-4)
    problem = PlanProblem({"cpu": prof}, cluster, 8, micro_batch_sizes=(1, 2, 4), time_limit_s=2)
    pool = default_plans(problem, top=2, baselines=True, shapes=3, span=1.5)
    keys = [plan_key(c.plan) for c in pool]
    assert len(keys) == len(set(keys))
    labels = [lab for c in pool for lab in c.labels]
    assert "pdv #1" in labels and "uniform" in labels
    assert any(lab.startswith("shape") for lab in labels)
    times = [c.predicted_s for c in pool]
    assert max(times) / min(times) >= 1.5
    assert min(times) == pytest.approx(pool[0].predicted_s)  # pdv's pick predicts fastest


def test_report_is_written_whole(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "r.json"
    write_json_atomic(target, {"a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


def test_check_without_a_batch_or_plans_is_one_line_exit_2(tmp_path: Path) -> None:
    prof, cl = tmp_path / "p.json", tmp_path / "c.json"
    artifacts.write(prof, make_profile(n_layers=2))
    artifacts.write(cl, make_cluster(2))
    res = run_pdv("check", str(prof), "--cluster", str(cl))
    assert res.returncode == 2 and "--global-batch" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_check_runs_a_small_model_end_to_end(tmp_path: Path) -> None:
    """gpt_tiny on 2 ranks: profile, cluster, check; the report agrees with itself.

    Timings are not asserted (speed targets live in benchmarks/): only the report's structure
    and its arithmetic, and that loose tolerances pass while an impossible one fails.
    """
    prof, cl, out = tmp_path / "p.json", tmp_path / "c.json", tmp_path / "check"
    r = run_pdv("profile", "model", "gpt_tiny", "--micro-batch-sizes", "1,2", "-o", str(prof),
                timeout=300)
    assert r.returncode == 0, r.stderr
    r = run_pdv("profile", "cluster", "--nproc-per-node", "2", "--no-collectives", "-o", str(cl),
                timeout=300)
    assert r.returncode == 0, r.stderr
    r = run_pdv("check", str(prof), "--cluster", str(cl), "--global-batch", "4", "--top", "1",
                "--no-baselines", "--shapes", "2", "--steps", "3", "--warmup", "1",
                "--out", str(out), "--max-median-error", "100", "--min-spearman", "-1",
                "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc == json.loads((out / "check.json").read_text())
    assert doc["schema"] == "pdv.check/v1" and doc["passed"] and doc["misses"] == []
    rows, s = doc["rows"], doc["summary"]
    profile, cluster = artifacts.load_as(prof, "model-profile"), artifacts.load_as(cl, "cluster")
    assert s["ran"] == len(rows) >= 2 and s["failed"] == 0
    assert rows[0]["labels"][0] == "pdv #1"
    for row in rows:
        assert row["measured_s"] > 0 and row["predicted_s"] > 0
        err = (row["predicted_s"] - row["measured_s"]) / row["measured_s"]
        assert row["error"] == pytest.approx(err)
        rep = json.loads(Path(row["report"]).read_text())
        assert rep["measured"]["step_time_s"] == row["measured_s"]
        plan = json.loads(Path(row["plan"]).read_text())
        mem = memory_error(plan["predicted"]["peak_memory_bytes"],
                           rep["measured"]["peak_memory_bytes"])
        assert row["memory_error"] == pytest.approx(mem) and mem != 0.0
        ran = artifacts.load_as(Path(row["plan"]), "plan")
        drift = compute_drift(ran, ops_compute(ran, {"cpu": profile}, cluster),
                              rep["measured"]["compute_s"])
        assert drift is not None and row["compute_drift"] == pytest.approx(drift)
        # gpt_tiny's steps are milliseconds: --min-seconds (1 s by default) asks for more
        assert row["steps"] == steps_for(row["predicted_s"], 3, 1, 1.0) > 3
        assert len(rep["measured"]["step_times_s"]) == row["steps"]
    assert s["median_abs_error"] == pytest.approx(statistics.median(x["abs_error"] for x in rows))
    assert 1 <= s["pick"]["measured_rank"] <= len(rows)
    assert s["max_load"] == max(r["load"] for r in rows) and s["cpus"] >= 1
    assert all(row["measured_runs_s"] == [row["measured_s"]] for row in rows)
    assert [u["rank"] for u in doc["cluster_unsteady"]] == [r for r, _, _ in
                                                            unsteady_ranks(cluster)]
    # Both files carry the small-op reference step; the report keeps their ratio.
    assert doc["small_op_ratio"] == {"cpu": pytest.approx(spell_ratio(profile, cluster))}
    assert doc["small_op_ratio"]["cpu"] > 0
    # The first plan again, two rounds, against a tolerance nothing meets: exit 1, the miss
    # named; its step is the median of both rounds' runs, each with its own report. Its
    # cluster file says rank 1's speed moved 20% over the probe (only the windows kept in
    # the details, which price nothing): the report and the output say so.
    raw = json.loads(cl.read_text())
    raw["devices"][0]["details"]["matmul_flops_alone_windows"] = [9.5e10, 9.6e10, 9.6e10]
    raw["devices"][1]["details"]["matmul_flops_alone_windows"] = [8e10, 9e10, 9.6e10]
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(raw))
    # And the profile reads the small-op reference twice the cluster's fastest rank: taken in
    # a slow spell, which the output says before the runs and after them.
    slow_doc = json.loads(prof.read_text())
    slow_doc["device"]["small_op_step_s"] = 2 * min(d["small_op_step_s"] for d in raw["devices"])
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(slow_doc))
    r = run_pdv("check", str(slow), "--cluster", str(moved), "--plan", rows[0]["plan"],
                "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "again"),
                "--max-error", "0", "--repeat", "2", timeout=300)
    assert r.returncode == 1, r.stderr
    assert "outside tolerance" in r.stdout and "max |error|" in r.stdout
    again = json.loads((tmp_path / "again" / "check.json").read_text())
    assert again["passed"] is False and again["repeat"] == 2
    (row,) = again["rows"]
    reports = [json.loads(Path(p).read_text()) for p in row["reports"]]
    assert len(set(row["reports"])) == 2 and row["report"] == row["reports"][0]
    assert row["measured_runs_s"] == [rep["measured"]["step_time_s"] for rep in reports]
    assert row["measured_s"] == pytest.approx(statistics.median(row["measured_runs_s"]))
    assert row["measured_stderr"] == pytest.approx(round_stderr(row["measured_runs_s"]))
    assert again["summary"]["measured_stderr_max"] == row["measured_stderr"]
    assert "the measurement's own noise" in r.stdout
    assert [u["rank"] for u in again["cluster_unsteady"]] == [1]
    assert again["cluster_unsteady"][0]["matmul_flops_alone_min"] == 8e10
    assert "rank 1 read 80.0 .. 96.0 GFLOP/s alone" in " ".join(r.stdout.split())
    assert again["small_op_ratio"] == {"cpu": pytest.approx(2.0)}
    assert "2.00x slower than the cluster file's ranks" in " ".join(r.stderr.split())
    assert "ran the small-op reference 2.00x the cluster file's time" in " ".join(r.stdout.split())
