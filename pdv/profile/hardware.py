"""What one rank runs on: its device (kind, name, memory), host, and a measured matmul speed.

CPU ranks get kind "cpu" (the model profiler measures under the same kind); a CUDA rank gets a
deterministic slug of its NVML/torch device name, e.g. "nvidia-h100-80gb-hbm3", so a profile
taken on one H100 prices every H100 of the cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import torch

__all__ = [
    "device_kind",
    "host_name",
    "matmul_flops",
    "memory_limit",
    "probe_device",
    "runtime_memory",
    "SmallOpNet",
    "small_op_step_s",
]

_NO_LIMIT = 1 << 60  # cgroup v1 writes ~2^63 for "unlimited"; anything this large means none


def device_kind(name: str) -> str:
    """Deterministic kind slug of a name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def _netns_name() -> str | None:
    # Ranks of the emulated cluster run in named network namespaces that stand for hosts; the
    # kernel host name is the same in all of them, so the namespace name tells the hosts apart.
    try:
        mine = os.stat("/proc/self/ns/net")
        entries = list(Path("/var/run/netns").iterdir())
    except OSError:
        return None
    for entry in entries:
        with contextlib.suppress(OSError):
            st = entry.stat()
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return entry.name
    return None


def host_name() -> str:
    """The host a rank runs on: PDV_HOST if set, else hostname (plus ':netns' inside one)."""
    if os.environ.get("PDV_HOST"):
        return os.environ["PDV_HOST"]
    host = socket.gethostname()
    ns = _netns_name()
    return f"{host}:{ns}" if ns else host


def _cgroup_memory_limits() -> list[tuple[int, str]]:
    """Memory limits of every cgroup (v1 and v2) that holds this process, innermost first."""
    found: list[tuple[int, str]] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: limits may sit on any ancestor
            root, leaf = Path("/sys/fs/cgroup"), "memory.max"
            if not (root / "cgroup.controllers").exists():
                root = Path("/sys/fs/cgroup/unified")
        elif "memory" in controllers.split(","):
            root, leaf = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        else:
            continue
        rel = Path(path.lstrip("/"))
        for d in [rel, *rel.parents]:
            f = root / d / leaf
            try:
                text = f.read_text().strip()
            except OSError:
                continue
            if text != "max" and int(text) < _NO_LIMIT:
                found.append((int(text), str(f)))
    return found


def memory_limit(local_ranks: int) -> tuple[int, str]:
    """Memory one CPU rank may use, and where the number came from.

    The smaller of: the tightest cgroup memory limit on this process (it binds the whole
    cgroup, and all local ranks of a launch share it, so it is divided too), and total RAM
    divided by the ranks on this host.
    """
    local_ranks = max(1, local_ranks)
    total = psutil.virtual_memory().total
    best, source = total // local_ranks, f"psutil total RAM {total} B / {local_ranks} local ranks"
    for limit, where in _cgroup_memory_limits():
        share = min(limit, total) // local_ranks
        if share < best:
            best, source = share, f"cgroup limit {limit} B ({where}) / {local_ranks} local ranks"
    return best, source


def _cgroup_charge(limit_file: str) -> int | None:
    """What the cgroup of a limit file is charged now (v1 usage_in_bytes, v2 memory.current)."""
    f = Path(limit_file)
    usage = "memory.usage_in_bytes" if f.name == "memory.limit_in_bytes" else "memory.current"
    try:
        return int((f.parent / usage).read_text().strip())
    except (OSError, ValueError):
        return None


def _cgroup_breakdown(limit_file: str) -> dict[str, int]:
    """Anonymous and page-cache parts of a cgroup's charge (v1 total_rss/total_cache, v2
    anon/file): the cache part is what the kernel can reclaim before it kills."""
    f = Path(limit_file)
    keys = ("total_rss", "total_cache") if f.name == "memory.limit_in_bytes" else ("anon", "file")
    found: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in (f.parent / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in keys:
                found[key] = int(value)
    return found


def runtime_memory(device: torch.device, local_ranks: int) -> tuple[int, dict[str, Any]]:
    """Memory this rank holds now, as its memory cap counts it, and how it was read.

    Meant to be called with the process group up and a first collective done, before any
    model: what every rank pays before its stage's tensors. CUDA: device memory in use
    (cudaMemGetInfo total − free: context, NCCL buffers). CPU inside a memory cgroup whose
    limit is below host RAM (the cap memory_limit honours): the cgroup's charge, which counts
    the launcher's processes in the group and page cache too, shared by the local ranks as
    the limit is; otherwise the process's resident set.
    """
    rss = int(psutil.Process(os.getpid()).memory_info().rss)
    info: dict[str, Any] = {"runtime_rss_bytes": rss}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        info["runtime_source"] = ("CUDA device memory in use (cudaMemGetInfo total - free) "
                                  "with the process group up, after a first collective")
        return int(total - free), info
    local_ranks = max(1, local_ranks)
    total = psutil.virtual_memory().total
    capped = sorted((limit, where) for limit, where in _cgroup_memory_limits() if limit < total)
    for limit, where in capped:  # the tightest cap whose charge can be read
        charge = _cgroup_charge(where)
        if charge is None:
            continue
        info["runtime_cgroup_charge_bytes"] = charge
        info["runtime_cgroup_stat_bytes"] = _cgroup_breakdown(where)
        info["runtime_source"] = (
            f"cgroup charge {charge} B of the group capped at {limit} B ({where}) / "
            f"{local_ranks} local ranks, with the process group up, after a first collective"
        )
        return charge // local_ranks, info
    info["runtime_source"] = ("resident set of this rank's process (psutil) with the process "
                              "group up, after a first collective (no memory cgroup cap)")
    return rss, info


def matmul_flops(device: torch.device, seconds: float = 0.3, trials: int = 5) -> float:
    """Dense float32 matmul throughput of one rank's device, FLOP/s, over ~`seconds`.

    The best of `trials` equal windows: on a shared machine a neighbour's burst only ever slows
    a window down, so the fastest is the closest to the device's own speed. The model profiler
    and the cluster's alone probe both use this default; the all-ranks-at-once probe passes
    trials=1, because there the sustained share under contention is the number wanted.
    """
    n = 512 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):  # warm-up: allocator, kernels, caches
        a @ b
    sync()
    best = 0.0
    for _ in range(max(1, trials)):
        calls, start = 0, time.perf_counter()
        while True:
            for _ in range(8):
                a @ b
            calls += 8
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / max(1, trials):
                best = max(best, 2.0 * n**3 * calls / elapsed)
                break
    return best


