"""The CUDA path end to end on one device: profile, estimate, plan, run, measured vs predicted.

    python benchmarks/cuda_check.py [--out DIR] [--device cuda] [--model gpt_medium]
        [--model-arg k=v ...] [--global-batch 16] [--micro-batch-sizes 1,2,4]
        [--dtypes float32,bfloat16] [--steps 8] [--warmup 3]

Everything goes through the real CLI, on one rank (the one device at hand):

1. `pdv profile cluster --nproc-per-node 1` (on CUDA: the nccl backend, the device's
   measured matmul rate, the rank's runtime memory, the schedule's own CPU costs);
2. per dtype, `pdv profile model` (layers run and timed on the device) and
   `pdv profile model --estimate` (no layer runs: FLOPs and bytes on the meta device, each GEMM
   shape timed on this device, other ops at its measured copy bandwidth);
3. `pdv plan` on the measured profile, `pdv run` of that plan on the device, and
   `pdv simulate` of the same plan with the estimate profile.

Prints per dtype: the layer sum of fwd+bwd measured and estimated at each micro-batch size;
the plan; predicted and measured step time; predicted and measured peak memory. Exits 1 when
a step time or peak memory is off by more than --tolerance (default 15%), or any step failed.
A summary is written to OUT/summary.json. `--device cpu` runs the same path here (small model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class Runner:
    """Runs pdv commands, logs each one, and keeps going after a failure."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.failures: list[str] = []
        self.log = (out / "commands.log").open("a")

    def pdv(self, *args: str, timeout: float = 600) -> bool:
        """One pdv command; False (and recorded) when it fails."""
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        t0 = time.perf_counter()
        try:
            res = subprocess.run([sys.executable, "-m", "pdv", *args], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=timeout)
            rc, text = res.returncode, res.stdout + res.stderr
        except subprocess.TimeoutExpired as exc:
            rc, text = 124, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
        took = time.perf_counter() - t0
        self.log.write(f"$ pdv {' '.join(args)}\n# rc {rc}, {took:.1f} s\n{text}\n")
        self.log.flush()
        print(f"  pdv {args[0]} {args[1] if len(args) > 1 else ''}: rc {rc}, {took:.1f} s",
              flush=True)
        if rc != 0:
            tail = text.strip().splitlines()[-1:] or ["(no output)"]
            self.failures.append(f"pdv {' '.join(args[:3])}: rc {rc}: {tail[0][:300]}")
        return rc == 0


def layer_sums(path: Path) -> dict[int, float]:
    """Sum over layers of fwd+bwd seconds at each profiled micro-batch size (TP 1)."""
    doc = json.loads(path.read_text())
    sums: dict[int, float] = {}
    for layer in doc["layers"]:
        for s in layer.get("samples") or []:
            if s.get("tp_degree", 1) == 1:
                mbs = s["micro_batch_size"]
                sums[mbs] = sums.get(mbs, 0.0) + s["fwd_s"] + s["bwd_s"]
    return sums


def rel(pred: float | None, meas: float | None) -> float | None:
    """(predicted - measured) / measured, or None when either is missing."""
    if pred is None or not meas:
        return None
    return (pred - meas) / meas


def pct(v: float | None) -> str:
    """A signed percentage, or '-'."""
    return "-" if v is None else f"{v:+.1%}"


