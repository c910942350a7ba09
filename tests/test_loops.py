"""gloo's event-loop threads: which policy is asked for, and that every loop thread gets it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pdv.errors import PdvError
from pdv.profile.loops import POLICY_ENV, loop_policy

# A one-rank gloo group, a second group (its own TCP device, so its own loop thread), then
# pdv's call; prints each loop thread's policy and the main thread's.
PROBE = textwrap.dedent("""
    import json, os, sys, tempfile, time
    import torch.distributed as dist
    from pdv.profile.loops import loop_threads, settle_gloo_loops
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    dist.new_group([0])
    # A one-rank group connects no pair, so new_group can return before its loop thread has
    # named itself (its first act); a group of peers connects through that thread.
    deadline = time.monotonic() + 10
    while len(loop_threads()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    before = {t: os.sched_getscheduler(t) for t in loop_threads()}
    note = settle_gloo_loops()
    after = {t: os.sched_getscheduler(t) for t in loop_threads()}
    print(json.dumps({"before": list(before.values()), "after": list(after.values()),
                      "main": os.sched_getscheduler(0), "note": note}))
    dist.destroy_process_group()
""")


def _probe(policy: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != POLICY_ENV}
    if policy is not None:
        env[POLICY_ENV] = policy
    res = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("value, want", [(None, "normal"), ("batch", "batch"),
                                         (" Batch ", "batch"), ("", "normal")])
def test_the_policy_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                               value: str | None, want: str) -> None:
    if value is None:
        monkeypatch.delenv(POLICY_ENV, raising=False)
    else:
        monkeypatch.setenv(POLICY_ENV, value)
    assert loop_policy() == want


def test_an_unknown_policy_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(POLICY_ENV, "fast")
    with pytest.raises(PdvError, match="batch.*normal"):
        loop_policy()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_every_loop_thread_of_every_group_becomes_batch_and_nothing_else_does() -> None:
    got = _probe("batch")
    before, after = got["before"], got["after"]
    assert isinstance(before, list) and isinstance(after, list)
    assert len(after) >= 2  # the default group's device and the new group's
    assert set(before) == {os.SCHED_OTHER}  # as torch starts them
    assert set(after) == {os.SCHED_BATCH}
    assert got["main"] == os.SCHED_OTHER  # the rank's own thread keeps preempting
    assert "SCHED_BATCH" in str(got["note"])


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
@pytest.mark.parametrize("policy", [None, "normal"])
def test_by_default_the_loop_threads_stay_as_torch_starts_them(policy: str | None) -> None:
    got = _probe(policy)
    assert got["after"] == got["before"]
    assert set(got["after"]) == {os.SCHED_OTHER}  # type: ignore[arg-type]
    assert "normal" in str(got["note"])


def test_without_a_gloo_group_there_is_nothing_to_note() -> None:
    res = subprocess.run([sys.executable, "-c",
                          "from pdv.profile.loops import settle_gloo_loops as s; print(s())"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "None"
