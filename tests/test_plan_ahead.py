"""The baselines' share of pdv's search in a forked child (pdv.plan.ahead): same plans as the
serial search, and a child that dies or hangs is replaced by in-process work."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from pdv.plan import ahead
from pdv.plan.problem import PlanProblem
from pdv.plan.search import search
from tests.plan_fixtures import GiB, cluster, profile

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or ahead._usable_cores() < 2, reason="needs fork and two cores"
)


def _problem(hosts: int = 8, per_host: int = 8) -> PlanProblem:
    """hosts × per_host devices, a fast island per host and an uneven fabric between them."""
    n = hosts * per_host
    names = [f"h{r // per_host}" for r in range(n)]
    bw = [[4e10 if names[i] == names[j] else 1e9 * (1 + (i * 7 + j * 3) % 5)
           for j in range(n)] for i in range(n)]  # fmt: skip
    kinds = ["a" if r < n // 2 else "b" for r in range(n)]
    profiles = {k: profile(kind=k, n_layers=10, fwd=[0.004 * (1 + i % 3) for i in range(10)],
                           tp_degrees=(1, 2, 4)) for k in ("a", "b")}  # fmt: skip
    return PlanProblem(profiles, cluster(names, bw, kinds, memory=8 * GiB), 64,
                       time_limit_s=0.2)  # fmt: skip


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_search_ahead_writes_the_plans_of_the_serial_search(monkeypatch) -> None:
    before = _children()
    said: list[str] = []
    parallel = search(_problem(), "pdv", top=3, progress=said.append)
    assert any("searched in a second process" in m for m in said), said
    assert _children() <= before  # the child is reaped

    monkeypatch.setattr(ahead, "AHEAD_FROM", 10**9)
    said.clear()
    serial = search(_problem(), "pdv", top=3, progress=said.append)
    assert not any("second process" in m for m in said)
    assert [p.model_dump_json() for p in parallel.plans] == [
        p.model_dump_json() for p in serial.plans
    ]


def test_a_child_that_dies_leaves_the_rest_to_the_parent() -> None:
    before = _children()

    def work(name: str) -> object:
        if name == "b":
            os._exit(3)
        return {"name": name}

    job = ahead.start(_problem(), ["a", "b", "c"], work)
    assert job is not None
    assert job.result("a") == {"name": "a"}
    assert job.result("b") is None
    assert job.result("c") is None
    assert job.pid == 0 and job.fd == -1
    assert _children() <= before


def test_a_child_that_hangs_is_killed_after_its_wait(monkeypatch) -> None:
    monkeypatch.setattr(ahead, "WAIT_S", 0.5)
    before = _children()

    def work(name: str) -> object:
        time.sleep(60)
        return name

    job = ahead.start(_problem(), ["a"], work)
    assert job is not None
    started = time.monotonic()
    assert job.result("a") is None
    assert time.monotonic() - started < 10
    assert _children() <= before


def test_small_clusters_search_in_process() -> None:
    assert ahead.start(_problem(hosts=2, per_host=4), ["a"], lambda name: name) is None