def one_dtype(r: Runner, a: argparse.Namespace, dtype: str, cluster: Path) -> dict[str, Any]:
    """Profile, estimate, plan, run and simulate one dtype; the figures for the table."""
    out, margs = r.out, [f"--model-arg={m}" for m in a.model_arg]
    prof, est = out / f"profile.{dtype}.json", out / f"estimate.{dtype}.json"
    plan, report = out / f"plan.{dtype}.json", out / f"report.{dtype}.json"
    common = [a.model, *margs, "--device", a.device, "--dtype", dtype,
              "--micro-batch-sizes", a.micro_batch_sizes]
    row: dict[str, Any] = {"dtype": dtype}
    if r.pdv("profile", "model", *common, "-o", str(prof)):
        row["measured_layers_s"] = layer_sums(prof)
        whole = json.loads(prof.read_text()).get("whole_model")
        row["whole_model"] = whole
    if r.pdv("profile", "model", *common, "--estimate", "-o", str(est)):
        row["estimated_layers_s"] = layer_sums(est)
    if not prof.exists() or not r.pdv("plan", str(prof), "--cluster", str(cluster),
                                      "--global-batch", str(a.global_batch), "-o", str(plan)):
        return row
    p = json.loads(plan.read_text())
    row["plan"] = (f"{len(p['stages'])} stage(s), {p['num_micro_batches']} x "
                   f"mbs {p['micro_batch_size']}, {p['schedule']}")
    row["plan_dtype"] = p.get("dtype", "float32 (not recorded)")
    pred = p["predicted"]
    row["predicted_step_s"] = pred["step_time_s"]
    row["predicted_peak_bytes"] = max(int(v) for v in pred["peak_memory_bytes"].values())
    if est.exists() and r.pdv("simulate", str(plan), "-p", str(est), "--cluster", str(cluster),
                              "--json", "-o", str(out / f"plan.{dtype}.estimated.json")):
        sim = json.loads((out / f"plan.{dtype}.estimated.json").read_text())["predicted"]
        row["estimated_step_s"] = sim["step_time_s"]
    if r.pdv("run", str(plan), "--device", a.device, "--steps", str(a.steps), "--warmup",
             str(a.warmup), "--report", str(report)):
        rep = json.loads(report.read_text())
        m = rep["measured"]
        row["measured_step_s"] = m["step_time_s"]
        row["measured_step_spread_s"] = m.get("step_time_spread_s")
        row["measured_peak_bytes"] = max(int(v) for v in m["peak_memory_bytes"].values())
        row["memory_method"] = m.get("memory_method")
        row["run_notes"] = rep.get("provenance", {}).get("notes", [])
        row["loss"] = rep.get("loss")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/pdv-cuda-check"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="gpt_medium")
    ap.add_argument("--model-arg", action="append", default=[])
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch-sizes", default="1,2,4")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tolerance", type=float, default=0.15)
    a = ap.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    r = Runner(out)
    cluster = out / "cluster.json"
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}
    if r.pdv("profile", "cluster", "--nproc-per-node", "1", "-o", str(cluster)):
        c = json.loads(cluster.read_text())
        summary["cluster_devices"] = c["devices"]
        for dtype in a.dtypes.split(","):
            rows.append(one_dtype(r, a, dtype, cluster))
            (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    missed = list(r.failures)
    for row in rows:
        print(f"\n{a.model} {row['dtype']} on {a.device}: plan {row.get('plan', '-')}, "
              f"plan dtype {row.get('plan_dtype', '-')}")
        meas, est = row.get("measured_layers_s", {}), row.get("estimated_layers_s", {})
        for mbs in sorted(set(meas) | set(est)):
            m, e = meas.get(mbs), est.get(mbs)
            print(f"  layers fwd+bwd at mbs {mbs}: measured "
                  f"{'-' if m is None else f'{m * 1e3:.2f} ms'}, estimated "
                  f"{'-' if e is None else f'{e * 1e3:.2f} ms'} ({pct(rel(e, m))})")
        ms, ps = row.get("measured_step_s"), row.get("predicted_step_s")
        es = row.get("estimated_step_s")
        step_err, est_err = rel(ps, ms), rel(es, ms)
        print(f"  step: predicted {ps and f'{ps * 1e3:.2f} ms'}, measured "
              f"{ms and f'{ms * 1e3:.2f} ms'} ({pct(step_err)}); from the estimate profile "
              f"{es and f'{es * 1e3:.2f} ms'} ({pct(est_err)})")
        mp, pp = row.get("measured_peak_bytes"), row.get("predicted_peak_bytes")
        mem_err = rel(pp, mp)
        print(f"  peak memory: predicted {pp and f'{pp / 2**30:.2f} GiB'}, measured "
              f"{mp and f'{mp / 2**30:.2f} GiB'} ({pct(mem_err)}) [{row.get('memory_method')}]")
        row.update(step_error=step_err, estimate_step_error=est_err, memory_error=mem_err)
        for name, err in (("step time", step_err), ("peak memory", mem_err)):
            if err is None:
                missed.append(f"{row['dtype']}: no {name} to compare")
            elif abs(err) > a.tolerance:
                missed.append(f"{row['dtype']}: {name} off by {err:+.1%}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nartifacts and commands.log in {out}")
    for m in missed:
        print(f"MISSED {m}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
