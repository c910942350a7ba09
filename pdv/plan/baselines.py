"""Baseline planners: the same problem in, ranked candidates out, each with one assumption changed.

- ``hierarchy`` (Alpa, Metis, AMP): the network is reduced to β by host. The two classes are
  taken from this cluster's own measurements — the median intra-host link and the median
  inter-host link — and, as those planners assume, the faster of the two medians is given to
  every intra-host pair and the slower to every inter-host pair (latency likewise). Devices are
  grouped and ordered by host name (hosts in order of their first rank). The stage DP and the
  CP-SAT sharding then run unchanged on that network.
- ``uniform`` (Megatron-LM): equal layers per stage, fixed dp × tp × pp over the ranks in rank
  order; every degree combination (and recompute where memory needs it) is tried, the best kept.
- ``pipedream`` (Narayanan et al., SOSP 2019): stages replicated by data parallelism only
  (no TP, FSDP or recompute), the slowest stage minimized (PipeDream's throughput objective),
  over a flat network at the median measured link, as its single-level profile sees it.

Every baseline's plans are re-evaluated by the simulator on the measured matrix (pdv.plan.search),
so the difference between planners is their assumption alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from pdv.artifacts import ClusterArtifact, LayerChoice, Links
from pdv.cost.schedules import max_stages
from pdv.plan.objective import pipeline_objective
from pdv.plan.problem import Candidate, PlanProblem, StageSpec
from pdv.plan.stages import DPResult, stage_dp

__all__ = [
    "hierarchy_links",
    "host_order",
    "hierarchy",
    "uniform",
    "uniform_layouts",
    "pipedream",
    "flat_links",
]


Matrix = list[list[float]]


def _same_host(cluster: ClusterArtifact) -> tuple[np.ndarray, np.ndarray]:
    # (pairs on one host, pairs on two hosts), off the diagonal
    hosts = np.array([d.host for d in cluster.devices])
    same = hosts[:, None] == hosts[None, :]
    off = ~np.eye(len(hosts), dtype=bool)
    return same & off, ~same & off


def _matrix(same: np.ndarray, intra: float, inter: float) -> Matrix:
    m = np.where(same, intra, inter)
    np.fill_diagonal(m, 0.0)
    return m.tolist()


def _hierarchy(cluster: ClusterArtifact, lat: Matrix, bw: Matrix) -> tuple[Matrix, Matrix]:
    intra, inter = _same_host(cluster)
    if not (intra.any() or inter.any()):  # one device: no link to assume anything about
        return lat, bw
    a, b = np.asarray(lat, dtype=float), np.asarray(bw, dtype=float)
    meds_b = [float(np.median(b[m])) for m in (intra, inter) if m.any()]
    meds_a = [float(np.median(a[m])) for m in (intra, inter) if m.any()]
    return (_matrix(intra, min(meds_a), max(meds_a)),
            _matrix(intra, max(meds_b), min(meds_b)))


def _flat(cluster: ClusterArtifact, lat: Matrix, bw: Matrix) -> tuple[Matrix, Matrix]:
    intra, inter = _same_host(cluster)
    pairs = intra | inter
    if not pairs.any():
        return lat, bw
    a = float(np.median(np.asarray(lat, dtype=float)[pairs]))
    b = float(np.median(np.asarray(bw, dtype=float)[pairs]))
    return _matrix(intra, a, a), _matrix(intra, b, b)


def _rebuilt(
    cluster: ClusterArtifact,
    assume: Callable[[ClusterArtifact, Matrix, Matrix], tuple[Matrix, Matrix]],
) -> Links:
    # Collective α/β (where measured) go through the same assumption as the point-to-point
    # ones, so a baseline differs from pdv by its network assumption alone.
    links = cluster.links
    lat, bw = assume(cluster, links.latency_s, links.bandwidth_Bps)
    coll_lat = coll_bw = None
    if links.collective_latency_s is not None and links.collective_bandwidth_Bps is not None:
        coll_lat, coll_bw = assume(cluster, links.collective_latency_s,
                                   links.collective_bandwidth_Bps)
    # Built from a validated cluster's own numbers: no need to validate a million floats again.
    # The exchange excess is the ranks' CPU side, not the network: kept as measured.
    return Links.model_construct(latency_s=lat, bandwidth_Bps=bw, collective_latency_s=coll_lat,
                                 collective_bandwidth_Bps=coll_bw,
                                 exchange_latency_s=links.exchange_latency_s,
                                 exchange_latency_alone_s=links.exchange_latency_alone_s)


def hierarchy_links(cluster: ClusterArtifact) -> Links:
    """The cluster's links as a host hierarchy assumes them: fast inside a host, slow between."""
    return _rebuilt(cluster, _hierarchy)