SMALL_OP_WIDTH, SMALL_OP_BATCH, SMALL_OP_BLOCKS = 128, 32, 4
"""the small-op reference net: SMALL_OP_BLOCKS × (Linear, LayerNorm, GELU) of this width, on
a batch of this many rows"""


class SmallOpNet:
    """A fixed net of small ops, built once, whose forward and backward is timed on demand.

    The matmul probe misses what slows a model of millisecond layers on a shared machine: in
    spells of seconds to minutes this project's 2-vCPU VM ran this net 1.6-1.8× slower
    (650 µs against 1050-1270) while 256×256 matmuls kept their speed, and model profiles
    taken in such a spell read gpt_tiny 1.6× and mlp 1.4× slow at 98-99 GFLOP/s. The
    profiler (after every timed round) and the cluster's alone probe both time it, so a
    profile taken in another state of the machine than the cluster file can be told
    (pdv.cost.compute.spell_note).
    """

    def __init__(self, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(0)
        layers: list[torch.nn.Module] = []
        for _ in range(SMALL_OP_BLOCKS):
            lin = torch.nn.Linear(SMALL_OP_WIDTH, SMALL_OP_WIDTH)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen)
                                 / SMALL_OP_WIDTH**0.5)
            layers += [lin, torch.nn.LayerNorm(SMALL_OP_WIDTH), torch.nn.GELU()]
        self.device = device
        self.net = torch.nn.Sequential(*layers).to(device)
        self.x = torch.randn(SMALL_OP_BATCH, SMALL_OP_WIDTH, generator=gen).to(device)
        for _ in range(5):  # warm-up: kernels, allocator
            self._step()
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step(self) -> None:
        self.net(self.x).sum().backward()

    def __call__(self, seconds: float) -> float:
        """Median seconds of one forward and backward over ~`seconds` (at least one step).

        A median, as the layers' times are. One untimed step first: read between a model's
        rounds, the first step meets caches the model's layers filled (readings after
        gpt_tiny's rounds read 11% over the quiet 0.1 s ones without it)."""
        self._step()
        self._sync()
        took: list[float] = []
        end = time.perf_counter() + seconds
        while not took or time.perf_counter() < end:
            t0 = time.perf_counter()
            self._step()
            self._sync()
            took.append(time.perf_counter() - t0)
        took.sort()
        return took[len(took) // 2]


def small_op_step_s(device: torch.device, seconds: float = 0.1) -> float:
    """Median seconds of one forward and backward of :class:`SmallOpNet` over ~`seconds`."""
    return SmallOpNet(device)(seconds)


def _cuda_details(index: int) -> dict[str, Any]:
    """What NVML says about one GPU: name, memory, and its active NVLinks."""
    import pynvml

    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
        info: dict[str, Any] = {
            "name": name,
            "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
            "pci_bus_id": _text(pynvml.nvmlDeviceGetPciInfo(h).busId),
        }
        links = []
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                if pynvml.nvmlDeviceGetNvLinkState(h, link) != pynvml.NVML_FEATURE_ENABLED:
                    continue
                remote = _text(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId)
            except pynvml.NVMLError:
                continue  # not supported on this GPU or link absent
            links.append({"link": link, "remote_pci_bus_id": remote})
        info["nvlinks"] = links
        return info
    finally:
        pynvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe_device(device: torch.device, local_ranks: int, seconds: float = 0.3) -> dict[str, Any]:
    """This rank's device as ClusterDevice fields (without rank): kind, name, memory, speed."""
    host = host_name()
    cpu_name = _cpu_model()
    details: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_name,
        "logical_cpus": psutil.cpu_count(logical=True),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "ram_total_bytes": psutil.virtual_memory().total,
    }
    ns = _netns_name()
    if ns:
        details["netns"] = ns
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            nvml = _cuda_details(index)
            details["nvml"] = nvml
            name, memory = nvml["name"], nvml["memory_bytes"]
            details["memory_source"] = "NVML total device memory"
        except Exception as exc:  # NVML missing in a container: fall back to torch's view
            props = torch.cuda.get_device_properties(index)
            name, memory = props.name, int(props.total_memory)
            details["memory_source"] = f"torch device properties (NVML unavailable: {exc})"
        kind = device_kind(name)
    else:
        name, kind = cpu_name, "cpu"
        memory, details["memory_source"] = memory_limit(local_ranks)
    return {
        "host": host,
        "kind": kind,
        "name": name,
        "memory_bytes": int(memory),
        # All ranks probe at once here: the speed each keeps when every rank computes.
        "matmul_flops": matmul_flops(device, seconds, trials=1),
        "details": details,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
