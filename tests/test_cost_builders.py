"""Small hand-written profiles, clusters and plans for the cost-model tests (no profiling)."""

from __future__ import annotations

from collections.abc import Sequence

from pdv.artifacts import (
    ClusterArtifact,
    ClusterDevice,
    DeviceInfo,
    LayerProfile,
    LayerSample,
    Links,
    ModelProfile,
    ModelSpec,
    Plan,
    PlanStage,
)

__all__ = ["make_profile", "make_cluster", "make_plan", "chain_plan"]


def make_profile(
    kind: str = "cpu",
    n_layers: int = 4,
    *,
    fwd: float | Sequence[float] = 0.01,
    bwd: float | Sequence[float] = 0.02,
    params: int = 1000,
    act: int = 500,
    out: int = 100,
    tp_degrees: Sequence[int] = (1,),
    matmul_flops: float | None = None,
    overhead: int = 0,
    ref_mbs: int = 1,
    optimizer_s: float | None = None,
) -> ModelProfile:
    """A profile whose layers scale linearly in micro-batch size and 1/tp in time and params."""
    fwds = [fwd] * n_layers if isinstance(fwd, float | int) else list(fwd)
    bwds = [bwd] * n_layers if isinstance(bwd, float | int) else list(bwd)
    layers = []
    for i in range(n_layers):
        samples = [
            LayerSample(
                micro_batch_size=ref_mbs,
                tp_degree=k,
                fwd_s=fwds[i] / k,
                bwd_s=bwds[i] / k,
                fwd_spread_s=0.0,
                bwd_spread_s=0.0,
                param_bytes=params // k,
                activation_bytes=act * ref_mbs // k,
                output_bytes=out * ref_mbs,
            )
            for k in tp_degrees
            if k > 1
        ]
        layers.append(
            LayerProfile(
                name=f"layer{i}",
                fwd_s=fwds[i] * ref_mbs,
                bwd_s=bwds[i] * ref_mbs,
                param_bytes=params,
                grad_bytes=params,
                optimizer_bytes=2 * params,
                activation_bytes=act * ref_mbs,
                output_bytes=out * ref_mbs,
                optimizer_s=optimizer_s,
                samples=samples,
            )
        )
    return ModelProfile(
        model=ModelSpec(spec="build"),
        device=DeviceInfo(kind=kind, name=kind, matmul_flops=matmul_flops),
        reference_micro_batch_size=ref_mbs,
        micro_batch_sizes=[ref_mbs],
        tp_degrees=sorted({1, *tp_degrees}),
        overhead_bytes=overhead,
        layers=layers,
    )


def make_cluster(
    n: int,
    *,
    bw: float | Sequence[Sequence[float]] = 1e9,
    lat: float | Sequence[Sequence[float]] = 0.0,
    kinds: Sequence[str] | None = None,
    memory: int = 10**9,
    matmul_flops: Sequence[float | None] | None = None,
) -> ClusterArtifact:
    """A cluster of n devices with uniform or given (row = sender) bandwidth/latency matrices."""
    kinds = list(kinds) if kinds else ["cpu"] * n
    flops = list(matmul_flops) if matmul_flops else [None] * n

    def matrix(v: float | Sequence[Sequence[float]], diag: float) -> list[list[float]]:
        if isinstance(v, float | int):
            return [[diag if i == j else float(v) for j in range(n)] for i in range(n)]
        return [[float(x) for x in row] for row in v]

    return ClusterArtifact(
        devices=[
            ClusterDevice(
                rank=i, host=f"h{i}", kind=kinds[i], memory_bytes=memory, matmul_flops=flops[i]
            )
            for i in range(n)
        ],
        links=Links(latency_s=matrix(lat, 0.0), bandwidth_Bps=matrix(bw, 0.0)),
    )


def make_plan(
    stages: Sequence[PlanStage], *, mbs: int = 1, num_micro: int = 4, schedule: str = "1F1B"
) -> Plan:
    """A plan holding only the contract fields."""
    return Plan(
        stages=list(stages),
        micro_batch_size=mbs,
        num_micro_batches=num_micro,
        global_batch_size=mbs * num_micro,
        schedule=schedule,
    )


def chain_plan(
    n_stages: int, *, num_micro: int = 4, schedule: str = "1F1B", layers_per_stage: int = 1,
    groups: Sequence[int] | None = None, mbs: int = 1,
) -> Plan:  # fmt: skip
    """One rank per stage (rank = groups[i], default i), layers split evenly."""
    groups = list(range(n_stages)) if groups is None else list(groups)
    k = layers_per_stage
    return make_plan(
        [PlanStage(layers=(i * k, (i + 1) * k), ranks=[groups[i]]) for i in range(n_stages)],
        mbs=mbs,
        num_micro=num_micro,
        schedule=schedule,
    )


def test_builders_make_valid_artifacts() -> None:
    """The builders produce artifacts that pass the same validation as files on disk."""
    from pdv import artifacts

    p = make_profile(tp_degrees=(1, 2))
    c = make_cluster(3, bw=[[0, 1, 2], [3, 0, 4], [5, 6, 0]])
    plan = chain_plan(2)
    for a in (p, c, plan):
        assert artifacts.parse(__import__("json").loads(artifacts.dumps(a))) == a
    assert c.links.bandwidth_Bps[1][2] == 4.0
    assert p.layers[0].samples[0].param_bytes == 500
