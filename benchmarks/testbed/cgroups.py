"""Per-rank cgroup v1 groups: a CPU quota (cpu controller) and a memory cap (memory controller).

A group is `<prefix>-<pid>-<tag>-r<rank>` under /sys/fs/cgroup/cpu and /sys/fs/cgroup/memory,
so groups left by a crashed run (whose pid is gone) are found and removed by
`cleanup_leftovers`, as the namespaces are. A rank enters its group before it execs (the
launcher writes its own pid to cgroup.procs), so torchrun and every worker it spawns inherit it.

A rank with a CPU quota also gets a large CPU weight (cpu.shares, `QUOTA_SHARES`): a quota only
caps, so on a machine that other work shares, the rank would get less than its quota whenever
the cores are busy. With the weight it is served first, up to the quota, whatever else runs; the
quotas of one cluster must then add up to less than the machine's cores (the topology files keep
the sum under 1.8 of 2 cores), which leaves the rest to everything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["CONTROLLERS", "RankGroup", "cleanup_leftovers", "leftovers", "unavailable_reason"]

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "memory")
PERIOD_US = 10_000  # short: a rank at a quota pauses for ms, not 100 ms, mid-transfer
QUOTA_SHARES = 32 * 1024  # 32x the weight of a plain process (1024)


def unavailable_reason() -> str | None:
    """Why per-rank cgroups cannot be made here (not root, no v1 cpu/memory), or None."""
    if os.geteuid() != 0:
        return "needs root (cgroups)"
    for c in CONTROLLERS:
        if not (ROOT / c / "cgroup.procs").exists():
            return f"no cgroup v1 {c} controller at {ROOT / c}"
    return None


def leftovers(prefix: str) -> list[Path]:
    """Cgroup folders with the testbed prefix that exist now (of any testbed)."""
    out: list[Path] = []
    for c in CONTROLLERS:
        with contextlib.suppress(FileNotFoundError):
            out += [p for p in (ROOT / c).iterdir()
                    if p.is_dir() and p.name.startswith(prefix + "-")]
    return out


def _pids(folder: Path) -> list[int]:
    with contextlib.suppress(FileNotFoundError):
        return [int(x) for x in (folder / "cgroup.procs").read_text().split()]
    return []


def _remove(folder: Path) -> None:
    """Kill what runs in the group and remove it (rmdir needs it empty)."""
    for _ in range(50):
        pids = _pids(folder)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            try:
                folder.rmdir()
                return
            except OSError:
                pass
        if not folder.exists():
            return
        time.sleep(0.1)
    raise RuntimeError(f"cgroup {folder} could not be removed (processes: {_pids(folder)})")


def cleanup_leftovers(prefix: str) -> list[Path]:
    """Remove groups left by testbeds whose process is gone; returns them."""
    removed = []
    for folder in leftovers(prefix):
        parts = folder.name.split("-")
        if len(parts) < 3 or not parts[1].isdigit() or psutil.pid_exists(int(parts[1])):
            continue
        _remove(folder)
        removed.append(folder)
    return removed


@dataclass(frozen=True)
class RankGroup:
    """One rank's cpu and memory groups."""

    name: str

    def path(self, controller: str) -> Path:
        """This group's folder under one controller."""
        return ROOT / controller / self.name

    def create(self, cpu: float | None, memory: int | None, shares: int | None = None) -> None:
        """Make the groups; cpu in cores (None: no quota), memory in bytes (None: no cap).

        shares: the CPU weight; by default `QUOTA_SHARES` under a quota, the kernel's otherwise.
        """
        for c in CONTROLLERS:
            self.path(c).mkdir()
        cpu_dir = self.path("cpu")
        (cpu_dir / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (cpu_dir / "cpu.cfs_quota_us").write_text(str(int(cpu * PERIOD_US)) if cpu else "-1")
        if shares or cpu:
            (cpu_dir / "cpu.shares").write_text(str(shares or QUOTA_SHARES))
        mem = self.path("memory")
        if memory is not None:
            (mem / "memory.limit_in_bytes").write_text(str(memory))
            # No swap here, but where there is, the cap must bind RAM+swap or it only slows.
            with contextlib.suppress(FileNotFoundError, OSError):
                (mem / "memory.memsw.limit_in_bytes").write_text(str(memory))
        with contextlib.suppress(OSError):
            (mem / "memory.swappiness").write_text("0")

    def shell_enter(self) -> str:
        """Shell text that moves the current shell ($$) into both groups."""
        return "; ".join(f"echo $$ > {self.path(c) / 'cgroup.procs'}" for c in CONTROLLERS)

    def peak_memory(self) -> int:
        """Most memory the group used since creation or the last reset (bytes)."""
        return int((self.path("memory") / "memory.max_usage_in_bytes").read_text())

    def memory_cap(self) -> int | None:
        """The group's memory cap in bytes, None if unlimited."""
        value = int((self.path("memory") / "memory.limit_in_bytes").read_text())
        return None if value >= 1 << 60 else value

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this group so far."""
        for line in (self.path("memory") / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def reset_peak(self) -> None:
        """Start the peak-memory reading afresh (before each run)."""
        (self.path("memory") / "memory.max_usage_in_bytes").write_text("0")

    def remove(self) -> None:
        """Kill what runs inside and remove both groups."""
        for c in CONTROLLERS:
            if self.path(c).exists():
                _remove(self.path(c))
