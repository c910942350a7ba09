"""Emulated hosts on one machine: network namespaces joined by veth pairs or a bridge, and tc.

A `Testbed` is a context manager that owns everything it creates and removes it on exit, even
when the body fails. Two hosts can be joined directly:

    with Testbed() as tb:
        a, b = tb.namespace("a"), tb.namespace("b")
        link = tb.connect(a, b)                    # veth pair, a private /30, both ends up
        tb.shape(a, link.a_dev, "100mbit")         # egress a -> b
        tb.shape(b, link.b_dev, "100mbit")         # egress b -> a
        tb.shape(a, "lo", "30mbit", burst="256kb") # traffic between two ranks inside a
        proc = tb.popen(a, ["python", "-c", "..."], env={"GLOO_SOCKET_IFNAME": link.a_dev})

or any number through a Linux bridge, which lives in a namespace of its own (`<...>-_sw`, a
name no host can take), so nothing is added to the root namespace:

    with Testbed() as tb:
        sw = tb.bridge()
        ports = [tb.attach(sw, tb.namespace(h)) for h in "abcd"]   # one /16, 10.78.0.k
        tb.tc(ports[0].ns, shaping.pair_commands(ports[0].dev, ...))  # per-destination rates

Names: namespaces are `<prefix>-<pid>-<tag>-<name>`, so leftovers of a crashed run (whose pid
is gone) are recognized and removed by `cleanup_leftovers`, and parallel testbeds of live
processes are never touched. veth pairs are created directly inside their namespaces
(`ip link add ... netns`), so they never exist in the root namespace, and deleting a namespace
removes its veth ends and their qdiscs with it.

Addresses are the testbed's own: 10.77.x.y/30 per direct veth, 10.78.0.0/16 on a bridge, seen
only inside the testbed's namespaces.
`lo` carries the traffic between two processes of one namespace; it has a 64 KiB MTU, so a tbf
on `lo` needs a burst of at least that (256kb works; smaller bursts drop large packets and the
ranks hang).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psutil

__all__ = [
    "PREFIX",
    "SWITCH",
    "Bridge",
    "Namespace",
    "DelayedPair",
    "Port",
    "Testbed",
    "Veth",
    "cleanup_leftovers",
    "leftovers",
    "unavailable_reason",
]

PREFIX = "pdvtb"
DELAY_LINE = Path(__file__).with_name("delayline.py")
TUN_MTU = 9000  # big packets: the delay line moves few per second
SWITCH = "_sw"  # the bridge's namespace: topology host names are letters and digits only


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (not root, no ip/tc, no netns support), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install iproute2)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def _netns_names() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def leftovers(prefix: str = PREFIX) -> list[str]:
    """Namespaces with the testbed prefix that exist now (of any testbed)."""
    return [n for n in _netns_names() if n.startswith(prefix + "-")]


def cleanup_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces left by testbeds whose process is gone; returns their names."""
    removed = []
    for name in leftovers(prefix):
        parts = name.split("-")
        if len(parts) < 3 or not parts[1].isdigit() or psutil.pid_exists(int(parts[1])):
            continue
        _kill_pids(_pids_in(name))
        _ip("netns", "delete", name, check=False)
        removed.append(name)
    return removed


def _pids_in(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_pids(pids: Sequence[int]) -> None:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            procs.append(p)
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=5)


@dataclass(frozen=True)
class Namespace:
    """One emulated host."""

    name: str

    def argv(self, command: Sequence[str]) -> list[str]:
        """The command line that runs `command` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *command]


@dataclass(frozen=True)
class Veth:
    """A veth pair between two namespaces, with one address at each end (a /30)."""

    a: Namespace
    a_dev: str
    a_addr: str
    b: Namespace
    b_dev: str
    b_addr: str


@dataclass(frozen=True)
class Bridge:
    """A Linux bridge in a namespace of its own; hosts attach to it by veth pairs."""

    ns: Namespace
    dev: str


@dataclass(frozen=True)
class Port:
    """A host's veth onto a bridge: `dev` (with `addr`) in the host, `switch_dev` on the bridge."""

    ns: Namespace
    dev: str
    addr: str
    switch_dev: str


