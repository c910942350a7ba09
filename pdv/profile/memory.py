"""Memory of one layer: parameters, gradients, optimizer state, saved activations, outputs.

Saved activations are the tensors autograd keeps for backward. They are counted with
``torch.autograd.graph.saved_tensors_hooks``: every tensor packed during a forward is recorded,
parameters are left out (they are counted as parameters), and tensors that share a storage
(views, the same tensor saved twice) count once, with the whole storage. This works on every
device, the meta device included. On CUDA the caching allocator's delta across the forward is
the measured number instead (see :func:`cuda_saved_bytes`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pdv.errors import PdvError

__all__ = [
    "OPTIMIZERS",
    "SavedTensors",
    "cuda_saved_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "overhead_bytes",
    "param_bytes",
    "tensor_bytes",
]

# Optimizer -> state bytes per parameter element. Adam keeps exp_avg and exp_avg_sq in fp32
# (PyTorch keeps them in the parameter dtype; mixed-precision recipes keep them in fp32, which is
# the larger and the safer number to plan with). Plain SGD keeps nothing.
OPTIMIZERS: dict[str, int] = {"adam": 8, "sgd": 0}


def param_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters (each counted once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def grad_bytes(module: nn.Module) -> int:
    """Bytes of the gradients of the trainable parameters (same dtype as the parameters)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def optimizer_state_bytes(module: nn.Module, optimizer: str) -> int:
    """Bytes of optimizer state for the module's trainable parameters."""
    if optimizer not in OPTIMIZERS:
        raise PdvError(f"optimizer {optimizer!r} is not known; use one of {sorted(OPTIMIZERS)}")
    per_element = OPTIMIZERS[optimizer]
    return sum(p.numel() * per_element for p in module.parameters() if p.requires_grad)


def tensor_bytes(value: Any) -> int:
    """Bytes of a tensor, or of all tensors in a tuple/list/dict output."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


def _root(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


class SavedTensors:
    """Records what autograd saves for backward while active; see :meth:`bytes`."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self._exclude_ids = {id(_root(t)) for t in exclude}
        self._exclude_ptrs = {_ptr(t) for t in exclude} - {0}
        self._seen: dict[Any, int] = {}
        # Keep what was packed alive so id() keys cannot be reused while counting.
        self._keep: list[torch.Tensor] = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        root = _root(t)
        ptr = _ptr(t)
        if id(root) in self._exclude_ids or (ptr and ptr in self._exclude_ptrs):
            return t
        # Real tensors: one storage is one allocation. Meta/fake tensors have no addresses, so
        # views are folded into their base tensor instead.
        key: Any = ("ptr", ptr) if ptr else ("id", id(root))
        if key not in self._seen:
            self._seen[key] = _storage_bytes(root)
            self._keep.append(root)
        return t

    @contextmanager
    def active(self) -> Iterator[SavedTensors]:
        """Count every tensor saved for backward inside this block."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    def holds(self, t: torch.Tensor) -> bool:
        """Whether backward saved this tensor (or a view of its storage)."""
        ptr = _ptr(t)
        return (("ptr", ptr) if ptr else ("id", id(_root(t)))) in self._seen

    def bytes(self) -> int:
        """Bytes of the distinct storages saved (parameters excluded)."""
        return sum(self._seen.values())


def _ptr(t: torch.Tensor) -> int:
    if t.device.type == "meta":
        return 0
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def cuda_saved_bytes(before: int, after: int, output_bytes: int, output_saved: bool,
                     input_bytes: int, input_saved: bool) -> int:
    """Saved bytes from the allocator delta across a forward (CUDA).

    The delta holds what the forward allocated and still holds: the saved tensors and the
    output. The output is taken out unless backward saved it too; the layer's input was
    allocated before the forward, so it is added back when backward saved it.
    """
    delta = max(0, after - before)
    if not output_saved:
        delta = max(0, delta - output_bytes)
    if input_saved:
        delta += input_bytes
    return delta


def overhead_bytes(device: torch.device) -> tuple[int, str]:
    """Per-device constant memory and how it was measured."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        used = total - free
        # What the device holds beyond PyTorch's own allocator pool: CUDA context, cuBLAS
        # workspaces and kernels loaded so far (after a warm-up matmul).
        return max(0, used - reserved), (
            "overhead_bytes: device memory in use (cudaMemGetInfo) minus the caching allocator's "
            "reserved pool, after a warm-up matmul: CUDA context, libraries and workspaces"
        )
    import psutil

    rss = psutil.Process(os.getpid()).memory_info().rss
    return int(rss), (
        "overhead_bytes: resident set size of this process (psutil) after importing torch and "
        "warming up, before the model's tensors were made: the runtime every CPU rank pays"
    )
