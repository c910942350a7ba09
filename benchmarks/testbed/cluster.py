"""The emulated cluster: a topology brought up as namespaces, shaped links and per-rank cgroups.

    with EmulatedCluster(topology.load("benchmarks/testbed/topologies/inverted.json")) as ec:
        ec.profile_cluster(out / "cluster.json")          # pdv profile cluster, one rank each
        result = ec.run_plan(out / "plan.json", steps=6)  # pdv's runtime, one rank each

Layout: each host is a network namespace with one veth onto a Linux bridge (in a namespace of
its own). Each host's port carries an htb tree with one class per destination host (a u32
filter on the destination address), so every host pair has its own rate in each direction, all
under the host's uplink where it has one; the bridge's port towards a host caps what it
receives at its uplink (see `shaping`). Each host's `lo` is shaped at its own rate (two ranks of
one host talk over it). Each rank runs in its host's namespace and in its own cgroup (CPU
quota and weight, memory cap).

Launch: one torchrun per rank (`--nproc-per-node 1`, node rank = global rank) with a static
rendezvous at the first rank's host address. This is `pdv run --print-commands`' command for a host,
split one rank per torchrun so each rank can enter its own cgroup before it execs (torchrun
numbers ranks node by node, so the global ranks are the plan's). gloo binds to the host's veth
address (GLOO_SOCKET_IFNAME); between two ranks of one host the kernel routes it over `lo`.

A plan that leaves ranks idle (say it runs on rank 2 alone, away from a memory-capped rank 0)
runs on exactly the slots of the ranks it names: torchrun only numbers ranks 0..k-1, so a copy
of the plan renumbered to 0..k-1 runs, torchrun rank i on the slot of the plan's i-th rank, and
the run report is mapped back to the plan's own rank numbers.

Teardown happens on every exit path: the context manager closes on exceptions, SIGTERM and
SIGHUP are turned into an exception while the cluster is up, and namespaces and cgroups of a
dead testbed process are removed on the next start (names carry the owner's pid).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

from benchmarks.testbed import cgroups, netns, shaping
from benchmarks.testbed.netns import Namespace
from benchmarks.testbed.topology import Topology, parse_duration, parse_rate
from pdv import artifacts
from pdv.artifacts import Plan, RunReport
from pdv.profile.launch_local import free_port
from pdv.run.idle import renumbered, report_in_plan_ranks
from pdv.run.launch import HostSlot, RunOptions, torchrun_argv

__all__ = ["EmulatedCluster", "RankRun", "RankSlot", "nothing_left", "unavailable_reason"]

ROOT = Path(__file__).resolve().parents[2]
LO_BURST = 256 * 1024  # lo's 64 KiB MTU: a smaller bucket drops every large packet
VETH_BURST = 16 * 1024  # a few 1500-byte frames
TUN_BURST = 2 * netns.TUN_MTU  # a delayed pair's packets are TUN_MTU long


def unavailable_reason() -> str | None:
    """Why the emulated cluster cannot be built here, or None."""
    return netns.unavailable_reason() or cgroups.unavailable_reason()


def _bps(rate: str | None) -> float | None:
    return parse_rate(rate) if rate else None


@dataclass(frozen=True)
class RankSlot:
    """Where one rank runs: its host namespace, interface, address and cgroup."""

    rank: int
    host: str
    ns: Namespace
    dev: str
    addr: str
    group: cgroups.RankGroup


@dataclass(frozen=True)
class RankRun:
    """How every rank of one launch ended, and what its cgroup saw."""

    returncodes: list[int | None]
    peak_memory: list[int]
    memory_cap: list[int | None]
    oom_kills: list[int]
    logs: list[Path]
    wall_s: float
    ranks: list[int]  # the testbed rank of each entry above (a plan may leave ranks idle)

    @property
    def ok(self) -> bool:
        """Every rank exited 0."""
        return all(rc == 0 for rc in self.returncodes)

    def tail(self, chars: int = 1500) -> str:
        """The end of every rank's log, for an error message."""
        return "\n".join(f"--- rank {r} (exit {rc}) ---\n{p.read_text()[-chars:]}"
                         for r, rc, p in zip(self.ranks, self.returncodes, self.logs, strict=True)
                         if p.exists())


class _Terminated(BaseException):
    """SIGTERM/SIGHUP while the cluster is up: unwinds through the context manager."""


