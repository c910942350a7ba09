"""HuggingFace transformers decoder models, built from a config with random weights.

    pdv profile model hf:llama --model-arg num_hidden_layers=4 -o llama.json
    pdv profile model hf:gpt2 --model-arg n_layer=4 -o gpt2.json

Nothing is downloaded: the model is built from a config object (``HF_HUB_OFFLINE=1`` is set
before transformers is imported), never ``from_pretrained``, and no tokenizer is used; batches
are random token ids. ``--model-arg`` sets any config field (``hidden_size=256``), plus
``seq_len`` (tokens per sample). The defaults are CPU-sized.

Layers: ``embed`` (token embedding; GPT-2 adds its learned positions), one layer per decoder
block (``layers.i`` / ``h.i``), and ``head`` (final norm + LM head). A decoder block takes more
than the hidden states -- position ids, rotary cos/sin tables (Llama), an attention mask -- and
pdv *recomputes* them in each block from the hidden states' shape rather than carrying them
over stage boundaries: positions are 0..T-1, Llama's rotary tables come from the block's own
copy of the rotary module, and the mask is causal (SDPA's ``is_causal``; no padding). So a
boundary carries one (B, T, d) tensor, the same bytes the planner priced.

Weights stay tied as the config says (GPT-2 ties the LM head to the token embedding by
default; Llama when ``tie_word_embeddings=true``): the tied parameter is one object in one
process, and ``pdv run`` keeps the copies of stages on different ranks equal (see
:mod:`pdv.run.tied`).

Tensor parallelism for Llama is torchtitan's plan for its blocks: q/k/v and gate/up split by
columns, o and down by rows (``ColwiseParallel`` / ``RowwiseParallel``); embedding and head
stay replicated. GPT-2 has no TP plan: its attention is one fused ``Conv1D`` (q, k and v in
one weight, stored transposed), which DTensor's parallel styles do not split by heads.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdv.errors import PdvError
from pdv.model_def import ModelDef

__all__ = ["gpt2", "llama", "FAMILIES"]

FAMILIES = ("gpt2", "llama")

_TINY: dict[str, dict[str, Any]] = {
    "gpt2": dict(vocab_size=512, n_positions=64, n_embd=64, n_layer=4, n_head=4),
    "llama": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
}
"""CPU-sized defaults; every key can be overridden with --model-arg."""

_NO_DROPOUT = {
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(attention_dropout=0.0),
}
"""Dropout off: a pipelined run draws its random numbers in another order than one process."""


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise PdvError("hf: models need transformers; install pdv with the hf extra: "
                       "pip install -e '.[hf]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def _config(family: str, kwargs: dict[str, Any]) -> tuple[Any, int]:
    tf = _transformers()
    cls = {"gpt2": tf.GPT2Config, "llama": tf.LlamaConfig}[family]
    kwargs = dict(kwargs)
    seq_len = int(kwargs.pop("seq_len", 32))
    known = set(cls().to_dict()) | {"head_dim"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise PdvError(f"hf:{family}: {', '.join(unknown)} is not a {cls.__name__} field "
                       f"(nor seq_len); e.g. {', '.join(sorted(_TINY[family]))}")
    fields = {**_TINY[family], **_NO_DROPOUT[family], **kwargs}
    try:
        config = cls(**fields)
    except (ValueError, TypeError) as exc:
        raise PdvError(f"hf:{family}: bad config {kwargs}: {exc}") from None
    config._attn_implementation = "sdpa"  # causal through is_causal: no mask to carry
    limit = config.n_positions if family == "gpt2" else config.max_position_embeddings
    if not 1 <= seq_len <= limit:
        raise PdvError(f"hf:{family}: seq_len={seq_len} must be in 1..{limit} (the config's "
                       "position limit); raise it with --model-arg")
    return config, seq_len


class _Embed(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, d); GPT-2 adds its learned positions."""

    def __init__(self, tokens: nn.Embedding, positions: nn.Embedding | None) -> None:
        super().__init__()
        self.tokens, self.positions = tokens, positions

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids)
        if self.positions is not None:
            h = h + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return h


