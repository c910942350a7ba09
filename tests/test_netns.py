"""Emulated hosts: pdv profile cluster measures tc-shaped links between network namespaces.

Needs root, `ip netns` and tc; skipped cleanly elsewhere. Every namespace, veth and qdisc is
removed even when a test fails (fixture finalizer + the testbed's own close), and the tests
check that nothing is left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from benchmarks.testbed import netns
from benchmarks.testbed.netns import Namespace, cleanup_leftovers, leftovers, unavailable_reason
from pdv.profile.launch_local import free_port
from tests.conftest import ROOT

pytestmark = [pytest.mark.netns, pytest.mark.e2e, pytest.mark.slow]

MBIT = 1e6 / 8  # bytes per second in one Mbit/s
# Modest sizes: the largest message takes ~85 ms at 100 Mbit/s and ~280 ms at 30 Mbit/s.
SIZES = "64KiB,256KiB,1MiB"


def _nothing_left(tb: netns.Testbed) -> None:
    mine = [n for n in leftovers(tb.prefix) if f"-{tb.tag}-" in n]
    assert mine == [], f"namespaces left behind: {mine}"
    assert tb.root_devices() == [], "veth devices left in the root namespace"


@pytest.fixture
def testbed() -> Any:
    """A Testbed that is torn down (and checked) whatever the test does."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    tb = netns.Testbed()
    tb.__enter__()
    try:
        yield tb
    finally:
        tb.close()
        _nothing_left(tb)


def _why(log: str) -> str:
    """The lines of a node's log that say why a rank failed (a tail alone shows torchrun's)."""
    keys = ("terminate called", "what()", "Error", "error:", "Signal", "exitcode")
    lines = [ln.strip() for ln in log.splitlines() if any(k in ln for k in keys)]
    return " | ".join(lines[:12]) or log[-1500:]


def _profile(tb: netns.Testbed, nodes: list[tuple[Namespace, str, int]], master: str,
             out: Path, logs: Path) -> dict[str, Any]:
    """Run `pdv profile cluster` as one torchrun per namespace (static rendezvous); load it."""
    port = free_port()
    procs = []
    for node, (ns, dev, nproc) in enumerate(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(nodes)}",
               f"--node-rank={node}", f"--nproc-per-node={nproc}", "--rdzv-backend=static",
               f"--master-addr={master}", f"--master-port={port}", "--no-python",
               sys.executable, "-m", "pdv", "profile", "cluster", "-o", str(out),
               "--sizes", SIZES, "--max-size", "1MiB", "--warmup", "1", "--timeout", "60"]
        log = (logs / f"node{node}.log").open("w")
        procs.append(tb.popen(ns, cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={"GLOO_SOCKET_IFNAME": dev, "OMP_NUM_THREADS": "1"}))
    deadline = time.monotonic() + 150
    for p in procs:
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            for q in procs:
                q.kill()  # a node whose peer failed waits in torchrun's exit barrier
            pytest.fail(f"torchrun node exited with {rc}: "
                        + "; ".join(f"{f.name}: {_why(f.read_text())}"
                                    for f in sorted(logs.glob("node*.log"))))
    return json.loads(out.read_text())


def test_veth_shaped_to_100mbit_is_measured_within_20_percent(testbed: netns.Testbed,
                                                              tmp_path: Path) -> None:
    a, b = testbed.namespace("a"), testbed.namespace("b")
    link = testbed.connect(a, b)
    testbed.shape(a, link.a_dev, "100mbit", burst="32kbit", latency="50ms")
    testbed.shape(b, link.b_dev, "100mbit", burst="32kbit", latency="50ms")
    assert "rate 100Mbit" in testbed.qdiscs(a)
    shown = testbed.run(a, ["ip", "-4", "-o", "addr", "show", link.a_dev]).stdout
    assert f"{link.a_addr}/30" in shown  # each veth has its own private /30
    data = _profile(testbed, [(a, link.a_dev, 1), (b, link.b_dev, 1)], link.a_addr,
                    tmp_path / "c.json", tmp_path)
    bw = data["links"]["bandwidth_Bps"]
    print(f"veth shaped to 100 Mbit/s: 0->1 {bw[0][1] / MBIT:.1f}, "
          f"1->0 {bw[1][0] / MBIT:.1f} Mbit/s")
    for src, dst in ((0, 1), (1, 0)):
        assert bw[src][dst] == pytest.approx(100 * MBIT, rel=0.2), (
            f"{src}->{dst}: {bw[src][dst] / MBIT:.1f} Mbit/s, shaped to 100"
        )
    hosts = [d["host"] for d in data["devices"]]
    assert hosts[0].endswith(a.name) and hosts[1].endswith(b.name)


def test_slow_lo_inside_a_namespace_is_measured_slower_than_the_veth(testbed: netns.Testbed,
                                                                     tmp_path: Path) -> None:
    a, b = testbed.namespace("a"), testbed.namespace("b")
    link = testbed.connect(a, b)
    testbed.shape(a, link.a_dev, "100mbit")
    testbed.shape(b, link.b_dev, "100mbit")
    # Two ranks in `a` talk over a's lo (64 KiB MTU: the burst must hold a whole packet).
    testbed.shape(a, "lo", "30mbit", burst="256kb")
    data = _profile(testbed, [(a, link.a_dev, 2), (b, link.b_dev, 1)], link.a_addr,
                    tmp_path / "c.json", tmp_path)
    bw = data["links"]["bandwidth_Bps"]
    lo = [bw[0][1], bw[1][0]]  # ranks 0 and 1 are both in a
    veth = [bw[0][2], bw[2][0], bw[1][2], bw[2][1]]
    print("lo shaped to 30 Mbit/s:", [round(x / MBIT, 1) for x in lo],
          "veth shaped to 100 Mbit/s:", [round(x / MBIT, 1) for x in veth], "(Mbit/s)")
    assert max(lo) < 0.5 * min(veth), f"lo {lo} vs veth {veth} (B/s)"
    for x in lo:
        assert x == pytest.approx(30 * MBIT, rel=0.25), f"lo {x / MBIT:.1f} Mbit/s, shaped to 30"
    for x in veth:
        assert x == pytest.approx(100 * MBIT, rel=0.2), f"veth {x / MBIT:.1f} Mbit/s"
    assert [d["host"].rsplit("-", 1)[-1] for d in data["devices"]] == ["a", "a", "b"]


def test_teardown_on_failure_leaves_nothing() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    tb = netns.Testbed()
    with pytest.raises(RuntimeError, match="boom"), tb:
        a, b = tb.namespace("a"), tb.namespace("b")
        link = tb.connect(a, b)
        tb.shape(a, link.a_dev, "10mbit")
        tb.shape(a, "lo", "10mbit", burst="256kb")
        sleeper = tb.popen(b, ["sleep", "300"])
        assert psutil.pid_exists(sleeper.pid)
        raise RuntimeError("boom")
    _nothing_left(tb)
    assert sleeper.poll() is not None, "a process started in the testbed still runs"


def test_leftovers_of_a_dead_process_are_cleaned() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"pdvtb-{gone.pid}-dead-a"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in cleanup_leftovers()
        assert stale not in leftovers()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)
