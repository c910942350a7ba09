"""A topology file: the emulated cluster's hosts, ranks, link rates and per-rank limits.

JSON, e.g. (benchmarks/testbed/topologies/geo-split.json has this shape):

    {
      "name": "two-sites",
      "inter_host": "400mbit",          # default between any two hosts, each direction
      "links": [                        # per host pair, both directions; overrides the default
        {"hosts": ["b", "c"], "rate": "20mbit"},
        {"hosts": ["a", "d"], "rate": "50mbit", "latency": "2ms"}
      ],
      "hosts": [
        {"name": "a", "lo": "50mbit",   # traffic between two ranks of this host
         "ranks": [{}, {"cpu": 0.5, "memory": "600MiB"}]},
        {"name": "b", "uplink": "100mbit", "ranks": [{}]},   # all of b's traffic, each way
        {"name": "c", "ranks": [{}]},
        {"name": "d", "ranks": [{}]}
      ]
    }

Hosts (two or more) hang off one Linux bridge. A rate is tc's syntax (`kbit`, `mbit`,
`gbit`); `null` or a missing rate leaves that path unshaped (as fast as the kernel copies). A
pair's rate is its `links` entry's, else `inter_host`; `latency` (`ms`, `us`, `s`) is added one
way, so a round trip grows by twice it (a delayed pair cannot touch a host with an uplink:
see delayline.py). A host's `uplink` caps everything it sends and everything
it receives together (an oversubscribed port), on top of its pairs' rates. `cpu` is a CPU quota
in cores (cgroup cpu.cfs_quota_us over cfs_period_us); `memory` a memory cap (cgroup
memory.limit_in_bytes). Ranks are numbered host by host in file order, so each host holds one
contiguous block (what torchrun needs).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "HostSpec",
    "LinkSpec",
    "RankSpec",
    "Topology",
    "load",
    "parse",
    "parse_bytes",
    "parse_duration",
    "parse_rate",
]

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_BYTE_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
# Host names go into namespace names; the bridge's own namespace uses a name outside this set.
_HOST_NAME = re.compile(r"[A-Za-z0-9]{1,16}")


def parse_rate(rate: str) -> float:
    """tc rate text ('50mbit') -> bits per second."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?bit)\s*", rate.lower())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"rate {rate!r}: write it like 50mbit or 1gbit")
    return float(m.group(1)) * _RATE_UNITS[m.group(2)]


def parse_bytes(size: str | int) -> int:
    """'600MiB' (or a plain integer of bytes) -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*(b|kib|mib|gib)?\s*", size.lower())
    if not m:
        raise ValueError(f"size {size!r}: write it like 600MiB or 2GiB")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2) or "b"])


def parse_duration(text: str) -> float:
    """tc time text ('2ms', '500us') -> seconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s)\s*", text.lower())
    if not m:
        raise ValueError(f"latency {text!r}: write it like 2ms or 500us")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


@dataclass(frozen=True)
class RankSpec:
    """One rank's limits (None: unlimited)."""

    cpu: float | None = None
    memory: int | None = None


@dataclass(frozen=True)
class HostSpec:
    """One emulated host: its ranks, its loopback rate and its uplink cap."""

    name: str
    ranks: tuple[RankSpec, ...]
    lo: str | None = None
    uplink: str | None = None


@dataclass(frozen=True)
class LinkSpec:
    """An override for one host pair, both directions (None: the default for that field)."""

    hosts: tuple[str, str]
    rate: str | None = None
    latency: str | None = None