class _Block(nn.Module):
    """A decoder layer fed what the model's forward would give it, recomputed from the hidden
    states: positions 0..T-1, (Llama) rotary cos/sin, and a causal mask (None -> is_causal)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module | None) -> None:
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        extra: dict[str, Any] = {"attention_mask": None, "position_ids": positions}
        if self.rotary is not None:
            extra["position_embeddings"] = self.rotary(h, positions)
        out = self.layer(h, **extra)
        return out[0] if isinstance(out, tuple) else out


class _Head(nn.Module):
    """Final norm and LM head: hidden (B, T, d) -> logits (B, T, vocab)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


def _batches(vocab: int, seq_len: int) -> Callable[[int, torch.Generator],
                                                  tuple[torch.Tensor, torch.Tensor]]:
    def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(vocab, (mbs, seq_len + 1), generator=gen, device="cpu")
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    return make_batch


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def gpt2(**kwargs: Any) -> ModelDef:
    """GPT-2 (GPT2LMHeadModel from a GPT2Config): embed, h.0..h.{n-1}, head (LM head tied to
    the token embedding unless tie_word_embeddings=false)."""
    tf = _transformers()
    config, seq_len = _config("gpt2", kwargs)
    model = tf.GPT2LMHeadModel(config)
    body = model.transformer
    layers: list[tuple[str, nn.Module]] = [("embed", _Embed(body.wte, body.wpe))]
    layers += [(f"h.{i}", _Block(block, None)) for i, block in enumerate(body.h)]
    layers.append(("head", _Head(body.ln_f, model.lm_head)))
    return ModelDef(layers=layers, make_batch=_batches(config.vocab_size, seq_len),
                    loss_fn=_lm_loss)


def llama(**kwargs: Any) -> ModelDef:
    """Llama (LlamaForCausalLM from a LlamaConfig): embed, layers.0..layers.{n-1}, head; TP
    on the blocks as torchtitan's plan (q/k/v, gate/up by columns; o, down by rows)."""
    tf = _transformers()
    config, seq_len = _config("llama", kwargs)
    model = tf.LlamaForCausalLM(config)
    body = model.model
    n = config.num_hidden_layers
    layers: list[tuple[str, nn.Module]] = [("embed", _Embed(body.embed_tokens, None))]
    layers += [(f"layers.{i}", _Block(layer, copy.deepcopy(body.rotary_emb)))
               for i, layer in enumerate(body.layers)]
    layers.append(("head", _Head(body.norm, model.lm_head)))

    def is_block(index: int) -> bool:
        return 1 <= index <= n

    def tp_plan(index: int, layer: nn.Module) -> dict[str, Any]:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        if not is_block(index):
            return {}
        return {
            "layer.self_attn.q_proj": ColwiseParallel(),
            "layer.self_attn.k_proj": ColwiseParallel(),
            "layer.self_attn.v_proj": ColwiseParallel(),
            "layer.self_attn.o_proj": RowwiseParallel(),
            "layer.mlp.gate_proj": ColwiseParallel(),
            "layer.mlp.up_proj": ColwiseParallel(),
            "layer.mlp.down_proj": RowwiseParallel(),
        }

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def tp_shard(index: int, layer: nn.Module, k: int) -> nn.Module:
        if not is_block(index) or k == 1:
            return layer
        if k not in degrees:
            raise PdvError(f"hf:llama: TP degree {k} does not divide the heads, key/value "
                           f"heads and intermediate size; use one of {list(degrees)}")
        local = copy.deepcopy(config)
        local.num_attention_heads = config.num_attention_heads // k
        local.num_key_value_heads = config.num_key_value_heads // k
        local.intermediate_size = config.intermediate_size // k
        local.head_dim = head_dim
        return _Block(tf.models.llama.modeling_llama.LlamaDecoderLayer(local, index - 1),
                      copy.deepcopy(body.rotary_emb))

    sizes = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    degrees = tuple(k for k in range(1, 9) if all(s % k == 0 for s in sizes))
    return ModelDef(layers=layers, make_batch=_batches(config.vocab_size, seq_len),
                    loss_fn=_lm_loss, tp_plan=tp_plan, tp_shard=tp_shard, tp_degrees=degrees)
