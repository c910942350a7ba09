"""One optimizer step per layer: what the run's optimizer costs over each layer's parameters.

The step is ``pdv run``'s own (pdv.optim.make_optimizer: AdamW or SGD, foreach off), taken over
each layer's trainable parameters with random gradients of their shapes -- an elementwise step
costs the same whatever the gradient's values. The first step allocates the state (Adam's two
moments), so it is a warm-up. A round steps every layer in execution order, as one step over the
whole model does, so each layer meets the caches it meets in training; rounds repeat and the
median is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pdv.optim import PROFILE_OPTIMIZERS, make_optimizer
from pdv.profile.compute import Clock, median_iqr

__all__ = ["LR", "optimizer_note", "time_optimizer_steps", "trainable"]

LR = 1e-3
"""pdv run's default learning rate; the step's time does not depend on it."""


def optimizer_note(optimizer: str) -> str:
    """How the step of a profile's --optimizer is taken, for the provenance notes."""
    opt = make_optimizer([nn.Parameter(torch.zeros(1))], PROFILE_OPTIMIZERS[optimizer], LR)
    return (f"one torch.optim.{type(opt).__name__}(lr={LR:g}, foreach=False) step "
            "(pdv.optim.make_optimizer, as pdv run builds it)")


def trainable(layer: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer steps: the layer's, each once, that require grad."""
    return [p for p in layer.parameters() if p.requires_grad]


def time_optimizer_steps(layers: Sequence[nn.Module], optimizer: str, device: torch.device,
                         warmup: int, repeat: int,
                         tick: Callable[[], None]) -> list[float]:
    """Median seconds of one optimizer step per layer; 0.0 for a layer without parameters.

    Steps the layers' own parameters (they change by lr-sized updates: measure after everything
    else). Holds gradients and optimizer state for every layer at once, as training does.
    """
    clock = Clock(device)
    gen = torch.Generator(device=device).manual_seed(2)
    opts: list[torch.optim.Optimizer | None] = []
    for layer in layers:
        params = trainable(layer)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
        opts.append(make_optimizer(params, PROFILE_OPTIMIZERS[optimizer], LR) if params else None)
    times: list[list[float]] = [[] for _ in layers]
    warm = max(1, warmup)  # the first step allocates state: never time it
    for r in range(warm + repeat):
        for i, opt in enumerate(opts):
            if opt is None:
                continue
            t0 = clock.now()
            opt.step()
            t = clock.now() - t0
            if r >= warm:
                times[i].append(t)
        tick()
    for layer in layers:
        for p in layer.parameters():
            p.grad = None
    return [median_iqr(t)[0] if t else 0.0 for t in times]
