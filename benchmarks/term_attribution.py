"""Which priced term moved which error: re-price a `pdv check` report's plans term by term.

    python benchmarks/term_attribution.py OUT/check.json -p PROFILE -c CLUSTER

The measured step times stay those of the check's runs; only the prediction changes, so the
rows differ by pricing alone (machine noise cannot move them). Variants, each adding one term:

- none: the cluster's measured overheads removed (the pricing before issue 12);
- +schedule: the pipeline schedule's per-micro-batch and per-step work (RankOverheads fwd/bwd/
  step);
- +message CPU: the per-message send/receive CPU as well;
- +FSDP collectives: all-gather and reduce-scatter on their own measured α/β (everything the
  cluster measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pdv import artifacts
from pdv.artifacts import ClusterArtifact
from pdv.check import predict, spearman, without_message_cpu, without_schedule_work


def _variant(cluster: ClusterArtifact, schedule: bool, messages: bool,
             fsdp: bool) -> ClusterArtifact:  # fmt: skip
    if not schedule:
        cluster = without_schedule_work(cluster)
    if not messages:
        cluster = without_message_cpu(cluster)
    links = cluster.links
    if not fsdp:
        links = links.model_copy(update={k: None for k in (
            "gather_latency_s", "gather_bandwidth_Bps", "scatter_latency_s",
            "scatter_bandwidth_Bps")})  # fmt: skip
    return cluster.model_copy(update={"links": links})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", type=Path)
    ap.add_argument("-p", "--profile", type=Path, required=True)
    ap.add_argument("-c", "--cluster", type=Path, required=True)
    a = ap.parse_args()
    doc = json.loads(a.report.read_text())
    prof = artifacts.load_as(a.profile, "model-profile")
    cluster = artifacts.load_as(a.cluster, "cluster")
    rows = [r for r in doc["rows"] if r["measured_s"] is not None]
    variants = {"none": (False, False, False), "+schedule": (True, False, False),
                "+message CPU": (True, True, False), "+FSDP collectives": (True, True, True)}
    print(f"{'pricing':<18}{'median |err|':>13}{'max |err|':>11}{'signed':>9}{'Spearman':>10}"
          "   per plan (predicted ms / measured ms)")
    for name, flags in variants.items():
        cl = _variant(cluster, *flags)
        preds = []
        for r in rows:
            plan = artifacts.load_as(r["plan"], "plan")
            got = predict(plan, {prof.device.kind: prof}, cl).predicted
            assert got is not None
            preds.append(got.step_time_s)
        meas = [r["measured_s"] for r in rows]
        errs = [(p - m) / m for p, m in zip(preds, meas, strict=True)]
        rho = spearman(preds, meas)
        per = " ".join(f"{p * 1e3:.1f}/{m * 1e3:.1f}" for p, m in zip(preds, meas, strict=True))
        print(f"{name:<18}{statistics.median(abs(e) for e in errs):>13.1%}"
              f"{max(abs(e) for e in errs):>11.1%}{statistics.fmean(errs):>9.1%}"
              f"{'-' if rho is None else f'{rho:.2f}':>10}   {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
