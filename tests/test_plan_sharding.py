"""CP-SAT's per-layer sharding against brute force over every per-layer assignment."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from pdv.artifacts import RankOverheads, SyncAfterLongCompute
from pdv.plan.objective import stage_price
from pdv.plan.problem import PlanProblem, StageSpec, choices_for
from pdv.plan.sharding import _layer_options, refine_stage
from tests.plan_fixtures import GiB, cluster, profile


def _instance(rng: random.Random) -> tuple[PlanProblem, StageSpec, int] | None:
    """One stage of a few layers, some of them equal (a model's repeated blocks), on 1-4
    devices under memory from roomy to tight, with a random uniform choice to refine."""
    n_layers = rng.randint(2, 5)
    pool = [rng.uniform(0.001, 0.02) for _ in range(rng.randint(1, 3))]
    prof = profile(n_layers=n_layers, fwd=[rng.choice(pool) for _ in range(n_layers)],
                   param_bytes=rng.choice([64, 256, 1024]) << 20,
                   act_bytes=rng.choice([128, 512, 1024]) << 20,
                   out_bytes=rng.choice([1, 8]) << 20,
                   optimizer_s=rng.choice([None, 0.004, 0.03]))  # fmt: skip
    n_dev = rng.choice([1, 2, 4])
    bw = [[rng.choice([1e8, 1e9, 1e10]) for _ in range(n_dev)] for _ in range(n_dev)]
    memory = int(rng.choice([1.5, 2, 3, 4, 6, 16]) * GiB)
    cl = cluster([f"h{r // 2}" for r in range(n_dev)], bw, memory=memory)
    # Half the instances: measured per-step overheads of replicas (a separate draw, so the
    # instances themselves are those drawn before): the plain gradients' passes per byte
    # (1-10 GB/s: tens of ms over these layers) and the sync's excess after compute, in some
    # growing with the stage's compute up to a longer burst these stages' steps fall short
    # of or pass (a per-layer choice then moves the sync too).
    extra = random.Random(f"{n_layers}-{n_dev}-{memory}-{pool}")
    if extra.random() < 0.5:
        grows = None
        if extra.random() < 0.6:
            grows = SyncAfterLongCompute(burst_s=0.005, long_burst_s=extra.choice([0.05, 0.3]),
                                         long_excess_s=extra.choice([0.003, 0.04]))
        over = RankOverheads(fwd_s=0.0, bwd_s=0.0, step_s=0.0,
                             sync_after_compute_s=extra.choice([0.0, 0.002]),
                             sync_after_long_compute=grows,
                             grad_passes_s_per_byte=extra.choice([1e-10, 1e-9]))
        cl = cl.model_copy(update={"devices": [d.model_copy(update={"overheads": over})
                                               for d in cl.devices]})
    batch = rng.choice([4, 8])
    problem = PlanProblem({"gpu": prof}, cl, batch, micro_batch_sizes=(1, 2, 4), time_limit_s=5)
    sizes = [m for m in problem.mbs_options() if list(choices_for(problem, n_dev, m))]
    if not sizes:
        return None
    mbs = rng.choice(sizes)
    choice = rng.choice(list(choices_for(problem, n_dev, mbs)))
    return problem, StageSpec(0, n_layers, tuple(range(n_dev)), choice), mbs


def brute_force_best(problem: PlanProblem, spec: StageSpec, mbs: int, M: int, ref: Any,
                     same: Sequence[int] = ()) -> float:  # fmt: skip
    """The least busy time (M·t + sync) over every per-layer assignment the refinement may
    take: it fits, and it makes neither the stage's micro-batch time nor its bottleneck term
    worse than the uniform choice `ref`; the layers `same` all take one option."""
    ref_t = ref.fwd_s + ref.bwd_s
    best = M * ref.time_s + ref.sync_s
    for combo in itertools.product(_layer_options(problem, spec), repeat=spec.hi - spec.lo):
        if len({combo[i - spec.lo] for i in same}) > 1:
            continue
        p = stage_price(problem, replace(spec, layer_choices=combo), mbs, 1, M, None)
        t = p.fwd_s + p.bwd_s
        if (p.fits and t <= ref_t * (1 + 1e-9) and p.time_s <= ref.time_s
                and (M - 1) * t + p.sync_s <= ((M - 1) * ref_t + ref.sync_s) * (1 + 1e-9)):
            best = min(best, M * p.time_s + p.sync_s)  # fmt: skip
    return best


def test_refined_stage_is_the_best_per_layer_assignment() -> None:
    compared = improved = 0
    for seed in range(160):
        drawn = _instance(random.Random(seed))
        if drawn is None:
            continue
        problem, spec, mbs = drawn
        M = problem.global_batch // mbs
        ref = stage_price(problem, spec, mbs, 1, M, None)
        if not ref.fits:
            continue
        ref_busy = M * ref.time_s + ref.sync_s
        best = brute_force_best(problem, spec, mbs, M, ref)
        res = refine_stage(problem, spec, mbs, 1, M, None)
        got = stage_price(problem, res.stage, mbs, 1, M, None)
        busy = M * got.time_s + got.sync_s
        assert got.fits and busy <= ref_busy + 1e-12, seed
        assert res.status == "OPTIMAL", (seed, res.status)
        # CP-SAT works in integer ns: a few ns per layer and micro-batch of rounding.
        assert busy <= best + 8e-9 * M * (spec.hi - spec.lo + 2), (seed, busy, best)
        compared += 1
        improved += busy < ref_busy
    # The instances exercise the refinement: most stages fit, and in some a per-layer mix wins.
    assert compared >= 60 and improved >= 10, (compared, improved)


def test_cp_sats_sync_excess_is_the_cost_models_at_every_compute() -> None:
    """The excess CP-SAT takes for a stage's compute (one boolean per rank choosing the line
    or the hold) equals pdv.cost.terms.sync_after_compute's, below the shorter burst, on the
    line, past the longer one, for ranks whose lines cross and one that does not grow."""
    import numpy as np
    from ortools.sat.python import cp_model

    from pdv.cost.comm import Ring
    from pdv.cost.terms import RankView, RingView, StageGroup, sync_after_compute
    from pdv.plan.sharding import NS, _after_compute_var, _Model

    ranks = (
        RankView("a", 1.0, 0.0, 1e9, 1e-4, 2e-4, 0.0, sync_after_compute_s=0.002,
                 sync_burst_s=0.005, sync_long_burst_s=0.05, sync_long_excess_s=0.006),
        RankView("a", 1.0, 0.0, 1e9, 1e-4, 2e-4, 0.0, sync_after_compute_s=0.001,
                 sync_burst_s=0.004, sync_long_burst_s=0.3, sync_long_excess_s=0.009),
        # Its longer burst read under its shorter: no growth.
        RankView("a", 1.0, 0.0, 1e9, 1e-4, 2e-4, 0.0, sync_after_compute_s=0.0025,
                 sync_burst_s=0.005, sync_long_burst_s=0.05, sync_long_excess_s=0.001),
    )
    ring = RingView(Ring(3, 1e-5, 1e9), ("a",))
    group = StageGroup(ranks=ranks, tp_rings=(ring,), dp_rings=(ring,), tp=1, dp=3)
    M = 4
    for compute_ms in (0.1, 1.0, 2.0, 5.0, 11.9, 20.0, 60.0, 74.7, 200.0):
        layers_ns = int(compute_ms * 1e6)
        m = cp_model.CpModel()
        compute = m.new_int_var(layers_ns, layers_ns, "compute")
        after = _after_compute_var(_Model(m, {}, {}, [], []), group, M, compute, 10**9)
        m.minimize(after)
        solver = cp_model.CpSolver()
        assert solver.solve(m) == cp_model.OPTIMAL
        step = M * (layers_ns / NS + 3e-4)  # the schedule's own work rides in the compute
        want = float(sync_after_compute(group, np.float64(step)))
        assert solver.value(after) / NS == pytest.approx(want, abs=2e-9), compute_ms