@dataclass
class EmulatedCluster:
    """A topology, up for the duration of a `with` block (see the module docstring)."""

    topology: Topology
    prefix: str = netns.PREFIX
    testbed: netns.Testbed = field(init=False)
    slots: list[RankSlot] = field(default_factory=list)
    service_group: cgroups.RankGroup | None = None
    _old_handlers: dict[int, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.testbed = netns.Testbed(prefix=self.prefix)

    @property
    def tag(self) -> str:
        """This cluster's name tag (in every namespace, veth and cgroup name)."""
        return self.testbed.tag

    def __enter__(self) -> EmulatedCluster:
        cgroups.cleanup_leftovers(self.prefix)
        self._trap_signals()
        try:
            self.testbed.__enter__()
            self._bring_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _trap_signals(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            raise _Terminated(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # only the main thread may set handlers
                self._old_handlers[sig] = signal.signal(sig, handler)

    def _bring_up(self) -> None:
        topo, tb = self.topology, self.testbed
        switch = tb.bridge()
        ports = {h.name: tb.attach(switch, tb.namespace(h.name)) for h in topo.hosts}
        delayed = {frozenset(lk.hosts): lk for lk in topo.links if lk.latency}
        for h in topo.hosts:
            port, uplink = ports[h.name], _bps(h.uplink)
            # A delayed pair has a path of its own (tun devices and the delay line), shaped there.
            dests = [shaping.Dest(ports[o.name].addr,
                                  None if frozenset((h.name, o.name)) in delayed
                                  else _bps(topo.pair_rate(h.name, o.name)))
                     for o in topo.hosts if o is not h]
            tb.tc(port.ns, shaping.pair_commands(port.dev, dests, uplink, VETH_BURST))
            if uplink:
                tb.tc(switch.ns, shaping.cap_commands(port.switch_dev, uplink, VETH_BURST))
            if h.lo:
                tb.tc(port.ns, shaping.tbf_commands("lo", parse_rate(h.lo), LO_BURST))
        for link in delayed.values():
            a, b = (ports[n] for n in link.hosts)
            pair = tb.delay(a, b, parse_duration(link.latency or "0s"))
            rate = _bps(topo.pair_rate(*link.hosts))
            if rate:
                tb.tc(a.ns, shaping.tbf_commands(pair.a_tun, rate, TUN_BURST))
                tb.tc(b.ns, shaping.tbf_commands(pair.b_tun, rate, TUN_BURST))
        if delayed:
            self.service_group = cgroups.RankGroup(
                f"{self.prefix}-{os.getpid()}-{self.tag}-delay")
            # No quota, a rank's weight: a packet is never held longer for want of a core.
            self.service_group.create(None, None, shares=cgroups.QUOTA_SHARES)
            tb.start_delay_line(self.service_group.shell_enter())
        for rank, host, limits in topo.rank_hosts():
            port = ports[host.name]
            group = cgroups.RankGroup(f"{self.prefix}-{os.getpid()}-{self.tag}-r{rank}")
            self.slots.append(RankSlot(rank, host.name, port.ns, port.dev, port.addr, group))
            group.create(limits.cpu, limits.memory)

    def close(self) -> None:
        """Kill every rank, remove the cgroups and the namespaces (with their veths, qdiscs)."""
        errors = []
        try:
            self.testbed.close()
        except RuntimeError as e:
            errors.append(str(e))
        groups = [s.group for s in self.slots]
        if self.service_group is not None:
            groups.append(self.service_group)
        for group in groups:
            try:
                group.remove()
            except RuntimeError as e:
                errors.append(str(e))
        self.slots.clear()
        self.service_group = None
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old_handlers.clear()
        if errors:
            raise RuntimeError("emulated cluster teardown: " + "; ".join(errors))

    # -- launching -------------------------------------------------------------------------

    def launch(self, rank_argv: list[str], logs: Path, timeout: float,
               env: dict[str, str] | None = None, world: int | None = None,
               ranks: list[int] | None = None) -> RankRun:
        """Run `python -m torch.distributed.run ... <rank_argv>` once per rank; wait for all.

        rank_argv follows torchrun's own options (a module run with `-m ...`, or `--no-python
        cmd ...`). A rank that exits non-zero or runs past `timeout` ends the launch: the
        others are killed, since they would block on it. `world`: only ranks 0..world-1.
        `ranks`: only these testbed ranks, torchrun rank i on the slot of ranks[i] (its log
        and the RankRun entries are named by the testbed rank).
        """
        if ranks is None:
            ranks = list(range(world or len(self.slots)))
        if not ranks or len(set(ranks)) != len(ranks) or not set(ranks) <= set(
                range(len(self.slots))):
            raise ValueError(f"ranks {ranks}: the testbed has ranks 0..{len(self.slots) - 1}, "
                             "each launched at most once")
        logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        slots = [self.slots[r] for r in ranks]
        # torchrun's rank 0 hosts the static rendezvous: its host's address, which the other
        # hosts reach over the bridge and its own host over the local route.
        master = slots[0].addr
        procs, paths = [], []
        for node_rank, slot in enumerate(slots):
            slot.group.reset_peak()
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes",
                    str(len(slots)), "--node-rank", str(node_rank), "--nproc-per-node", "1",
                    "--master-addr", master, "--master-port", str(port), *rank_argv]
            procs.append(self._start(slot, argv, logs / f"rank{slot.rank}.log", env))
            paths.append(logs / f"rank{slot.rank}.log")
        return self._wait(procs, paths, timeout, slots)

    def _start(self, slot: RankSlot, argv: list[str], log: Path,
               env: dict[str, str] | None) -> subprocess.Popen[bytes]:
        # The shell enters the rank's cgroups, then execs: torchrun and its worker inherit them.
        # nsenter --net (not `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup)
        # lets the rank's profiler read its own memory cap.
        enter = ["nsenter", f"--net=/var/run/netns/{slot.ns.name}", "--"]
        script = f"{slot.group.shell_enter()} && exec {shlex.join(enter + argv)}"
        rank_env = {**os.environ, "GLOO_SOCKET_IFNAME": slot.dev, "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(ROOT), **(env or {})}
        with log.open("w") as out:
            proc = subprocess.Popen(["sh", "-c", script], env=rank_env, cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.testbed.procs.append(proc)  # killed with its children on close
        return proc

    def _wait(self, procs: list[subprocess.Popen[bytes]], logs: list[Path],
              timeout: float, slots: list[RankSlot]) -> RankRun:
        start = time.monotonic()
        rcs: list[int | None] = [None] * len(procs)
        while any(rc is None for rc in rcs) and time.monotonic() - start < timeout:
            rcs = [p.poll() for p in procs]
            if any(rc not in (None, 0) for rc in rcs):
                time.sleep(2)  # let the others report why they stop, then end them
                rcs = [p.poll() for p in procs]
                break
            time.sleep(0.2)
        wall = time.monotonic() - start
        run = RankRun(
            returncodes=rcs,
            peak_memory=[s.group.peak_memory() for s in slots],
            memory_cap=[s.group.memory_cap() for s in slots],
            oom_kills=[s.group.oom_kills() for s in slots],
            logs=logs, wall_s=wall, ranks=[s.rank for s in slots],
        )
        for p in procs:
            if p.poll() is None:
                _kill_tree(p)
        self.testbed.procs.clear()
        return run

    # -- what the thesis runs ----------------------------------------------------------------

    def profile_cluster(self, out: Path, logs: Path, sizes: str = "64KiB,256KiB",
                        timeout: float = 240) -> RankRun:
        """`pdv profile cluster` across the testbed, one rank per process (writes `out`)."""
        largest = sizes.split(",")[-1]
        return self.launch(["--no-python", sys.executable, "-m", "pdv", "profile", "cluster",
                            "-o", str(out), "--sizes", sizes, "--max-size", largest,
                            "--warmup", "1", "--iters", "3", "--timeout", "90"],
                           logs, timeout)

    def run_plan(self, plan: Path, report: Path, logs: Path, steps: int, warmup: int = 1,
                 timeout: float = 300) -> RankRun:
        """pdv's runtime on a plan across the testbed (rank 0 writes the run report).

        A plan may leave ranks idle (a baseline that found fewer ranks faster, or a planner
        that kept off a memory-capped rank); it runs on the slots of the ranks its stages use.
        Unless those are 0..k-1, a copy renumbered to 0..k-1 runs (`<plan>.renumbered.json`
        and `<report>.renumbered.json` next to the report), and `report` is written back in
        the plan's own rank numbers.
        """
        original = artifacts.load_as(plan, "plan")
        assert isinstance(original, Plan)
        used = sorted({r for s in original.stages for r in s.ranks})
        if used[-1] >= len(self.slots):
            raise ValueError(f"{plan}: the plan uses ranks {used} but the testbed has ranks "
                             f"0..{len(self.slots) - 1}")
        renumber = used != list(range(len(used)))
        runs, raw = plan, report
        if renumber:
            runs = report.with_name(f"{plan.stem}.renumbered.json")
            raw = report.with_name(f"{report.stem}.renumbered.json")
            artifacts.write(runs, renumbered(original, used))
        opts = RunOptions(plan=str(runs), steps=steps, warmup=warmup, report=str(raw),
                          device="cpu")
        # pdv's own per-host command, for one rank: drop the torchrun part we build ourselves.
        argv = torchrun_argv(HostSlot("-", 0, 0, 1), 1, "-", 0, opts, python=sys.executable)
        run = self.launch(argv[argv.index("-m", 2):], logs, timeout, ranks=used)
        if renumber and run.ok and raw.exists():
            got = artifacts.load_as(raw, "run-report")
            assert isinstance(got, RunReport)
            artifacts.write(report, report_in_plan_ranks(got, original, used, runs.name))
        return run


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        family = psutil.Process(proc.pid).children(recursive=True)
        for p in [*family, psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    proc.wait()


def nothing_left(prefix: str, tag: str) -> list[str]:
    """This cluster's namespaces (bridge's included), root-namespace links, cgroups and
    processes (ranks, the delay line: their command lines name the tag) that still exist."""
    import psutil

    left = [n for n in netns.leftovers(prefix) if f"-{tag}-" in n]
    left += [str(p) for p in cgroups.leftovers(prefix) if f"-{tag}-" in p.name]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    left += [line.split(":")[1].strip() for line in links.splitlines() if f"pv{tag}" in line]
    for proc in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if f"-{tag}-" in line and proc.pid != os.getpid():
            left.append(f"process {proc.pid}: {line[:120]}")
    return left
