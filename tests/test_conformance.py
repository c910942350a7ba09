"""Conformance: every sample model and every model source x plan shapes trains as one process.

Each model runs five plans on 4 CPU ranks -- pipeline only (1F1B), stages of different widths
(GPipe), pipeline x FSDP, TP (or replicas) with recompute, interleaved -- and its per-step losses
must equal a 1-rank run's within 1e-5 relative. All plans of all models share one torchrun
launch (tests/conformance_worker.py). The models include one whose layers hand on
non-contiguous views, one whose blocks take extra inputs as tuples, three whose embedding
is tied to the LM head across a stage boundary, one with two inputs whose boundaries carry
tokens flattened into dim 0 (a fixed multiple of the micro-batch), and an nn.Sequential that
holds one module at three places and writes into stage inputs in place, a sequence-first
model (the micro-batch in dim 1, samples strided in a time-major flatten), one that takes its
batch as a dict and whose layers hand on dicts with a nested state pair, a None and a float,
an nn.Sequential written for torch's convention (a child's tuple reaches the next child
whole), and three families through the generic hf: cut: Mixtral (a mixture of experts),
Gemma 2 (eager attention, sliding windows) and Mamba (a state-space model). Each model's
profile must
also add up: the sum of its layers' times within 15% of the whole model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pdv.run.reference import reference_losses
from tests.conftest import ROOT

pytest.importorskip("transformers")

STEPS, NMB, MBS = 3, 4, 4


@dataclass(frozen=True)
class Source:
    """A model as pdv names it, and what it supports."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    split_at: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    tp: bool = False
    lr: float = 1e-3
    profiled: dict[str, Any] = field(default_factory=dict)
    """kwargs of the profile check: layers of a millisecond or more, so the fixed cost of
    timing each layer on its own (tens of microseconds) stays inside the 15%"""
    profile_mbs: int = 16
    """micro-batch size of the profile check (for the same reason)"""

    def argv(self) -> list[str]:
        out = ["--model", self.spec]
        out += [f"--model-arg={k}={json.dumps(v)}" for k, v in self.kwargs.items()]
        for name in self.split_at:
            out += ["--split-at", name]
        for name in self.blocks:
            out += ["--blocks", name]
        return out


MODELS = {
    "mlp": Source("mlp", {"n_layer": 2}, tp=True, profiled={"dim": 512, "in_dim": 256},
                  profile_mbs=256),
    "convnet": Source("convnet", {"n_block": 2, "width": 8, "image_size": 16},
                      profiled={"width": 16, "image_size": 32}),
    "gpt_tiny": Source("gpt_tiny", {"n_layer": 2}, tp=True),
    # tied embedding = LM head (GPT-2's default) cut by every plan's first boundary; a large
    # learning rate so that untied copies would drift apart within the steps.
    "hf_gpt2": Source("hf:gpt2", {"n_layer": 2, "n_embd": 32, "seq_len": 16}, lr=0.05),
    "hf_llama": Source("hf:llama", {"num_hidden_layers": 2, "hidden_size": 32,
                                    "intermediate_size": 64, "seq_len": 16}, tp=True),
    # any Llama-shaped transformers family (pdv.adapters.hf.decoder): a mixture of experts
    "hf_mixtral": Source("hf:mixtral", {"num_hidden_layers": 2, "hidden_size": 32,
                                        "intermediate_size": 64, "seq_len": 16}),
    # eager attention (soft-capped), a sliding window shorter than the sequence on every
    # other layer: the mask is recomputed in each block, never carried
    "hf_gemma2": Source("hf:gemma2", {"num_hidden_layers": 2, "hidden_size": 32,
                                      "intermediate_size": 64, "sliding_window": 5,
                                      "seq_len": 16}, tp=True),
    # a state-space model: no attention, a selective scan in each block
    "hf_mamba": Source("hf:mamba", {"num_hidden_layers": 2, "hidden_size": 32, "seq_len": 16}),
    "sequential_views": Source("tests/models/seq_views.py:net", profile_mbs=512),
    "split_blocks": Source("tests/models/split_net.py:net", {"n_block": 2}, blocks=("layers",),
                           lr=0.05, profiled={"d": 256}),
    "tuples_tied": Source("tests/models/carry.py:carry", {"n_block": 2}, lr=0.05,
                          profiled={"d": 256}),
    # two inputs (ids, mask); a GRU, then tokens flattened into dim 0 (samples x tokens rows)
    "flat_tokens": Source("tests/models/flat_tokens.py:net", lr=0.05, profiled={"d": 128}),
    # one Linear at three depths (shared across stages and twice in one FSDP stage); stages
    # that start with a layer writing into its input in place
    "shared_in_place": Source("tests/models/shared_in_place.py:net", lr=0.05,
                              profiled={"d": 512}, profile_mbs=512),
    # torch's sequence-first layout: (tokens, batch, d) boundaries and an LSTM's (1, batch, h)
    # state, joined between the widths plan's stages; a time-major flatten (strided samples)
    "seq_first": Source("tests/models/seq_first.py:net", lr=0.05, profiled={"d": 256}),
    # a dict batch (ids, a mask, a setting), and every boundary a dict: hidden states, an
    # LSTM's (h, c) pair (micro-batch in dim 1), None and a float (only the tensors travel)
    "nested": Source("tests/models/nested.py:keyed", lr=0.05, profiled={"d": 256}),
    # written for torch's nn.Sequential: nn.LSTM and nn.GRU as children, whose tuples the next
    # child takes whole
    "torch_sequential": Source("tests/models/torch_seq.py:net", lr=0.05, profiled={"d": 256}),
}
"""Every model has at least 4 layers, so every plan below has at least one layer per stage."""


