"""Declared devices: what a device not at hand achieves, each figure with its source.

`pdv profile model --estimate --device-spec FILE` prices every op of a layer for a device that
is not here. A datasheet peak is not what training reaches, so a spec declares the achievable
rates and where each comes from (the file is refused without a source per figure):

    {
      "kind": "nvidia-a100-sxm4-80gb", "name": "NVIDIA A100-SXM4-80GB", "memory": "80GiB",
      "matmul": {"float16": "312TFLOP/s", "bfloat16": "312TFLOP/s", "float32": "156TFLOP/s"},
      "matmul_efficiency": 0.859,
      "gemm": {"units": 108, "tiles": [[256, 128], [128, 256]]},
      "memory_bandwidth": "2039GB/s",
      "memory_efficiency": 0.88,
      "sources": {"matmul": "...", "matmul_efficiency": "...", "gemm": "...",
                  "memory_bandwidth": "...", "memory_efficiency": "..."}
    }

The model (pure functions, no torch):

- A GEMM (batch × M×N output, K deep) runs at ``peak · matmul_efficiency · q``: the efficiency
  is the fraction of the datasheet peak that the best-shaped large GEMM sustains (measured, e.g.
  a maximum-achievable-matmul benchmark), and q the shape's *tile and wave quantization*
  (NVIDIA, "Matrix Multiplication Background User's Guide", DU-09799-001, §3.1–3.2): the output
  is cut into tiles of one of the declared sizes, tiles run in waves of ``units`` at once (one
  per SM), and a partial tile or a partial last wave computes nothing useful:
  ``q = batch·M·N / (waves · units · tile_m · tile_n)``, the best over the declared tiles.
- A GEMM is also bounded by its bytes (the roofline, Williams et al., CACM 2009), and every
  other op is its bytes in and out over ``memory_bandwidth · memory_efficiency``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdv.cluster_spec import parse_bytes, parse_flops, parse_rate
from pdv.errors import PdvError

__all__ = ["DeviceSpec", "Gemm", "load_device_spec", "quantization"]

Gemm = tuple[int, int, int, int]
"""(batch, M, N, K): batch × (M×K @ K×N)"""

_FIELDS = ("matmul", "matmul_efficiency", "gemm", "memory_bandwidth", "memory_efficiency")


@dataclass(frozen=True)
class DeviceSpec:
    """A declared device's achievable rates (see the module docstring)."""

    kind: str
    name: str
    memory_bytes: int
    matmul_peak: dict[str, float]
    """datasheet dense matmul FLOP/s per dtype"""
    matmul_efficiency: float
    """fraction of the peak the best-shaped large GEMM sustains"""
    units: int
    """tiles computed at once (streaming multiprocessors)"""
    tiles: tuple[tuple[int, int], ...]
    """output tile sizes (M, N) the GEMM library chooses among"""
    memory_bandwidth: float
    """datasheet bytes/s"""
    memory_efficiency: float
    """fraction of the datasheet bandwidth a streaming kernel sustains"""
    sources: dict[str, str]

    def peak(self, dtype: str) -> float:
        """Datasheet matmul FLOP/s in this dtype, or a PdvError naming the declared ones."""
        if dtype not in self.matmul_peak:
            raise PdvError(f"device spec {self.kind}: no matmul rate for {dtype}; declared: "
                           f"{', '.join(sorted(self.matmul_peak))}")
        return self.matmul_peak[dtype]

    def gemm_flops(self, dtype: str, gemm: Gemm) -> float:
        """FLOP/s this GEMM shape achieves: peak × efficiency × quantization."""
        batch, m, n, _k = gemm
        q = quantization(self.units, self.tiles, batch, m, n)
        return self.peak(dtype) * self.matmul_efficiency * q

    @property
    def bandwidth(self) -> float:
        """Bytes/s a memory-bound kernel achieves."""
        return self.memory_bandwidth * self.memory_efficiency

    def op_seconds(self, dtype: str, flops: float, nbytes: float, gemm: Gemm | None) -> float:
        """Device time of one op: the slower of its math and its memory traffic."""
        memory = nbytes / self.bandwidth
        if flops <= 0:
            return memory
        rate = (self.gemm_flops(dtype, gemm) if gemm is not None
                else self.peak(dtype) * self.matmul_efficiency)
        return max(flops / rate, memory)

    def notes(self, dtype: str) -> list[str]:
        """What the estimate assumed, with the sources, for the profile's provenance."""
        tiles = ", ".join(f"{m}x{n}" for m, n in self.tiles)
        return [
            f"device {self.kind} declared by a spec, nothing measured here",
            f"GEMM: {self.peak(dtype):.4g} FLOP/s peak in {dtype} [{self.sources['matmul']}] "
            f"x {self.matmul_efficiency:.3g} sustained by the best large GEMM "
            f"[{self.sources['matmul_efficiency']}] x the shape's tile/wave quantization "
            f"(tiles {tiles}, {self.units} at once) [{self.sources['gemm']}]",
            f"memory-bound ops: bytes / ({self.memory_bandwidth:.4g} B/s "
            f"[{self.sources['memory_bandwidth']}] x {self.memory_efficiency:.3g} "
            f"[{self.sources['memory_efficiency']}])",
        ]


