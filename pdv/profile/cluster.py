"""One rank of `pdv profile cluster`: join, probe the device, measure links, rank 0 writes.

Order: join; a first collective, then the memory the rank holds (runtime_bytes); the device
probe; the point-to-point tournament; the all-reduce tournament and each host's ring (unless
turned off); the pipeline bookkeeping and message-CPU probes, and with the all-reduce
tournament the FSDP own-work probe (pdv.profile.overheads).

Runs under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment). Every
step is reported to a callback; under the local launcher that callback writes heartbeat files
(pdv.profile.launch_local) so a rank that stops answering is named, not waited for.
"""

from __future__ import annotations

import os
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pdv import artifacts
from pdv.artifacts import ClusterArtifact, ClusterDevice, Links, Provenance
from pdv.cost.comm import ring_of
from pdv.cost.compute import unsteady_note
from pdv.errors import PdvError
from pdv.profile.allocator import keep_freed_memory
from pdv.profile.collective import (
    collective_block,
    collective_matrices,
    host_ring_block,
    measure_collectives,
    measure_host_rings,
)
from pdv.profile.hardware import matmul_flops, probe_device, runtime_memory, small_op_step_s
from pdv.profile.launch_local import PROGRESS_ENV
from pdv.profile.loops import settle_gloo_loops
from pdv.profile.network import (
    Progress,
    SweepConfig,
    gather_on_rank0,
    link_matrices,
    measure_links,
    measurement_block,
)
from pdv.profile.overheads import (
    AfterCompute,
    all_cpu,
    exchange_excess,
    fsdp_own_work,
    fsdp_pairs,
    measure_overheads,
    overheads_block,
    sync_excess,
    typical_pass,
)

__all__ = ["LinkFailure", "describe_event", "profile_cluster_rank", "rank_env"]


class LinkFailure(PdvError):
    """A collective or transfer failed; `peer` is the rank it waited on, when known."""

    def __init__(self, message: str, peer: int | None) -> None:
        super().__init__(message)
        self.peer = peer

# Test hook: PDV_TEST_STALL_RANK=r makes rank r stop answering at PDV_TEST_STALL_AT
# ("join": before it joins the group; "round": at the first round; "all-reduce": before the
# all-reduce tournament), or die there ("exit-join", "exit-round", "exit-all-reduce"). Used to
# prove that a stuck or dead rank is named.
_STALL_RANK, _STALL_AT = "PDV_TEST_STALL_RANK", "PDV_TEST_STALL_AT"


def rank_env() -> tuple[int, int] | None:
    """(rank, world size) when running under torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _maybe_stall(rank: int, where: str) -> None:
    if os.environ.get(_STALL_RANK) != str(rank):
        return
    at = os.environ.get(_STALL_AT, "round")
    if at == f"exit-{where}":
        os._exit(3)  # a crash: the rank is gone without a word
    if at == where:
        while True:
            time.sleep(3600)


def _pick(backend: str) -> tuple[str, torch.device, torch.device]:
    """(backend, device the messages live on, device the rank computes on)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    # The rank's device is its GPU where there is one, whatever carries the messages.
    compute = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if compute.type == "cuda":
        torch.cuda.set_device(compute)
    if backend == "auto":
        backend = "nccl" if compute.type == "cuda" else "gloo"
    if backend == "nccl":
        if compute.type != "cuda":
            raise PdvError("--backend nccl needs CUDA; use --backend gloo on CPU ranks")
        return backend, compute, compute
    if backend != "gloo":
        raise PdvError(f"unknown backend {backend!r}; use auto, gloo or nccl")
    return backend, torch.device("cpu"), compute  # gloo point-to-point moves host memory


