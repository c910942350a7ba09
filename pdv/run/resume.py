"""What a checkpoint says about itself, and whether a plan may resume from it (no torch).

Each checkpoint folder ``<dir>/step-<k>`` holds, next to torch.distributed.checkpoint's files, a
``pdv-checkpoint.json`` written by rank 0 once every rank has saved: the model (spec, arguments
and the name and global shape of every tensor of its state), the training setup that fixes the
data order (global batch, seed, data hook) and the optimizer, and the per-step losses and step
times of the run so far, already reduced over ranks. Keys of the tensors are the layers' own
names, not stage numbers, so a checkpoint written under one plan loads under any other plan of
the same model: DCP reads each rank's shard of every tensor, whatever the old layout was.

A resume is refused before any process starts when the checkpoint cannot continue this run:
another model (a tensor missing, extra, or of another shape), another global batch or seed
(the data order would change), another optimizer (its state would not fit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdv.artifacts import ModelSpec
from pdv.errors import PdvError

__all__ = [
    "META_NAME",
    "CheckpointMeta",
    "check_resume",
    "checkpoint_step_dir",
    "read_meta",
    "resume_source",
]

META_NAME = "pdv-checkpoint.json"
LATEST = "latest"


class CheckpointMeta(BaseModel):
    """The sidecar of one checkpoint folder."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    format: Literal["pdv.checkpoint/v1"] = "pdv.checkpoint/v1"
    step: int = Field(ge=0, description="steps done; the run continues with this step")
    model: ModelSpec
    tensors: dict[str, list[int]] = Field(
        description="the model's state: tensor name (layer name . parameter) -> global shape"
    )
    global_batch_size: int = Field(ge=1)
    num_micro_batches: int = Field(ge=1, description="of the plan that wrote it (informative)")
    seed: int
    data: str | None = Field(None, description="the data hook, when not the model's batches")
    optimizer: str
    lr: float
    plan_digest: str = Field(description="digest of the plan (as run) that wrote it")
    loss: list[float] = Field(description="loss of every step so far, reduced over ranks")
    step_times_s: list[float] = Field(description="every step's time so far, max over ranks")


def checkpoint_step_dir(path: str | Path) -> Path:
    """The step folder a path names: a checkpoint dir's ``latest``, or a step folder itself."""
    p = Path(path)
    if not p.exists():
        raise PdvError(f"checkpoint folder {p} does not exist")
    if not p.is_dir():
        raise PdvError(f"{p} is not a checkpoint folder (a file, not a folder)")
    if (p / LATEST).is_file():
        step_dir = p / (p / LATEST).read_text().strip()
        if not (step_dir / META_NAME).is_file():
            raise PdvError(f"{p}/latest names {step_dir.name}, which holds no {META_NAME}; "
                           "the checkpoint is incomplete or not pdv's")
        return step_dir
    if (p / META_NAME).is_file():
        return p
    raise PdvError(f"{p} holds no pdv checkpoint (neither a 'latest' file nor {META_NAME}); "
                   "pass the folder given to --checkpoint-dir, or one of its step-<k> folders")


def resume_source(checkpoint_dir: str | Path | None, resume_from: str | Path | None,
                  ) -> Path | None:
    """The step folder a run starts from: its own --checkpoint-dir's latest (a restart of this
    run: newer than anything it was started from), else --resume-from's, else none."""
    if checkpoint_dir is not None and (Path(checkpoint_dir) / LATEST).is_file():
        return checkpoint_step_dir(checkpoint_dir)
    if resume_from is not None:
        return checkpoint_step_dir(resume_from)
    return None


def read_meta(step_dir: Path) -> CheckpointMeta:
    """The sidecar of a step folder; a one-line PdvError when it is unreadable."""
    path = step_dir / META_NAME
    try:
        return CheckpointMeta.model_validate(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PdvError(f"{path}: not a readable pdv checkpoint description ({first})") from None


def _describe(spec: ModelSpec) -> str:
    args = ",".join(f"{k}={v}" for k, v in sorted(spec.kwargs.items()))
    return spec.spec + (f"({args})" if args else "")


def check_resume(meta: CheckpointMeta, where: Path, model: ModelSpec,
                 tensors: dict[str, list[int]], *, global_batch_size: int, seed: int,
                 data: str | None, optimizer: str, steps: int) -> None:
    """A PdvError naming the fix unless a run of `model` with this setup can continue `meta`."""
    missing = sorted(set(meta.tensors) - set(tensors))
    extra = sorted(set(tensors) - set(meta.tensors))
    shaped = sorted(k for k in set(tensors) & set(meta.tensors) if tensors[k] != meta.tensors[k])
    if missing or extra or shaped:
        if shaped:
            k = shaped[0]
            first = f"{k} is {meta.tensors[k]} there, {tensors[k]} here"
        else:
            first = f"{(missing or extra)[0]} is only {'there' if missing else 'here'}"
        raise PdvError(
            f"{where} is a checkpoint of another model ({_describe(meta.model)}; "
            f"{len(missing) + len(extra) + len(shaped)} tensors differ from "
            f"{_describe(model)}'s, e.g. {first}); resume it with a plan of that model"
        )
    if meta.global_batch_size != global_batch_size:
        raise PdvError(
            f"{where} trained with a global batch of {meta.global_batch_size}, this plan's is "
            f"{global_batch_size}: the data order would change; plan (or replan) with "
            f"--global-batch {meta.global_batch_size}"
        )
    if meta.seed != seed or meta.data != data:
        raise PdvError(
            f"{where} trained with --seed {meta.seed}"
            + (f" --data {meta.data}" if meta.data else "")
            + f"; this run has --seed {seed}" + (f" --data {data}" if data else "")
            + ": the data order would change; pass the checkpoint's"
        )
    if meta.optimizer != optimizer:
        raise PdvError(
            f"{where} holds {meta.optimizer} state but this run uses --optimizer {optimizer}; "
            f"pass --optimizer {meta.optimizer}"
        )
    if meta.step >= steps:
        raise PdvError(
            f"{where} is at step {meta.step}; --steps {steps} leaves nothing to run "
            f"(ask for more than {meta.step} steps)"
        )