def _layers(source: Source) -> int:
    from pdv.models import build_model

    return len(build_model(source.spec, source.kwargs, split_at=source.split_at,
                           blocks=source.blocks).layers)


def _cuts(n: int, k: int) -> list[list[int]]:
    """k contiguous ranges over n layers, as even as they go."""
    edges = [round(i * n / k) for i in range(k + 1)]
    return [[edges[i], edges[i + 1]] for i in range(k)]


def plans(n: int, tp: bool) -> dict[str, tuple[list[dict[str, Any]], str]]:
    """The plan shapes every model runs, on 4 ranks."""
    four, two = _cuts(n, 4), _cuts(n, 2)
    width = "tp" if tp else "dp"
    return {
        "pipeline-1f1b": ([{"layers": r, "ranks": [i]} for i, r in enumerate(four)], "1F1B"),
        "widths-gpipe": ([{"layers": [0, two[0][1]], "ranks": [0, 1], "dp": 2},
                          {"layers": [two[0][1], four[3][0]], "ranks": [2]},
                          {"layers": four[3], "ranks": [3]}], "GPipe"),
        "fsdp-1f1b": ([{"layers": r, "ranks": [2 * i, 2 * i + 1], "dp": 2, "fsdp": True}
                       for i, r in enumerate(two)], "1F1B"),
        f"{width}-recompute-gpipe": ([{"layers": r, "ranks": [2 * i, 2 * i + 1], width: 2,
                                       "recompute": True} for i, r in enumerate(two)], "GPipe"),
        "interleaved": ([{"layers": r, "ranks": [0, 1] if i % 2 == 0 else [2, 3], "dp": 2}
                         for i, r in enumerate(four)], "Interleaved1F1B"),
    }


def _write_plan(path: Path, stages: list[dict[str, Any]], schedule: str) -> None:
    plan = {"schema": "pdv.plan/v1", "stages": stages, "micro_batch_size": MBS,
            "num_micro_batches": NMB, "global_batch_size": MBS * NMB, "schedule": schedule}
    path.write_text(json.dumps(plan))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], list[float]]:
    """Every (model, plan) trained in one torchrun launch: their reports' losses."""
    tmp = tmp_path_factory.mktemp("conformance")
    cases, reports = [], {}
    for model, source in MODELS.items():
        for name, (stages, schedule) in plans(_layers(source), source.tp).items():
            plan = tmp / f"{model}-{name}.json"
            _write_plan(plan, stages, schedule)
            report = tmp / f"{model}-{name}.report.json"
            cases.append([str(plan), "--steps", str(STEPS), "--lr", str(source.lr),
                          "--report", str(report), "--warmup", "0", *source.argv()])
            reports[(model, name)] = report
    listing = tmp / "cases.json"
    listing.write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(ROOT / "tests" / "conformance_worker.py"), str(listing)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return {key: json.loads(path.read_text())["loss"] for key, path in reports.items()}


def _reference(source: Source) -> list[float]:
    from pdv.models import build_model  # noqa: F401  (the reference builds its own)

    return reference_losses(source.spec, source.kwargs, steps=STEPS,
                            global_batch_size=MBS * NMB, num_micro_batches=NMB, lr=source.lr,
                            split_at=source.split_at, blocks=source.blocks)


CASES = [(m, p) for m, s in MODELS.items() for p in plans(4, s.tp)]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
def test_losses_equal_one_process(runs: dict[tuple[str, str], list[float]], model: str) -> None:
    want = _reference(MODELS[model])
    got = {plan: losses for (m, plan), losses in runs.items() if m == model}
    assert len(got) == 5
    for plan, losses in got.items():
        assert len(losses) == STEPS
        for step, (g, w) in enumerate(zip(losses, want, strict=True)):
            assert abs(g - w) <= 1e-5 * abs(w), f"{model} {plan} step {step}: {g} vs {w}"


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
def test_profile_layers_add_up_to_the_whole_model(model: str) -> None:
    """Within 15%, round by round. The profiler times every layer and then the whole model in
    each round, so a pair shares the machine's state of the moment: the median of the rounds'
    ratios is what a burst of other processes (which moves the medians of either side alone by
    more than 15% on a shared 2-core machine) does not move. Retaken at most 3 times; a
    systematic error fails every take."""
    import statistics

    import torch

    from pdv.boundaries import in_place_writers, probe
    from pdv.models import build_model
    from pdv.profile.layers import _measure_points

    torch.set_num_threads(1)
    source = MODELS[model]
    built = build_model(source.spec, {**source.kwargs, **source.profiled},
                        split_at=source.split_at, blocks=source.blocks)
    layers = [layer for _, layer in built.layers]
    writers = in_place_writers(probe(built))
    x, y = built.make_batch(source.profile_mbs, torch.Generator().manual_seed(0))
    for _ in range(3):
        mbs = source.profile_mbs
        by_size, whole = _measure_points(layers, built.loss_fn, {mbs: (x, y)},
                                         torch.device("cpu"), warmup=3, repeat=9, whole_at=mbs,
                                         ticks={mbs: lambda: None}, between=lambda: None,
                                         writers=writers)
        points = by_size[mbs]
        ratios = [sum(p.fwd[r] + p.bwd[r] for p in points) / (wf + wb)
                  for r, (wf, wb) in enumerate(whole)]
        ratio = statistics.median(ratios)
        if abs(ratio - 1) <= 0.15:
            break
    assert abs(ratio - 1) <= 0.15, f"layer sum / whole model, round by round: {ratios}"
