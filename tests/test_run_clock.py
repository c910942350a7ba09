"""pdv.run.clock: a rank's compute is its stage modules' forward and backward spans, the first
stage's first layer's backward included, and nothing between them."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn

from pdv.run.clock import ComputeClock


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward waits `bwd_s` first (a layer's backward of known length)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bwd_s: float) -> torch.Tensor:
        ctx.bwd_s = bwd_s
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(ctx.bwd_s)
        return grad, None


class _Layer(nn.Module):
    """Waits `fwd_s` forward and `bwd_s` backward; with a weight, backward makes its grad."""

    def __init__(self, fwd_s: float, bwd_s: float, weight: bool = True) -> None:
        super().__init__()
        self.fwd_s, self.bwd_s = fwd_s, bwd_s
        self.w = nn.Parameter(torch.ones(4)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.fwd_s)
        y = x * self.w if self.w is not None else x * 1.0
        return _SlowBackward.apply(y, self.bwd_s)


def _step(stem_weight: bool, input_grad: bool, micro: int = 2,
          gap_s: float = 0.05) -> float:  # fmt: skip
    """Seconds the clock counts over `micro` forwards then backwards of stem (10 ms / 40 ms)
    and body (10 ms / 20 ms), with `gap_s` of idle time after each op."""
    stage = nn.Sequential(_Layer(0.01, 0.04, stem_weight), _Layer(0.01, 0.02))
    clock = ComputeClock({0: stage})
    outs = []
    for _ in range(micro):
        x = torch.ones(4, requires_grad=input_grad)
        outs.append(stage(x))
        time.sleep(gap_s)
    for out in outs:
        out.sum().backward()
        time.sleep(gap_s)
    return clock.take()


@pytest.mark.parametrize("input_grad", [False, True])
def test_a_stage_backward_counts_every_layer_up_to_its_weights_gradients(
        input_grad: bool) -> None:  # fmt: skip
    """A backward span runs from the gradient reaching the stage's outputs to the end of the
    pass: a first stage (its input carries no gradient) counts its stem's backward, which only
    makes the stem's weight gradient, as a later stage counts it; idle time between the ops is
    never counted."""
    busy = _step(stem_weight=True, input_grad=input_grad)
    ops = 2 * (0.01 + 0.01 + 0.04 + 0.02)
    assert ops * 0.98 <= busy < ops + 0.05  # 4 gaps of 50 ms would show


def test_a_backward_that_no_input_gradient_ends_is_still_counted() -> None:
    """A weightless first layer on an input without gradient: nothing before the second layer
    needs a gradient, so the pass ends there, and the span with it."""
    busy = _step(stem_weight=False, input_grad=False)
    counted = 2 * (0.01 + 0.01 + 0.02)  # the stem's backward is not in the graph
    assert counted * 0.98 <= busy < counted + 0.05


def test_a_last_stage_counts_its_loss_forward_and_backward() -> None:
    """The profile times the last layer with its loss, so the clock counts the loss's call and
    its backward (which runs before the gradient reaches the stage's outputs)."""
    stage = nn.Sequential(_Layer(0.01, 0.02))
    clock = ComputeClock({0: stage})

    def slow_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        time.sleep(0.03)
        return _SlowBackward.apply((out - target).square().sum(), 0.04)

    loss_fn = clock.timed_loss(slow_loss)
    for _ in range(2):
        loss = loss_fn(stage(torch.ones(4)), torch.zeros(4))
        time.sleep(0.05)
        loss.backward()
        time.sleep(0.05)
    busy = clock.take()
    counted = 2 * (0.01 + 0.02 + 0.03 + 0.04)
    assert counted * 0.98 <= busy < counted + 0.05  # 4 gaps of 50 ms would show