@dataclass(frozen=True)
class DelayedPair:
    """Two bridge ports whose traffic to each other goes through tun devices and a delay line."""

    a: Port
    a_tun: str
    b: Port
    b_tun: str
    delay_s: float


@dataclass
class Testbed:
    """Namespaces, veth pairs and qdiscs that are all removed on exit (context manager)."""

    prefix: str = PREFIX
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    namespaces: list[Namespace] = field(default_factory=list)
    veths: list[Veth] = field(default_factory=list)
    ports: list[Port] = field(default_factory=list)
    delayed: list[DelayedPair] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    services: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __enter__(self) -> Testbed:
        cleanup_leftovers(self.prefix)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def namespace(self, name: str) -> Namespace:
        """Create a namespace (an emulated host) with its loopback up."""
        ns = Namespace(f"{self.prefix}-{os.getpid()}-{self.tag}-{name}")
        _ip("netns", "add", ns.name)
        self.namespaces.append(ns)
        _ip("-n", ns.name, "link", "set", "lo", "up")
        return ns

    def connect(self, a: Namespace, b: Namespace) -> Veth:
        """Join two namespaces by a veth pair with a private /30 (10.77.x.y) and bring it up."""
        k = len(self.veths)
        assert k < 16384, "the 10.77.0.0/16 block holds 16384 /30 subnets"
        net = f"10.77.{k * 4 // 256}.{k * 4 % 256}"  # the /30's network address
        a_addr, b_addr = net[: net.rindex(".") + 1], net[: net.rindex(".") + 1]
        a_addr += str(k * 4 % 256 + 1)
        b_addr += str(k * 4 % 256 + 2)
        a_dev, b_dev = f"pv{self.tag}{k}a", f"pv{self.tag}{k}b"
        _ip(
            "link",
            "add",
            a_dev,
            "netns",
            a.name,
            "type",
            "veth",
            "peer",
            "name",
            b_dev,
            "netns",
            b.name,
        )
        for ns, dev, addr in ((a, a_dev, a_addr), (b, b_dev, b_addr)):
            _ip("-n", ns.name, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns.name, "link", "set", dev, "up")
        veth = Veth(a, a_dev, a_addr, b, b_dev, b_addr)
        self.veths.append(veth)
        return veth

    def bridge(self) -> Bridge:
        """A bridge (in its own namespace) for hosts to attach to; STP off, so ports forward."""
        ns = self.namespace(SWITCH)
        dev = f"pv{self.tag}br"
        _ip("-n", ns.name, "link", "add", dev, "type", "bridge", "stp_state", "0")
        _ip("-n", ns.name, "link", "set", dev, "up")
        return Bridge(ns, dev)

    def attach(self, bridge: Bridge, ns: Namespace) -> Port:
        """Join a namespace to the bridge by a veth pair; its end gets the next 10.78/16 address."""
        k = len(self.ports)
        assert k < 65000, "the 10.78.0.0/16 block holds 65000 hosts here"
        addr = f"10.78.{(k + 1) // 256}.{(k + 1) % 256}"
        dev, switch_dev = f"pv{self.tag}h{k}", f"pv{self.tag}s{k}"
        _ip("link", "add", dev, "netns", ns.name, "type", "veth", "peer", "name", switch_dev,
            "netns", bridge.ns.name)
        _ip("-n", bridge.ns.name, "link", "set", switch_dev, "master", bridge.dev)
        _ip("-n", bridge.ns.name, "link", "set", switch_dev, "up")
        _ip("-n", ns.name, "addr", "add", f"{addr}/16", "dev", dev)
        _ip("-n", ns.name, "link", "set", dev, "up")
        port = Port(ns, dev, addr, switch_dev)
        self.ports.append(port)
        return port

    def delay(self, a: Port, b: Port, delay_s: float) -> DelayedPair:
        """Route a <-> b through a tun device in each (the delay line carries them; see
        `start_delay_line`), so that this pair gets `delay_s` one way. Shape each tun's egress
        for the pair's rate."""
        k = len(self.delayed)
        pair = DelayedPair(a, f"pv{self.tag}t{k}a", b, f"pv{self.tag}t{k}b", delay_s)
        for port, tun, peer in ((a, pair.a_tun, b), (b, pair.b_tun, a)):
            _ip("-n", port.ns.name, "tuntap", "add", "dev", tun, "mode", "tun")
            _ip("-n", port.ns.name, "link", "set", tun, "mtu", str(TUN_MTU), "up")
            # A packet from the peer arrives on the tun, not on the port the reverse route
            # names for the bridge; loose reverse-path checks must not drop it.
            for conf in ("all", tun):
                self.run(port.ns, ["sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0"],
                         check=True)
            _ip("-n", port.ns.name, "route", "add", f"{peer.addr}/32", "dev", tun, "src",
                port.addr)
        self.delayed.append(pair)
        return pair

    def start_delay_line(self, prelude: str = "", timeout: float = 30) -> None:
        """Start the process that carries every delayed pair (killed on close).

        `prelude`: shell text run first (say, entering a cgroup) before it execs.
        """
        if not self.delayed:
            return
        spec = json.dumps([{"a": p.a.ns.name, "a_dev": p.a_tun, "b": p.b.ns.name,
                            "b_dev": p.b_tun, "delay_s": p.delay_s} for p in self.delayed])
        argv = shlex.join([sys.executable, str(DELAY_LINE), spec])
        script = f"{prelude} && exec {argv}" if prelude else f"exec {argv}"
        proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE,
                                start_new_session=True)
        self.services.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            raise RuntimeError(f"the delay line did not start (exit {proc.poll()}, said "
                               f"{line!r})")

    def tc(self, ns: Namespace, commands: Sequence[Sequence[str]]) -> None:
        """Run tc command lines (see `shaping`) inside a namespace, stopping at the first error."""
        for cmd in commands:
            done = subprocess.run(ns.argv(cmd), capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} in {ns.name}: {done.stderr.strip()}")

    def shape(
        self, ns: Namespace, dev: str, rate: str, burst: str = "32kbit", latency: str = "50ms"
    ) -> None:
        """Limit `dev`'s egress in `ns` with a token bucket (tc tbf): rate like '100mbit'."""
        subprocess.run(
            ns.argv(
                [
                    "tc",
                    "qdisc",
                    "replace",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    burst,
                    "latency",
                    latency,
                ]
            ),
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def qdiscs(self, ns: Namespace) -> str:
        """`tc qdisc show` inside a namespace (what is shaped)."""
        return subprocess.run(
            ns.argv(["tc", "qdisc", "show"]), capture_output=True, text=True, check=True, timeout=30
        ).stdout

    def run(
        self, ns: Namespace, command: Sequence[str], **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside a namespace and wait for it (text output captured)."""
        opts: dict[str, object] = {"capture_output": True, "text": True, "timeout": 120, **kwargs}
        return subprocess.run(ns.argv(command), **opts)  # type: ignore[call-overload]

    def popen(
        self,
        ns: Namespace,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        **kwargs: object,
    ) -> subprocess.Popen[bytes]:
        """Start a command inside a namespace; it is killed (with its children) on close."""
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(ns.argv(command), env=full_env, start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Kill what runs inside, delete every namespace (their veths, bridge, qdiscs go too)."""
        for proc in self.procs + self.services:
            with contextlib.suppress(psutil.NoSuchProcess):
                family = [*psutil.Process(proc.pid).children(recursive=True)]
                _kill_pids([p.pid for p in family] + [proc.pid])
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for ns in self.namespaces:
            # Processes started some other way inside (ip netns exec ...) would pin the netns.
            _kill_pids(_pids_in(ns.name))
        errors = []
        for ns in reversed(self.namespaces):
            done = _ip("netns", "delete", ns.name, check=False)
            if done.returncode != 0 and ns.name in _netns_names():
                errors.append(f"{ns.name}: {done.stderr.strip()}")
        self.namespaces.clear()
        self.veths.clear()
        self.ports.clear()
        self.delayed.clear()
        self.procs.clear()
        self.services.clear()
        if errors:
            raise RuntimeError("testbed teardown failed: " + "; ".join(errors))

    def root_devices(self) -> list[str]:
        """Links in the root namespace that carry this testbed's veth names (should be none)."""
        out = _ip("-o", "link", "show", check=False).stdout
        return [
            line.split(":")[1].strip().split("@")[0]
            for line in out.splitlines()
            if f"pv{self.tag}" in line
        ]
