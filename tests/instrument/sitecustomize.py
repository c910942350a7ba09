"""Counts the all-gathers each training step of a `pdv run` rank issues (tests only).

On PYTHONPATH with PDV_TEST_GATHERS=DIR, every rank process wraps torch.distributed's all-gather
entry points and both executors' ``step``, and at exit writes DIR/rank<R>.json: the number of
all-gathers issued inside each step call. Nothing is replaced: the real collectives run.
"""

import json
import os

_out = os.environ.get("PDV_TEST_GATHERS")
if _out and os.environ.get("RANK") is not None:
    import atexit

    import torch.distributed as dist

    from pdv.run.pipeline import ChainPipeline
    from pdv.run.widths import WidthPipeline

    _count = [0]
    _steps: list[int] = []

    def _counted(fn):
        def call(*args, **kwargs):
            _count[0] += 1
            return fn(*args, **kwargs)
        return call

    for _name in ("all_gather_single", "all_gather_into_tensor"):
        if hasattr(dist, _name):
            setattr(dist, _name, _counted(getattr(dist, _name)))

    def _per_step(step):
        def call(self, *args, **kwargs):
            before = _count[0]
            try:
                return step(self, *args, **kwargs)
            finally:
                _steps.append(_count[0] - before)
        return call

    for _cls in (ChainPipeline, WidthPipeline):
        _cls.step = _per_step(_cls.step)

    @atexit.register
    def _write() -> None:
        with open(os.path.join(_out, f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(_steps, f)
