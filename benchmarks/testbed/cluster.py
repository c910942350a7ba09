"""The emulated cluster: a topology brought up as namespaces, shaped links and per-rank cgroups.

    with EmulatedCluster(topology.load("benchmarks/testbed/topologies/inverted.json")) as ec:
        ec.profile_cluster(out / "cluster.json")          # pdv profile cluster, one rank each
        result = ec.run_plan(out / "plan.json", steps=6)  # pdv's runtime, one rank each

Layout: each host is a network namespace; the two hosts are joined by one veth pair shaped
with tc tbf at the inter-host rate in both directions; each host's `lo` is shaped at its own
rate (two ranks of one host talk over it). Each rank runs in its host's namespace and in its
own cgroup (CPU quota, memory cap).

Launch: one torchrun per rank (`--nproc-per-node 1`, node rank = global rank) with a static
rendezvous at host 0's veth address. This is `pdv run --print-commands`' command for a host,
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

from benchmarks.testbed import cgroups, netns
from benchmarks.testbed.netns import Namespace
from benchmarks.testbed.topology import Topology, parse_rate
from pdv import artifacts
from pdv.artifacts import Plan, RunReport
from pdv.profile.launch_local import free_port
from pdv.run.idle import renumbered, report_in_plan_ranks
from pdv.run.launch import HostSlot, RunOptions, torchrun_argv

__all__ = ["EmulatedCluster", "RankRun", "RankSlot", "nothing_left", "unavailable_reason"]

ROOT = Path(__file__).resolve().parents[2]
LO_BURST = 256 * 1024  # lo's 64 KiB MTU: a smaller bucket drops every large packet
VETH_BURST = 16 * 1024  # a few 1500-byte frames


def unavailable_reason() -> str | None:
    """Why the emulated cluster cannot be built here, or None."""
    return netns.unavailable_reason() or cgroups.unavailable_reason()


def _burst(rate: str, floor: int) -> str:
    """A tbf bucket that holds a packet (`floor`) and ~2 ms of traffic (fast links need more)."""
    return f"{max(floor, int(parse_rate(rate) / 8 * 0.002))}b"


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
        a_spec, b_spec = topo.hosts
        a, b = tb.namespace(a_spec.name), tb.namespace(b_spec.name)
        link = tb.connect(a, b)
        if topo.inter_host:
            tb.shape(a, link.a_dev, topo.inter_host, burst=_burst(topo.inter_host, VETH_BURST))
            tb.shape(b, link.b_dev, topo.inter_host, burst=_burst(topo.inter_host, VETH_BURST))
        ends = {a_spec.name: (a, link.a_dev, link.a_addr),
                b_spec.name: (b, link.b_dev, link.b_addr)}
        for spec in topo.hosts:
            if spec.lo:
                tb.shape(ends[spec.name][0], "lo", spec.lo, burst=_burst(spec.lo, LO_BURST))
        for rank, host, limits in topo.rank_hosts():
            ns, dev, addr = ends[host.name]
            group = cgroups.RankGroup(f"{self.prefix}-{os.getpid()}-{self.tag}-r{rank}")
            self.slots.append(RankSlot(rank, host.name, ns, dev, addr, group))
            group.create(limits.cpu, limits.memory)

    def close(self) -> None:
        """Kill every rank, remove the cgroups and the namespaces (with their veths, qdiscs)."""
        errors = []
        try:
            self.testbed.close()
        except RuntimeError as e:
            errors.append(str(e))
        for slot in self.slots:
            try:
                slot.group.remove()
            except RuntimeError as e:
                errors.append(str(e))
        self.slots.clear()
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
        # torchrun's rank 0 hosts the static rendezvous: its host's veth address, which the
        # other host reaches over the veth and its own host over the local route.
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
    """This cluster's namespaces, root-namespace veths and cgroups that still exist."""
    left = [n for n in netns.leftovers(prefix) if f"-{tag}-" in n]
    left += [str(p) for p in cgroups.leftovers(prefix) if f"-{tag}-" in p.name]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    left += [line.split(":")[1].strip() for line in links.splitlines() if f"pv{tag}" in line]
    return left