def profile_cluster_rank(
    out: Path,
    cfg: SweepConfig,
    timeout_s: float,
    backend: str = "auto",
    report: Progress | None = None,
    collectives: bool = True,
) -> ClusterArtifact | None:
    """Run this rank's part; rank 0 writes `out` and returns the artifact, others return None."""
    env = rank_env()
    if env is None:
        raise PdvError("not under torchrun (no RANK/WORLD_SIZE); pass --nproc-per-node N")
    rank, world = env
    report = report or (lambda event: None)
    last: dict[str, Any] = {}

    def step(event: dict[str, Any]) -> None:
        last.clear()
        last.update(event)
        report(event)

    _maybe_stall(rank, "join")
    step({"phase": "joining"})
    backend, wire, device = _pick(backend)
    # Under the local launcher the launcher diagnoses a stuck rank after timeout_s; the
    # group's own timeout is a backstop that must not fire first (its error names no culprit).
    group_timeout = timeout_s if os.environ.get(PROGRESS_ENV) is None else 2 * timeout_s + 30
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=group_timeout))
    except Exception as exc:
        raise PdvError(
            f"rank {rank}: could not join the {world}-rank group within {timeout_s:g}s "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    done = False
    try:
        step({"phase": "joined"})
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        # A first collective makes the backend set up what it keeps (connections, threads,
        # NCCL buffers) before the rank's memory is read: a run holds all of it.
        dist.all_reduce(torch.zeros(1, device=wire))
        runtime, runtime_info = runtime_memory(device, local)
        step({"phase": "runtime-measured"})
        mine = probe_device(device, local) | {"rank": rank, "runtime_bytes": runtime}
        if device.type == "cpu":
            mine["runtime_own_bytes"] = runtime_info["runtime_rss_bytes"]
        mine["details"] |= runtime_info
        if device.type == "cpu":  # as the model profile and the run's ranks do (after the RSS)
            keep_freed_memory()
        loops_note = settle_gloo_loops()
        mine["matmul_flops_alone"], small_first = _probe_alone(device, wire, local)
        step({"phase": "probed"})
        devices: list[dict[str, Any]] | None = [{} for _ in range(world)] if rank == 0 else None
        dist.gather_object(mine, devices, dst=0)
        _maybe_stall(rank, "round")
        together = [mine["matmul_flops"]]
        alone = [mine["matmul_flops_alone"]]
        small = [small_first]
        results = measure_links(cfg, wire, step)
        together.append(_probe_together(device))
        _append_alone(_probe_alone(device, wire, local), alone, small)
        # The after-compute probe takes a pass at each later compute window and one at the
        # end. Not at the start: a pass there landed twice as late (1.04 ms against 0.5-0.7
        # over 13 files), a process's first seconds, which a run's timed steps are not.
        after = AfterCompute(device) if all_cpu(device, wire) else None
        _take_pass(after)
        matrices = link_matrices(world, results) if results is not None else None  # rank 0
        coll = host_rings = None
        if collectives:
            _maybe_stall(rank, "all-reduce")
            coll = measure_collectives(cfg, wire, timedelta(seconds=group_timeout), step)
            host_rings = measure_host_rings(cfg, wire, timedelta(seconds=group_timeout), step)
            together.append(_probe_together(device))
            _append_alone(_probe_alone(device, wire, local), alone, small)
            _take_pass(after)
        windows = gather_on_rank0([(together, alone, small)], rank, world)
        if devices is not None and windows is not None:
            for d, (w, a, sm) in zip(devices, windows, strict=True):
                d["matmul_flops"] = max(w)
                d["details"]["matmul_flops_together_windows"] = w
                d["matmul_flops_alone"] = max(a)
                d["details"]["matmul_flops_alone_windows"] = a
                # The fastest window: the machine's quiet state, as the best matmul window.
                d["small_op_step_s"] = min(sm)
                d["details"]["small_op_step_alone_windows_s"] = sm
        pairs: list[Any] = [None]
        if collectives and world > 1:
            # Rank 0 holds the links; every rank needs the same pairs for the FSDP probe.
            if rank == 0:
                assert matrices is not None and devices is not None
                room = [d["memory_bytes"] - (d.get("runtime_bytes") or 0) for d in devices]
                pairs[0] = fsdp_pairs(matrices[1], room)
            dist.broadcast_object_list(pairs, src=0)
        over = gather_on_rank0(
            [measure_overheads(device, wire, step, fsdp=pairs[0], after=after)], rank, world)
        step({"phase": "gathered"})
        if rank != 0:
            # No rank leaves before rank 0 has written: a rank that tore its group down while
            # others still held connections to it was seen to abort (SIGABRT) at exit in CI.
            dist.barrier()
            done = True
            return None
        assert devices is not None and results is not None and over is not None
        assert matrices is not None
        for d, o in zip(devices, over, strict=True):
            d["overheads"] = o["overheads"]
        lat, bw = matrices
        measurement = measurement_block(world, cfg, results, backend)
        measurement["overheads"] = overheads_block(over)
        coll_lat = coll_bw = None
        fsdp: dict[str, list[list[float]] | None] = {}
        if collectives:
            assert coll is not None
            coll_lat, coll_bw = collective_matrices(world, coll)
            for op, kind in (("all_gather", "gather"), ("reduce_scatter", "scatter")):
                lat_m, bw_m = collective_matrices(world, coll, op)
                fsdp[f"{kind}_latency_s"], fsdp[f"{kind}_bandwidth_Bps"] = lat_m, bw_m
            measurement["collective"] = collective_block(coll)
            if host_rings:
                measurement["collective"]["host_rings"] = host_ring_block(host_rings)
        links = Links(latency_s=lat, bandwidth_Bps=bw, collective_latency_s=coll_lat,
                      collective_bandwidth_Bps=coll_bw,
                      host_rings=[s.ring for s in host_rings or ()] or None, **fsdp)
        _fsdp_own_work(devices, over, links)
        _sync_after_compute(devices, over, links)
        links = _with_exchange(devices, over, links)
        artifact = ClusterArtifact(
            provenance=Provenance(
                method="measured",
                notes=[f"pdv profile cluster: {world} ranks, {backend}, "
                       f"{len(results)} ordered pairs in tournament rounds"
                       + (f", all-reduce, all-gather and reduce-scatter of {len(coll) // 3} "
                          "pairs" if coll is not None else "")]
                + ([loops_note] if loops_note else []),
            ),
            devices=[ClusterDevice(**d) for d in devices],
            links=links,
            measurement=measurement,
        )
        unsteady = unsteady_note(artifact)
        if unsteady:  # the file says so itself, for whoever reads it later
            artifact = artifact.model_copy(update={"provenance": artifact.provenance.model_copy(
                update={"notes": [*artifact.provenance.notes, unsteady]})})
        artifacts.write(out, artifact)
        step({"phase": "written"})
        dist.barrier()
        done = True
        return artifact
    except PdvError:
        raise
    except Exception as exc:
        # A peer that died or stalled surfaces here as a gloo/nccl timeout or a closed socket.
        peers = {last.get("src"), last.get("dst")} - {rank, None}
        peer = peers.pop() if peers else None
        who = "link measurement failed" if peer is None else f"no answer from rank {peer}"
        first = (str(exc).splitlines() or [""])[0][:200]
        raise LinkFailure(
            f"rank {rank}: {who} (last step: {describe_event(last)}; group timeout "
            f"{group_timeout:g}s): {type(exc).__name__}: {first}",
            peer,
        ) from None
    finally:
        # After a complete measurement the group is left up: gloo's teardown, all ranks at
        # once after the last barrier, still SIGABRTed a rank now and then in CI ('terminate
        # called without an active exception'), failing a measurement already written. The
        # rank's process ends without tearing down (pdv.cli: os._exit after the summary).
        if not done and dist.is_initialized():
            dist.destroy_process_group()


def _take_pass(after: AfterCompute | None) -> None:
    if after is not None:
        after.take_pass()


def _fsdp_own_work(devices: list[dict[str, Any]], over: list[dict[str, Any]],
                   links: Links) -> None:
    """Each rank's FSDP own work (pdv.profile.overheads) into its overheads, in place.

    A pair's ranks get their own probe's lines, less the pair's collective as the sweep prices
    it. A rank in no pair (an odd one out, or one without the memory headroom to probe) gets
    the median of its device kind's measured ranks.
    """
    lines: dict[int, dict[str, dict[str, float]]] = {}
    for o in over:
        probe = o.get("fsdp")
        if probe:
            lines[o["rank"]] = fsdp_own_work(probe, ring_of(links, probe["pair"]))
    if not lines:
        return
    for d, o in zip(devices, over, strict=True):
        mine = lines.get(o["rank"])
        if mine is None:
            alike = [lines[r] for r in lines if devices[r]["kind"] == d["kind"]]
            if not alike:
                continue
            mine = {op: {k: statistics.median(x[op][k] for x in alike) for k in alike[0][op]}
                    for op in alike[0]}
        d["overheads"]["fsdp_gather"] = mine["gather"]
        d["overheads"]["fsdp_reduce_scatter"] = mine["reduce_scatter"]


def _sync_after_compute(devices: list[dict[str, Any]], over: list[dict[str, Any]],
                        links: Links) -> None:
    """Each rank's gradient-sync excess after compute (pdv.profile.overheads) into its
    overheads, in place: its pair's probe (each round's later end) less the sweep's price on
    the pair; a rank in no pair gets the median of its device kind's."""
    records = {o["rank"]: o["after_compute"] for o in over if o.get("after_compute")}

    def partner(rec: dict[str, Any], rank: int) -> dict[str, Any] | None:
        other = next((r for r in rec["pair"] if r != rank), None)
        return records.get(other) if other is not None else None

    mine = {r: sync_excess(rec, ring_of(links, rec["pair"]), partner(rec, r))
            for r, rec in records.items()}
    for d, value in zip(devices, _own_or_kind_median(devices, mine), strict=True):
        if value is not None:
            d["overheads"]["sync_after_compute_s"] = value
    # The same after the longer burst, and both bursts' lengths: what the excess is priced
    # between by a stage's compute per step. Each number falls back to its kind's median alone.
    timed = {r: rec for r, rec in records.items()
             if rec.get("long") and rec.get("burst_rounds_s") and rec["long"].get("burst_rounds_s")}
    if not timed:
        return

    def longer(rec: dict[str, Any]) -> dict[str, Any]:
        return {**rec["long"], "bytes": rec["bytes"], "passes": rec.get("passes", 1)}

    def burst(rounds: list[float], rec: dict[str, Any]) -> float:
        # Taken pass by pass as the excess is: a pass in a slow spell lengthens both.
        return typical_pass(rounds, int(rec.get("passes", 1)))

    parts = {
        "burst_s": {r: burst(rec["burst_rounds_s"], rec) for r, rec in timed.items()},
        "long_burst_s": {r: burst(rec["long"]["burst_rounds_s"], rec)
                         for r, rec in timed.items()},
        "long_excess_s": {
            r: sync_excess(longer(rec), ring_of(links, rec["pair"]),
                           longer(p) if (p := partner(rec, r)) and p.get("long") else None)
            for r, rec in timed.items()},
    }
    columns = {k: _own_or_kind_median(devices, v) for k, v in parts.items()}
    for i, d in enumerate(devices):
        row = {k: columns[k][i] for k in parts}
        if all(v is not None for v in row.values()) and "sync_after_compute_s" in d["overheads"]:
            d["overheads"]["sync_after_long_compute"] = row


def _with_exchange(devices: list[dict[str, Any]], over: list[dict[str, Any]],
                   links: Links) -> Links:
    """The links with each message's measured excess after compute (pdv.profile.overheads):
    a message to rank j pays j's; a rank not measured (a bye, a peer on another host) gets its
    device kind's median. Where some host's pairs also took turns, the same from those rounds
    into exchange_latency_alone_s; a rank whose host held one pair, its busy excess (nobody
    else was at work then either)."""
    measured = [o for o in over if o.get("after_compute") and o["after_compute"].get("exchange")]
    busy = {o["rank"]: exchange_excess(o["after_compute"], links, o["rank"]) for o in measured}
    alone = {o["rank"]: exchange_excess(o["after_compute"], links, o["rank"], alone=True)
             for o in measured}
    if not busy:
        return links
    n = len(devices)

    def matrix(mine: dict[int, float | None]) -> list[list[float]]:
        per = [v or 0.0 for v in _own_or_kind_median(devices, mine)]
        return [[0.0 if i == j else per[j] for j in range(n)] for i in range(n)]

    update = {"exchange_latency_s": matrix(busy)}
    if any(v is not None for v in alone.values()):
        update["exchange_latency_alone_s"] = matrix(
            {r: busy[r] if v is None else v for r, v in alone.items()})
    return links.model_copy(update=update)


def _own_or_kind_median(devices: list[dict[str, Any]],
                        mine: dict[int, float]) -> list[float | None]:
    """Per rank: its own value, else the median of its device kind's ranks' (None: none)."""
    out: list[float | None] = []
    for d in devices:
        alike = [v for r, v in mine.items() if devices[r]["kind"] == d["kind"]]
        out.append(mine.get(d["rank"], statistics.median(alike) if alike else None))
    return out


def _probe_together(device: torch.device) -> float:
    """This rank's matmul FLOP/s while every rank computes, one more window of it.

    probe_device takes the first window as the profile starts; two more are taken later (after
    the link sweep, after the collectives), and the rank keeps the best. Ranks that share cores
    share them in every window, so the best is still their sustained share; a spell of the
    machine's (a 2-vCPU VM here read 53.6 GFLOP/s in its one window against 100.5 alone, while
    the same host's runs computed at full speed on both ranks) lasts seconds and sets one
    window, not the host's capacity.
    """
    dist.barrier()  # every rank starts the window together
    return matmul_flops(device, trials=1)


def _append_alone(window: tuple[float, float], alone: list[float], small: list[float]) -> None:
    alone.append(window[0])
    small.append(window[1])


def _probe_alone(device: torch.device, wire: torch.device,
                 local_ranks: int) -> tuple[float, float]:
    """This rank's matmul FLOP/s while the other ranks of its host wait, and its small-op
    reference step then (pdv.profile.hardware.small_op_step_s, as the model profiler times it).

    probe_device timed all ranks at once: what each gets when every rank computes. A model
    profile is timed in one process, and in a pipeline not every rank computes at once, so the
    cost model needs both: alone prices one op, the ratio says how many ranks the host's cores
    carry at full speed. Local rank l of every host probes in turn l (hosts do not share cores).
    Like the all-at-once window, it is taken at three points of the probe and the best kept:
    its five windows lie within 0.3 s, and a spell there once read one rank of this 2-vCPU VM
    at 69.7 GFLOP/s against its neighbour's 99.8, and the planner left that rank out.
    """
    mine = int(os.environ.get("LOCAL_RANK", "0"))
    # Hosts may run different numbers of ranks: all take as many turns as the fullest host.
    turns = torch.tensor([local_ranks], device=wire)
    dist.all_reduce(turns, op=dist.ReduceOp.MAX)
    alone = small = 0.0
    for turn in range(int(turns.item())):
        dist.barrier()
        if turn == mine:
            alone = matmul_flops(device)
            small = small_op_step_s(device)
    dist.barrier()
    return alone, small


def describe_event(event: dict[str, Any]) -> str:
    """Human words for a progress event, e.g. 'round 2, 1→3, 64 KiB'."""
    phase = event.get("phase", "starting")
    if phase == "pair":
        return f"round {event['round'] + 1}, rank {event['src']}→{event['dst']}, {event['size']} B"
    if phase == "pair-start":
        return f"round {event['round'] + 1}, starting rank {event['src']}→{event['dst']}"
    if phase in ("round", "round-done", "all-reduce-round", "all-reduce-round-done"):
        return f"{phase} {event['round'] + 1} of {event['rounds']}"
    if phase == "all-reduce":
        return (f"all-reduce round {event['round'] + 1}, ranks {event['src']}+{event['dst']}, "
                f"{event['size']} B")
    if phase == "all-reduce-start":
        return (f"all-reduce round {event['round'] + 1}, "
                f"starting ranks {event['src']}+{event['dst']}")
    if phase == "fsdp":
        return "the FSDP own-work probe"
    return str(phase)
