"""Slow ranks: a rank whose measured compute exceeds its prediction, step after step (no torch).

Every rank times its own forward and backward compute and optimizer step each step
(pdv.run.clock) and the ranks share the numbers (one small all-reduce), so every rank feeds the
same numbers to the same detector and reaches the same decision at the same step: no further
agreement is needed before the ranks stop for a replan.

The comparison. A rank's ratio at a step is measured compute / predicted compute (the plan's
per-stage ``compute_s``, summed over the rank's stages). Predictions on a shared machine are
off by a factor that every rank shares (cores shared by ranks, other load), so the run first
calibrates: the median ratio over all ranks and the first `baseline_steps` timed steps is the
run's normal ratio. After that, a rank is slow at a step when its ratio exceeds
(1 + margin) x normal, and it is flagged once it has been slow for `steps` steps in a row. A
rank already slow at the start is flagged too, as long as fewer than half the ranks are (the
median is then the healthy ranks').
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

__all__ = ["SlowFlag", "SlowDetector", "rank_predictions"]


@dataclass(frozen=True)
class SlowFlag:
    """A rank found slow: at which step, by how much."""

    rank: int
    stages: tuple[int, ...]
    step: int
    """the step (0-based, of the whole run) that completed the run of slow steps"""
    consecutive_steps: int
    measured_s: float
    """the rank's compute in that step"""
    predicted_s: float
    normal_ratio: float
    """measured / predicted of the run's ranks in its first timed steps (the calibration)"""

    @property
    def ratio(self) -> float:
        """How many times its calibrated prediction the rank took."""
        return self.measured_s / (self.predicted_s * self.normal_ratio)

    def reason(self) -> str:
        """One line for people and the run report."""
        stages = ",".join(map(str, self.stages))
        return (f"rank {self.rank} (stage {stages}) slow: compute {self.measured_s * 1e3:.1f} ms "
                f"at step {self.step}, {self.ratio:.1f}x its calibrated prediction "
                f"({self.predicted_s * 1e3:.1f} ms x {self.normal_ratio:.2f}) for "
                f"{self.consecutive_steps} steps in a row")


def rank_predictions(stage_compute_s: list[float], stage_ranks: list[list[int]],
                     world: int) -> list[float]:
    """Each rank's predicted compute per step: the sum over the stages it runs."""
    out = [0.0] * world
    for t, ranks in zip(stage_compute_s, stage_ranks, strict=True):
        for r in ranks:
            out[r] += t
    return out


@dataclass
class SlowDetector:
    """Feed it every rank's measured compute each step; it says when a rank is flagged."""

    predicted_s: list[float]
    stages_of: list[tuple[int, ...]]
    margin: float = 0.5
    steps: int = 3
    baseline_steps: int = 2
    _baseline: list[float] = field(default_factory=list)
    _normal: float | None = None
    _run: list[int] = field(default_factory=list)
    flagged: list[SlowFlag] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.margin <= 0 or self.steps < 1 or self.baseline_steps < 1:
            raise ValueError("margin > 0, steps >= 1 and baseline_steps >= 1")
        self._run = [0] * len(self.predicted_s)

    @property
    def normal_ratio(self) -> float | None:
        """The calibration, once the baseline steps are in."""
        return self._normal

    def observe(self, step: int, measured_s: list[float]) -> list[SlowFlag]:
        """Take one timed step's compute per rank; return the ranks flagged at this step."""
        ratios = [m / p if p > 0 else None for m, p in zip(measured_s, self.predicted_s,
                                                             strict=True)]
        if self._normal is None:
            self._baseline += [r for r in ratios if r is not None]
            if self._baseline and len(self._baseline) >= self.baseline_steps * sum(
                    r is not None for r in ratios):
                self._normal = statistics.median(self._baseline)
            return []
        new = []
        for rank, r in enumerate(ratios):
            slow = r is not None and r > (1 + self.margin) * self._normal
            self._run[rank] = self._run[rank] + 1 if slow else 0
            if self._run[rank] == self.steps:
                flag = SlowFlag(rank, self.stages_of[rank], step, self.steps,
                                measured_s[rank], self.predicted_s[rank], self._normal)
                self.flagged.append(flag)
                new.append(flag)
        return new
