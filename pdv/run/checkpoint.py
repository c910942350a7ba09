"""Checkpoint and resume a run with torch.distributed.checkpoint (DCP), across plans.

Every K steps all ranks save one DCP checkpoint ``<dir>/step-<k>``: model and optimizer state of
each rank's stages. Keys are the layers' own names (``h_0.attn.weight``), never stage numbers,
so any plan of the same model reads them back: DCP gives each rank its shard of every tensor it
holds under the new plan (replicas wrote once, FSDP/TP shards were saved as shards and are
resharded on load). Rank 0 then writes the folder's sidecar (pdv.run.resume: the model's tensor
names and shapes, the data order's settings, the losses and step times so far, reduced over
ranks) and points ``<dir>/latest`` at the folder (atomic rename), so a crash mid-save leaves the
previous checkpoint in force. Under ``torchrun --max-restarts`` restarted workers find
``latest`` and continue after its step; ``--resume-from`` starts a run from another run's.

Loading goes through DCP's reader (tensors into preallocated storage), never through
``torch.load`` of pickled objects; the sidecar is JSON.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pdv.models import ModelDef
from pdv.run.resume import META_NAME, CheckpointMeta

__all__ = ["Checkpointer", "state_shapes"]

_STAGE_PREFIX = re.compile(r"^stage\d+\.")


def state_shapes(model: ModelDef) -> dict[str, list[int]]:
    """Every tensor of the model's state by its checkpoint key (layer name . tensor) -> shape."""
    return {k: list(v.shape) for k, v in model.sequential().state_dict().items()}


def _by_layer(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The state keyed without the stage<i>. prefix, and the way back to the prefixed keys."""
    out: dict[str, Any] = {}
    back: dict[str, str] = {}
    for key, value in state.items():
        name = _STAGE_PREFIX.sub("", key)
        out[name], back[name] = value, key
    return out, back


class Checkpointer:
    """Saves every `every` steps into `folder`; loads a checkpoint written under any plan."""

    def __init__(self, folder: str | None, every: int, modules: dict[int, nn.Module],
                 optimizer: torch.optim.Optimizer) -> None:
        self.folder = Path(folder) if folder else None
        self.every = every
        # One container: get_state_dict needs one module; its stage<i>. prefix is dropped.
        self.modules = nn.ModuleDict({f"stage{i}": modules[i] for i in sorted(modules)})
        self.optimizer = optimizer

    def due(self, step: int) -> bool:
        """Whether a checkpoint is saved after `step` (0-based)."""
        return self.folder is not None and bool(self.every) and (step + 1) % self.every == 0

    def _aliases(self) -> dict[str, list[str]]:
        """Every checkpoint key of a parameter that has several (a tied weight held twice)."""
        keys: dict[int, list[str]] = {}
        for name, p in self.modules.named_parameters(remove_duplicate=False):
            key = _STAGE_PREFIX.sub("", name.replace("_checkpoint_wrapped_module.", ""))
            keys.setdefault(id(p), []).append(key)
        return {k: group for group in keys.values() if len(group) > 1 for k in group}

    def _state(self) -> tuple[dict[str, Any], dict[str, str], dict[str, str], Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.modules, self.optimizer)
        model, model_back = _by_layer(model_sd)
        # Optimizer state tensors only: hyperparameters (param_groups) come from the command
        # line, so nothing but tensors travels through the checkpoint.
        optim, optim_back = _by_layer(dict(optim_sd["state"]))  # type: ignore[arg-type]
        return {"model": model, "optim": {"state": optim}}, model_back, optim_back, optim_sd

    def save(self, steps_done: int, meta: CheckpointMeta) -> None:
        """Save after `steps_done` steps (all ranks call this); rank 0 writes `meta` and latest."""
        assert self.folder is not None
        import torch.distributed.checkpoint as dcp

        name = f"step-{steps_done}"
        target = self.folder / name
        if dist.get_rank() == 0 and target.exists():
            # Left by a run that stopped before pointing latest at it (another plan's files).
            shutil.rmtree(target)
        dist.barrier()
        state, *_ = self._state()
        # A tied weight held once here has its optimizer state under one of its names; a plan
        # that puts its layers on two ranks asks for each name, so it is saved under all.
        optim = state["optim"]["state"]
        for key, aliases in self._aliases().items():
            if key in optim:
                for alias in aliases:
                    optim.setdefault(alias, optim[key])
        dcp.save(state, checkpoint_id=str(target))
        dist.barrier()
        if dist.get_rank() == 0:
            _write_text(target / META_NAME, meta.model_dump_json(indent=2) + "\n")
            _write_text(self.folder / "latest", name + "\n")
        dist.barrier()

    def load(self, step_dir: Path) -> None:
        """Load model and optimizer state from a step folder written under any plan."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state, model_back, optim_back, live = self._state()
        dcp.load(state, checkpoint_id=str(step_dir))
        model_sd = {model_back[k]: v for k, v in state["model"].items()}
        optim_state = {optim_back[k]: v for k, v in state["optim"]["state"].items()}
        set_state_dict(self.modules, self.optimizer, model_state_dict=model_sd,
                       optim_state_dict={"state": optim_state,
                                         "param_groups": live["param_groups"]})


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
