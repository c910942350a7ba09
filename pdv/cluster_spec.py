"""Declared clusters: a small description of hosts, devices and link classes → a cluster artifact.

For what-if planning on clusters that are not at hand. The description (JSON, or TOML on
Python >= 3.11) looks like this; human units are accepted and converted to SI:

    {
      "kinds": {"h100": {"name": "NVIDIA H100", "memory": "80GiB", "matmul": "400TFLOP/s"}},
      "links": {"intra_host": {"latency": "3us", "bandwidth": "450GB/s"},
                "inter_host": {"latency": "10us", "bandwidth": "400Gbit/s"},
                "pcie":       {"latency": "5us", "bandwidth": "25GB/s"}},
      "hosts": [{"name": "node{i}", "count": 128, "devices": {"h100": 8}, "intra": "pcie"}],
      "overrides": [{"src": {"hosts": "0-3"}, "dst": {"kind": "h100"}, "link": "pcie",
                     "symmetric": true}]
    }

Ranks are numbered host by host in the order written, devices in the order of each host's
`devices`. Link classes `intra_host` and `inter_host` are required; a host group may name
another class as its `intra`. Overrides apply in order (later wins) to every ordered pair
(src, dst) with src in `src` and dst in `dst`, also to (dst, src) when `symmetric` (the
default); a selector is any of `ranks` ("0-7,12" or a list), `hosts` (host indices "0-3", or a
list of host names), `kind`, intersected. This module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from pdv.artifacts import ClusterArtifact, ClusterDevice, Links, Provenance
from pdv.errors import PdvError

__all__ = [
    "declare_cluster",
    "load_spec",
    "parse_bytes",
    "parse_flops",
    "parse_rate",
    "parse_time",
    "parse_ranges",
]

_PREFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BIN = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
_NUM = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"


def _scale(prefix: str) -> float:
    return _BIN[prefix] if prefix in _BIN else _PREFIX[prefix]


def _number(value: Any, what: str) -> float | None:
    if isinstance(value, bool):
        raise PdvError(f"{what}: expected a number or a string with a unit, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise PdvError(f"{what}: expected a number or a string with a unit, got {value!r}")
    return None


def parse_bytes(value: Any, what: str = "size") -> int:
    """'80GiB' -> 85899345920, '4KiB' -> 4096, '1.5GB' -> 1500000000; numbers are bytes."""
    n = _number(value, what)
    if n is not None:
        return int(n)
    m = re.fullmatch(_NUM + r"(|[kKMGTP]i?)B?\s*", value)
    if not m:
        raise PdvError(f"{what}: cannot read {value!r} as bytes (e.g. 80GiB, 4MiB, 1.5GB)")
    return round(float(m.group(1)) * _scale(m.group(2)))


def parse_time(value: Any, what: str = "time") -> float:
    """'5us' -> 5e-06, '1.5ms' -> 0.0015, '2s' -> 2.0; numbers are seconds."""
    n = _number(value, what)
    if n is not None:
        return n
    m = re.fullmatch(_NUM + r"(s|ms|us|µs|μs|ns)\s*", value)
    if not m:
        raise PdvError(f"{what}: cannot read {value!r} as a time (e.g. 5us, 1.5ms, 2s)")
    return _clean(float(m.group(1)) * _TIME[m.group(2)])


def parse_rate(value: Any, what: str = "bandwidth") -> float:
    """Link speed in bytes/s: '400Gbit/s', '400Gbps', '50GB/s', '25GiB/s'; numbers are B/s."""
    n = _number(value, what)
    if n is not None:
        return n
    m = re.fullmatch(_NUM + r"(|[kKMGTP]i?)(bit/s|bps|b/s|B/s|Bps)\s*", value)
    if not m:
        raise PdvError(
            f"{what}: cannot read {value!r} as a bandwidth (e.g. 400Gbit/s, 100Mbps, 50GB/s)"
        )
    scaled = float(m.group(1)) * _scale(m.group(2))
    return _clean(scaled / 8 if m.group(3) in ("bit/s", "bps", "b/s") else scaled)


def parse_flops(value: Any, what: str = "matmul") -> float:
    """Compute speed in FLOP/s: '400TFLOP/s', '400 TFLOPS', '1.2e14'; numbers are FLOP/s."""
    n = _number(value, what)
    if n is not None:
        return n
    m = re.fullmatch(_NUM + r"([kKMGTP]?)(?:FLOP/s|FLOPS|flop/s|flops)\s*", value)
    if not m:
        raise PdvError(f"{what}: cannot read {value!r} as FLOP/s (e.g. 400TFLOP/s)")
    return _clean(float(m.group(1)) * _PREFIX[m.group(2)])


def parse_ranges(value: Any, limit: int, what: str) -> list[int]:
    """'0-3,8' or [0, 1, 2] -> sorted indices, each checked to be < limit."""
    if isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, list) and all(isinstance(v, int) for v in value):
        items = list(value)
    elif isinstance(value, str):
        items = []
        for part in value.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not m:
                raise PdvError(f"{what}: cannot read {part!r} as a range (e.g. 0-7,12)")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise PdvError(f"{what}: range {part.strip()!r} runs backwards")
            items.extend(range(lo, hi + 1))
    else:
        raise PdvError(f"{what}: expected a range string like '0-7,12' or a list of integers")
    bad = [i for i in items if not 0 <= i < limit]
    if bad:
        raise PdvError(f"{what}: index {bad[0]} out of range; there are {limit} (0..{limit - 1})")
    return sorted(set(items))


def load_spec(path: Path) -> tuple[dict[str, Any], bytes]:
    """Read a spec file (JSON, or TOML by its .toml suffix) into a dict, with its raw bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PdvError(f"{path}: cannot read: {exc.strerror}") from None
    if path.suffix == ".toml":
        if sys.version_info < (3, 11):
            raise PdvError(f"{path}: TOML specs need Python >= 3.11; write the spec as JSON")
        import tomllib

        try:
            data = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PdvError(f"{path}: not valid TOML: {exc}") from None
    else:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PdvError(
                f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
    if not isinstance(data, dict):
        raise PdvError(f"{path}: the spec must be an object with kinds, links and hosts")
    return data, raw


def _get(obj: Any, key: str, where: str, kind: type | tuple[type, ...] = object) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise PdvError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise PdvError(f"{where}.{key}: wrong type {type(value).__name__}")
    return value


def _check_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise PdvError(
            f"{where}: unknown field {extra[0]!r}; allowed: {', '.join(sorted(allowed))}"
        )


def _link(obj: Any, where: str) -> tuple[float, float]:
    if not isinstance(obj, dict):
        raise PdvError(f"{where}: expected an object with latency and bandwidth")
    _check_keys(obj, {"latency", "bandwidth"}, where)
    latency = parse_time(_get(obj, "latency", where), f"{where}.latency")
    bandwidth = parse_rate(_get(obj, "bandwidth", where), f"{where}.bandwidth")
    if latency < 0 or bandwidth <= 0:
        raise PdvError(f"{where}: latency must be >= 0 and bandwidth > 0")
    return latency, bandwidth


class _Layout:
    """Ranks laid out host by host: host index, host name and kind of every rank."""

    def __init__(self, spec: dict[str, Any], kinds: dict[str, dict[str, Any]],
                 classes: dict[str, tuple[float, float]]) -> None:
        self.host_of: list[int] = []
        self.kind_of: list[str] = []
        self.host_names: list[str] = []
        self.intra: list[tuple[float, float]] = []  # per host
        groups = _get(spec, "hosts", "spec", list)
        if not groups:
            raise PdvError("spec.hosts: declare at least one host group")
        for g, group in enumerate(groups):
            where = f"hosts[{g}]"
            if not isinstance(group, dict):
                raise PdvError(f"{where}: expected an object with name, count and devices")
            _check_keys(group, {"name", "count", "devices", "intra"}, where)
            count = group.get("count", 1)
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise PdvError(f"{where}.count: must be a positive integer, got {count!r}")
            devices = _get(group, "devices", where, dict)
            for kind, n in devices.items():
                if kind not in kinds:
                    raise PdvError(f"{where}.devices: unknown kind {kind!r}; "
                                   f"declared kinds: {', '.join(sorted(kinds))}")
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    raise PdvError(f"{where}.devices.{kind}: must be a positive integer")
            intra = group.get("intra", "intra_host")
            if intra not in classes:
                raise PdvError(f"{where}.intra: unknown link class {intra!r}; "
                               f"declared: {', '.join(sorted(classes))}")
            template = group.get("name", "host{i}")
            for i in range(count):
                h = len(self.host_names)
                try:
                    name = str(template).format(i=i, h=h)
                except (KeyError, IndexError, ValueError):
                    raise PdvError(f"{where}.name: {template!r} may use only {{i}} "
                                   "(index in the group) and {h} (global host index)") from None
                self.host_names.append(name)
                self.intra.append(classes[intra])
                for kind, n in devices.items():
                    self.host_of += [h] * n
                    self.kind_of += [kind] * n
        dupes = [name for name, k in Counter(self.host_names).items() if k > 1]
        if dupes:
            raise PdvError(f"spec.hosts: host name {sorted(dupes)[0]!r} is used twice; "
                           "put {i} in the group's name")

    def select(self, sel: Any, where: str) -> np.ndarray:
        """Boolean mask over ranks for one selector."""
        n = len(self.host_of)
        if not isinstance(sel, dict) or not sel:
            raise PdvError(f"{where}: expected an object with ranks, hosts and/or kind")
        _check_keys(sel, {"ranks", "hosts", "kind"}, where)
        mask = np.ones(n, dtype=bool)
        if "ranks" in sel:
            m = np.zeros(n, dtype=bool)
            m[parse_ranges(sel["ranks"], n, f"{where}.ranks")] = True
            mask &= m
        if "hosts" in sel:
            hosts = sel["hosts"]
            if isinstance(hosts, list) and all(isinstance(h, str) for h in hosts):
                index = {name: h for h, name in enumerate(self.host_names)}
                unknown = [h for h in hosts if h not in index]
                if unknown:
                    raise PdvError(f"{where}.hosts: no host named {unknown[0]!r}")
                idx = [index[h] for h in hosts]
            else:
                idx = parse_ranges(hosts, len(self.host_names), f"{where}.hosts")
            mask &= np.isin(np.asarray(self.host_of), idx)
        if "kind" in sel:
            mask &= np.asarray(self.kind_of) == sel["kind"]
        if not mask.any():
            raise PdvError(f"{where}: selects no rank")
        return mask


def declare_cluster(
    spec: dict[str, Any], source: str = "<spec>", raw: bytes = b""
) -> ClusterArtifact:
    """Build the declared cluster artifact (provenance 'declared') from a parsed spec."""
    _check_keys(spec, {"kinds", "links", "hosts", "overrides", "description"}, "spec")
    kinds: dict[str, dict[str, Any]] = {}
    for kind, body in _get(spec, "kinds", "spec", dict).items():
        where = f"kinds.{kind}"
        if not isinstance(body, dict):
            raise PdvError(f"{where}: expected an object with memory and matmul")
        _check_keys(body, {"name", "memory", "matmul"}, where)
        memory = parse_bytes(_get(body, "memory", where), f"{where}.memory")
        if memory <= 0:
            raise PdvError(f"{where}.memory: must be > 0")
        kinds[kind] = {
            "name": str(body.get("name", kind)),
            "memory_bytes": memory,
            "matmul_flops": parse_flops(_get(body, "matmul", where), f"{where}.matmul"),
        }
    classes = {name: _link(body, f"links.{name}")
               for name, body in _get(spec, "links", "spec", dict).items()}
    for required in ("intra_host", "inter_host"):
        if required not in classes:
            raise PdvError(f"spec.links: missing link class {required!r} "
                           "(give both intra_host and inter_host)")
    layout = _Layout(spec, kinds, classes)
    n = len(layout.host_of)

    host = np.asarray(layout.host_of)
    same_host = host[:, None] == host[None, :]
    intra_lat = np.asarray([lat for lat, _ in layout.intra])[host]
    intra_bw = np.asarray([bw for _, bw in layout.intra])[host]
    inter_lat, inter_bw = classes["inter_host"]
    lat = np.where(same_host, intra_lat[:, None], inter_lat)
    bw = np.where(same_host, intra_bw[:, None], inter_bw)

    overrides = spec.get("overrides", [])
    if not isinstance(overrides, list):
        raise PdvError("spec.overrides: expected a list")
    for k, ov in enumerate(overrides):
        where = f"overrides[{k}]"
        if not isinstance(ov, dict):
            raise PdvError(f"{where}: expected an object with src, dst, and link or "
                           "latency/bandwidth")
        _check_keys(ov, {"src", "dst", "link", "latency", "bandwidth", "symmetric"}, where)
        src = layout.select(_get(ov, "src", where), f"{where}.src")
        dst = layout.select(_get(ov, "dst", where), f"{where}.dst")
        o_lat: float | None
        o_bw: float | None
        if "link" in ov:
            if ov["link"] not in classes:
                raise PdvError(f"{where}.link: unknown link class {ov['link']!r}")
            o_lat, o_bw = classes[ov["link"]]
        else:
            if "latency" not in ov and "bandwidth" not in ov:
                raise PdvError(f"{where}: give link, or latency and/or bandwidth")
            o_lat = parse_time(ov["latency"], f"{where}.latency") if "latency" in ov else None
            o_bw = parse_rate(ov["bandwidth"], f"{where}.bandwidth") if "bandwidth" in ov else None
            if (o_lat is not None and o_lat < 0) or (o_bw is not None and o_bw <= 0):
                raise PdvError(f"{where}: latency must be >= 0 and bandwidth > 0")
        pairs = src[:, None] & dst[None, :]
        if ov.get("symmetric", True):
            pairs |= pairs.T
        if o_lat is not None:
            lat[pairs] = o_lat
        if o_bw is not None:
            bw[pairs] = o_bw
    np.fill_diagonal(lat, 0.0)
    np.fill_diagonal(bw, 0.0)

    devices = [
        ClusterDevice(rank=r, host=layout.host_names[layout.host_of[r]], kind=layout.kind_of[r],
                      **kinds[layout.kind_of[r]])
        for r in range(n)
    ]
    inputs = {"spec": "sha256:" + hashlib.sha256(raw).hexdigest()} if raw else {}
    return ClusterArtifact(
        provenance=Provenance(
            method="declared", inputs=inputs,
            # The file name only: a folder path would make the artifact (and every plan that
            # digests it) differ between checkouts; inputs["spec"] identifies the content.
            notes=[f"declared from {PurePath(source).name}: {len(layout.host_names)} hosts, "
                   f"{n} ranks, "
                   f"{len(classes)} link classes, {len(overrides)} overrides"],
        ),
        devices=devices,
        links=Links(latency_s=_compact(lat), bandwidth_Bps=_compact(bw)),
        measurement={
            "method": "declared",
            "link_classes": {name: {"latency_s": la, "bandwidth_Bps": b}
                             for name, (la, b) in sorted(classes.items())},
            "overrides": len(overrides),
            "diagonal": "0 (a rank does not send to itself)",
        },
    )


def _compact(m: np.ndarray) -> list[list[float]]:
    # Values are the few parsed class numbers, already cleaned of float noise by _clean, so
    # each prints short (3e-06, not 2.9999999999999997e-06): 1024 ranks make 2 x 1M of them.
    return m.tolist()


def _clean(x: float) -> float:
    """Drop the float noise of unit conversion: 3 * 1e-6 -> 3e-06."""
    return float(f"{x:.12g}")