@dataclass(frozen=True)
class Topology:
    """Hosts on one bridge; every pair at `inter_host` unless `links` says otherwise."""

    name: str
    hosts: tuple[HostSpec, ...]
    inter_host: str | None = None
    links: tuple[LinkSpec, ...] = ()

    def __post_init__(self) -> None:
        _check(self)

    @property
    def world(self) -> int:
        """Number of ranks."""
        return sum(len(h.ranks) for h in self.hosts)

    def rank_hosts(self) -> list[tuple[int, HostSpec, RankSpec]]:
        """(global rank, host, rank limits), host by host."""
        out: list[tuple[int, HostSpec, RankSpec]] = []
        for host in self.hosts:
            for spec in host.ranks:
                out.append((len(out), host, spec))
        return out

    def host(self, name: str) -> HostSpec:
        """The host called `name`."""
        return next(h for h in self.hosts if h.name == name)

    def _override(self, a: str, b: str) -> LinkSpec | None:
        return next((lk for lk in self.links if set(lk.hosts) == {a, b}), None)

    def pair_rate(self, a: str, b: str) -> str | None:
        """The shaped rate between hosts a and b (each way), None if unshaped."""
        override = self._override(a, b)
        return override.rate if override and override.rate else self.inter_host

    def pair_latency(self, a: str, b: str) -> str | None:
        """The one-way latency added between hosts a and b, None if none."""
        override = self._override(a, b)
        return override.latency if override else None

    def effective_rate(self, a: str, b: str) -> float | None:
        """Bits/s one flow from a to b can get alone: the pair's rate under both uplinks."""
        caps = [self.pair_rate(a, b), self.host(a).uplink, self.host(b).uplink]
        rates = [parse_rate(r) for r in caps if r]
        return min(rates) if rates else None

    def inverts_hierarchy(self) -> bool:
        """Some host's ranks talk slower to each other than that host talks to another host."""
        for h in self.hosts:
            if len(h.ranks) < 2 or not h.lo:
                continue
            others = [self.effective_rate(h.name, o.name) for o in self.hosts if o is not h]
            fastest = max((float("inf") if r is None else r for r in others), default=0.0)
            if parse_rate(h.lo) < fastest:
                return True
        return False


def _check(topo: Topology) -> None:
    """Refuse what the testbed cannot build, naming the part of the file at fault."""
    if len(topo.hosts) < 2:
        raise ValueError(f"{topo.name}: a topology needs at least 2 hosts, it has "
                         f"{len(topo.hosts)}")
    names = [h.name for h in topo.hosts]
    if len(set(names)) != len(names):
        raise ValueError(f"{topo.name}: host names repeat: {names}")
    for h in topo.hosts:
        if not _HOST_NAME.fullmatch(h.name):
            raise ValueError(f"{topo.name}: host name {h.name!r}: use 1-16 letters or digits")
        if not h.ranks:
            raise ValueError(f"{topo.name}: host {h.name} has no ranks")
        for rate in (h.lo, h.uplink):
            if rate:
                parse_rate(rate)
    if topo.inter_host:
        parse_rate(topo.inter_host)
    seen: set[frozenset[str]] = set()
    for lk in topo.links:
        pair = frozenset(lk.hosts)
        if len(lk.hosts) != 2 or len(pair) != 2 or not pair <= set(names):
            raise ValueError(f"{topo.name}: link {list(lk.hosts)}: name two different hosts "
                             f"of {names}")
        if pair in seen:
            raise ValueError(f"{topo.name}: link {list(lk.hosts)} is given twice")
        seen.add(pair)
        if not (lk.rate or lk.latency):
            raise ValueError(f"{topo.name}: link {list(lk.hosts)} sets neither rate nor latency")
        if lk.rate:
            parse_rate(lk.rate)
        if lk.latency:
            parse_duration(lk.latency)
            capped = [h for h in lk.hosts if topo.host(h).uplink]
            if capped:
                # A delayed pair travels outside the bridge (see delayline.py), so an uplink's
                # shaper would not see it.
                raise ValueError(f"{topo.name}: link {list(lk.hosts)} has a latency and host "
                                 f"{capped[0]} an uplink; the testbed cannot combine them")


def _host(h: dict[str, Any]) -> HostSpec:
    ranks = tuple(
        RankSpec(
            cpu=float(r["cpu"]) if r.get("cpu") is not None else None,
            memory=parse_bytes(r["memory"]) if r.get("memory") is not None else None,
        )
        for r in h.get("ranks", [])
    )
    return HostSpec(name=str(h["name"]), ranks=ranks, lo=h.get("lo"), uplink=h.get("uplink"))


def parse(data: dict[str, Any], name: str) -> Topology:
    """A topology from its JSON object (`name` if the object has none)."""
    known = {"name", "inter_host", "links", "hosts"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{name}: unknown keys {unknown} (known: {sorted(known)})")
    links = tuple(
        LinkSpec(hosts=tuple(lk["hosts"]), rate=lk.get("rate"), latency=lk.get("latency"))
        for lk in data.get("links", [])
    )
    return Topology(name=str(data.get("name", name)),
                    hosts=tuple(_host(h) for h in data["hosts"]),
                    inter_host=data.get("inter_host"), links=links)


def load(path: str | Path) -> Topology:
    """Read and check a topology file."""
    try:
        return parse(json.loads(Path(path).read_text()), Path(path).stem)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: malformed topology ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
