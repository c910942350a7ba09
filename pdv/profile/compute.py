"""Timing primitives for layer profiles: the device, a synchronizing clock, robust statistics,
the time = a + b·micro_batch fit, and the device probes the estimator prices ops with (dense
matmul throughput, copy bandwidth, per-op dispatch cost).
"""

from __future__ import annotations

import functools
import math
import platform
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pdv.artifacts import DeviceInfo, TimeFit
from pdv.errors import PdvError

__all__ = [
    "DTYPES",
    "Clock",
    "device_info",
    "fit_time",
    "gemm_efficiency",
    "matmul_throughput",
    "median_iqr",
    "memory_bandwidth",
    "op_overhead",
    "resolve_device",
    "resolve_dtype",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """'cpu' or 'cuda[:i]' -> a device that exists here, or a PdvError saying what to use."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PdvError(f"--device {name!r}: expected cpu or cuda[:index]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PdvError(
                f"--device {name}: no CUDA device here; use --device cpu, or --estimate "
                "with --device-flops to plan for a GPU not at hand"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise PdvError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise PdvError(f"--device {name!r}: expected cpu or cuda[:index]")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' -> torch dtype."""
    if name not in DTYPES:
        raise PdvError(f"--dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device, matmul_flops: float | None = None,
                kind: str | None = None) -> DeviceInfo:
    """The profile's device. CPU is kind "cpu"; CUDA is a slug of the device name.

    matmul_flops defaults to the same probe ``pdv profile cluster`` runs on every rank
    (pdv.profile.hardware.matmul_flops), so a profile and a cluster compare like with like.
    """
    from pdv.profile.hardware import device_kind
    from pdv.profile.hardware import matmul_flops as cluster_probe

    if matmul_flops is None:
        matmul_flops = cluster_probe(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return DeviceInfo(kind=kind or device_kind(name), name=name, matmul_flops=matmul_flops)
    return DeviceInfo(kind=kind or "cpu", name=_cpu_name(), matmul_flops=matmul_flops)


class Clock:
    """Wall clock that first waits for the device, so a reading covers the work queued before it."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._device = device

    def now(self) -> float:
        """Seconds, after all queued work on the device has finished."""
        if self._cuda:
            torch.cuda.synchronize(self._device)
        return time.perf_counter()


def median_iqr(values: Sequence[float]) -> tuple[float, float]:
    """Median and interquartile range: robust to the odd slow round (a neighbour's burst)."""
    assert values, "no samples"
    arr = np.asarray(values, dtype=float)
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return float(med), float(q3 - q1)


def fit_time(micro_batch_sizes: Sequence[int], times: Sequence[float]) -> TimeFit:
    """Least-squares time = a + b·mbs over the measured points, with R² and max relative error.

    One point cannot separate a from b: it is taken as all per-sample cost (a = 0), which is
    what a user scaling a single measurement would assume; R² is then reported as 1.
    """
    x = np.asarray(micro_batch_sizes, dtype=float)
    y = np.asarray(times, dtype=float)
    assert x.shape == y.shape and x.size >= 1
    if x.size == 1 or np.ptp(x) == 0:
        a, b = 0.0, float(y.mean() / x.mean())
    else:
        b, a = (float(v) for v in np.polyfit(x, y, 1))
    pred = a + b * x
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 if ss_tot == 0 else 1.0 - ss_res / ss_tot
    rel = np.abs(pred - y) / np.where(y > 0, y, 1.0)
    return TimeFit(a_s=a, b_s=b, r2=r2, max_rel_error=float(rel.max()))


def _best_rate(op: Callable[[], object], work: float, device: torch.device, seconds: float,
               trials: int) -> float:
    """`work` units per call of `op`, per second: the best of `trials` equal runs.

    The best, not the mean: on a shared machine a neighbour's burst only ever slows a trial
    down, so the fastest trial is the closest to what the device can do.
    """
    clock = Clock(device)
    op()
    start = clock.now()
    op()
    one = max(clock.now() - start, 1e-6)
    reps = max(1, int(seconds / trials / one))
    best = 0.0
    for _ in range(trials):
        start = clock.now()
        for _ in range(reps):
            op()
        best = max(best, work * reps / (clock.now() - start))
    return best


REFERENCE_SIDE = {"cpu": 1024, "cuda": 4096}
"""side of the square matmul that stands for a device's FLOP rate (matmul_throughput)"""


def _reference(device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], object], float]:
    n = REFERENCE_SIDE.get(device.type, REFERENCE_SIDE["cpu"])
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2.0 * n**3


def matmul_throughput(device: torch.device, dtype: torch.dtype = torch.float32,
                      seconds: float = 0.5, trials: int = 5) -> float:
    """Dense square matmul FLOP/s on this device: the best of `trials` runs over ~`seconds`."""
    op, work = _reference(device, dtype)
    return _best_rate(op, work, device, seconds, trials)


def gemm_efficiency(device: torch.device, dtype: torch.dtype, batch: int, m: int, n: int,
                    k: int, seconds: float = 0.2, trials: int = 5) -> float:
    """This GEMM shape's FLOP/s (batch × M×K @ K×N) over the reference square matmul's.

    Achieved throughput depends on the shape (NVIDIA, "Matrix Multiplication Background User's
    Guide", DU-09799-001; Anthony et al., "The Case for Co-Designing Model Architectures with
    Hardware", 2024): a small or oddly sized GEMM reaches a fraction of what a large square one
    does. The shape and the reference are timed in alternate runs and the best run of each
    compared, so a neighbour's burst on a shared machine slows both alike. A shape larger than
    the reference is timed with its largest dimension halved until it is not: a dimension that
    large has reached the plateau of its efficiency; the small ones, which set it, stay.
    """
    ref, ref_work = _reference(device, dtype)
    dims = [max(1, batch), max(1, m), max(1, n), max(1, k)]
    while 2.0 * math.prod(dims) > ref_work and max(dims) > 1:
        i = dims.index(max(dims))
        dims[i] = (dims[i] + 1) // 2
    b, mm, nn, kk = dims
    x = torch.randn(b, mm, kk, device=device, dtype=dtype)
    y = torch.randn(b, kk, nn, device=device, dtype=dtype)
    op = (lambda: torch.mm(x[0], y[0])) if b == 1 else (lambda: torch.bmm(x, y))
    work = 2.0 * b * mm * nn * kk
    clock = Clock(device)
    reps = []
    for fn in (op, ref):
        fn()
        start = clock.now()
        fn()
        reps.append(max(1, int(seconds / trials / 2 / max(clock.now() - start, 1e-6))))
    best = [0.0, 0.0]
    for _ in range(trials):
        for j, (fn, w) in enumerate(((op, work), (ref, ref_work))):
            start = clock.now()
            for _ in range(reps[j]):
                fn()
            best[j] = max(best[j], w * reps[j] / max(clock.now() - start, 1e-9))
    return best[0] / best[1]


def memory_bandwidth(device: torch.device, seconds: float = 0.3, trials: int = 5) -> float:
    """Bytes/s of a large device-memory copy (read + write): the best of `trials` runs.

    The best, as for the matmul probe: on a shared CPU one 0.3 s window measured 5 GB/s and the
    next 25 GB/s.
    """
    n = (256 if device.type == "cuda" else 32) * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    return _best_rate(lambda: dst.copy_(src), 2.0 * n * 4, device, seconds, trials)


@functools.cache
def op_overhead(device: torch.device, reps: int = 2000, trials: int = 5) -> float:
    """Seconds per tiny op (dispatch + launch), the least of `trials` runs: the floor under
    every kernel's time. Timed once per process and device: it is the host's, and two estimates
    in one process read it alike (timed per estimate, a burst of load read 4.3 µs against the
    usual 2.4 µs now and then, and moved an estimated GPT block's forward by 16 µs)."""
    x = torch.zeros(1, device=device)
    clock = Clock(device)
    for _ in range(50):
        x.add_(1)
    best = float("inf")
    for _ in range(trials):
        start = clock.now()
        for _ in range(reps // trials):
            x.add_(1)
        best = min(best, (clock.now() - start) / (reps // trials))
    return best
