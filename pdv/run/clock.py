"""The wall time a rank spends computing its stages, per step (what a slowed device stretches).

A rank's step time says little about which rank is slow: in a pipeline every rank waits for the
slowest, so all step times stretch together. Its compute does not: forward time is the span of
each stage module's call (forward hooks; FSDP's all-gather runs in its own earlier hook and is
left out), backward time the span from the moment a gradient reaches the stage's outputs (an
identity autograd function marks them) to the end of that backward pass (a callback the
autograd engine runs when the pass is done). So a backward counts all the stage's work: its
input gradients, and its parameters' gradients accumulated, the first layer's too where the
stage's inputs carry no gradient (token ids, images: an embedding's scatter-add, a stem
convolution's weight gradient). A last stage's loss counts too, forward and backward (the
profile times the last layer with its loss): the loss call is a span, and its backward opens
the stage's backward span. Recompute runs inside the backward span and counts there; TP
collectives and FSDP's reduce-scatter run inside the spans and count as compute too. On CUDA the
spans are CUDA events on the current stream (kernels run after the host queued them), read once
per step.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.autograd import Variable

__all__ = ["ComputeClock"]


class _Mark(torch.autograd.Function):
    """Identity forward; its backward tells the clock that a gradient reached the stage."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clock: ComputeClock) -> torch.Tensor:
        ctx.clock = clock
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.clock.open_backward()
        return grad, None


def _marks(value: Any) -> bool:
    return (type(value) is torch.Tensor and value.is_floating_point() and value.requires_grad)


def _wrap(value: Any, clock: ComputeClock) -> Any:
    """The value with every plain float tensor that needs a gradient passed through a mark."""
    if _marks(value):
        return _Mark.apply(value, clock)
    if isinstance(value, tuple):
        return tuple(_wrap(v, clock) for v in value)
    return value


class ComputeClock:
    """Sums this rank's forward and backward compute spans; `take()` returns and resets."""

    def __init__(self, modules: dict[int, nn.Module], cuda: bool = False) -> None:
        self.busy_s = 0.0
        self._cuda = cuda
        self._spans: list[tuple[Any, Any]] = []  # CUDA: (start, end) events of this step
        self._fwd_start: Any = None
        self._bwd_start: Any = None
        for module in modules.values():
            module.register_forward_pre_hook(self._before_forward)
            module.register_forward_hook(self._after_forward)

    def _now(self) -> Any:
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _add(self, start: Any) -> None:
        if self._cuda:
            self._spans.append((start, self._now()))
        else:
            self.busy_s += time.perf_counter() - start

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._fwd_start = self._now()

    def _after_forward(self, module: nn.Module, args: Any, out: Any) -> Any:
        out = _wrap(out, self)
        if self._fwd_start is not None:
            self._add(self._fwd_start)
            self._fwd_start = None
        return out

    def timed_loss(self, loss_fn: Any) -> Any:
        """`loss_fn` whose call is a forward span and whose backward opens the backward span."""

        def loss(output: Any, target: Any) -> Any:
            start = self._now()
            value = loss_fn(output, target)
            self._add(start)
            return _wrap(value, self)

        return loss

    def open_backward(self) -> None:
        """A gradient reached a stage's outputs: the first of them opens the span, which the
        end of this backward pass closes."""
        if self._bwd_start is None:
            self._bwd_start = self._now()
            Variable._execution_engine.queue_callback(self.close_backward)

    def close_backward(self) -> None:
        """The backward pass that opened the span is done."""
        if self._bwd_start is not None:
            self._add(self._bwd_start)
            self._bwd_start = None

    def take(self) -> float:
        """Compute seconds since the last take (an unclosed span is dropped)."""
        if self._spans:
            torch.cuda.synchronize()
            self.busy_s += sum(a.elapsed_time(b) for a, b in self._spans) / 1e3
            self._spans = []
        busy, self.busy_s, self._bwd_start = self.busy_s, 0.0, None
        return busy
