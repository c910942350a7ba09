"""A GPT family (nanoGPT-shaped, pre-LN) from a CPU-sized toy up to GPT-3 175B, as pdv ModelDefs.

    pdv profile model gpt_tiny --device cpu -o p.json
    pdv profile model gpt3_175b --estimate -o gpt3.json

Layers are "embed" (token + position embedding), "block0".."block{n-1}" (causal self-attention
and a 4x MLP, each behind a LayerNorm and a residual), and "head" (final LayerNorm + LM head,
returning logits; the loss is cross entropy against the next tokens). Each layer's input is the
previous layer's output, so a pipeline stage is any contiguous range of them.

Tensor parallelism follows Megatron-LM (Shoeybi et al., 2019) as torchtitan writes it: q, k, v
and the MLP's first projection split by columns, the attention and MLP output projections by
rows. Attention reshapes with ``view(B, T, -1, head_dim)`` so it runs unchanged on the local
shard (n_head / k heads) that ColwiseParallel hands it.

The sizes from gpt_medium up are the GPT-3 paper's (Brown et al., 2020, table 2.1) with a
2048-token context; they are for planning with ``--estimate`` (build them on the meta device).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdv.errors import PdvError
from pdv.models import ModelDef

__all__ = [
    "GPTConfig",
    "Embed",
    "Block",
    "Head",
    "gpt",
    "gpt_tiny",
    "gpt_small",
    "gpt_medium",
    "gpt_1_3b",
    "gpt_6_7b",
    "gpt_13b",
    "gpt3_175b",
]


class Embed(nn.Module):
    """Token plus learned position embedding: ids (B, T) -> hidden (B, T, d)."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.tok(idx) + self.pos(positions)


