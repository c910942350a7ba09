"""HuggingFace transformers decoder models, built from a config with random weights.

    pdv profile model hf:llama --model-arg num_hidden_layers=4 -o llama.json
    pdv profile model hf:gpt2 --model-arg n_layer=4 -o gpt2.json
    pdv profile model hf:mixtral -o mixtral.json     # any decoder-only model_type

``hf:gpt2`` and ``hf:llama`` have their own builders. Any other transformers ``model_type``
(mistral, qwen2, mixtral, phi, gpt_neox, gpt_bigcode, olmo, granite, ...) is built with
AutoModelForCausalLM and cut as Llama is, its parts found by what they are rather than by
Llama's names: the base model's one list of ``num_hidden_layers`` blocks (``layers``, ``h``),
its input embedding, a learned position table (``wpe``, ``embed_positions``) if any, a shared
``rotary_emb`` if any, a final norm (``norm``, ``final_layernorm``, ``final_layer_norm``,
``ln_f``), and the output embedding. The cut is checked at build time: the layers in a row must
give the model's own logits on a short batch, else the family is refused (its forward does
work between those parts that the cut would drop: an embedding scale, a logit soft-cap, a
position offset, a mask the blocks need).

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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdv.errors import PdvError, first_line
from pdv.model_def import ModelDef

__all__ = ["gpt2", "llama", "decoder", "FAMILIES"]

FAMILIES = ("gpt2", "llama")
"""the families with their own builders; any other model_type goes through `decoder`"""

_TINY_ANY: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
"""CPU-sized defaults for any other family, each used where its config has the field."""

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


def _model_args(family: str, cls: type, kwargs: dict[str, Any], hint: str = "",
                extra: set[str] | None = None) -> tuple[dict[str, Any], int, set[str]]:
    """--model-arg split into the config's fields (and `extra` constructor arguments) and
    seq_len; the names accepted."""
    kwargs = dict(kwargs)
    seq_len = int(kwargs.pop("seq_len", 32))
    # a family's own field names, and the common names it maps to them (GPT-2's n_embd is
    # hidden_size)
    known = (set(cls().to_dict()) | set(getattr(cls, "attribute_map", {})) | {"head_dim"}
             | (extra or set()))
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise PdvError(f"hf:{family}: {', '.join(unknown)} is not a {cls.__name__} field "
                       f"(nor seq_len){hint}")
    return kwargs, seq_len, known


def _config(family: str, kwargs: dict[str, Any]) -> tuple[Any, int]:
    tf = _transformers()
    cls = {"gpt2": tf.GPT2Config, "llama": tf.LlamaConfig}[family]
    kwargs, seq_len, _ = _model_args(family, cls, kwargs,
                                     f"; e.g. {', '.join(sorted(_TINY[family]))}")
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
    return _llama_shaped("llama", tf.LlamaForCausalLM(config), config, seq_len)


_TP_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f")
"""what families call the norm after their last block"""
_POSITIONS = ("wpe", "embed_positions")
"""what families call a learned position table added to the token embedding"""


@dataclass(frozen=True)
class _Parts:
    """The pieces of a decoder-only causal LM that pdv's layers are made of."""

    tokens: nn.Module
    positions: nn.Embedding | None
    blocks_name: str
    blocks: nn.ModuleList
    rotary: nn.Module | None
    norm: nn.Module
    head: nn.Module


def _embedding(get: Callable[[], Any]) -> nn.Module | None:
    try:
        found = get()
    except Exception:  # a wrapper's get_input_embeddings may raise rather than return None
        return None
    return found if isinstance(found, nn.Module) else None


