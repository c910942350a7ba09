"""Measure a run (step time, peak memory per rank) and write the run report.

Peak memory, CUDA: ``torch.cuda.max_memory_reserved`` (what the allocator holds from the device,
the number that must fit) and ``max_memory_allocated`` in the notes.
Peak memory, CPU: the rank's resident-set high-water mark (``VmHWM`` in /proc/self/status)
during training, whole: interpreter, torch and process groups included, because that is what a
memory cap must hold and what the profile's ``overhead_bytes`` (the resident set of a process
that imported torch) predicts. The high-water mark is reset (``/proc/self/clear_refs`` = 5)
after the stage is built and the other stages' layers are freed (``malloc_trim``), so building
the whole model on every rank does not count. On top of the runtime it holds the stage's
parameters, gradients, optimizer state, activations and communication buffers.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from pdv.artifacts import Plan, Provenance, RunMeasured, RunReport, digest
from pdv.profile.allocator import trim_heap

__all__ = ["PeakMemory", "status_bytes", "step_stats", "make_report", "CPU_MEMORY_METHOD",
           "CUDA_MEMORY_METHOD"]

CPU_MEMORY_METHOD = (
    "cpu: peak resident set of the rank process (VmHWM, reset after the stage was built), "
    "runtime included"
)
CUDA_MEMORY_METHOD = "cuda: torch.cuda.max_memory_reserved (caching allocator)"


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


class PeakMemory:
    """Peak memory of this rank, by the method that fits its device."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type

    @property
    def method(self) -> str:
        """How the peak is measured, for the report."""
        return CPU_MEMORY_METHOD if self.device_type == "cpu" else CUDA_MEMORY_METHOD

    def start(self) -> None:
        """Start the peak window (after the stage is built and the rest of the model freed)."""
        if self.device_type == "cpu":
            trim_heap()
            Path("/proc/self/clear_refs").write_text("5")
        else:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        """Peak bytes in the window."""
        if self.device_type == "cpu":
            return status_bytes("VmHWM")
        import torch

        return int(torch.cuda.max_memory_reserved())


def step_stats(times: list[float], warmup: int) -> tuple[float, float]:
    """(median, interquartile range) of the step times after the warm-up steps."""
    timed = times[warmup:] or times
    if len(timed) < 2:
        return timed[0], 0.0
    q = statistics.quantiles(timed, n=4, method="inclusive")
    return statistics.median(timed), q[2] - q[0]


def make_report(plan: Plan, step_times: list[float], warmup: int, peaks: list[int],
                memory_method: str, losses: list[float], notes: list[str]) -> RunReport:
    """The run report: measured next to the plan's prediction, with the loss of every step."""
    median, spread = step_stats(step_times, warmup)
    return RunReport(
        provenance=Provenance(method="measured", inputs={"plan": digest(plan)}, notes=notes),
        plan_digest=digest(plan),
        measured=RunMeasured(
            step_time_s=median,
            step_time_spread_s=spread,
            step_times_s=step_times,
            peak_memory_bytes={str(r): int(b) for r, b in enumerate(peaks)},
            memory_method=memory_method,
        ),
        predicted=plan.predicted,
        loss=losses,
        dtype=plan.dtype,
    )
