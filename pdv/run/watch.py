"""Per-step watching on every rank: compute time, slow ranks, and a heartbeat for the launcher.

After each step every rank adds its compute (pdv.run.clock, plus its optimizer step) to a
world-sized vector that one all-reduce shares, so all ranks hold every rank's compute and feed
the same detector (pdv.run.slow): they flag the same rank at the same step. The same vector
carries each rank's process CPU time in the step (all its threads: the ops, the backend's own
threads, Python around them), so a report shows the CPU a rank spends off its ops. The heartbeat
(``PDV_PROGRESS_DIR``, pdv.profile.launch_local's format) tells an elastic launcher how far each
rank got when one of them vanished.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pdv.artifacts import Plan, SlowRank
from pdv.profile.launch_local import heartbeat_from_env
from pdv.run.clock import ComputeClock
from pdv.run.dims import ParallelDims
from pdv.run.slow import SlowDetector, SlowFlag, rank_predictions

__all__ = ["SlowOptions", "StepWatch"]


@dataclass(frozen=True)
class SlowOptions:
    """When a rank counts as slow (pdv.run.slow) and whether the run stops to replan."""

    margin: float = 0.5
    steps: int = 3
    baseline_steps: int = 2
    stop: bool = False


class StepWatch:
    """One per rank; `after_step` is collective (all ranks call it every step)."""

    def __init__(self, plan: Plan, dims: ParallelDims, modules: dict[int, nn.Module], rank: int,
                 world: int, warmup: int, options: SlowOptions, device: torch.device) -> None:
        self.rank, self.world, self.warmup, self.options = rank, world, warmup, options
        self.clock = ComputeClock(modules, cuda=device.type == "cuda")
        self.comm = device if device.type == "cuda" else torch.device("cpu")  # nccl: on GPU
        self.compute: list[list[float]] = []  # per timed step: every rank's compute
        self.cpu: list[list[float]] = []  # per timed step: every rank's process CPU
        self.cpu_at = 0.0
        self.beat = heartbeat_from_env(rank)
        self.steps_seen = 0
        stages = plan.predicted.stages if plan.predicted else []
        self.detector: SlowDetector | None = None
        if len(stages) == dims.num_stages:
            predicted = rank_predictions([s.compute_s for s in stages],
                                         [list(s.ranks) for s in dims.stages], world)
            stages_of = [tuple(dims.stages_of(r)) for r in range(world)]
            self.detector = SlowDetector(predicted, stages_of, options.margin, options.steps,
                                         options.baseline_steps)
        self.flags: list[SlowFlag] = []

    def before_step(self) -> None:
        """Start the step's compute count afresh."""
        self.clock.take()
        self.cpu_at = time.process_time()

    def after_step(self, step: int, optimizer_s: float) -> list[SlowFlag]:
        """Share this step's compute; return the ranks flagged slow at this step."""
        mine = torch.zeros(2 * self.world, dtype=torch.float64)
        mine[self.rank] = self.clock.take() + optimizer_s
        mine[self.world + self.rank] = time.process_time() - self.cpu_at
        mine = mine.to(self.comm)
        dist.all_reduce(mine)
        if self.beat:
            self.beat({"phase": "step", "step": step + 1})
        self.steps_seen += 1
        if self.steps_seen <= self.warmup:
            return []
        both = mine.tolist()
        self.compute.append(both[: self.world])
        self.cpu.append(both[self.world :])
        if self.detector is None:
            return []
        new = self.detector.observe(step, self.compute[-1])
        self.flags += new
        return new

    def median_compute(self) -> dict[str, float]:
        """Each rank's median compute per timed step."""
        return self._medians(self.compute)

    def median_cpu(self) -> dict[str, float]:
        """Each rank's median process CPU per timed step."""
        return self._medians(self.cpu)

    def _medians(self, steps: list[list[float]]) -> dict[str, float]:
        if not steps:
            return {}
        return {str(r): statistics.median(c[r] for c in steps) for r in range(self.world)}

    def slow_ranks(self) -> list[SlowRank]:
        """The flags, for the run report."""
        return [SlowRank(rank=f.rank, stages=list(f.stages), step=f.step,
                         consecutive_steps=f.consecutive_steps, measured_compute_s=f.measured_s,
                         predicted_compute_s=f.predicted_s, normal_ratio=f.normal_ratio,
                         reason=f.reason()) for f in self.flags]