def _parts(family: str, model: nn.Module, config: Any) -> _Parts:
    """Found by what every decoder has, under whatever names: the base model's one list of
    num_hidden_layers blocks, its input embedding, a learned position table if any, a
    shared rotary module if any, a final norm, and the output embedding (the LM head)."""
    n = config.num_hidden_layers

    def block_lists(module: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(name, m) for name, m in module.named_children()
                if isinstance(m, nn.ModuleList) and len(m) == n]

    # the base model holds the blocks; where its prefix does not name it (Llama 4's text
    # model), the one module that does
    base = model.base_model
    if not block_lists(base):
        holders = [m for m in model.modules() if block_lists(m)]
        base = holders[0] if len(holders) == 1 else base
    lists = block_lists(base)
    norms = [getattr(base, a) for a in _NORMS if isinstance(getattr(base, a, None), nn.Module)]
    tokens, head = _embedding(model.get_input_embeddings), _embedding(model.get_output_embeddings)
    if len(lists) != 1 or len(norms) != 1 or tokens is None or head is None:
        raise PdvError(f"hf:{family}: {type(model).__name__} is not a decoder pdv can cut (one "
                       f"list of its {n} blocks, a final norm named {'/'.join(_NORMS)}, an input "
                       "and an output embedding); wrap it in a factory that returns an "
                       "nn.Sequential or a ModelDef")
    # a plain table read at 0..T-1; a subclass has a forward of its own (OPT's offset by 2),
    # which the cut would not reproduce
    positions = [getattr(base, a) for a in _POSITIONS
                 if type(getattr(base, a, None)) is nn.Embedding]
    return _Parts(tokens, positions[0] if positions else None, lists[0][0], lists[0][1],
                  getattr(base, "rotary_emb", None), norms[0], head)


def _llama_shaped(family: str, model: nn.Module, config: Any, seq_len: int) -> ModelDef:
    """embed, <blocks>.0..<blocks>.{n-1}, head of a decoder-only causal LM; TP where its
    blocks have Llama's projections (a mixture of experts' blocks do not)."""
    parts = _parts(family, model, config)
    n = config.num_hidden_layers
    rotary = parts.rotary
    layers: list[tuple[str, nn.Module]] = [("embed", _Embed(parts.tokens, parts.positions))]
    layers += [(f"{parts.blocks_name}.{i}", _Block(layer, copy.deepcopy(rotary)))
               for i, layer in enumerate(parts.blocks)]
    layers.append(("head", _Head(parts.norm, parts.head)))
    make_batch = _batches(config.vocab_size, seq_len)
    names = {name for name, _ in parts.blocks[0].named_modules()}
    if not (set(_TP_NAMES) <= names and all(
            hasattr(config, f) for f in ("num_key_value_heads", "intermediate_size"))):
        return ModelDef(layers=layers, make_batch=make_batch, loss_fn=_lm_loss)

    def is_block(index: int) -> bool:
        return 1 <= index <= n

    def tp_plan(index: int, layer: nn.Module) -> dict[str, Any]:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        if not is_block(index):
            return {}
        return {f"layer.{name}": RowwiseParallel() if name.endswith(("o_proj", "down_proj"))
                else ColwiseParallel() for name in _TP_NAMES}

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    block_cls = type(parts.blocks[0])

    def tp_shard(index: int, layer: nn.Module, k: int) -> nn.Module:
        if not is_block(index) or k == 1:
            return layer
        if k not in degrees:
            raise PdvError(f"hf:{family}: TP degree {k} does not divide the heads, key/value "
                           f"heads and intermediate size; use one of {list(degrees)}")
        local = copy.deepcopy(config)
        local.num_attention_heads = config.num_attention_heads // k
        local.num_key_value_heads = config.num_key_value_heads // k
        local.intermediate_size = config.intermediate_size // k
        local.head_dim = head_dim
        return _Block(block_cls(local, index - 1), copy.deepcopy(rotary))

    sizes = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    degrees = tuple(k for k in range(1, 9) if all(s % k == 0 for s in sizes))
    return ModelDef(layers=layers, make_batch=make_batch, loss_fn=_lm_loss, tp_plan=tp_plan,
                    tp_shard=tp_shard, tp_degrees=degrees)


