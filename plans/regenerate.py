"""Regenerate the example plans: sample-model profiles × a few declared clusters.

    python plans/regenerate.py              # rewrite plans/ in place
    python plans/regenerate.py --out DIR    # write elsewhere (the freshness test compares bytes)

Clusters are declared from specs (clusters/inverted-2x2.json and plans/clusters/*.json) with
`pdv cluster declare`; each plan is made by the real `pdv plan` command, so these files are
exactly what a user gets from the same inputs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

CLUSTERS = {
    "inverted-2x2": ROOT / "clusters" / "inverted-2x2.json",
    "normal-2x2": HERE / "clusters" / "normal-2x2.json",
}
PROFILES = {
    "gpt_tiny": ROOT / "profiles" / "gpt_tiny.cpu.json",
    "gpt_small": ROOT / "profiles" / "gpt_small.cpu.json",
}
GLOBAL_BATCH = 16


def _pdv(*args: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pdv", *args], cwd=ROOT, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"pdv {' '.join(args)} failed:\n{r.stderr}")


def regenerate(out: Path) -> list[Path]:
    """Write every example plan (and its declared cluster) under `out`; return the plan paths."""
    written = []
    for cname, spec in CLUSTERS.items():
        cluster = out / "clusters" / f"{cname}.cluster.json"
        _pdv("cluster", "declare", str(spec), "-o", str(cluster), "--json")
        for mname, profile in PROFILES.items():
            plan = out / f"{mname}.{cname}.plan.json"
            _pdv(
                "plan",
                str(profile),
                "--cluster",
                str(cluster),
                "--global-batch",
                str(GLOBAL_BATCH),
                "-o",
                str(plan),
                "--json",
                "--time-limit",
                "5",
            )
            written.append(plan)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description="Regenerate the example plans.")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    for path in regenerate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
