"""How long `pdv plan` searches: 96 GPT-3-175B-sized blocks on declared clusters of two GPU kinds.

    python benchmarks/search_time.py            # 64 GPUs (target ≤ 1 s) and 1024 GPUs (≤ 10 s)
    python benchmarks/search_time.py --json

Each size runs twice: on profiles and a cluster synthesized here, and on the repository's own
inputs (clusters/two-kinds-128x8.json declared with `pdv cluster declare`, its node count scaled
for 64 GPUs, and the `--estimate` GPT-3 175B profiles in plans/profiles/, 96 blocks plus the
embedding and head), and on a noisy matrix shaped like a measured one
(benchmarks/noisy_cluster.py: NVLink-class and PCIe-class hosts on one fabric, two memory sizes,
one device kind, every ordered pair ±10% off its class; its first 64 ranks for the 64 size) with
a GPT-3 175B `pdv profile model --estimate` profile taken on this machine's CPU (or `--profile`).
Search time is the whole search (DP, CP-SAT, simulating the result);
hashing the inputs for the plan's provenance is timed apart.

Profiles are synthesized here (provenance "estimated"): per block 24·s·d² + 4·s²·d forward FLOPs
per sample (Narayanan et al., 2021, §5.1) at half the kind's peak, backward twice the forward;
bf16 weights and grads, fp32 Adam state and master weights (16 bytes per parameter in all);
activations per sample s·d·(10 + 24/t + 5·a·s/(d·t)) bytes at TP degree t (Korthikanti et al.,
2022, eq. 2). The cluster is declared: nodes of 8 GPUs on NVLink, half A100 nodes, half H100
nodes, InfiniBand between nodes. Exits 1 when a search time is over its target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pdv.artifacts import (
    ClusterArtifact,
    ClusterDevice,
    DeviceInfo,
    LayerProfile,
    LayerSample,
    Links,
    ModelProfile,
    ModelSpec,
    Provenance,
    TimeFit,
)
from pdv.plan.problem import PlanProblem
from pdv.plan.search import plan_provenance, search

ROOT = Path(__file__).resolve().parents[1]
SEQ, D, HEADS, BLOCKS = 2048, 12288, 96, 96
KINDS = {  # kind: (peak bf16 FLOP/s, NVLink bytes/s, NIC bytes/s, memory bytes)
    "a100": (312e12, 300e9, 25e9, 80 * 10**9),
    "h100": (989e12, 450e9, 50e9, 80 * 10**9),
}
TP = (1, 2, 4, 8)


def gpt3_block_profile(kind: str) -> ModelProfile:
    """A synthesized profile of 96 GPT-3 175B blocks on one GPU kind."""
    peak = KINDS[kind][0]
    flops = 24 * SEQ * D * D + 4 * SEQ * SEQ * D
    per_sample = flops / (0.5 * peak)
    params = 12 * D * D
    layers = []
    for i in range(BLOCKS):
        samples = []
        fwd_fit, bwd_fit = {}, {}
        for t in TP:
            act = SEQ * D * (10 + 24 / t + 5 * HEADS * SEQ / (D * t))
            fwd_fit[str(t)] = TimeFit(a_s=2e-4, b_s=per_sample / t, r2=1.0, max_rel_error=0.0)
            bwd_fit[str(t)] = TimeFit(a_s=4e-4, b_s=2 * per_sample / t, r2=1.0, max_rel_error=0.0)
            if t > 1:
                samples.append(
                    LayerSample(
                        micro_batch_size=1,
                        tp_degree=t,
                        fwd_s=per_sample / t,
                        bwd_s=2 * per_sample / t,
                        fwd_spread_s=0.0,
                        bwd_spread_s=0.0,
                        param_bytes=2 * params // t,
                        activation_bytes=int(act),
                        output_bytes=2 * SEQ * D,
                    )
                )
        layers.append(
            LayerProfile(
                name=f"block{i}",
                fwd_s=per_sample,
                bwd_s=2 * per_sample,
                param_bytes=2 * params,
                grad_bytes=2 * params,
                optimizer_bytes=12 * params,
                activation_bytes=int(SEQ * D * (34 + 5 * HEADS * SEQ / D)),
                output_bytes=2 * SEQ * D,
                flops_fwd=float(flops),
                samples=samples,
                fwd_fit=fwd_fit,
                bwd_fit=bwd_fit,
            )
        )
    return ModelProfile(
        provenance=Provenance(method="estimated", notes=["synthesized by search_time.py"]),
        model=ModelSpec(spec="gpt3_175b"),
        device=DeviceInfo(kind=kind, name=kind.upper(), matmul_flops=0.5 * peak),
        dtype="bfloat16",
        micro_batch_sizes=[1, 2, 4, 8],
        tp_degrees=list(TP),
        overhead_bytes=2 * 10**9,
        layers=layers,
    )


def declared_cluster(nodes: int, per_node: int = 8) -> ClusterArtifact:
    """First half of the nodes A100, second half H100; NVLink inside, the slower NIC between."""
    kinds = ["a100" if n < nodes // 2 else "h100" for n in range(nodes)]
    devices = [
        ClusterDevice(
            rank=n * per_node + g,
            host=f"node{n}",
            kind=kinds[n],
            memory_bytes=KINDS[kinds[n]][3],
            matmul_flops=0.5 * KINDS[kinds[n]][0],
        )
        for n in range(nodes)
        for g in range(per_node)
    ]
    size = nodes * per_node
    node = [r // per_node for r in range(size)]
    bw, lat = [], []
    for i in range(size):
        ki = KINDS[kinds[node[i]]]
        row_b, row_a = [], []
        for j in range(size):
            if i == j:
                row_b.append(0.0)
                row_a.append(0.0)
            elif node[i] == node[j]:
                row_b.append(ki[1])
                row_a.append(3e-6)
            else:
                row_b.append(min(ki[2], KINDS[kinds[node[j]]][2]))
                row_a.append(8e-6)
        bw.append(row_b)
        lat.append(row_a)
    return ClusterArtifact.model_construct(
        provenance=Provenance(method="declared"),
        devices=devices,
        links=Links.model_construct(latency_s=lat, bandwidth_Bps=bw),
        measurement={},
    )


def measure(nodes: int, global_batch: int) -> dict:
    """Search time (wall clock, whole `pdv plan` search) for one cluster size."""
    profiles = {k: gpt3_block_profile(k) for k in KINDS}
    cluster = declared_cluster(nodes)
    return _timed(profiles, cluster, global_batch, nodes * 8, "synthesized 96 blocks")


def _timed(profiles, cluster, global_batch: int, gpus: int, what: str,
           mbs: tuple[int, ...] = (1, 2, 4, 8)) -> dict:  # fmt: skip
    problem = PlanProblem(profiles, cluster, global_batch, micro_batch_sizes=mbs,
                          time_limit_s=2.0)  # fmt: skip
    started = time.perf_counter()
    provenance = plan_provenance(profiles, cluster)
    digest_s = time.perf_counter() - started
    started = time.perf_counter()
    result = search(problem, "pdv", provenance=provenance)
    seconds = time.perf_counter() - started
    plan = result.plans[0]
    return {
        "inputs": what,
        "gpus": gpus,
        "search_time_s": round(seconds, 3),
        "input_digest_s": round(digest_s, 3),
        "stages": len(plan.stages),
        "micro_batch_size": plan.micro_batch_size,
        "predicted_step_time_s": plan.predicted.step_time_s if plan.predicted else None,
        "status": plan.planner.status,
        "layout": [f"{s.layers[0]}-{s.layers[1]}:dp{s.dp}tp{s.tp}" for s in plan.stages[:4]],
    }


def measure_declared(nodes: int, global_batch: int) -> dict | None:
    """The same on clusters/two-kinds-128x8.json (scaled to `nodes`) and plans/profiles/."""
    import subprocess
    import tempfile

    from pdv import artifacts

    spec_path = ROOT / "clusters" / "two-kinds-128x8.json"
    profs = sorted((ROOT / "plans" / "profiles").glob("gpt3_175b.*.json"))
    if not spec_path.exists() or len(profs) < 2:
        return None
    spec = json.loads(spec_path.read_text())
    for host in spec["hosts"]:
        host["count"] = nodes // 2
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        out = Path(tmp) / "cluster.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pdv",
                "cluster",
                "declare",
                str(Path(tmp) / "spec.json"),
                "-o",
                str(out),
                "--json",
            ],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        cluster = artifacts.load_as(out, "cluster")
    profiles = {}
    for path in profs:
        prof = artifacts.load_as(path, "model-profile")
        profiles[prof.device.kind] = prof
    return _timed(profiles, cluster, global_batch, nodes * 8, "declared 128x8 spec, 175B estimates")


def estimate_profile(path: Path | None) -> ModelProfile:
    """GPT-3 175B `--estimate` profile: the given file, or one taken on this CPU now."""
    import subprocess
    import tempfile

    from pdv import artifacts

    if path is not None:
        return artifacts.load_as(path, "model-profile")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gpt3_175b.json"
        subprocess.run([sys.executable, "-m", "pdv", "profile", "model", "gpt3_175b", "--estimate",
                        "-o", str(out)], check=True, capture_output=True, cwd=ROOT)  # fmt: skip
        return artifacts.load_as(out, "model-profile")


def measure_noisy(gpus: int, global_batch: int, profile: ModelProfile) -> dict:
    """The noisy measured-like matrix (first `gpus` ranks of 128 hosts x 8), CPU estimate."""
    if str(ROOT) not in sys.path:  # run as a script: the repository root is not on the path
        sys.path.insert(0, str(ROOT))
    from benchmarks.noisy_cluster import first_ranks, noisy_cluster

    cluster = noisy_cluster(128, kind=profile.device.kind)
    if gpus < len(cluster.devices):
        cluster = first_ranks(cluster, gpus)
    return _timed({profile.device.kind: profile}, cluster, global_batch, gpus,
                  "noisy 128x8 matrix, 175B --estimate on this CPU", mbs=())  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", type=int, choices=(64, 1024), help="one cluster size only")
    parser.add_argument("--profile", type=Path,
                        help="GPT-3 175B --estimate profile for the noisy case (default: take "
                        "one on this CPU)")  # fmt: skip
    args = parser.parse_args()
    targets = {64: 1.0, 1024: 10.0}
    noisy = estimate_profile(args.profile)
    rows, failed = [], False
    for gpus, target in targets.items():
        if args.only and gpus != args.only:
            continue
        for row in (measure(gpus // 8, 1536), measure_declared(gpus // 8, 1536),
                    measure_noisy(gpus, 1536, noisy)):
            if row is None:
                continue
            row["target_s"] = target
            row["ok"] = row["search_time_s"] <= target
            failed |= not row["ok"]
            rows.append(row)
            if args.json:
                continue
            print(
                f"{gpus:5d} GPUs, {row['inputs']}: search {row['search_time_s']:.2f} s "
                f"(target ≤ {target} s) "
                f"{'ok' if row['ok'] else 'OVER'} (+{row['input_digest_s']:.2f} s hashing the "
                f"inputs); {row['stages']} stages, mbs "
                f"{row['micro_batch_size']}, predicted step {row['predicted_step_time_s']:.2f} s,"
                f" {row['status']}; first stages {row['layout']}"
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