def decoder(model_type: str, **kwargs: Any) -> ModelDef:
    """Any other transformers model_type whose causal LM is a decoder pdv can cut as Llama
    (`_parts`); refused unless the cut gives the model's own logits."""
    try:
        return _decoder(model_type, kwargs)
    except PdvError:
        raise
    except Exception as exc:  # a family's config or model raises what it likes
        raise PdvError(f"hf:{model_type}: pdv cannot build or cut it ({type(exc).__name__}: "
                       f"{first_line(exc)}); wrap it in a factory that returns an "
                       "nn.Sequential or a ModelDef") from None


def _decoder(model_type: str, kwargs: dict[str, Any]) -> ModelDef:
    tf = _transformers()
    try:
        cls = type(tf.AutoConfig.for_model(model_type))
    except (ValueError, KeyError):
        raise PdvError(f"hf:{model_type}: transformers {tf.__version__} has no model_type "
                       f"{model_type!r} (e.g. hf:llama, hf:mistral, hf:qwen2, hf:mixtral)"
                       ) from None
    kwargs, seq_len, known = _model_args(model_type, cls, kwargs, extra={"experts_implementation"})
    quiet = {k: 0.0 for k in known if k.endswith(("dropout", "pdrop", "jitter_noise"))}
    tiny = {k: v for k, v in _TINY_ANY.items() if k in known}
    # a family that names a field its own way maps the common name to it (n_embd, n_layer)
    for common, own in getattr(cls, "attribute_map", {}).items():
        if common in _TINY_ANY and own in known and own not in tiny:
            tiny[own] = _TINY_ANY[common]
    # A mixture of experts' default kernel (grouped_mm) takes bfloat16 only on a CPU, at some
    # sizes (Mixtral at hidden_size 128 in float32 failed); eager runs in every dtype and on
    # every device. --model-arg experts_implementation=grouped_mm picks the fused one.
    tiny["experts_implementation"] = "eager"
    try:
        config = cls(**{**tiny, **quiet, **kwargs})
        config._attn_implementation = "sdpa"
        model = tf.AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # a config's own checks raise what they like
        first = first_line(exc)
        given = kwargs or "pdv's small defaults"
        raise PdvError(f"hf:{model_type}: cannot build {cls.__name__} with {given} "
                       f"({type(exc).__name__}: {first}); set its sizes with --model-arg"
                       ) from None
    limit = getattr(config, "max_position_embeddings", seq_len)
    if not 1 <= seq_len <= limit:
        raise PdvError(f"hf:{model_type}: seq_len={seq_len} must be in 1..{limit} (the "
                       "config's position limit); raise it with --model-arg")
    built = _llama_shaped(model_type, model, config, seq_len)
    _check_cut(model_type, model, built)
    return built


def _check_cut(family: str, model: nn.Module, built: ModelDef) -> None:
    """The layers in a row give the model's own logits (eval mode, a short batch)."""
    if any(p.is_meta for p in model.parameters()):
        return  # built on meta (a quick check of the source, or --estimate): nothing to compare
    ids, _ = built.make_batch(2, torch.Generator().manual_seed(0))
    chain = built.sequential()
    modes = [m.training for m in (model, chain)]
    model.eval()
    chain.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            want = model(input_ids=ids).logits
            got = chain(ids)
    except Exception as exc:
        first = first_line(exc)
        raise PdvError(f"hf:{family}: {type(model).__name__} fails on a short batch, whole or "
                       f"cut ({type(exc).__name__}: {first}); set its sizes with --model-arg, or "
                       "wrap it in a factory that returns an nn.Sequential or a ModelDef"
                       ) from None
    finally:
        model.train(modes[0])
        chain.train(modes[1])
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        raise PdvError(
            f"hf:{family}: pdv's cut (input embedding, each block, final norm, LM head) does "
            f"not give {type(model).__name__}'s logits (largest difference {diff:.3g}): its "
            "forward does work between those parts that the cut would drop (an embedding "
            "scale, a logit soft-cap, per-layer masks); wrap it in a factory that returns an "
            "nn.Sequential or a ModelDef")
