"""Regenerate the example plans: sample-model profiles × a few declared clusters.

    python plans/regenerate.py              # rewrite plans/ in place
    python plans/regenerate.py --out DIR    # write elsewhere (the freshness test compares bytes)

Clusters are declared from specs (clusters/*.json and plans/clusters/*.json) with
`pdv cluster declare`; each plan is made by the real `pdv plan` command, so these files are
exactly what a user gets from the same inputs. The 1024-rank cluster is declared into a
temporary folder (its N×N matrices are 22 MB); the small ones are kept next to the plans.

GPT-3 175B has no measured profile here: plans/profiles/ holds `pdv profile model --estimate`
profiles for the two GPU kinds of clusters/two-kinds-128x8.json, made with the device FLOP/s
and memory bandwidth below (`--profiles` re-estimates them; that needs torch).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
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
BIG_CLUSTER = ROOT / "clusters" / "two-kinds-128x8.json"
BIG_BATCH = 1536
ESTIMATES = {  # device kind: (FLOP/s, memory bytes/s), as the cluster spec declares the kinds
    "nvidia-h100-80gb-hbm3": (4e14, 3.35e12),
    "nvidia-a100-pcie-40gb": (1.5e14, 1.55e12),
}


def _pdv(*args: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pdv", *args], cwd=ROOT, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"pdv {' '.join(args)} failed:\n{r.stderr}")


def estimate_profiles() -> list[Path]:
    """Re-estimate the GPT-3 175B profiles in plans/profiles/ (needs torch)."""
    paths = []
    for kind, (flops, bandwidth) in ESTIMATES.items():
        path = HERE / "profiles" / f"gpt3_175b.{kind}.json"
        _pdv(
            "profile",
            "model",
            "gpt3_175b",
            "--estimate",
            "--device-flops",
            str(flops),
            "--device-bandwidth",
            str(bandwidth),
            "--device-kind",
            kind,
            "--tp-degrees",
            "1,2,4,8",
            "--micro-batch-sizes",
            "1,2,4,8",
            "--dtype",
            "bfloat16",
            "-o",
            str(path),
        )
        paths.append(path)
    return paths


def regenerate(out: Path) -> list[Path]:
    """Write every example plan (and the small declared clusters) under `out`; return plans."""
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Path(tmp) / "two-kinds-128x8.cluster.json"
        _pdv("cluster", "declare", str(BIG_CLUSTER), "-o", str(cluster), "--json")
        plan = out / "gpt3_175b.two-kinds-128x8.plan.json"
        profiles = [str(HERE / "profiles" / f"gpt3_175b.{k}.json") for k in ESTIMATES]
        _pdv(
            "plan",
            *profiles,
            "--cluster",
            str(cluster),
            "--global-batch",
            str(BIG_BATCH),
            "--dtype",
            "bfloat16",
            "-o",
            str(plan),
            "--json",
            "--time-limit",
            "5",
        )
        written.append(plan)
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
    parser.add_argument("--profiles", action="store_true", help="re-estimate 175B profiles too")
    args = parser.parse_args()
    if args.profiles:
        for path in estimate_profiles():
            print(path)
    for path in regenerate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
