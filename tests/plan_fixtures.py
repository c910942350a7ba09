"""Small hand-built profiles and clusters for the planner tests (no torch, no profiling)."""

from __future__ import annotations

import random

from pdv.artifacts import (
    ClusterArtifact,
    ClusterDevice,
    DeviceInfo,
    LayerProfile,
    LayerSample,
    Links,
    ModelProfile,
    ModelSpec,
    TimeFit,
)

GiB = 1 << 30


def _fit(per_sample: float) -> TimeFit:
    return TimeFit(a_s=per_sample * 0.1, b_s=per_sample, r2=1.0, max_rel_error=0.0)


def profile(
    kind: str = "gpu",
    n_layers: int = 4,
    fwd: list[float] | None = None,
    param_bytes: int = 64 << 20,
    act_bytes: int = 32 << 20,
    out_bytes: int = 8 << 20,
    matmul_flops: float = 1e12,
    tp_degrees: tuple[int, ...] = (1, 2),
    overhead: int = 0,
    optimizer_s: float | None = None,
) -> ModelProfile:
    """A transformer-like profile: per-layer fwd, bwd = 2·fwd, Adam state = 2·params."""
    fwd = fwd or [0.01] * n_layers
    layers = [
        LayerProfile(
            name=f"layer{i}",
            fwd_s=f,
            bwd_s=2 * f,
            param_bytes=param_bytes,
            grad_bytes=param_bytes,
            optimizer_bytes=2 * param_bytes,
            activation_bytes=act_bytes,
            output_bytes=out_bytes,
            optimizer_s=optimizer_s,
            samples=[
                LayerSample(
                    micro_batch_size=1,
                    tp_degree=t,
                    fwd_s=f * 0.55,
                    bwd_s=2 * f * 0.55,
                    fwd_spread_s=0.0,
                    bwd_spread_s=0.0,
                    param_bytes=param_bytes // t,
                    activation_bytes=act_bytes // t,
                    output_bytes=out_bytes,
                )
                for t in tp_degrees
                if t > 1
            ],
            fwd_fit={str(t): _fit(f / t**0.85) for t in tp_degrees},
            bwd_fit={str(t): _fit(2 * f / t**0.85) for t in tp_degrees},
        )
        for i, f in enumerate(fwd)
    ]
    return ModelProfile(
        model=ModelSpec(spec="gpt_tiny"),
        device=DeviceInfo(kind=kind, name=kind, matmul_flops=matmul_flops),
        micro_batch_sizes=[1, 2, 4],
        tp_degrees=list(tp_degrees),
        overhead_bytes=overhead,
        layers=layers,
    )


def cluster(
    hosts: list[str],
    bw: list[list[float]],
    kinds: list[str] | None = None,
    memory: int = 16 * GiB,
    flops: list[float] | None = None,
    latency: float = 1e-5,
    collective: list[list[float]] | None = None,
    runtime_bytes: list[int] | None = None,
) -> ClusterArtifact:
    """A declared cluster from a bandwidth matrix (bytes/s), one device per entry of hosts.

    `collective` (bytes/s per pair) adds measured-collective matrices, with α twice the
    point-to-point one; `runtime_bytes` gives each rank a measured footprint.
    """
    n = len(hosts)
    kinds = kinds or ["gpu"] * n
    devices = [
        ClusterDevice(
            rank=r,
            host=hosts[r],
            kind=kinds[r],
            memory_bytes=memory,
            matmul_flops=(flops[r] if flops else 1e12),
            runtime_bytes=runtime_bytes[r] if runtime_bytes else None,
        )
        for r in range(n)
    ]
    lat = [[0.0 if i == j else latency for j in range(n)] for i in range(n)]
    bwm = [[0.0 if i == j else bw[i][j] for j in range(n)] for i in range(n)]
    coll_lat = coll_bw = None
    if collective is not None:
        coll_lat = [[0.0 if i == j else 2 * latency for j in range(n)] for i in range(n)]
        coll_bw = [[0.0 if i == j else collective[i][j] for j in range(n)] for i in range(n)]
    links = Links(latency_s=lat, bandwidth_Bps=bwm, collective_latency_s=coll_lat,
                  collective_bandwidth_Bps=coll_bw)
    return ClusterArtifact(devices=devices, links=links)


def two_by_two(intra: float, inter: float) -> ClusterArtifact:
    """2 hosts × 2 devices with the given intra-host and inter-host bandwidth."""
    hosts = ["h0", "h0", "h1", "h1"]
    bw = [[intra if hosts[i] == hosts[j] else inter for j in range(4)] for i in range(4)]
    return cluster(hosts, bw)


def random_instance(rng: random.Random):
    """≤ 6 layers, ≤ 4 devices, random speeds, asymmetric links, sometimes tight memory."""
    n_layers = rng.randint(2, 6)
    n_dev = rng.randint(1, 4)
    kinds = [rng.choice(["a", "b"]) for _ in range(n_dev)]
    fwd = [rng.uniform(0.001, 0.02) for _ in range(n_layers)]
    profiles = {
        k: profile(
            kind=k,
            n_layers=n_layers,
            fwd=[f * (1.0 if k == "a" else 1.7) for f in fwd],
            param_bytes=rng.choice([8, 64, 256]) << 20,
            act_bytes=rng.choice([4, 32, 128]) << 20,
            out_bytes=rng.choice([1, 8, 64]) << 20,
            optimizer_s=rng.choice([None, 0.0, 0.004, 0.03]),
        )
        for k in sorted(set(kinds))
    }
    bw = [[rng.choice([1e8, 1e9, 1e10, 5e10]) for _ in range(n_dev)] for _ in range(n_dev)]
    flops = [rng.choice([0.5e12, 1e12, 2e12]) for _ in range(n_dev)]
    memory = rng.choice([1, 2, 4, 16]) * GiB
    hosts = [f"h{r // 2}" for r in range(n_dev)]
    # Sometimes collectives measured apart from point-to-point (slower per byte, or faster),
    # and a measured per-rank runtime footprint.
    collective = None
    if rng.random() < 0.5:
        sym = [[min(bw[i][j], bw[j][i]) for j in range(n_dev)] for i in range(n_dev)]
        collective = [[sym[i][j] * rng.choice([0.15, 1.0, 2.0]) for j in range(n_dev)]
                      for i in range(n_dev)]
    runtime = [rng.choice([0, 256 << 20]) for _ in range(n_dev)] if rng.random() < 0.5 else None
    cl = cluster(hosts, bw, kinds, memory, flops, collective=collective, runtime_bytes=runtime)
    batch = rng.choice([4, 8, 16])
    # Sometimes boundaries of several tensors, not all carrying a gradient back: one message
    # each, priced alike by the planner's tables, its objective and the simulator.
    if rng.random() < 0.5:
        counts = [rng.choice([(1, 1), (2, 1), (3, 1), (3, 3), (2, 0)]) for _ in range(n_layers)]
        profiles = {
            k: p.model_copy(update={"layers": [
                layer.model_copy(update={"output_tensors": t, "output_grad_tensors": g})
                for layer, (t, g) in zip(p.layers, counts, strict=True)
            ]})
            for k, p in profiles.items()
        }
    return profiles, cl, batch
