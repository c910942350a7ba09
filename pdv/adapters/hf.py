"""HuggingFace transformers decoder models, built from a config with random weights.

    pdv profile model hf:llama --model-arg num_hidden_layers=4 -o llama.json
    pdv profile model hf:gpt2 --model-arg n_layer=4 -o gpt2.json
    pdv profile model hf:mixtral -o mixtral.json     # any decoder-only model_type

``hf:gpt2`` and ``hf:llama`` have their own builders. Any other transformers ``model_type``
(mistral, qwen2, mixtral, phi, gpt_neox, gpt_bigcode, olmo, granite, ...) is built with
AutoModelForCausalLM and cut as Llama is, its parts found by what they are rather than by
Llama's names: the base model's one list of ``num_hidden_layers`` blocks (``layers``, ``h``),
its input embedding, a learned position table (``wpe``, ``embed_positions``; OPT's read at its
offset) if any, a shared ``rotary_emb`` if any, a final norm (``norm``, ``final_layernorm``,
``final_layer_norm``, ``ln_f``, ``norm_f``), and the output embedding, scaled (``logit_scale``)
and soft-capped (``final_logit_softcapping``) as the config says. Attention goes through SDPA,
or eager where the family refuses SDPA (Gemma 2's soft-capped attention; state-space and
hybrid models). The cut is checked at build time: the layers in a row must give the model's own
logits on a short batch, else the family is refused (its forward does work between those parts
that the cut would drop: an embedding scale, ALiBi biases, a mask the blocks need).

Nothing is downloaded: the model is built from a config object (``HF_HUB_OFFLINE=1`` is set
before transformers is imported), never ``from_pretrained``, and no tokenizer is used; batches
are random token ids. ``--model-arg`` sets any config field (``hidden_size=256``), plus
``seq_len`` (tokens per sample). The defaults are CPU-sized.

Layers: ``embed`` (token embedding; GPT-2 adds its learned positions), one layer per decoder
block (``layers.i`` / ``h.i``), and ``head`` (final norm + LM head). A decoder block takes more
than the hidden states -- position ids, rotary cos/sin tables (Llama), an attention mask -- and
pdv *recomputes* them in each block from the hidden states' shape rather than carrying them
over stage boundaries: positions are 0..T-1, Llama's rotary tables come from the block's own
copy of the rotary module (the block's layer type's table, where the family has sliding and
full layers), and the mask is causal (SDPA's ``is_causal``; no padding), spelled out as an
additive table for eager attention or a sliding window shorter than the sequence. So a
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
import inspect
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
    moe_intermediate_size=64, n_group=1, topk_group=1,
    # multi-head latent attention (DeepSeek V3): its rotary width is head_dim
    qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, kv_lora_rank=32, q_lora_rank=48,
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
    """Token ids (B, T) -> hidden states (B, T, d); GPT-2 adds its learned positions (OPT's
    table starts `offset` rows in)."""

    def __init__(self, tokens: nn.Module, positions: nn.Embedding | None,
                 offset: int = 0) -> None:
        super().__init__()
        self.tokens, self.positions, self.offset = tokens, positions, offset

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids)
        if self.positions is not None:
            at = torch.arange(ids.shape[1], device=ids.device) + self.offset
            # the table's own lookup: a subclass's forward takes a mask, not positions
            h = h + nn.Embedding.forward(self.positions, at)
        return h


@dataclass(frozen=True)
class _Attention:
    """How a block's attention is fed: SDPA takes no mask for plain causal attention (its
    is_causal); eager attention, or a sliding window shorter than the sequence, needs the
    mask as an additive (T, T) table. `kind` is the block's layer type where the family has
    several (Gemma's sliding and full layers each have their own rotary tables)."""

    sdpa: bool = True
    window: int | None = None
    kind: str | None = None

    def mask(self, h: torch.Tensor) -> torch.Tensor | None:
        """None where SDPA's is_causal does it, else the additive table."""
        if self.sdpa and (self.window is None or h.shape[1] <= self.window):
            return None
        return _causal_mask(h, self.window)


def _attention(config: Any, index: int, block: nn.Module) -> _Attention | None:
    """The block at `index`'s attention, as the family's config describes it; None for a
    block without one (a state-space model's, whose mask argument is a padding mask)."""
    if not any("attn" in name or "attention" in name for name, _ in block.named_modules()):
        return None
    kinds = getattr(config, "layer_types", None)
    kind = kinds[index] if isinstance(kinds, (list, tuple)) and index < len(kinds) else None
    window = getattr(config, "sliding_window", None)
    if kind is not None:
        window = window if kind == "sliding_attention" else None
    elif getattr(config, "use_sliding_window", True) is False:
        window = None
    return _Attention(getattr(config, "_attn_implementation", "sdpa") == "sdpa",
                      window if isinstance(window, int) else None, kind)


def _causal_mask(h: torch.Tensor, window: int | None) -> torch.Tensor:
    """(1, 1, T, T) additive mask: a query sees itself and earlier keys, within `window`."""
    t = h.shape[1]
    q = torch.arange(t, device=h.device).unsqueeze(1)
    k = torch.arange(t, device=h.device).unsqueeze(0)
    seen = k <= q
    if window is not None:
        seen = seen & (q - k < window)
    blocked = torch.full((), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device)
    return torch.where(seen, torch.zeros((), dtype=h.dtype, device=h.device), blocked)[None, None]


class _Block(nn.Module):
    """A decoder layer fed what the model's forward would give it, recomputed from the hidden
    states: positions 0..T-1, (Llama) rotary cos/sin, and a causal mask (None -> is_causal)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module | None,
                 attention: _Attention | None = _Attention()) -> None:
        super().__init__()
        self.layer, self.rotary, self.attention = layer, rotary, attention
        self._typed_rotary = rotary is not None and "layer_type" in inspect.signature(
            rotary.forward).parameters
        # an argument the block requires that its model passes as None in this configuration
        # (Falcon's alibi, when config.alibi is off); where the model passes more, the
        # logits check refuses the cut
        given = {"attention_mask", "position_ids", "position_embeddings"}
        params = list(inspect.signature(layer.forward).parameters.values())[1:]
        self._nones = [p.name for p in params
                       if p.default is inspect.Parameter.empty and p.name not in given
                       and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        how = self.attention
        extra: dict[str, Any] = {"attention_mask": None if how is None else how.mask(h),
                                 "position_ids": positions}
        if self.rotary is not None:
            extra["position_embeddings"] = (
                self.rotary(h, positions, how.kind if how else None) if self._typed_rotary
                else self.rotary(h, positions))
        extra.update(dict.fromkeys(self._nones))
        out = self.layer(h, **extra)
        return out[0] if isinstance(out, tuple) else out


class _Head(nn.Module):
    """Final norm and LM head: hidden (B, T, d) -> logits (B, T, vocab), scaled (Cohere) and
    soft-capped (Gemma 2) where the family's config says so."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, scale: float | None = None,
                 cap: float | None = None) -> None:
        super().__init__()
        self.norm, self.lm_head, self.scale, self.cap = norm, lm_head, scale, cap

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(h))
        if self.scale is not None:
            logits = logits * self.scale
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


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


