"""Overhead of `pdv run` over a minimal hand-written torch.distributed.pipelining script.

    OMP_NUM_THREADS=1 python benchmarks/run_overhead.py [--steps 8] [--tolerance 1.25]

Both run gpt_small as pp=4 (one stage per CPU rank, 1F1B, AdamW, same micro-batching) and
report the median step time after warm-up (max over ranks per step). Prints both and the ratio
pdv / hand-written; exits 1 when the ratio passes --tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLITS = [0, 4, 8, 11, 14]  # embed+3 blocks | 4 blocks | 3 blocks | 2 blocks + head


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=1.25)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="pdv-overhead-"))
    nmb, mbs = a.micro_batches, a.micro_batch_size
    plan = {"schema": "pdv.plan/v1", "micro_batch_size": mbs, "num_micro_batches": nmb,
            "global_batch_size": mbs * nmb, "schedule": "1F1B",
            "model": {"spec": "gpt_small", "kwargs": {}},
            "stages": [{"layers": [SPLITS[i], SPLITS[i + 1]], "ranks": [i]} for i in range(4)]}
    (tmp / "plan.json").write_text(json.dumps(plan))
    pdv_runs, hand_runs = [], []
    for _ in range(a.rounds):
        # Alternate the two so a change in machine load hits both alike.
        subprocess.run([sys.executable, "-m", "pdv", "run", str(tmp / "plan.json"), "--steps",
                        str(a.steps), "--warmup", str(a.warmup), "--report", str(tmp / "pdv.json")],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                        "benchmarks/_hand_pipeline.py", ",".join(map(str, SPLITS)), str(a.steps),
                        str(nmb), str(mbs), str(tmp / "hand.json")],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        pdv_runs.append(statistics.median(json.loads((tmp / "pdv.json").read_text())
                                          ["measured"]["step_times_s"][a.warmup:]))
        hand_runs.append(statistics.median(json.loads((tmp / "hand.json").read_text())
                                           ["step_times_s"][a.warmup:]))
    # The least disturbed round of each (the minimum of the per-round medians).
    pdv, hand = min(pdv_runs), min(hand_runs)
    print("per-round medians: pdv " + ", ".join(f"{t * 1e3:.0f}" for t in pdv_runs)
          + " ms; hand " + ", ".join(f"{t * 1e3:.0f}" for t in hand_runs) + " ms")
    ratio = pdv / hand
    print(f"{'runner':<14}{'median step':>14}")
    print(f"{'pdv run':<14}{pdv * 1e3:>11.1f} ms")
    print(f"{'hand-written':<14}{hand * 1e3:>11.1f} ms")
    print(f"ratio pdv/hand = {ratio:.3f} (tolerance {a.tolerance})")
    return 0 if ratio <= a.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
