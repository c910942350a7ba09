"""Checkpoint and resume a run with torch.distributed.checkpoint (DCP).

Every K steps all ranks save one DCP checkpoint ``<dir>/step-<k>``: model and optimizer state of
each rank's stage (keys are the layers' names, unique across stages; replicas write once, DCP
deduplicates; FSDP/TP shards are saved as shards), plus each rank's losses and step times so far.
When all ranks have written, rank 0 points ``<dir>/latest`` at it (atomic rename), so a crash
mid-save leaves the previous checkpoint in force. Under ``torchrun --max-restarts`` the restarted
workers find ``latest`` and continue after its step.

Loading goes through DCP's reader (tensors into preallocated storage), never through
``torch.load`` of pickled objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Checkpointer"]


class Checkpointer:
    """Saves every `every` steps into `folder` and resumes from its latest checkpoint."""

    def __init__(self, folder: str | None, every: int, modules: dict[int, nn.Module],
                 optimizer: torch.optim.Optimizer, max_steps: int = 100_000) -> None:
        self.folder = Path(folder) if folder else None
        self.every = every
        # One container so keys read stage<i>.<layer>...: unique across ranks and stages.
        self.modules = nn.ModuleDict({f"stage{i}": modules[i] for i in sorted(modules)})
        self.optimizer = optimizer
        self.max_steps = max_steps

    def _state(self, losses: list[float], times: list[float], step: int) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.modules, self.optimizer)
        rank = dist.get_rank()
        pad = self.max_steps
        lt = torch.zeros(pad, dtype=torch.float64)
        tt = torch.zeros(pad, dtype=torch.float64)
        lt[: len(losses)] = torch.tensor(losses, dtype=torch.float64)
        tt[: len(times)] = torch.tensor(times, dtype=torch.float64)
        return {
            "model": model_sd,
            # Optimizer state tensors only: hyperparameters (param_groups) come from the command
            # line, so nothing but tensors travels through the checkpoint.
            "optim": {"state": optim_sd["state"]},
            f"rank{rank}_losses": lt,
            f"rank{rank}_times": tt,
            "step": torch.tensor([step], dtype=torch.int64),
        }

    def maybe_save(self, step: int, losses: list[float], times: list[float]) -> None:
        """Save after `step` when it is a multiple of `every` (all ranks call this)."""
        if self.folder is None or not self.every or (step + 1) % self.every:
            return
        import torch.distributed.checkpoint as dcp

        name = f"step-{step + 1}"
        dcp.save(self._state(losses, times, step + 1), checkpoint_id=str(self.folder / name))
        dist.barrier()
        if dist.get_rank() == 0:
            tmp = self.folder / ".latest.tmp"
            tmp.write_text(name + "\n")
            os.replace(tmp, self.folder / "latest")
        dist.barrier()

    def resume(self) -> tuple[int, list[float], list[float]]:
        """(first step to run, losses so far, step times so far): (0, [], []) on a fresh run."""
        if self.folder is None or not (self.folder / "latest").is_file():
            return 0, [], []
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        name = (self.folder / "latest").read_text().strip()
        state = self._state([], [], 0)
        dcp.load(state, checkpoint_id=str(self.folder / name))
        _, live = get_state_dict(self.modules, self.optimizer)
        set_state_dict(self.modules, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict={"state": state["optim"]["state"],
                                         "param_groups": live["param_groups"]})
        step = int(state["step"][0])
        rank = dist.get_rank()
        losses = state[f"rank{rank}_losses"][:step].tolist()
        times = state[f"rank{rank}_times"][:step].tolist()
        return step, losses, times
