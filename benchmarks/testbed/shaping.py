"""tc command lines that shape the emulated links (pure: argv lists in, nothing run here).

A host's port onto the bridge carries its traffic to every other host, so one token bucket on
it could give only one rate. Instead its egress gets an htb tree with one class per destination
host, picked by a u32 filter on the destination address, so each host pair has its own rate:

    root 1: htb (unmatched traffic, e.g. ARP or an unshaped pair, leaves unshaped)
    ├── 1:1   the host's uplink (only when it has one): rate = ceil = uplink
    │   ├── 1:10  to host 0 ─ rate min(pair, uplink/n)  ceil min(pair, uplink)
    │   └── 1:11  to host 1 ─ ...
    └── (without an uplink the per-destination classes hang off the root, rate = ceil = pair)

Under an uplink each class is guaranteed uplink/n and may borrow up to the pair's rate while
the uplink has room, so one flow alone gets min(pair, uplink) and all flows together never
exceed the uplink (an htb class's guaranteed rate is not held back by its parent, hence the
uplink/n). What a host receives through its uplink is capped on the bridge's port towards it
(`cap_commands`). `lo` keeps a tbf (`tbf_commands`): one rate, and a bucket that holds lo's
64 KiB packets (a smaller bucket drops them and the ranks hang).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Dest", "burst_bytes", "cap_commands", "class_id", "pair_commands", "tbf_commands"]

# htb's default quantum (rate / r2q) is out of its range for fast classes; siblings here share
# by rate, so one fixed quantum of a few full frames is enough.
QUANTUM = 60_000
UPLINK_CLASS = "1:1"


def burst_bytes(rate_bps: float, floor: int) -> int:
    """A bucket that holds a packet (`floor` bytes) and ~2 ms of traffic (fast links need more)."""
    return max(floor, int(rate_bps / 8 * 0.002))


@dataclass(frozen=True)
class Dest:
    """One destination host as seen from a sender: its address and the pair's rate (bit/s)."""

    addr: str
    rate_bps: float | None


def class_id(index: int) -> str:
    """The htb class of the index-th destination (tc reads the minor number as hex)."""
    return f"1:{index + 16:x}"


def _bits(rate_bps: float) -> str:
    return f"{round(rate_bps)}bit"


def _htb_class(dev: str, parent: str, classid: str, rate: float, ceil: float,
               burst: int) -> list[str]:
    return ["tc", "class", "add", "dev", dev, "parent", parent, "classid", classid, "htb",
            "rate", _bits(rate), "ceil", _bits(ceil), "burst", f"{burst}b", "cburst",
            f"{burst}b", "quantum", str(QUANTUM)]


def pair_commands(dev: str, dests: Sequence[Dest], uplink_bps: float | None,
                  burst_floor: int) -> list[list[str]]:
    """The htb tree on a host's port: one class per shaped destination, under its uplink."""
    shaped = [(i, d) for i, d in enumerate(dests) if d.rate_bps is not None or uplink_bps]
    if not shaped:
        return []
    cmds = [["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default",
             "0"]]
    parent = "1:"
    if uplink_bps:
        parent = UPLINK_CLASS
        burst = burst_bytes(uplink_bps, burst_floor)
        cmds.append(_htb_class(dev, "1:", UPLINK_CLASS, uplink_bps, uplink_bps, burst))
    for i, d in shaped:
        ceil = min(r for r in (d.rate_bps, uplink_bps) if r)
        rate = min(ceil, uplink_bps / len(dests)) if uplink_bps else ceil
        cmds.append(_htb_class(dev, parent, class_id(i), rate, ceil,
                               burst_bytes(ceil, burst_floor)))
        cmds.append(["tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip",
                     "prio", "1", "u32", "match", "ip", "dst", f"{d.addr}/32", "flowid",
                     class_id(i)])
    return cmds


def cap_commands(dev: str, rate_bps: float, burst_floor: int) -> list[list[str]]:
    """Everything leaving `dev` through one htb class at `rate_bps` (an uplink's inbound half)."""
    return [["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default",
             "1"],
            _htb_class(dev, "1:", UPLINK_CLASS, rate_bps, rate_bps,
                       burst_bytes(rate_bps, burst_floor))]


def tbf_commands(dev: str, rate_bps: float, burst_floor: int) -> list[list[str]]:
    """One token bucket on `dev` (lo: its bucket must hold a 64 KiB packet)."""
    return [["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", _bits(rate_bps),
             "burst", f"{burst_bytes(rate_bps, burst_floor)}b", "latency", "50ms"]]