def flat_links(cluster: ClusterArtifact) -> Links:
    """Every pair at the median measured link (a single-level network)."""
    return _rebuilt(cluster, _flat)


def host_order(cluster: ClusterArtifact) -> tuple[list[int], list[list[int]]]:
    """Ranks grouped by host name, hosts in order of their first rank."""
    groups: dict[str, list[int]] = {}
    for d in cluster.devices:
        groups.setdefault(d.host, []).append(d.rank)
    parts = list(groups.values())
    return [r for p in parts for r in p], parts


def hierarchy(problem: PlanProblem) -> DPResult:
    """Alpa-style: the same DP on the host-hierarchy network and host grouping."""
    order, parts = host_order(problem.cluster)
    believed = replace(problem, links=hierarchy_links(problem.cluster))
    return stage_dp(believed, order, parts, search="hierarchy")


def pipedream(problem: PlanProblem) -> DPResult:
    """PipeDream-style: DP-replicated stages, min slowest stage, flat network."""
    order = list(range(len(problem.cluster.devices)))
    believed = replace(
        problem,
        links=flat_links(problem.cluster),
        tp_degrees=(1,),
        allow_fsdp=False,
        allow_recompute=False,
    )
    return stage_dp(believed, order, [order], search="pipedream", bottleneck_only=True)


def even_split(n_layers: int, pp: int) -> list[tuple[int, int]]:
    """pp contiguous layer ranges whose sizes differ by at most one."""
    base, extra = divmod(n_layers, pp)
    out, lo = [], 0
    for s in range(pp):
        hi = lo + base + (1 if s < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def uniform_layouts(problem: PlanProblem, n: int) -> Iterator[tuple[int, int, int, int]]:
    """(micro-batch size, pp, stage width, tp) of every fixed dp × tp × pp over n devices."""
    for mbs in problem.mbs_options():
        M = problem.global_batch // mbs
        for pp in range(1, max_stages(problem.schedule, M, min(n, problem.num_layers)) + 1):
            if n % pp:
                continue
            width = n // pp
            for tp in problem.tp_options():
                if width % tp == 0 and problem.replica_batch_ok(mbs, width // tp):
                    yield mbs, pp, width, tp


def uniform(problem: PlanProblem) -> DPResult:
    """Megatron-style: equal layers per stage, one dp × tp × pp for the whole cluster."""
    n = len(problem.cluster.devices)
    found: list[Candidate] = []
    evaluated = 0
    for mbs, pp, width, tp in uniform_layouts(problem, n):
        for recompute in (False, True) if problem.allow_recompute else (False,):
            ch = LayerChoice(tp=tp, fsdp=False, recompute=recompute)
            stages = tuple(
                StageSpec(lo, hi, tuple(range(s * width, (s + 1) * width)), ch)
                for s, (lo, hi) in enumerate(even_split(problem.num_layers, pp))
            )
            evaluated += 1
            j = pipeline_objective(problem, stages, mbs)
            if j < float("inf"):
                found.append(Candidate(stages, mbs, problem.global_batch // mbs, j, "uniform"))
                break  # recompute only where memory needs it
    found.sort(key=lambda c: (c.objective_s, len(c.stages), c.micro_batch_size, repr(c.stages)))
    return DPResult(found, True, evaluated)
