"""Property: on any cluster where a baseline plans, pdv plans too, at least as fast; never a crash.

Random clusters of 2–64 ranks: hosts of 1–8 devices, link classes per host and fabric drawn
over two decades, every ordered pair off its class by up to ±10% and some directions slower
than their reverse, one or two device kinds, mixed speeds and memory sizes; profiles with and
without TP, memory from roomy to too small. Fixed seed (derandomized), so CI sees the same cases.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdv.artifacts import ClusterArtifact, ClusterDevice, Links
from pdv.errors import PdvError
from pdv.plan.problem import PlanProblem
from pdv.plan.search import BASELINES, search, step_floor
from tests.plan_fixtures import GiB, profile


def random_cluster(rng: random.Random) -> tuple[dict, ClusterArtifact, int]:
    """Profiles, a noisy measured-like cluster and a global batch."""
    n = rng.choice([2, 2, 3, 4, 4, 5, 6, 8, 8, 12, 16, 24, 32, 40, 48, 64])
    per_host = rng.choice([1, 2, 4, 8])
    host = [r // per_host for r in range(n)]
    n_hosts = host[-1] + 1
    kinds = ["a"] if rng.random() < 0.6 else ["a", "b"]
    kind = [kinds[(h * len(kinds)) // n_hosts] for h in host]
    g = np.random.default_rng(rng.getrandbits(32))
    inside = 10 ** g.uniform(9, 11.5, n_hosts)  # each host's own class
    fabric = 10 ** g.uniform(9, 11)
    same = np.equal.outer(host, host)
    bw = np.where(same, inside[host][:, None], fabric) * g.uniform(0.9, 1.1, (n, n))
    if rng.random() < 0.3:  # some directions slower than their reverse
        bw *= np.where(g.random((n, n)) < 0.2, rng.choice([0.3, 0.6]), 1.0)
    lat = np.where(same, 3e-6, 1e-5) * g.uniform(0.9, 1.1, (n, n))
    np.fill_diagonal(bw, 0.0)
    np.fill_diagonal(lat, 0.0)
    memory = rng.choice([1, 2, 4, 16])
    devices = [
        ClusterDevice(
            rank=r,
            host=f"h{host[r]}",
            kind=kind[r],
            memory_bytes=int(memory * GiB * (2 if rng.random() < 0.3 else 1)
                             * g.uniform(0.98, 1.02)),  # fmt: skip
            matmul_flops=1e12 * rng.choice([1.0, 1.0, 0.5, 2.0]) * float(g.uniform(0.95, 1.05)),
        )
        for r in range(n)
    ]
    n_layers = rng.randint(2, 8)
    fwd = [rng.uniform(0.001, 0.02) for _ in range(n_layers)]
    tp = rng.choice([(1,), (1, 2), (1, 2, 4)])
    params, acts = rng.choice([8, 64, 256, 512]) << 20, rng.choice([4, 32, 128]) << 20
    profiles = {
        k: profile(kind=k, n_layers=n_layers, fwd=[f * (1.0 if k == "a" else 1.7) for f in fwd],
                   param_bytes=params, act_bytes=acts, tp_degrees=tp,
                   optimizer_s=rng.choice([None, 0.002]))  # fmt: skip
        for k in kinds
    }
    links = Links(latency_s=lat.tolist(), bandwidth_Bps=bw.tolist())
    return profiles, ClusterArtifact(devices=devices, links=links), rng.choice([4, 8, 16])


@pytest.mark.slow
@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(st.integers(0, 2**32 - 1))
def test_pdv_plans_whenever_a_baseline_does_and_is_never_slower(seed: int) -> None:
    profiles, cluster, batch = random_cluster(random.Random(seed))
    schedule = ("1F1B", "GPipe", "1F1B", "Interleaved1F1B")[seed % 4]
    problem = PlanProblem(profiles, cluster, batch, time_limit_s=0.05, schedule=schedule,
                          allow_fsdp=seed % 3 != 0)  # fmt: skip
    best_baseline = float("inf")
    for name in BASELINES:
        try:
            plan = search(problem, name).plans[0]
        except PdvError:  # no plan, or none its schedule can run: pdv need not match it
            continue
        assert plan.predicted is not None
        # the bound pdv's search uses to skip simulating a baseline's plan is a bound
        assert step_floor(plan, problem) <= plan.predicted.step_time_s * (1 + 1e-9)
        best_baseline = min(best_baseline, plan.predicted.step_time_s)
    try:
        plan = search(problem, "pdv").plans[0]
    except PdvError as exc:
        assert best_baseline == float("inf"), f"a baseline planned, pdv did not: {exc}"
        msg = str(exc)
        assert "no plan" in msg
        assert all(float(x) > 0 for x in re.findall(r"(-?[\d.]+) GiB over", msg)), msg
        return
    assert plan.predicted is not None
    assert plan.planner.notes[0].startswith("search objective J")  # J against the simulator
    assert plan.predicted.step_time_s <= best_baseline * (1 + 1e-9)
    assert step_floor(plan, problem) <= plan.predicted.step_time_s * (1 + 1e-9)
    for rank, peak in plan.predicted.peak_memory_bytes.items():
        assert peak <= problem.capacity(int(rank)) * (1 + 1e-9)
