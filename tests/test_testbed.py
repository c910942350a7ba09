"""The emulated cluster end to end: links measured as the file says, a reduced `inverted`
scenario, teardown.

`pdv profile cluster` across a 4-host file reproduces every pair's rate (htb class per
destination, an uplink, a delayed pair) within 15%, and an uplink is shared by its host's
pairs. In the reduced scenario, two hosts (network namespaces) of two ranks each; each host's
`lo` is shaped slow (10 Mbit/s) and the link between the hosts fast (1 Gbit/s), so the usual
assumption (inside a host is faster) is wrong here. The planner learns that only from `pdv
profile cluster` run across the testbed; the test asserts that pdv's plan, run across the
namespaces, is *measured* faster than the hierarchy baseline's. Every test checks that no
namespace (the bridge's included), link, qdisc, cgroup or process of the testbed is left.
Needs root, iproute2 and cgroup v1 cpu/memory; skipped cleanly elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import thesis
from benchmarks.testbed import cgroups, netns, topology
from benchmarks.testbed.cluster import EmulatedCluster, nothing_left, unavailable_reason
from pdv import artifacts
from tests.conftest import run_pdv

TOPOLOGY = thesis.TOPOLOGIES / "inverted-ci.json"
PAIRS = thesis.TOPOLOGIES / "pairs-ci.json"
MBIT = 1e6
# Small enough to profile and run in seconds on one core; wide enough (128 KiB of activations
# per sample) that a pipeline hop over a 10 Mbit/s lo costs more than a stage's compute.
MODEL_ARGS = ("d_model=256", "seq_len=128", "n_layer=4", "vocab_size=512")


@pytest.fixture
def _needs_testbed() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"emulated cluster unavailable: {reason}")


def _all_qdiscs_in_root() -> str:
    return subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout


@pytest.mark.usefixtures("_needs_testbed")
@pytest.mark.netns
@pytest.mark.e2e
@pytest.mark.slow
def test_profile_cluster_reproduces_every_pair_of_a_four_host_file(tmp_path: Path) -> None:
    topo = topology.load(PAIRS)
    with EmulatedCluster(topo) as ec:
        tag = ec.tag
        prof = ec.profile_cluster(tmp_path / "c.json", tmp_path / "logs",
                                  sizes="64KiB,256KiB,1MiB")
        assert prof.ok, prof.tail()
    assert nothing_left(netns.PREFIX, tag) == []
    data = json.loads((tmp_path / "c.json").read_text())
    bw, lat = data["links"]["bandwidth_Bps"], data["links"]["latency_s"]
    hosts = [h.name for _, h, _ in topo.rank_hosts()]
    assert [d["host"].rsplit("-", 1)[-1] for d in data["devices"]] == hosts
    lines, misses = [], []
    for i, a in enumerate(hosts):
        for j, b in enumerate(hosts):
            if a == b:
                continue
            want, got = topo.effective_rate(a, b), bw[i][j] * 8
            assert want is not None
            lines.append(f"{a}->{b} {got / MBIT:.1f} of {want / MBIT:.0f} Mbit/s, "
                         f"alpha {lat[i][j] * 1e3:.2f} ms")
            if abs(got - want) > 0.15 * want:
                misses.append(lines[-1])
    print("\n".join(lines))
    assert misses == [], misses
    # the delayed pair's one-way latency, read from the 1-byte round trip
    for i, j in ((0, 1), (1, 0)):
        assert lat[i][j] == pytest.approx(0.003, rel=0.15), lines
    assert max(lat[0][2], lat[2][3], lat[3][0]) < 0.001, "an undelayed pair got a latency"


_SINK = ("import socket\n"
         "s = socket.create_server(('0.0.0.0', 5301))\n"
         "c, _ = s.accept()\n"
         "while c.recv(1 << 20):\n"
         "    pass\n")
_SEND = ("import socket, sys, threading, time\n"
         "def send(host, out):\n"
         "    c = socket.create_connection((host, 5301))\n"
         "    t = time.perf_counter()\n"
         "    c.sendall(bytes(3 << 20))\n"
         "    c.shutdown(socket.SHUT_WR)\n"
         "    c.recv(1)\n"
         "    out.append(3 * 8 * 2**20 / (time.perf_counter() - t))\n"
         "out = []\n"
         "ts = [threading.Thread(target=send, args=(h, out)) for h in sys.argv[1:]]\n"
         "[t.start() for t in ts]\n"
         "[t.join() for t in ts]\n"
         "print(sum(out))\n")


@pytest.mark.usefixtures("_needs_testbed")
@pytest.mark.netns
def test_an_uplink_is_shared_by_every_pair_of_its_host() -> None:
    # Host c's uplink (30 Mbit/s) is below each of its pairs (60 Mbit/s): two flows at once
    # share it, in both directions.
    topo = topology.load(PAIRS)
    with EmulatedCluster(topo) as ec:
        tag = ec.tag
        ns = {s.host: s for s in ec.slots}
        tb = ec.testbed

        def both(sender: str, receivers: list[str]) -> float:
            sinks = [tb.popen(ns[r].ns, [sys.executable, "-c", _SINK]) for r in receivers]
            time.sleep(1)
            done = tb.run(ns[sender].ns, [sys.executable, "-c", _SEND,
                                          *[ns[r].addr for r in receivers]], timeout=60)
            assert done.returncode == 0, done.stderr
            for p in sinks:
                p.wait(timeout=10)
            return float(done.stdout)

        out_of_c = both("c", ["a", "b"])
        unshared = both("b", ["a", "d"])  # b's pairs to a (delayed) and d, no uplink
    assert out_of_c == pytest.approx(30 * MBIT, rel=0.15)
    assert unshared > 1.5 * 60 * MBIT  # two pairs side by side, each at its own rate
    assert nothing_left(netns.PREFIX, tag) == []


@pytest.mark.usefixtures("_needs_testbed")
@pytest.mark.netns
@pytest.mark.e2e
@pytest.mark.slow
def test_inverted_pdv_is_measured_faster_than_hierarchy(tmp_path: Path) -> None:
    prof = thesis.profile_model(tmp_path, thesis.MODEL, MODEL_ARGS, "1,2")
    scenario = thesis.Scenario("inverted-ci")
    tags: list[str] = []
    real_enter = EmulatedCluster.__enter__

    def remember(self: EmulatedCluster) -> EmulatedCluster:
        tags.append(self.tag)
        return real_enter(self)

    EmulatedCluster.__enter__ = remember  # type: ignore[method-assign]
    try:
        rows = thesis.run_scenario(scenario, prof, tmp_path / "run", global_batch=8, steps=4,
                                   planners=("pdv", "hierarchy"), topology_file=TOPOLOGY)
    finally:
        EmulatedCluster.__enter__ = real_enter  # type: ignore[method-assign]
    print(thesis.markdown(rows))
    by = {r.planner: r for r in rows}
    pdv, hier = by["pdv"], by["hierarchy"]
    assert pdv.measured_s and hier.measured_s, f"a plan did not run: {rows}"
    assert pdv.measured_s < hier.measured_s, (
        f"pdv {pdv.layout} measured {pdv.measured_s:.3f} s, hierarchy {hier.layout} "
        f"{hier.measured_s:.3f} s"
    )
    assert pdv.error is not None and hier.error is not None  # both have a prediction
    assert tags and nothing_left(netns.PREFIX, tags[0]) == []
    assert f"pv{tags[0]}" not in _all_qdiscs_in_root()


@pytest.mark.usefixtures("_needs_testbed")
@pytest.mark.netns
@pytest.mark.e2e
def test_ranks_run_in_their_namespace_and_cgroup_and_teardown_on_failure(
        tmp_path: Path) -> None:
    topo = topology.Topology(
        "limits",
        (topology.HostSpec("a", (topology.RankSpec(cpu=0.5, memory=300 << 20),), "20mbit"),
         topology.HostSpec("b", (topology.RankSpec(),), None),
         topology.HostSpec("c", (topology.RankSpec(),), None, uplink="50mbit")),
        "100mbit",
        (topology.LinkSpec(("a", "b"), latency="1ms"),),
    )
    ec = EmulatedCluster(topo)
    probe = ("import os,sys; print(open('/proc/self/cgroup').read());"
             "print(os.stat('/proc/self/ns/net').st_ino)")
    with pytest.raises(RuntimeError, match="boom"), ec:
        tag = ec.tag
        a = ec.slots[0]
        assert (a.group.path("cpu") / "cpu.cfs_quota_us").read_text().strip() == "5000"
        assert a.group.memory_cap() == 300 << 20
        assert "rate 20Mbit" in ec.testbed.qdiscs(a.ns)  # lo
        classes = ec.testbed.run(a.ns, ["tc", "class", "show", "dev", a.dev]).stdout
        assert "rate 100Mbit" in classes  # the class towards host b
        run = ec.launch(["--no-python", "python", "-c", probe], tmp_path, timeout=60)
        assert run.ok, run.tail()
        text = run.logs[0].read_text()
        assert f"cpu:/{a.group.name}" in text and f"memory:/{a.group.name}" in text
        ns_inode = os.stat(f"/var/run/netns/{a.ns.name}").st_ino
        assert str(ns_inode) in text
        assert run.peak_memory[0] > 0 and run.memory_cap == [300 << 20, None, None]
        # the bridge's namespace, the uplink's inbound cap there, the delay line and its cgroup
        switch = ec.testbed.namespaces[0]
        assert switch.name.endswith(f"-{tag}-{netns.SWITCH}")
        assert "rate 50Mbit" in ec.testbed.run(switch, ["tc", "class", "show", "dev",
                                                        ec.testbed.ports[2].switch_dev]).stdout
        assert ec.service_group is not None and ec.service_group.path("cpu").exists()
        assert [p for p in nothing_left(netns.PREFIX, tag) if "delayline" in p]
        raise RuntimeError("boom")
    assert nothing_left(netns.PREFIX, tag) == []
    assert not [p for p in cgroups.leftovers(netns.PREFIX) if tag in p.name]


@pytest.mark.usefixtures("_needs_testbed")
@pytest.mark.netns
@pytest.mark.e2e
def test_a_plan_on_idle_ranks_runs_on_their_slots(tmp_path: Path) -> None:
    # Ranks 0, 1 on host a, rank 2 on host b; the plan keeps off rank 0 and runs stage 0 on
    # host b: torchrun's rank 0 (the rendezvous) must be plan rank 1, on host a.
    caps = [200 << 20, 3 << 30, 2 << 30]
    topo = topology.Topology(
        "idle-rank",
        (topology.HostSpec("a", (topology.RankSpec(memory=caps[0]),
                                 topology.RankSpec(memory=caps[1]))),
         topology.HostSpec("b", (topology.RankSpec(memory=caps[2]),))),
        "1gbit",
    )
    devices = [{"rank": r, "host": h, "kind": "cpu", "memory_bytes": c}
               for r, (h, c) in enumerate(zip("aab", caps, strict=True))]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({
        "schema": "pdv.plan/v1", "model": {"spec": "mlp",
                                           "kwargs": {"n_layer": 2, "dim": 32}},
        "stages": [{"layers": [0, 2], "ranks": [2]}, {"layers": [2, 4], "ranks": [1]}],
        "micro_batch_size": 2, "num_micro_batches": 2, "global_batch_size": 4,
        "schedule": "GPipe", "devices": devices,
        "predicted": {"step_time_s": 0.01, "peak_memory_bytes": {"1": 111, "2": 222}},
    }))
    report = tmp_path / "report.json"
    probe = ("import os; print('RANK', os.environ['RANK']);"
             "print(open('/proc/self/cgroup').read());"
             "print('NETNS', os.stat('/proc/self/ns/net').st_ino)")
    with EmulatedCluster(topo) as ec:
        tag = ec.tag
        placed = ec.launch(["--no-python", "python", "-c", probe], tmp_path / "probe",
                           timeout=60, ranks=[2, 1])
        assert placed.ok, placed.tail()
        for torchrun_rank, (slot, log) in enumerate(
                zip([ec.slots[2], ec.slots[1]], placed.logs, strict=True)):
            text = log.read_text()
            assert f"RANK {torchrun_rank}\n" in text and f"memory:/{slot.group.name}\n" in text
            assert f"NETNS {os.stat(f'/var/run/netns/{slot.ns.name}').st_ino}" in text
        run = ec.run_plan(plan, report, tmp_path / "logs", steps=3, timeout=240)
    assert run.ok, run.tail()
    assert run.ranks == [1, 2] and run.memory_cap == caps[1:]
    assert sorted(p.name for p in (tmp_path / "logs").glob("rank*.log")) == [
        "rank1.log", "rank2.log"]
    copy = tmp_path / "plan.renumbered.json"
    assert run_pdv("validate", str(copy)).returncode == 0
    ran = json.loads(copy.read_text())
    assert [s["ranks"] for s in ran["stages"]] == [[1], [0]]
    # Read as a plan: the file writes devices as runs of alike ranks (pdv.plan/v2).
    devices = artifacts.load_as(copy, "plan").devices
    assert devices is not None and [(d.rank, d.host) for d in devices] == [(0, "a"), (1, "b")]
    assert ran["predicted"]["peak_memory_bytes"] == {"0": 111, "1": 222}
    assert run_pdv("validate", str(report)).returncode == 0
    got = json.loads(report.read_text())
    assert got["plan_digest"] == artifacts.digest(artifacts.load(plan))
    peaks = got["measured"]["peak_memory_bytes"]
    assert sorted(peaks) == ["1", "2"]
    # A rank's cgroup holds its worker (and its torchrun): never less than the worker's peak.
    for i, r in enumerate(run.ranks):
        assert run.peak_memory[i] >= peaks[str(r)] > 0
    assert nothing_left(netns.PREFIX, tag) == []


@pytest.mark.usefixtures("_needs_testbed")
@pytest.mark.netns
def test_sigterm_tears_the_cluster_down(tmp_path: Path) -> None:
    # Three hosts on the bridge, one pair behind the delay line: all of it must go.
    spec = json.loads(TOPOLOGY.read_text())
    spec["hosts"].append({"name": "c", "ranks": [{}]})
    spec["links"] = [{"hosts": ["a", "c"], "rate": "50mbit", "latency": "1ms"}]
    (tmp_path / "three.json").write_text(json.dumps(spec))
    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(thesis.ROOT)!r})\n"
        "from benchmarks.testbed import topology\n"
        "from benchmarks.testbed.cluster import EmulatedCluster\n"
        f"topo = topology.load({str(tmp_path / 'three.json')!r})\n"
        "with EmulatedCluster(topo) as ec:\n"
        "    print(ec.tag, flush=True)\n"
        "    ec.launch(['--no-python', 'sleep', '300'], __import__('pathlib').Path("
        f"{str(tmp_path)!r}), timeout=300)\n"
    )
    proc = subprocess.Popen(["python", "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    tag = proc.stdout.readline().strip()
    assert tag, "the cluster did not come up"
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("rank*.log")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    assert [p for p in cgroups.leftovers(netns.PREFIX) if tag in p.name], "no cgroups made"
    assert len([n for n in netns.leftovers() if f"-{tag}-" in n]) == 4  # 3 hosts + bridge
    assert [p for p in nothing_left(netns.PREFIX, tag) if "delayline" in p]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert nothing_left(netns.PREFIX, tag) == []


def test_topology_files_load_and_bad_ones_are_refused(tmp_path: Path) -> None:
    for name in ("inverted", "normal", "mixed-speed", "memory-tight", "inverted-ci"):
        # the two-host scenarios (N-host files: tests/test_testbed_topology.py)
        topo = topology.load(thesis.TOPOLOGIES / f"{name}.json")
        assert topo.world == 4
        assert [r for r, _, _ in topo.rank_hosts()] == [0, 1, 2, 3]
    mixed = topology.load(thesis.TOPOLOGIES / "mixed-speed.json")
    cpus = [spec.cpu for _, _, spec in mixed.rank_hosts()]
    assert cpus[2] == cpus[0] / 2  # host b's ranks at half the CPU of host a's
    assert topology.parse_rate("50mbit") == 50e6
    assert topology.parse_bytes("440MiB") == 440 << 20
    bad = tmp_path / "bad.json"
    bad.write_text('{"hosts": [{"name": "a", "ranks": [{}]}]}')
    with pytest.raises(ValueError, match="at least 2 hosts"):
        topology.load(bad)
    with pytest.raises(ValueError, match="50mbit"):
        topology.parse_rate("50 megabits")


def test_acceptance_checks_fail_when_they_should() -> None:
    def row(planner: str, measured: float | None, oom: bool = False) -> thesis.Row:
        return thesis.Row("inverted", planner, "-", 0.1, measured, [1], [None], [3], oom,
                          None if measured else "OOM-killed")

    inverted = thesis.SCENARIOS["inverted"]
    assert thesis.check(inverted, [row("pdv", 0.6), row("hierarchy", 1.0)]) == []
    assert thesis.check(inverted, [row("pdv", 0.8), row("hierarchy", 1.0)])
    tight = thesis.Scenario("inverted", no_pdv_oom=True)
    assert thesis.check(tight, [row("pdv", None, oom=True)])
    crashed = replace(row("pdv", None), failed="exit codes [1, 1]")
    assert any("did not run" in f for f in thesis.check(thesis.Scenario("inverted"), [crashed]))
    table = thesis.markdown([row("pdv", 0.5), row("hierarchy", 1.0)])
    assert "| inverted | hierarchy |" in table and "2.00x" in table and "-80%" in table
    assert "r3 0/inf" in table  # peaks are labelled with the testbed rank they were read on
