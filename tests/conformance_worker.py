"""Run several pdv plans in one torchrun launch (the conformance suite shares its launches).

    torchrun --nproc-per-node 4 tests/conformance_worker.py cases.json

cases.json: a list of argument lists of ``python -m pdv.run.runtime``; each is trained in turn
in the same process group, and a failing case stops the launch.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from pdv.run.runtime import _init_process_group, parse_args, train


def main() -> int:
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    _init_process_group("gloo")
    try:
        for argv in cases:
            if dist.get_rank() == 0:
                print(f"conformance case {argv[0]}", file=sys.stderr, flush=True)
            train(parse_args(argv))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
