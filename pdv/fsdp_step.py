"""An FSDP2 step as torch.distributed.pipelining runs it: the run and the cluster probe share it.

torch's PipelineStage runs each backward of an FSDP stage with resharding after backward and
gradient sync off, then ends the step with each unit's reduce-scatter and reshard. A forward
reshards its layer after itself, so a stage all-gathers each layer M + 1 times a step of M
micro-batches (pdv.cost.terms prices it so). pdv's own executor (pdv.run.widths) and the FSDP
probe of ``pdv profile cluster`` (pdv.profile.overheads) follow these two calls.
"""

from __future__ import annotations

from typing import Any

__all__ = ["before_backward", "end_step"]


def _flags(root: Any, on: bool) -> None:
    root.set_is_last_backward(on)
    root.set_reshard_after_backward(on)
    root.set_requires_gradient_sync(on)


def before_backward(root: Any) -> None:
    """Before every backward: leave the parameters and gradients unsharded and unsynced."""
    _flags(root, False)


def end_step(root: Any) -> None:
    """After the step's backwards: each FSDP unit's reduce-scatter and reshard.

    (Setting the flags on before the last backward instead gathered one unit once more per
    step than the M + 1 times the cost model prices.)
    """
    from torch.distributed.fsdp import fully_shard

    _flags(root, True)
    state = fully_shard.state(root)
    for unit in state._state_ctx.all_states:
        groups = getattr(unit, "_fsdp_param_groups", None)
        if groups is None:  # older torch kept at most one group per unit
            one = getattr(unit, "_fsdp_param_group", None)
            groups = [one] if one is not None else []
        for group in groups:
            group.post_backward()
    state._root_post_backward_final_callback()
