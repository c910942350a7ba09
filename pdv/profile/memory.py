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
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pdv.errors import PdvError

__all__ = [
    "OPTIMIZERS",
    "LiveBytes",
    "SavedTensors",
    "backward_peak",
    "cuda_saved_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "cpu_runtime_bytes",
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


def _allocation(t: torch.Tensor) -> tuple[Any, int, int]:
    """(what owns a tensor's memory, a key for it, its bytes): its storage, or for a sparse
    gradient (no storage of its own) the tensor with its indices and values."""
    try:
        storage = t.untyped_storage()
        return storage, storage._cdata, int(storage.nbytes())
    except (RuntimeError, NotImplementedError):
        if t.is_sparse:
            parts = (t._indices(), t._values())
            return t, id(t), sum(p.numel() * p.element_size() for p in parts)
        return t, id(t), t.numel() * t.element_size()


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages ops create while active and that are still alive, with the peak.

    Counted by storage, so views and in-place results add nothing; works alike on every device,
    meta included (a storage's own handle, not its address, keys it). `mark()` starts a new
    peak from the live bytes at that moment: a layer's backward peak above what its forward
    left alive is `peak - at_mark`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.at_mark = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            owner, key, nbytes = _allocation(t)
            if key in self._sizes:
                continue
            self._sizes[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(owner, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def mark(self) -> None:
        """Start a new peak from what is alive now."""
        self.at_mark = self.peak = self.live

    def above_mark(self) -> int:
        """The peak since `mark()`, above the bytes alive at it."""
        return max(0, self.peak - self.at_mark)


def backward_peak(layer: nn.Module, live: LiveBytes, backward: Callable[[], object]) -> int:
    """`backward()`'s peak of live storages above what was alive before it, with the layer's
    gradients already held: as in every micro-batch after a step's first, a backward adds into
    them through a temporary, and the gradients themselves are the stage's state. The layer's
    gradients are cleared after."""
    for p in layer.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    live.mark()
    with live:
        backward()
    for p in layer.parameters():
        p.grad = None
    return live.above_mark()


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
    try:
        return cpu_runtime_bytes()
    except PdvError as exc:
        import psutil

        rss = psutil.Process(os.getpid()).memory_info().rss
        return int(rss), (
            "overhead_bytes: resident set size of this process (psutil) after importing torch "
            f"and warming up, before the model's tensors were made ({exc}); a run rank imports "
            "other modules and holds more"
        )


RUNTIME_PROBE_MODEL = ("mlp", {"n_layer": 1, "dim": 1, "expansion": 1, "in_dim": 1})
"""the model of the empty pipeline whose run measures a CPU rank's runtime: 8 parameters"""


def cpu_runtime_bytes(steps: int = 3, timeout_s: float = 180.0) -> tuple[int, str]:
    """What a ``pdv run`` rank on CPU holds besides its model, measured by running one.

    The profiling process is not a run rank: it imports the CLI's modules and whatever the
    model's factory pulls in (a GPT factory that loads sympy read 365 MiB, a convnet 297 MiB,
    on the same machine), and it has no process group, pipeline schedule or optimizer. So a
    one-rank ``python -m pdv.run.runtime`` trains a pipeline of an 8-parameter model for a
    few steps and reports its peak resident set, as every run reports its ranks' (VmHWM).
    """
    import subprocess
    import tempfile

    from pdv import artifacts
    from pdv.artifacts import ModelSpec, Plan, PlanStage
    from pdv.run.launch import RunOptions, runtime_argv
    from pdv.run.local import free_port

    spec, kwargs = RUNTIME_PROBE_MODEL
    plan = Plan(model=ModelSpec(spec=spec, kwargs=kwargs), stages=[PlanStage(layers=(0, 3),
                ranks=[0])], micro_batch_size=1, num_micro_batches=1, global_batch_size=1)
    with tempfile.TemporaryDirectory(prefix="pdv-runtime-") as tmp:
        plan_file, report = os.path.join(tmp, "plan.json"), os.path.join(tmp, "report.json")
        artifacts.write(plan_file, plan)
        # A world of its own, whatever launcher this process runs under.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
        env |= {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, *runtime_argv(RunOptions(plan=plan_file, steps=steps, warmup=1,
                                                         device="cpu", report=report))]
        try:
            res = subprocess.run(argv, env=env, capture_output=True, text=True,
                                 timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PdvError(f"the empty-pipeline run took over {timeout_s:.0f} s") from None
        if res.returncode != 0 or not os.path.exists(report):
            tail = (res.stderr or res.stdout).strip().splitlines()
            raise PdvError(f"the empty-pipeline run failed with exit {res.returncode}: "
                           f"{tail[-1] if tail else 'no output'}")
        measured = artifacts.load_as(report, "run-report").measured
    return int(measured.peak_memory_bytes["0"]), (
        "overhead_bytes: peak resident set of a one-rank pdv run (python -m pdv.run.runtime, "
        f"gloo) training a pipeline of an 8-parameter {spec} for {steps} steps: what every CPU "
        "rank holds besides its model (torch and the run's modules, the process group, the "
        "schedule, the optimizer, glibc's heap)"
    )
