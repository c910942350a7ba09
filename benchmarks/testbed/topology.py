"""A topology file: the emulated cluster's hosts, ranks, link rates and per-rank limits.

JSON, e.g. (benchmarks/testbed/topologies/inverted.json):

    {
      "name": "inverted",
      "inter_host": "1gbit",            # the veth between the hosts, each direction
      "hosts": [
        {"name": "a", "lo": "50mbit",   # traffic between two ranks of this host
         "ranks": [{}, {"cpu": 0.5, "memory": "600MiB"}]},
        {"name": "b", "lo": "50mbit", "ranks": [{}, {}]}
      ]
    }

A rate is tc's syntax (`kbit`, `mbit`, `gbit`); `null` or a missing `lo` leaves the link
unshaped (as fast as the kernel copies). `cpu` is a CPU quota in cores (cgroup cpu.cfs_quota_us
over cfs_period_us); `memory` a memory cap (cgroup memory.limit_in_bytes). Ranks are numbered
host by host in file order, so each host holds one contiguous block (what torchrun needs).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HostSpec", "RankSpec", "Topology", "load", "parse_bytes", "parse_rate"]

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_BYTE_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_rate(rate: str) -> float:
    """tc rate text ('50mbit') -> bits per second."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?bit)\s*", rate.lower())
    if not m:
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


@dataclass(frozen=True)
class RankSpec:
    """One rank's limits (None: unlimited)."""

    cpu: float | None = None
    memory: int | None = None


@dataclass(frozen=True)
class HostSpec:
    """One emulated host: its ranks and its loopback rate."""

    name: str
    ranks: tuple[RankSpec, ...]
    lo: str | None = None


@dataclass(frozen=True)
class Topology:
    """Hosts joined by one inter-host link (a veth pair, shaped at `inter_host` each way)."""

    name: str
    hosts: tuple[HostSpec, ...]
    inter_host: str | None = None

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


def load(path: str | Path) -> Topology:
    """Read and check a topology file."""
    data = json.loads(Path(path).read_text())
    hosts = []
    for h in data["hosts"]:
        ranks = tuple(
            RankSpec(
                cpu=float(r["cpu"]) if r.get("cpu") is not None else None,
                memory=parse_bytes(r["memory"]) if r.get("memory") is not None else None,
            )
            for r in h["ranks"]
        )
        if not ranks:
            raise ValueError(f"{path}: host {h['name']} has no ranks")
        if h.get("lo"):
            parse_rate(h["lo"])
        hosts.append(HostSpec(name=str(h["name"]), ranks=ranks, lo=h.get("lo")))
    if len(hosts) != 2:
        # One veth pair joins exactly two namespaces; more hosts would need a bridge.
        raise ValueError(f"{path}: the testbed joins exactly 2 hosts, the file has {len(hosts)}")
    if len({h.name for h in hosts}) != len(hosts):
        raise ValueError(f"{path}: host names repeat")
    if data.get("inter_host"):
        parse_rate(data["inter_host"])
    return Topology(name=str(data.get("name", Path(path).stem)), hosts=tuple(hosts),
                    inter_host=data.get("inter_host"))
