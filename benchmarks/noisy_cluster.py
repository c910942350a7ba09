"""Clusters shaped like measured ones: every link a class value times its own noise.

    python benchmarks/noisy_cluster.py --nodes 128 -o cluster.json   # 1024 ranks

A measured matrix is never two-valued: each ordered pair is its class's value times a factor
drawn uniformly from [1 − noise, 1 + noise], independently per direction (so links are
asymmetric too). The shape is the one `clusters/two-kinds-128x8.json` declares, with one device
kind: the first half of the hosts are NVLink-class boxes (GPUs on a 450 GB/s switch), the
second half PCIe-class boxes (25 GB/s between the GPUs of a box), all on one 400 Gbit/s fabric;
the NVLink boxes hold 80 GiB per device, the PCIe ones 40 GiB. The class values are those of
that spec; the noise is what `pdv profile cluster` reads between pairs of one class (±10% on
this machine's loopback). Marked `declared`: nothing here was measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pdv.artifacts import ClusterArtifact, ClusterDevice, Links, Provenance

__all__ = ["noisy_cluster", "CLASSES"]

GiB = 1 << 30
CLASSES = {  # link class: (latency s, bandwidth B/s), as clusters/two-kinds-128x8.json declares
    "nvlink": (3e-6, 450e9),
    "pcie": (5e-6, 25e9),
    "fabric": (10e-6, 50e9),
}


def noisy_cluster(
    nodes: int,
    per_node: int = 8,
    noise: float = 0.1,
    seed: int = 0,
    kind: str = "cpu",
    matmul_flops: float | None = None,
) -> ClusterArtifact:
    """`nodes` hosts of `per_node` devices: NVLink-class first half, PCIe-class second half."""
    rng = np.random.default_rng(seed)
    n = nodes * per_node
    node = np.arange(n) // per_node
    nvlink_host = node < max(1, nodes // 2)
    same = node[:, None] == node[None, :]
    lat = np.full((n, n), CLASSES["fabric"][0])
    bw = np.full((n, n), CLASSES["fabric"][1])
    for cls, mask in (("nvlink", nvlink_host), ("pcie", ~nvlink_host)):
        inside = same & mask[:, None]
        lat[inside], bw[inside] = CLASSES[cls]
    lat *= rng.uniform(1 - noise, 1 + noise, (n, n))
    bw *= rng.uniform(1 - noise, 1 + noise, (n, n))
    np.fill_diagonal(lat, 0.0)
    np.fill_diagonal(bw, 0.0)
    devices = [
        ClusterDevice(
            rank=r,
            host=f"{'nv' if nvlink_host[r] else 'pcie'}-{node[r]}",
            kind=kind,
            memory_bytes=(80 if nvlink_host[r] else 40) * GiB,
            matmul_flops=matmul_flops,
        )
        for r in range(n)
    ]
    note = (f"synthesized by benchmarks/noisy_cluster.py: {nodes} hosts x {per_node}, every "
            f"link its class value x U[{1 - noise:g}, {1 + noise:g}] (seed {seed})")
    return ClusterArtifact(
        provenance=Provenance(method="declared", notes=[note]),
        devices=devices,
        links=Links(latency_s=lat.tolist(), bandwidth_Bps=bw.tolist()),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=128)
    parser.add_argument("--per-node", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", default="cpu")
    parser.add_argument("--ranks", type=int, help="keep only the first N ranks")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    from pdv import artifacts

    cluster = noisy_cluster(args.nodes, args.per_node, args.noise, args.seed, args.kind)
    if args.ranks:
        cluster = first_ranks(cluster, args.ranks)
    artifacts.write(args.out, cluster, compact=True)
    print(args.out)
    return 0


def first_ranks(cluster: ClusterArtifact, k: int) -> ClusterArtifact:
    """The cluster cut to its first k ranks."""
    links = cluster.links
    return cluster.model_copy(update={
        "devices": cluster.devices[:k],
        "links": Links(latency_s=[row[:k] for row in links.latency_s[:k]],
                       bandwidth_Bps=[row[:k] for row in links.bandwidth_Bps[:k]]),
    })


if __name__ == "__main__":
    sys.exit(main())
