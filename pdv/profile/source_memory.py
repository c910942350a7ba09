"""What a run rank holds because of where its model comes from, besides the model itself.

The empty-pipeline run (:func:`pdv.profile.memory.cpu_runtime_bytes`) measures a CPU rank's
runtime with a sample model, whose factory imports nothing torch has not. A model cut by
tracing (``--split-at``/``--blocks``: torch.export brings in dynamo, FX and sympy) or built by
transformers (``hf:``) makes every rank import and keep much more: 33-35 MiB for a traced
U-Net or decoder and 38 MiB for ``hf:gpt2`` on this project's machine, against 1.5-2.3 MiB
for the sample models (beyond their parameters). A held-out traced U-Net's runs measured
47-64 MiB over their predicted peaks with the sample model's runtime alone.

So a fresh process does what a rank does before its stage exists: it keeps freed memory as
runs do (pdv.profile.allocator), imports the run's modules, builds the empty pipeline's model,
then the user's, and frees it. The resident set it keeps beyond the empty pipeline's model,
with the heap's free top handed back (as a run does once the other stages are freed), is what
the model's source adds to every rank's runtime.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from pdv.errors import PdvError

__all__ = ["model_source_bytes"]


def _settle() -> int:
    """The resident set once garbage is collected and the heap's free top handed back."""
    from pdv.profile.allocator import trim_heap
    from pdv.run.report import status_bytes

    gc.collect()
    trim_heap()
    return status_bytes("VmRSS")


def _measure(spec: str, kwargs: dict[str, Any], split_at: list[str], blocks: list[str]) -> int:
    from pdv.profile.allocator import keep_freed_memory

    keep_freed_memory()
    import torch

    torch.set_num_threads(1)
    import pdv.run.runtime  # noqa: F401  (what every run rank imports before it builds)
    from pdv.models import build_model
    from pdv.profile.memory import RUNTIME_PROBE_MODEL

    probe_spec, probe_kwargs = RUNTIME_PROBE_MODEL
    build_model(probe_spec, dict(probe_kwargs))
    before = _settle()
    model = build_model(spec, kwargs, split_at=split_at, blocks=blocks)
    del model
    return max(0, _settle() - before)


def model_source_bytes(spec: str, kwargs: dict[str, Any], split_at: Sequence[str] = (),
                       blocks: Sequence[str] = (), timeout_s: float = 300.0) -> tuple[int, str]:
    """Bytes a CPU run rank keeps for the model's source beyond the empty pipeline's, and a note.

    Measured in a fresh process (see the module docstring); Linux only (/proc).
    """
    if not os.path.exists("/proc/self/status"):
        return 0, "model source's memory not measured (no /proc): priced as none"
    request = json.dumps({"spec": spec, "kwargs": kwargs, "split_at": list(split_at),
                          "blocks": list(blocks)})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        res = subprocess.run([sys.executable, "-m", "pdv.profile.source_memory", request],
                             env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PdvError(f"building the model in a fresh process took over {timeout_s:.0f} s") \
            from None
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        tail = res.stderr.strip().splitlines()
        raise PdvError(f"building the model in a fresh process failed with exit "
                       f"{res.returncode}: {tail[-1] if tail else 'no output'}")
    extra = int(json.loads(lines[-1])["bytes"])
    return extra, (
        f"overhead_bytes includes {extra / 2**20:.1f} MiB for the model's source: what a fresh "
        "process importing the run's modules keeps after building and freeing the model, "
        "beyond the empty pipeline's model (pdv.profile.source_memory)"
    )


def main() -> int:
    """Entry of the fresh process: one JSON request in argv, one JSON line out."""
    req = json.loads(sys.argv[1])
    print(json.dumps({"bytes": _measure(req["spec"], req["kwargs"], req["split_at"],
                                        req["blocks"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