class Attention(nn.Module):
    """Causal multi-head self-attention over n_head heads (the local heads under TP).

    fused: one scaled_dot_product_attention call (flash-style kernels where the device has
    them); otherwise the T x T scores are materialized, masked, softmaxed, dropped out and
    multiplied by v as separate ops, as Megatron-LM ran attention before flash kernels.
    """

    def __init__(self, d_model: int, n_head: int, head_dim: int, bias: bool,
                 fused: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        width = n_head * head_dim
        self.head_dim = head_dim
        self.fused, self.dropout = fused, dropout
        # Separate q, k, v (not one fused qkv) so a column split keeps whole heads of each.
        self.q = nn.Linear(d_model, width, bias=bias)
        self.k = nn.Linear(d_model, width, bias=bias)
        self.v = nn.Linear(d_model, width, bias=bias)
        self.proj = nn.Linear(width, d_model, bias=bias)

    def extra_repr(self) -> str:
        return f"fused={self.fused}, dropout={self.dropout}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads, not n_head: under TP each rank holds only its local heads.
        q = self.q(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            scores = torch.matmul(q * self.head_dim**-0.5, k.transpose(-2, -1))
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            probs = F.dropout(F.softmax(scores.masked_fill(future, float("-inf")), dim=-1), p,
                              self.training)
            y = torch.matmul(probs, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """fc (d -> hidden), GELU, proj (hidden -> d)."""

    def __init__(self, d_model: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(x)) (dropout on each branch)."""

    def __init__(self, d_model: int, n_head: int, head_dim: int, mlp_hidden: int,
                 bias: bool = True, fused: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_head, head_dim, bias, fused, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_hidden, bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout
        x = x + F.dropout(self.attn(self.ln1(x)), p, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), p, self.training)


class Head(nn.Module):
    """Final LayerNorm and the LM head: hidden (B, T, d) -> logits (B, T, vocab)."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln(x))


class GPTConfig:
    """The sizes of one GPT; validated once so every factory fails the same way."""

    def __init__(self, n_layer: int, n_head: int, d_model: int, seq_len: int, vocab_size: int,
                 mlp_ratio: int = 4, bias: bool = True, fused_attention: bool = True,
                 dropout: float = 0.0) -> None:
        if min(n_layer, n_head, d_model, seq_len, vocab_size, mlp_ratio) < 1:
            raise PdvError("every GPT size must be >= 1")
        if d_model % n_head:
            raise PdvError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_layer, self.n_head, self.d_model = n_layer, n_head, d_model
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.head_dim = d_model // n_head
        self.mlp_hidden = mlp_ratio * d_model
        self.bias = bias
        if not 0.0 <= dropout < 1.0:
            raise PdvError(f"dropout={dropout}: must be in [0, 1)")
        self.fused_attention, self.dropout = fused_attention, dropout

    def block(self, k: int = 1) -> Block:
        """A block with the local shard shapes of TP degree k (k = 1: the whole block)."""
        return Block(self.d_model, self.n_head // k, self.head_dim, self.mlp_hidden // k,
                     self.bias, self.fused_attention, self.dropout)


def _init(module: nn.Module) -> None:
    # nanoGPT's init (GPT-2): N(0, 0.02) weights, zero biases. A no-op cost on the meta device.
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)


def gpt(n_layer: int = 4, n_head: int = 4, d_model: int = 64, seq_len: int = 32,
        vocab_size: int = 512, mlp_ratio: int = 4, bias: bool = True,
        shard_head: bool = False, fused_attention: bool = True,
        dropout: float = 0.0) -> ModelDef:
    """A GPT of the given sizes as a ModelDef (embed, block0..block{n-1}, head).

    fused_attention=False materializes the attention scores (Megatron-LM's attention before
    flash kernels); dropout applies to the attention probabilities and both residual branches.

    shard_head: TP also splits the LM head by vocabulary columns (its logits gathered for the
    loss), as Megatron-LM's vocab-parallel head splits that GEMM; by default the head runs
    whole on every TP shard.
    """
    cfg = GPTConfig(n_layer, n_head, d_model, seq_len, vocab_size, mlp_ratio, bias,
                    fused_attention, dropout)
    layers: list[tuple[str, nn.Module]] = [("embed", Embed(vocab_size, seq_len, d_model))]
    layers += [(f"block{i}", cfg.block()) for i in range(n_layer)]
    layers.append(("head", Head(d_model, vocab_size)))
    for _, layer in layers:
        _init(layer)

    def is_block(index: int) -> bool:
        return 1 <= index <= n_layer

    def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # One extra token so targets are the inputs shifted by one (next-token prediction).
        tokens = torch.randint(vocab_size, (mbs, seq_len + 1), generator=gen, device="cpu")
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def tp_plan(index: int, layer: nn.Module) -> dict[str, Any]:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        if shard_head and index == n_layer + 1:
            from torch.distributed.tensor import Replicate

            return {"lm_head": ColwiseParallel(output_layouts=Replicate())}
        if not is_block(index):
            return {}
        return {
            "attn.q": ColwiseParallel(),
            "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(),
            "mlp.fc": ColwiseParallel(),
            "mlp.proj": RowwiseParallel(),
        }

    def tp_shard(index: int, layer: nn.Module, k: int) -> nn.Module:
        if k == 1 or not (is_block(index) or (shard_head and index == n_layer + 1)):
            return layer
        if k not in degrees:
            raise PdvError(f"TP degree {k} does not divide n_head={n_head} and 4d={cfg.mlp_hidden}"
                           + (f" and vocab_size={vocab_size}" if shard_head else ""))
        shard = cfg.block(k) if is_block(index) else Head(d_model, vocab_size // k)
        _init(shard)
        return shard

    degrees = tuple(k for k in range(1, 9) if n_head % k == 0 and cfg.mlp_hidden % k == 0
                    and (not shard_head or vocab_size % k == 0))
    return ModelDef(layers=layers, make_batch=make_batch, loss_fn=loss_fn, tp_plan=tp_plan,
                    tp_shard=tp_shard, tp_degrees=degrees)


# Named sizes. Every keyword can be overridden (--model-arg seq_len=64).
_CONFIGS: dict[str, dict[str, int]] = {
    # Fwd+bwd on one CPU core in well under a second.
    "tiny": dict(n_layer=4, n_head=4, d_model=64, seq_len=32, vocab_size=512),
    # GPT-2 small's width and depth, but a short context and a small vocabulary so CPU ranks
    # train it in seconds per step.
    "small": dict(n_layer=12, n_head=12, d_model=768, seq_len=128, vocab_size=8192),
    # GPT-3 paper sizes (Medium 350M, XL 1.3B, 6.7B, 13B, 175B), context 2048, GPT-2 BPE vocab.
    "medium": dict(n_layer=24, n_head=16, d_model=1024, seq_len=2048, vocab_size=50257),
    "1_3b": dict(n_layer=24, n_head=16, d_model=2048, seq_len=2048, vocab_size=50257),
    "6_7b": dict(n_layer=32, n_head=32, d_model=4096, seq_len=2048, vocab_size=50257),
    # The paper lists d_model 5140; 5120 (= 40 heads x 128) is what implementations use.
    "13b": dict(n_layer=40, n_head=40, d_model=5120, seq_len=2048, vocab_size=50257),
    "175b": dict(n_layer=96, n_head=96, d_model=12288, seq_len=2048, vocab_size=50257),
}


def gpt_tiny(**overrides: Any) -> ModelDef:
    """4 layers, d 64, 4 heads, context 32, vocab 512: a test-sized GPT."""
    return gpt(**{**_CONFIGS["tiny"], **overrides})


def gpt_small(**overrides: Any) -> ModelDef:
    """GPT-2 small width (12 layers, d 768, 12 heads), context 128, vocab 8192 (~100M params)."""
    return gpt(**{**_CONFIGS["small"], **overrides})


def gpt_medium(**overrides: Any) -> ModelDef:
    """GPT-3 Medium (350M): 24 layers, d 1024, 16 heads, context 2048."""
    return gpt(**{**_CONFIGS["medium"], **overrides})


def gpt_1_3b(**overrides: Any) -> ModelDef:
    """GPT-3 XL (1.3B): 24 layers, d 2048, context 2048 (16 heads of 128 so TP 8 divides them)."""
    return gpt(**{**_CONFIGS["1_3b"], **overrides})


def gpt_6_7b(**overrides: Any) -> ModelDef:
    """GPT-3 6.7B: 32 layers, d 4096, 32 heads, context 2048."""
    return gpt(**{**_CONFIGS["6_7b"], **overrides})


def gpt_13b(**overrides: Any) -> ModelDef:
    """GPT-3 13B: 40 layers, d 5120, 40 heads, context 2048."""
    return gpt(**{**_CONFIGS["13b"], **overrides})


def gpt3_175b(**overrides: Any) -> ModelDef:
    """GPT-3 175B: 96 layers, d 12288, 96 heads, context 2048, vocab 50257 (build on meta)."""
    return gpt(**{**_CONFIGS["175b"], **overrides})