def quantization(units: int, tiles: tuple[tuple[int, int], ...], batch: int, m: int,
                 n: int) -> float:
    """Useful fraction of the tile-waves a batch × M×N output occupies (best declared tile)."""
    useful = batch * m * n
    if useful <= 0:
        return 1.0
    best = 0.0
    for tm, tn in tiles:
        count = batch * math.ceil(m / tm) * math.ceil(n / tn)
        waves = math.ceil(count / units)
        best = max(best, useful / (waves * units * tm * tn))
    return best


def _fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise PdvError(f"{what}: expected a fraction in (0, 1], got {value!r}")
    return float(value)


def load_device_spec(path: str | Path) -> DeviceSpec:
    """Read a device spec (JSON); a PdvError names the first bad or unsourced field."""
    p = Path(path)
    try:
        spec = json.loads(p.read_text())
    except OSError as exc:
        raise PdvError(f"device spec {p}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise PdvError(f"device spec {p}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(spec, dict):
        raise PdvError(f"device spec {p}: expected an object")
    allowed = {"kind", "name", "memory", "description", "sources", *_FIELDS}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise PdvError(f"device spec {p}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = [k for k in ("kind", "memory", *_FIELDS) if k not in spec]
    if missing:
        raise PdvError(f"device spec {p}: missing {missing}")
    sources = spec.get("sources")
    if not isinstance(sources, dict):
        raise PdvError(f"device spec {p}: 'sources' must give a source for each of {_FIELDS}")
    unsourced = [k for k in _FIELDS if not str(sources.get(k, "")).strip()]
    if unsourced:
        raise PdvError(f"device spec {p}: no source for {unsourced}; say where each figure "
                       "comes from (a datasheet, a paper, a measurement)")
    matmul = spec["matmul"]
    if not isinstance(matmul, dict) or not matmul:
        raise PdvError(f"device spec {p}: matmul must map dtypes to FLOP/s, "
                       "e.g. {\"bfloat16\": \"312TFLOP/s\"}")
    gemm = spec["gemm"]
    if not isinstance(gemm, dict) or set(gemm) != {"units", "tiles"}:
        raise PdvError(f"device spec {p}: gemm must be {{\"units\": N, \"tiles\": [[M, N], ...]}}")
    units, tiles = gemm["units"], gemm["tiles"]
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise PdvError(f"device spec {p}: gemm.units must be a positive integer")
    if (not isinstance(tiles, list) or not tiles
            or not all(isinstance(t, list) and len(t) == 2
                       and all(isinstance(x, int) and x > 0 for x in t) for t in tiles)):
        raise PdvError(f"device spec {p}: gemm.tiles must be a list of [M, N] positive integers")
    return DeviceSpec(
        kind=str(spec["kind"]),
        name=str(spec.get("name", spec["kind"])),
        memory_bytes=parse_bytes(spec["memory"], "memory"),
        matmul_peak={str(k): parse_flops(v, f"matmul.{k}") for k, v in matmul.items()},
        matmul_efficiency=_fraction(spec["matmul_efficiency"], "matmul_efficiency"),
        units=units,
        tiles=tuple((int(a), int(b)) for a, b in tiles),
        memory_bandwidth=parse_rate(spec["memory_bandwidth"], "memory_bandwidth"),
        memory_efficiency=_fraction(spec["memory_efficiency"], "memory_efficiency"),
        sources={k: str(v) for k, v in sources.items()},
    )