_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")
"""what families call the norm after their last block"""
_POSITIONS = ("wpe", "embed_positions")
"""what families call a learned position table added to the token embedding"""


@dataclass(frozen=True)
class _Parts:
    """The pieces of a decoder-only causal LM that pdv's layers are made of."""

    tokens: nn.Module
    positions: nn.Embedding | None
    offset: int
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
    # a table read at 0..T-1, or `offset` rows in (OPT's); a subclass with another forward
    # of its own is left out, and the logits check refuses the cut
    tables = [(t, _offset(t)) for t in (getattr(base, a, None) for a in _POSITIONS)]
    table, offset = next(((t, o) for t, o in tables if o is not None), (None, 0))
    return _Parts(tokens, table, offset, lists[0][0], lists[0][1],
                  getattr(base, "rotary_emb", None), norms[0], head)


def _offset(table: Any) -> int | None:
    """Where a position table's row for position 0 is: 0 for a plain nn.Embedding, the
    subclass's integer `offset` (OPT's 2); None for anything else."""
    if type(table) is nn.Embedding:
        return 0
    offset = getattr(table, "offset", None)
    return offset if isinstance(table, nn.Embedding) and isinstance(offset, int) else None


def _number(config: Any, field: str) -> float | None:
    """A config's float setting, None where the family has none or leaves it unset."""
    value = getattr(config, field, None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _llama_shaped(family: str, model: nn.Module, config: Any, seq_len: int) -> ModelDef:
    """embed, <blocks>.0..<blocks>.{n-1}, head of a decoder-only causal LM; TP where its
    blocks have Llama's projections (a mixture of experts' blocks do not)."""
    parts = _parts(family, model, config)
    n = config.num_hidden_layers
    rotary = parts.rotary
    layers: list[tuple[str, nn.Module]] = [
        ("embed", _Embed(parts.tokens, parts.positions, parts.offset))]
    layers += [(f"{parts.blocks_name}.{i}",
                _Block(layer, copy.deepcopy(rotary), _attention(config, i, layer)))
               for i, layer in enumerate(parts.blocks)]
    layers.append(("head", _Head(parts.norm, parts.head, _number(config, "logit_scale"),
                                 _number(config, "final_logit_softcapping"))))
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
        block = block_cls(local, index - 1)
        return _Block(block, copy.deepcopy(rotary), _attention(config, index - 1, block))

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
    # a field the family derives from others (Falcon's head_dim) cannot be set
    tiny = {k: v for k, v in tiny.items() if _settable(cls, k)}
    fields = {**tiny, **quiet, **kwargs}
    if {"kv_lora_rank", "num_key_value_heads", "num_attention_heads"} <= set(fields) \
            and "num_key_value_heads" not in kwargs:
        # latent attention expands its keys to every head: no grouped heads to share
        fields["num_key_value_heads"] = fields.get("num_attention_heads")
    failed: Exception | None = None
    # SDPA first (no mask to carry); eager where the family refuses SDPA (Gemma 2's soft-capped
    # attention, state-space models with no attention at all)
    for attention in ("sdpa", "eager"):
        try:
            config = cls(**fields)
            _fit_rotary(config, kwargs)
            config._attn_implementation = attention
            model = tf.AutoModelForCausalLM.from_config(config)
            break
        except Exception as exc:  # a config's own checks raise what they like
            # the eager attempt's error is the one that says what else is wrong (reformer:
            # is_decoder); a family that refuses SDPA fails the first for that alone
            failed = exc
    else:
        assert failed is not None
        given = kwargs or "pdv's small defaults"
        raise PdvError(f"hf:{model_type}: cannot build {cls.__name__} with {given} "
                       f"({type(failed).__name__}: {first_line(failed)}); set its sizes with "
                       "--model-arg") from None
    limit = getattr(config, "max_position_embeddings", seq_len)
    if not 1 <= seq_len <= limit:
        raise PdvError(f"hf:{model_type}: seq_len={seq_len} must be in 1..{limit} (the "
                       "config's position limit); raise it with --model-arg")
    built = _llama_shaped(model_type, model, config, seq_len)
    _check_cut(model_type, model, built)
    return built


def _fit_rotary(config: Any, given: dict[str, Any]) -> None:
    """A rotary width the family set for its default heads (GPT-J's 64), cut to the heads
    pdv's sizes give, unless --model-arg set it."""
    width = getattr(config, "rotary_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if "rotary_dim" in given or not all(isinstance(v, int) for v in (width, heads, hidden)):
        return
    config.rotary_dim = min(width, hidden // heads)


def _settable(cls: type, field: str) -> bool:
    """Whether a config field can be given: not a property without a setter."""
    attr = inspect.getattr_static(cls, field, None)
    return not (isinstance(attr, property) and attr.fset is None)


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
            want = model(input_ids=ids, use_cache=False).logits
            got = chain(ids)
    except Exception as exc:
        first = first_line(exc)
        raise PdvError(f"hf:{family}: {type(model).__name__} fails on a short batch, whole or "
                       f"cut ({type(exc).__name__}: {first}){_passed_none(built)}; set its "
                       "sizes with --model-arg, or "
                       "wrap it in a factory that returns an nn.Sequential or a ModelDef"
                       ) from None
    finally:
        model.train(modes[0])
        chain.train(modes[1])
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        raise PdvError(
            f"hf:{family}: pdv's cut (input embedding, each block, final norm, LM head) does "
            f"not give {type(model).__name__}'s logits (largest difference {diff:.3g})"
            f"{_passed_none(built)}: its "
            "forward does work between those parts that the cut would drop (an embedding "
            "scale, a logit soft-cap, per-layer masks); wrap it in a factory that returns an "
            "nn.Sequential or a ModelDef")


def _passed_none(built: ModelDef) -> str:
    """What the cut handed the blocks as None that the model may compute (Bloom's alibi)."""
    names = sorted({n for _, layer in built.layers if isinstance(layer, _Block)
                    for n in layer._nones})
    return f" (pdv hands its blocks None for {', '.join(names)})" if names else ""
