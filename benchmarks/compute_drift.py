"""Split each step error of a prediction_check round into its compute part and the rest.

    python benchmarks/compute_drift.py OUT [OUT ...]

OUT is a `benchmarks/prediction_check.py --out` folder (cluster.json, NAME.profile.json and
NAME/check.json with its plans and run reports). Nothing is run: the recorded runs are re-read.

For each plan, on its busiest rank: the compute priced from the layers alone as the run's clock
times it (pdv.check.ops_compute, summed per rank) against the ranks' own clocked compute (the run
reports' ``compute_s``, per rank the median over rounds), and the rest of the step (everything
that is not the ops: messages, waits, bubbles, gradient sync, the optimizer) predicted against
measured. The step error is exactly the sum of the two parts, each over the measured step, so
a round says whether its errors came from the ops' speed or from what lies between them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pdv import artifacts
from pdv.check import compute_drift, ops_compute
from pdv.run.slow import rank_predictions


def _clocked(reports: list[Path]) -> dict[str, float]:
    """Per rank, the median over rounds of its measured compute per step."""
    per: dict[str, list[float]] = {}
    for path in reports:
        measured = json.loads(path.read_text())["measured"].get("compute_s") or {}
        for rank, t in measured.items():
            per.setdefault(rank, []).append(t)
    return {r: statistics.median(v) for r, v in per.items()}


def split_rows(out: Path) -> list[dict[str, object]]:
    """One row per plan that ran and timed its compute, over every model folder in `out`."""
    cluster = artifacts.load_as(out / "cluster.json", "cluster")
    rows: list[dict[str, object]] = []
    for check in sorted(out.glob("*/check.json")):
        name = check.parent.name
        profile = artifacts.load_as(out / f"{name}.profile.json", "model-profile")
        profiles = {profile.device.kind: profile}
        for r in json.loads(check.read_text())["rows"]:
            if r["measured_s"] is None or not r.get("reports"):
                continue
            plan = artifacts.load_as(r["plan"], "plan")
            priced = ops_compute(plan, profiles, cluster)
            clocked = _clocked([Path(p) for p in r["reports"]])
            if not clocked:
                continue
            world = 1 + max(x for s in plan.stages for x in s.ranks)
            per_rank = rank_predictions(priced, [s.ranks for s in plan.stages], world)
            busiest = max(clocked, key=lambda k: clocked[k])
            ops_p, ops_m = per_rank[int(busiest)], clocked[busiest]
            pred, meas = r["predicted_s"], r["measured_s"]
            rows.append({
                "model": name, "layout": " ".join(r["layout"]) if isinstance(r["layout"], list)
                else str(r["layout"]), "shape": f"{r['num_micro_batches']}x{r['micro_batch_size']}",
                "stages": len(plan.stages), "predicted_s": pred, "measured_s": meas,
                "error": (pred - meas) / meas, "ops_priced_s": ops_p, "ops_clocked_s": ops_m,
                "drift": compute_drift(plan, priced, clocked),
                "rest_predicted_s": pred - ops_p, "rest_measured_s": meas - ops_m,
                "from_compute": (ops_p - ops_m) / meas,
                "from_rest": ((pred - ops_p) - (meas - ops_m)) / meas,
            })  # fmt: skip
    return rows


def _pct(v: object) -> str:
    return "-" if v is None else f"{float(v):+.1%}"  # type: ignore[arg-type]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, nargs="+", help="prediction_check --out folders")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = ap.parse_args()
    rows = [dict(row, round=str(o)) for o in a.out for row in split_rows(o)]
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'round':<12}{'model':<13}{'layout':<32}{'shape':>6}{'pred ms':>9}{'meas ms':>9}"
          f"{'error':>8}{'ops p/m ms':>14}{'drift':>8}{'rest p/m ms':>14}"
          f"{'from ops':>10}{'from rest':>10}")
    for r in rows:
        ops = f"{r['ops_priced_s'] * 1e3:.1f}/{r['ops_clocked_s'] * 1e3:.1f}"  # type: ignore[operator]
        rest = f"{r['rest_predicted_s'] * 1e3:.1f}/{r['rest_measured_s'] * 1e3:.1f}"  # type: ignore[operator]
        print(f"{Path(str(r['round'])).name:<12}{r['model']:<13}{str(r['layout'])[:31]:<32}"
              f"{r['shape']:>6}{r['predicted_s'] * 1e3:>9.1f}{r['measured_s'] * 1e3:>9.1f}"  # type: ignore[operator]
              f"{_pct(r['error']):>8}{ops:>14}{_pct(r['drift']):>8}{rest:>14}"
              f"{_pct(r['from_compute']):>10}{_pct(r['from_rest']):>10}")
    for label, keep in (("one-stage", lambda r: r["stages"] == 1),
                        ("pipelined", lambda r: r["stages"] > 1)):  # fmt: skip
        sel = [r for r in rows if keep(r) and r["drift"] is not None]
        if not sel:
            continue

        def med(key: str, sel: list[dict[str, object]] = sel) -> str:
            return _pct(statistics.median(float(r[key]) for r in sel))  # type: ignore[arg-type]

        print(f"{label}: {len(sel)} plans; median compute drift {med('drift')}, step error "
              f"{med('error')} = from the ops {med('from_compute')} and from the rest "
              f"{med('from_rest')} (medians, each part's own)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
