"""Attention, Annotated: a complete transformer in one file, to be read from top to bottom.

Vaswani et al., "Attention Is All You Need" (2017, arXiv:1706.03762), plus the three changes almost every
model made since: pre-norm residual blocks, rotary positions (Su et al. 2021, arXiv:2104.09864) and gated
feed-forward layers (Shazeer 2020, arXiv:2002.05202). The walk-through with the math beside the code is
``docs/transformer.md``; the comments cite its numbered equations as ``# eq. (N)``.

Reading order (each part uses only what came before it):

1. ``scaled_dot_product_attention``  the whole idea in ten lines, an explicit path and PyTorch's fused one
2. ``KVCache``                       keys and values kept between decoding steps
3. ``MultiHeadAttention``            projections, heads, masks, cache, rotary hook
4. Positions: ``SinusoidalPositionalEncoding`` (the paper's, default), ``LearnedPositionalEmbedding``,
   ``RotaryEmbedding``
5. ``FeedForward`` (ReLU, GELU exact or tanh, SwiGLU), ``MoEFeedForward`` (a mixture of experts in its place),
   ``RMSNorm``, ``make_norm``; pre-norm or post-norm residuals
6. Blocks: ``EncoderBlock``, ``DecoderBlock`` (masked self-attention + cross-attention), ``DecoderOnlyBlock``
7. Models: ``Transformer`` (decoder-only language model with ``generate``; ``Transformer.from_gpt2`` loads
   a Hugging Face GPT-2 checkpoint into it), ``EncoderDecoderTransformer`` (the paper's translation model
   with ``greedy_decode``), ``EncoderTransformer`` (BERT-style, MLM head); all three share saving,
   loading, parameter counting, the mixture-of-experts loss and gradient checkpointing
8. A demo under ``if __name__ == "__main__"``: train a small model to reverse digit strings, then generate.

Conventions (the project's DESIGN.md): tensors are batch-first ``(B, T, E)``; inside attention they are
``(B, H, T, Dh)``. A boolean ``mask`` means True = *may attend*, broadcastable to ``(B, H, Tq, Tk)``, the
convention of ``torch.nn.functional.scaled_dot_product_attention``; ``key_padding_mask`` (B, Tk) marks the
real tokens with True; ``is_causal=True`` adds the causal mask; the three combine by AND. A query whose
keys are all masked gets a zero output, never NaN.

Only ``torch`` and the standard library are imported, so the file can be copied into any project.
"""

import json
import math
import os
import tempfile
import time
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# 1. Scaled dot-product attention
# ---------------------------------------------------------------------------------------------------------
#
# Every query asks "which keys are relevant to me?" by a dot product with each key; a softmax turns the
# scores into weights that sum to one; the output is the weighted average of the values. Dividing by
# sqrt(Dh) keeps the scores' variance near one whatever the head width, so the softmax does not saturate
# into a one-hot and starve the gradients (the paper's footnote 4).


def _check_mask(mask: Tensor, expected: Tuple[int, int, int, int], name: str = "mask") -> None:
    """Refuse a mask that is not bool or that would only fit ``expected`` by an accidental broadcast."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a torch.bool tensor (True = may attend), got {got}; "
                        f"convert a 0/1 mask with {name}.bool()")
    B, H, Tq, Tk = expected
    # Only 2-D (Tq, Tk) or 4-D masks: a 3-D mask is ambiguous between (B, Tq, Tk) and (H, Tq, Tk), and a
    # 2-D (B, Tk) padding mask cannot be told from (Tq, Tk) when B == Tq: padding has its own argument.
    if mask.dim() == 2:
        fits = mask.shape[0] in (1, Tq) and mask.shape[1] in (1, Tk)
    elif mask.dim() == 4:
        fits = all(got in (1, want) for got, want in zip(mask.shape, expected))
    else:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}, expected (Tq, Tk) = ({Tq}, {Tk}) or a 4-D shape broadcastable "
            f"to (B, H, Tq, Tk) = {tuple(expected)} (each dimension 1 or equal); for padding pass "
            f"key_padding_mask of shape (B, Tk) = ({B}, {Tk}) instead"
        )


def _check_key_padding_mask(key_padding_mask: Tensor, B: int, Tk: int) -> None:
    """Refuse a key padding mask that is not a (B, Tk) bool tensor, True = a real token."""
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
        raise TypeError(f"key_padding_mask must be a torch.bool tensor (True = a real token that may be "
                        f"attended), got {got}; build it as (ids != pad_id)")
    if tuple(key_padding_mask.shape) != (B, Tk):
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected (B, Tk) = ({B}, {Tk})")


def _check_dropout(dropout: float, name: str = "dropout") -> None:
    """Raise unless ``dropout`` is a probability in [0, 1) (1 would drop everything)."""
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {dropout!r}")


def _causal_mask(Tq: int, Tk: int, device: torch.device) -> Tensor:
    """True where query i may see key j: j <= i + (Tk - Tq), i.e. aligned to the bottom-right corner.

    With a KV cache the Tq new queries are the *last* Tq of Tk positions, so query i sits at absolute
    position i + (Tk - Tq); for Tq == Tk this is the usual lower triangle.
    """
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)  # (Tq, Tk)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    need_weights: bool = False,
    fused: Optional[bool] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """softmax(Q Kᵀ / sqrt(Dh) with masked scores at -inf) V, eqs. (1)-(3).

    query (B, H, Tq, Dh), key (B, H, Tk, Dh), value (B, H, Tk, Dv) -> (B, H, Tq, Dv);
    with ``need_weights=True`` -> (output, weights (B, H, Tq, Tk)), weights taken before dropout.

    ``mask``: bool, True = may attend, (Tq, Tk) or broadcastable 4-D such as (B, 1, Tq, Tk).
    ``key_padding_mask``: bool (B, Tk), True = a real token (``ids != pad_id``).
    ``is_causal``: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned, what a KV cache needs).
    The three combine by logical AND.
    ``fused``: None picks the fused kernel ``F.scaled_dot_product_attention`` unless weights are wanted
    (the kernel never materialises them); False forces the explicit path; True with need_weights is an error.
    A query row with every key masked returns zeros on both paths.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape (B, H, T, Dh) (4 dims), got {got}")
    B, H, Tq, Dh = query.shape
    Tk = key.shape[-2]
    if key.shape[:2] != (B, H) or value.shape[:2] != (B, H):
        raise ValueError(
            f"query, key and value must share (B, H): query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}"
        )
    if key.shape[-1] != Dh:
        raise ValueError(f"key has head dim {key.shape[-1]}, expected the query's {Dh} (key {tuple(key.shape)})")
    if value.shape[-2] != Tk:
        raise ValueError(f"value has {value.shape[-2]} positions, expected the key's {Tk} (value {tuple(value.shape)})")
    if mask is not None:
        _check_mask(mask, (B, H, Tq, Tk))
    _check_dropout(dropout_p, "dropout_p")
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, B, Tk)
        padding = key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk): the same real keys for every head and query
        mask = padding if mask is None else mask & padding  # (B, .., .., Tk)
    if fused is None:
        fused = not need_weights
    elif fused and need_weights:
        raise ValueError("need_weights=True needs the explicit path (fused=False or None): the fused kernel returns no weights")
    if scale is None:
        scale = 1.0 / math.sqrt(Dh)

    # Fold is_causal into the mask, unless the fused kernel can build the triangle itself (Tq == Tk, no
    # other mask: it then never allocates a (T, T) tensor at all) or the triangle masks nothing (Tq == 1:
    # a single new query may see every cached key).
    kernel_causal = False
    if is_causal:
        if fused and mask is None and Tq == Tk:
            kernel_causal = True
        elif not (mask is None and Tq == 1):
            causal = _causal_mask(Tq, Tk, query.device)  # (Tq, Tk)
            mask = causal if mask is None else mask & causal  # (.., Tq, Tk)

    # A row with no visible key has softmax 0/0 = NaN, and that NaN would also poison the gradients of
    # every key through the backward pass. So let such rows see every key (a well-defined softmax) and
    # zero their output afterwards: same answer as "attend to nothing", no NaN forwards or backwards.
    row_ok = None
    if mask is not None:
        row_ok = mask.any(dim=-1, keepdim=True)  # (.., Tq, 1)
        mask = mask | ~row_ok  # (.., Tq, Tk)

    if fused:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=kernel_causal, scale=scale
        )  # (B, H, Tq, Dv)
        if row_ok is not None:
            out = out.masked_fill(~row_ok, 0.0)
        return out

    scores = (query @ key.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)  eq. (1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # eq. (2)
    # Softmax in at least float32 even under bf16/fp16: exp() of low-precision scores loses the small weights.
    acc = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.softmax(scores, dim=-1, dtype=acc).to(query.dtype)  # (B, H, Tq, Tk)  eq. (3)
    if row_ok is not None:
        weights = weights.masked_fill(~row_ok, 0.0)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    out = dropped @ value  # (B, H, Tq, Dv)  eq. (3)
    return (out, weights) if need_weights else out


# ---------------------------------------------------------------------------------------------------------
# 2. The key/value cache
# ---------------------------------------------------------------------------------------------------------
#
# A causal model's keys and values at position t depend only on tokens <= t, so once computed they never
# change. Generating token t+1 therefore needs the projections of only the newest token; the older keys
# and values are read from this cache. That turns each step from O(T) projections into O(1), while the
# attention itself still reads all T keys.


class KVCache:
    """The keys and values one attention layer has seen so far, in a buffer allocated once.

    ``update(key, value)`` appends (B, H, T_new, D) tensors and returns views of everything cached so
    far, (B, H, length, D). The buffer holds ``max_seq_len`` positions; writing past it is an error (the
    model crops its context and refills the cache instead, see ``Transformer.generate``).
    """

    def __init__(self, max_seq_len: int):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.key: Optional[Tensor] = None
        self.value: Optional[Tensor] = None
        self.length = 0

    def reset(self) -> None:
        """Forget the cached positions but keep the buffers for reuse."""
        self.length = 0

    def update(self, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor]:
        B, H, T, Dk = key.shape
        fits = (
            self.key is not None
            and self.key.shape[:2] == (B, H)
            and self.key.shape[-1] == Dk
            and self.value.shape[-1] == value.shape[-1]
            and self.key.dtype == key.dtype
            and self.key.device == key.device
        )
        if not fits:
            if self.length > 0:
                raise ValueError(
                    f"key {tuple(key.shape)} does not match the cached keys {tuple(self.key.shape)}; reset() the cache first"
                )
            # Allocate once: appending with torch.cat would copy the whole cache at every step.
            self.key = key.new_empty(B, H, self.max_seq_len, Dk)  # (B, H, L, Dk)
            self.value = value.new_empty(B, H, self.max_seq_len, value.shape[-1])  # (B, H, L, Dv)
        end = self.length + T
        if end > self.max_seq_len:
            raise ValueError(
                f"the cache holds at most max_seq_len={self.max_seq_len} positions; it has {self.length} "
                f"and key brings {T} more"
            )
        self.key[:, :, self.length:end] = key
        self.value[:, :, self.length:end] = value
        self.length = end
        return self.key[:, :, :end], self.value[:, :, :end]  # (B, H, length, Dk), (B, H, length, Dv)


# ---------------------------------------------------------------------------------------------------------
# 3. Multi-head attention
# ---------------------------------------------------------------------------------------------------------
#
# One attention head can only form one weighted average per query. Splitting the model width E into H
# heads of width Dh = E / H, each with its own projections, lets a token gather several different things
# at once (the previous word, the subject of the verb, ...) for the cost of one big attention: eq. (4).


class MultiHeadAttention(nn.Module):
    """Multi-head attention, eq. (4); the same parameters and answer as ``nn.MultiheadAttention(batch_first=True)``.

    Projections, and why two layouts:

    * ``kdim == vdim == d_model`` (the usual case): one fused ``in_proj`` Linear (3E x E, rows ordered
      query, key, value, the layout of ``nn.MultiheadAttention.in_proj_weight``). For self-attention it is
      a single matmul producing Q, K and V together, the fastest thing to do on every device. For
      cross-attention (key is not query) the same weight is sliced: rows [0, E) project the query and rows
      [E, 3E) project key and value, in one matmul when key is value.
    * ``kdim`` or ``vdim`` differ from ``d_model``: the three inputs have different widths, so there are
      separate ``q_proj``, ``k_proj`` and ``v_proj`` Linears.

    ``forward(query (B, Tq, E), key=None, value=None, ...)``: ``key=None`` means self-attention
    (key = value = query). ``mask`` is bool, True = may attend, (Tq, Tk) or broadcastable 4-D such as
    (B, 1, Tq, Tk); ``key_padding_mask`` is bool (B, Tk), True = a real token; ``is_causal`` adds the
    bottom-right aligned causal mask; the three combine by AND. With a cache, Tk counts the cached keys
    too. ``cache`` (a ``KVCache``) appends this call's keys and values and attends over all
    cached ones; ``rotary`` (a ``RotaryEmbedding``) rotates queries and keys by their ``positions`` (an
    int offset or a (Tq,) tensor; default: the cache length, else 0). Returns (B, Tq, E), or
    (output, weights (B, H, Tq, Tk)) with ``need_weights=True``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("num_heads", num_heads),
                            ("kdim", d_model if kdim is None else kdim), ("vdim", d_model if vdim is None else vdim)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}; "
                             f"choose d_model as a multiple of num_heads")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.kdim = kdim if kdim is not None else d_model
        self.vdim = vdim if vdim is not None else d_model
        self.fused_projection = self.kdim == d_model and self.vdim == d_model
        if self.fused_projection:
            self.in_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
            projections = [self.in_proj]
        else:
            self.q_proj = nn.Linear(d_model, d_model, bias=bias)
            self.k_proj = nn.Linear(self.kdim, d_model, bias=bias)
            self.v_proj = nn.Linear(self.vdim, d_model, bias=bias)
            projections = [self.q_proj, self.k_proj, self.v_proj]
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # Same initialisation as nn.MultiheadAttention: Glorot-uniform projections and zero biases.
        for layer in projections:
            nn.init.xavier_uniform_(layer.weight)
        for layer in projections + [self.out_proj]:
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        need_weights: bool = False,
        cache: Optional[KVCache] = None,
        rotary: Optional["RotaryEmbedding"] = None,
        positions: Union[int, Tensor, None] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if key is None:
            key = query
        if value is None:
            value = key
        for name, t, width, width_name in (("query", query, self.d_model, "d_model"), ("key", key, self.kdim, "kdim"),
                                           ("value", value, self.vdim, "vdim")):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != width:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have shape (B, T, {width_name}) = (B, T, {width}), got {got}")
        B, Tq, E = query.shape
        if key.shape[0] != B or value.shape[0] != B:
            raise ValueError(
                f"query, key and value must have the same batch size: query {tuple(query.shape)}, "
                f"key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        if key.shape[1] != value.shape[1]:
            raise ValueError(f"key and value must have the same length: key {tuple(key.shape)}, value {tuple(value.shape)}")
        # Check the masks before the cache is touched: a refused call must leave the cache as it was.
        Tk = key.shape[1] + (cache.length if cache is not None else 0)  # keys attended: cached + new
        if mask is not None:
            _check_mask(mask, (B, self.num_heads, Tq, Tk))
        if key_padding_mask is not None:
            _check_key_padding_mask(key_padding_mask, B, Tk)

        if self.fused_projection and key is query and value is query:
            # Self-attention: one matmul for Q, K and V. The view splits the 3E outputs into
            # (which of q/k/v, head, channel), matching the row order of in_proj_weight.
            qkv = self.in_proj(query)  # (B, T, 3E)
            qkv = qkv.view(B, Tq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
            q, k, v = qkv.unbind(0)  # 3 x (B, H, T, Dh), views: no copy
        elif self.fused_projection:
            w, b = self.in_proj.weight, self.in_proj.bias
            q = self._split_heads(F.linear(query, w[:E], None if b is None else b[:E]))  # (B, H, Tq, Dh)
            if key is value:
                kv = F.linear(key, w[E:], None if b is None else b[E:])  # (B, Tk, 2E)
                kv = kv.view(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, H, Tk, Dh)
                k, v = kv.unbind(0)  # 2 x (B, H, Tk, Dh)
            else:
                k = self._split_heads(F.linear(key, w[E:2 * E], None if b is None else b[E:2 * E]))  # (B, H, Tk, Dh)
                v = self._split_heads(F.linear(value, w[2 * E:], None if b is None else b[2 * E:]))  # (B, H, Tk, Dh)
        else:
            q = self._split_heads(self.q_proj(query))  # (B, H, Tq, Dh)
            k = self._split_heads(self.k_proj(key))  # (B, H, Tk, Dh)
            v = self._split_heads(self.v_proj(value))  # (B, H, Tk, Dh)

        if positions is None:
            positions = cache.length if cache is not None else 0
        if rotary is not None:
            # Rotate before caching: a cached key then already carries its own position, and only the
            # new query needs rotating at each step.
            q = rotary(q, positions)  # (B, H, Tq, Dh)
            k = rotary(k, positions)  # (B, H, Tk, Dh)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H, cached + Tk, Dh)

        dropout_p = self.dropout if self.training else 0.0
        out = scaled_dot_product_attention(
            q, k, v, mask=mask, key_padding_mask=key_padding_mask, is_causal=is_causal, dropout_p=dropout_p,
            need_weights=need_weights,
        )
        weights = None
        if need_weights:
            out, weights = out
        # Heads side by side again. On the fused path the kernel already lays its output out as
        # (B, T, H, Dh) in memory, so this reshape is free; the explicit path pays one copy.
        out = out.transpose(1, 2).reshape(B, Tq, E)  # (B, Tq, E)
        out = self.out_proj(out)  # (B, Tq, E)  eq. (4)
        return (out, weights) if need_weights else out


# ---------------------------------------------------------------------------------------------------------
# 4. Positions
# ---------------------------------------------------------------------------------------------------------
#
# Attention is a weighted *set* average: permute the tokens and every output is permuted the same way.
# Word order must therefore be written into the inputs. Three ways, all selectable by `position=`:
# add a fixed signal (sinusoidal), add a learned vector per position, or rotate queries and keys by an
# angle proportional to their position (rotary), which makes every score depend on relative distance.


class SinusoidalPositionalEncoding(nn.Module):
    """The paper's fixed positions, eq. (5): sines and cosines of geometrically spaced wavelengths.

    ``forward(x (B, T, E), offset=0)`` adds the codes of positions offset .. offset + T - 1. Because
    sin(a + b) is a linear function of sin(a) and cos(a), a fixed offset is a fixed linear map of the
    code, which attention can learn to use for "k tokens back".
    """

    def __init__(self, d_model: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        # Computed in float64, stored in float32: a float32 angle p * omega at p = 1000 is off by ~1e-4.
        position = torch.arange(max_seq_len, dtype=torch.float64).unsqueeze(1)  # (L, 1)
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(base) / d_model))  # (E/2,)
        table = torch.zeros(max_seq_len, d_model, dtype=torch.float64)  # (L, E)
        table[:, 0::2] = torch.sin(position * inv_freq)  # eq. (5)
        table[:, 1::2] = torch.cos(position * inv_freq)[:, : d_model // 2]  # eq. (5)
        # A buffer, not a parameter: it moves with .to(device) and is computed once, not per step.
        # Not persistent: it is a function of the config, so checkpoints need not carry it.
        self.register_buffer("table", table.float(), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        return x + self.table[offset: offset + x.shape[1]].to(x.dtype)  # (B, T, E)


class LearnedPositionalEmbedding(nn.Module):
    """One trainable vector per position (GPT, BERT). Cannot extrapolate past ``max_seq_len``."""

    def __init__(self, d_model: int, max_seq_len: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_seq_len, d_model))  # (L, E), unit scale like the tokens

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        return x + self.weight[offset: offset + x.shape[1]].to(x.dtype)  # (B, T, E)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), eqs. (6)-(7).

    Each pair of channels of a query or key at position m is rotated by the angle m * theta_i. The dot
    product of two rotated vectors depends only on the difference of their angles, so the attention
    score between positions m and n sees only m - n (eq. (7)): relative positions, for free.

    We pair channel i with channel i + Dh/2 (rotate the two halves) rather than 2i with 2i+1: it is the
    same rotation up to a fixed permutation of channels, which the learned projections absorb, and it
    needs no interleaving reshape.

    ``forward(x (B, H, T, Dh), positions)``: ``positions`` is an int offset (positions offset ..
    offset + T - 1) or a (T,) long tensor.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary positions need an even head_dim, got head_dim={head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        # Angles in float64, tables stored in float32 (as for the sinusoidal table).
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (Dh/2,)  theta_i
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (L, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, Dh): channel i and i + Dh/2 share an angle
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, positions: Union[int, Tensor] = 0) -> Tensor:
        T = x.shape[-2]
        if isinstance(positions, int):
            if positions < 0 or positions + T > self.max_seq_len:
                raise ValueError(
                    f"positions {positions}..{positions + T - 1} outside the table of max_seq_len={self.max_seq_len}"
                )
            cos, sin = self.cos[positions: positions + T], self.sin[positions: positions + T]  # (T, Dh)
        else:
            cos, sin = self.cos[positions], self.sin[positions]  # (T, Dh)
        x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, H, T, Dh/2)
        rotated_half = torch.cat((-x2, x1), dim=-1)  # (B, H, T, Dh): each pair turned by 90 degrees
        return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)  # (B, H, T, Dh)  eq. (6)


# ---------------------------------------------------------------------------------------------------------
# 5. Feed-forward, normalisation, residual wiring
# ---------------------------------------------------------------------------------------------------------
#
# Attention mixes information *between* positions; the feed-forward layer then processes each position
# on its own, with a wide hidden layer (typically 4E) where most of the parameters, and most of the
# "knowledge" of a trained model, live.


class FeedForward(nn.Module):
    """Position-wise feed-forward: ReLU (the paper's, eq. (8)), GELU, or SwiGLU (eq. (9)).

    ``activation``: ``"relu"``; ``"gelu"`` (exact, with erf, as BERT and ``nn.GELU()``); ``"gelu_tanh"``
    (the tanh approximation GPT-2 was trained with, Hugging Face's ``"gelu_new"``); ``"swiglu"``.

    SwiGLU multiplies a SiLU-gated projection with a second projection; ``linear1`` produces both at
    once (2 * ff_dim outputs), so at equal ``ff_dim`` it has 1.5x the parameters of the others (LLaMA
    shrinks ff_dim by 2/3 to compensate; we leave that choice to the caller).
    """

    def __init__(self, d_model: int, ff_dim: int, dropout: float = 0.0, activation: str = "relu", bias: bool = True):
        super().__init__()
        if activation not in ("relu", "gelu", "gelu_tanh", "swiglu"):
            raise ValueError(f"activation must be 'relu', 'gelu', 'gelu_tanh' or 'swiglu', got {activation!r}")
        self.activation = activation
        hidden_out = 2 * ff_dim if activation == "swiglu" else ff_dim
        self.linear1 = nn.Linear(d_model, hidden_out, bias=bias)
        self.linear2 = nn.Linear(ff_dim, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x)  # (B, T, F) or (B, T, 2F)
        if self.activation == "relu":
            h = F.relu(h)  # eq. (8)
        elif self.activation == "gelu":
            h = F.gelu(h)  # eq. (8) with GELU in place of max(0, .)
        elif self.activation == "gelu_tanh":
            # GPT-2's approximation 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))); differs from the exact
            # GELU by up to 5e-4, enough to break equality with a published GPT-2's logits.
            h = F.gelu(h, approximate="tanh")
        else:
            gate, up = h.chunk(2, dim=-1)  # 2 x (B, T, F)
            h = F.silu(gate) * up  # (B, T, F)  eq. (9)
        return self.linear2(self.dropout(h))  # (B, T, E)


class MoEFeedForward(nn.Module):
    """A mixture of experts in place of the feed-forward layer, eqs. (10)-(12).

    Switch Transformer (Fedus, Zoph & Shazeer 2021, arXiv:2101.03961), with top-k routing (Shazeer et al.
    2017, arXiv:1701.06538). ``num_experts`` feed-forward layers of width ``ff_dim`` (each a
    ``FeedForward``, so every activation works) and a router, a bias-free Linear E -> num_experts. Each
    token goes to the ``top_k`` experts of highest router probability; its output is their outputs
    weighted by those probabilities renormalised to sum to one (eqs. (10)-(11)). Parameters grow with
    ``num_experts``, the work per token only with ``top_k``: at ``top_k * ff_dim`` equal to a dense layer's
    width, the two do the same work per token.

    After each call ``aux_loss`` holds the load-balancing loss of eq. (12) for that call's tokens (a scalar
    on the autograd graph); the models add it to their loss. Without it the router tends to collapse onto
    the few experts that happened to learn first, and the others never train.

    Capacity is unbounded: a token is processed by all its top_k experts however many other tokens chose
    them. Switch Transformer caps the tokens per expert (the capacity factor) and drops the overflow, so
    that tensor shapes stay fixed when experts live on different devices; that cap would make a token's
    output depend on the rest of its batch. On one device there is no need for it, and without it the
    layer is a function of each token alone, equal to the per-token sum of eq. (11)
    (tests/test_transformer_moe.py).
    """

    def __init__(self, d_model: int, ff_dim: int, num_experts: int = 4, top_k: int = 2, dropout: float = 0.0,
                 activation: str = "relu", bias: bool = True):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("top_k", top_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} must not exceed num_experts={num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(d_model, ff_dim, dropout, activation, bias) for _ in range(num_experts))
        self.aux_loss: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        E = x.shape[-1]
        tokens = x.reshape(-1, E)  # (N, E): routing is per token, N = B * T
        # The router's softmax in at least float32: in bf16 two close probabilities could swap places.
        logits = self.router(tokens)  # (N, X)
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # (N, X)  eq. (10)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (N, k), (N, k): the chosen experts, best first
        gates = top_p / top_p.sum(dim=-1, keepdim=True)  # (N, k)  eq. (10), renormalised over the chosen k

        # Each expert runs once, on just the tokens that chose it (a gather), and adds its weighted output
        # back at their rows (a scatter-add). Work per token: top_k experts, not num_experts.
        out = torch.zeros_like(tokens)  # (N, E)
        for e, expert in enumerate(self.experts):
            token, slot = (top_i == e).nonzero(as_tuple=True)  # (n_e,), (n_e,): who chose e, in which place
            y = expert(tokens[token]) * gates[token, slot, None]  # (n_e, E)  eq. (11)
            out = out.index_add(0, token, y.to(out.dtype))  # (N, E)  eq. (11)

        # eq. (12): f = share of the N * k (token, expert) assignments each expert received, P = mean router
        # probability per expert. f is a count (no gradient); P carries the gradient to the router.
        f = F.one_hot(top_i, self.num_experts).sum(dim=(0, 1)).to(probs.dtype) / top_i.numel()  # (X,)
        P = probs.mean(dim=0)  # (X,)
        self.aux_loss = self.num_experts * (f * P).sum()  # eq. (12)
        return out.view(x.shape)  # (B, T, E)

    def __getstate__(self):
        # aux_loss belongs to one forward pass and its autograd graph, which cannot be copied: a copy of the
        # layer (copy.deepcopy, e.g. for an averaged model) or a pickle of it starts without one.
        return {**self.__dict__, "aux_loss": None}


def make_feed_forward(ff: str, d_model: int, ff_dim: int, dropout: float = 0.0, activation: str = "relu",
                      bias: bool = True, num_experts: int = 4, top_k: int = 2) -> nn.Module:
    """``"dense"``: one ``FeedForward`` (eqs. (8)-(9)); ``"moe"``: a ``MoEFeedForward`` (eqs. (10)-(12))."""
    if ff == "dense":
        return FeedForward(d_model, ff_dim, dropout=dropout, activation=activation, bias=bias)
    if ff == "moe":
        return MoEFeedForward(d_model, ff_dim, num_experts, top_k, dropout=dropout, activation=activation, bias=bias)
    raise ValueError(f"ff must be 'dense' or 'moe', got {ff!r}")


class RMSNorm(nn.Module):
    """Root-mean-square normalisation, eq. (13): LayerNorm without the mean subtraction and the bias.

    Re-centring turned out to matter little; dropping it saves a reduction and keeps the same training
    stability (Zhang & Sennrich 2019, arXiv:1910.07467).
    """

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))  # (E,): gain only, no bias

    def forward(self, x: Tensor) -> Tensor:
        # In (at least) float32 even under bf16: a mean of squares of many low-precision numbers loses digits.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # eq. (13)
        return (normed * self.weight).to(x.dtype)


def make_norm(norm: str, d_model: int, bias: bool = True) -> nn.Module:
    """``"layernorm"`` (eq. (14), eps 1e-5 as in nn.Transformer) or ``"rmsnorm"`` (eq. (13))."""
    if norm == "layernorm":
        return nn.LayerNorm(d_model, eps=1e-5, bias=bias)
    if norm == "rmsnorm":
        return RMSNorm(d_model, eps=1e-5)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {norm!r}")


# Where the norm goes, eq. (15). The paper normalises *after* adding the residual (post-norm):
#     x = Norm(x + Sublayer(x)).
# Pre-norm normalises only the sublayer's input:
#     x = x + Sublayer(Norm(x)),
# which leaves an un-normalised identity path from the embeddings to the output. Gradients then reach the
# early layers undiminished, so deep pre-norm stacks train without the careful learning-rate warm-up that
# post-norm needs; the price is one extra norm at the end of the stack (our models have it either way,
# as nn.Transformer does).


# ---------------------------------------------------------------------------------------------------------
# 6. Blocks
# ---------------------------------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """Self-attention then feed-forward, each wrapped in a residual with a norm (eq. (15)).

    With ``norm_first=False, activation="relu", norm="layernorm"`` it computes exactly what
    ``nn.TransformerEncoderLayer(batch_first=True)`` computes (same sublayer order and dropouts).
    ``forward(x (B, T, E), mask=None, is_causal=False, need_weights=False, cache=None, rotary=None,
    positions=None)`` -> (B, T, E), or (x, weights (B, H, T, T)) with ``need_weights``.
    ``ff="moe"`` puts a ``MoEFeedForward`` of ``num_experts`` experts, ``top_k`` per token, in place of
    the feed-forward layer (``make_feed_forward``).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ff_dim: int,
        dropout: float = 0.0,
        *,
        norm: str = "layernorm",
        norm_first: bool = True,
        activation: str = "gelu",
        bias: bool = True,
        ff: str = "dense",
        num_experts: int = 4,
        top_k: int = 2,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout, bias=bias)
        self.ff = make_feed_forward(ff, d_model, ff_dim, dropout, activation, bias, num_experts, top_k)
        self.norm1 = make_norm(norm, d_model, bias)
        self.norm2 = make_norm(norm, d_model, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        is_causal: bool = False,
        need_weights: bool = False,
        cache: Optional[KVCache] = None,
        rotary: Optional[RotaryEmbedding] = None,
        positions: Union[int, Tensor, None] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        def attend(h):
            return self.self_attn(h, mask=mask, is_causal=is_causal, need_weights=need_weights,
                                  cache=cache, rotary=rotary, positions=positions)

        weights = None
        if self.norm_first:  # eq. (15), pre-norm
            a = attend(self.norm1(x))
            if need_weights:
                a, weights = a
            x = x + self.dropout1(a)  # (B, T, E)
            x = x + self.dropout2(self.ff(self.norm2(x)))  # (B, T, E)
        else:  # eq. (15), post-norm
            a = attend(x)
            if need_weights:
                a, weights = a
            x = self.norm1(x + self.dropout1(a))  # (B, T, E)
            x = self.norm2(x + self.dropout2(self.ff(x)))  # (B, T, E)
        return (x, weights) if need_weights else x


class DecoderOnlyBlock(EncoderBlock):
    """The GPT block: an encoder block whose self-attention is causal by default.

    A decoder-only model has no source sentence, so there is no cross-attention; what makes it a
    "decoder" is only that position t cannot see positions after t. Same parameters, same code path.
    """

    def forward(self, x, mask=None, is_causal=True, need_weights=False, cache=None, rotary=None, positions=None):
        return super().forward(x, mask=mask, is_causal=is_causal, need_weights=need_weights,
                               cache=cache, rotary=rotary, positions=positions)


class DecoderBlock(nn.Module):
    """The paper's decoder block: causal self-attention, cross-attention to the encoder, feed-forward.

    Cross-attention is where translation happens: each target position queries the encoder's output
    (``memory``) for the source words it needs. With post-norm ReLU LayerNorm it equals
    ``nn.TransformerDecoderLayer(batch_first=True)``.

    ``forward(x (B, T, E), memory (B, S, E), self_mask=None, memory_mask=None, is_causal=True,
    need_weights=False, cache=None, rotary=None, positions=None)`` -> (B, T, E), or
    (x, self_weights (B, H, T, T), cross_weights (B, H, T, S)). ``cache`` serves the self-attention;
    rotary positions apply to self-attention only (source and target positions are not comparable).
    ``ff``, ``num_experts``, ``top_k``: the feed-forward layer, as for ``EncoderBlock``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ff_dim: int,
        dropout: float = 0.0,
        *,
        norm: str = "layernorm",
        norm_first: bool = True,
        activation: str = "gelu",
        bias: bool = True,
        ff: str = "dense",
        num_experts: int = 4,
        top_k: int = 2,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout, bias=bias)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout, bias=bias)
        self.ff = make_feed_forward(ff, d_model, ff_dim, dropout, activation, bias, num_experts, top_k)
        self.norm1 = make_norm(norm, d_model, bias)
        self.norm2 = make_norm(norm, d_model, bias)
        self.norm3 = make_norm(norm, d_model, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        self_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        is_causal: bool = True,
        need_weights: bool = False,
        cache: Optional[KVCache] = None,
        rotary: Optional[RotaryEmbedding] = None,
        positions: Union[int, Tensor, None] = None,
    ):
        def self_attend(h):
            return self.self_attn(h, mask=self_mask, is_causal=is_causal, need_weights=need_weights,
                                  cache=cache, rotary=rotary, positions=positions)

        def cross_attend(h):
            return self.cross_attn(h, memory, memory, mask=memory_mask, need_weights=need_weights)

        sw = cw = None
        if self.norm_first:  # eq. (15), pre-norm
            a = self_attend(self.norm1(x))
            if need_weights:
                a, sw = a
            x = x + self.dropout1(a)  # (B, T, E)
            c = cross_attend(self.norm2(x))
            if need_weights:
                c, cw = c
            x = x + self.dropout2(c)  # (B, T, E)
            x = x + self.dropout3(self.ff(self.norm3(x)))  # (B, T, E)
        else:  # eq. (15), post-norm
            a = self_attend(x)
            if need_weights:
                a, sw = a
            x = self.norm1(x + self.dropout1(a))  # (B, T, E)
            c = cross_attend(x)
            if need_weights:
                c, cw = c
            x = self.norm2(x + self.dropout2(c))  # (B, T, E)
            x = self.norm3(x + self.dropout3(self.ff(x)))  # (B, T, E)
        return (x, sw, cw) if need_weights else x


# ---------------------------------------------------------------------------------------------------------
# 7. Models
# ---------------------------------------------------------------------------------------------------------
#
# Shared plumbing first: checking token ids, embedding them (eq. (16)), and saving / loading with the
# config beside the weights.


def _check_ids(ids, name: str, vocab_size: int, max_len: Optional[int] = None, offset: int = 0) -> None:
    """Cheap checks on a (B, T) batch of token ids.

    The range check runs only for CPU tensors, and not under torch.compile or torch.export: reading a CUDA
    tensor's min/max into Python would force the host to wait for the GPU at every step. On CUDA an out-of-range id is caught by the embedding's own
    device-side assert instead (a less friendly message, but no stall).
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.long tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.long, torch.int32):
        raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(ids.shape)}; for one sequence use ids.unsqueeze(0)")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one token per row, got shape {tuple(ids.shape)}")
    if max_len is not None and offset + ids.shape[1] > max_len:
        raise ValueError(
            f"{name} has length {ids.shape[1]}"
            + (f" after {offset} cached positions" if offset else "")
            + f", longer than max_seq_length={max_len}"
        )
    # Not while torch.compile or torch.export traces the model: a value read into Python cannot be traced.
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(ids)  # one pass over the ids
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]")


def _position_modules(position: str, embed_dim: int, num_heads: int, max_len: int):
    """(additive position module or None, RotaryEmbedding or None) for ``position``."""
    if position == "sinusoidal":
        return SinusoidalPositionalEncoding(embed_dim, max_len), None
    if position == "learned":
        return LearnedPositionalEmbedding(embed_dim, max_len), None
    if position == "rotary":
        return None, RotaryEmbedding(embed_dim // num_heads, max_len)
    raise ValueError(f"position must be 'sinusoidal', 'learned' or 'rotary', got {position!r}")


def _check_dims(embed_dim: int, num_heads: int, dropout: float, **positive) -> None:
    for name, value in dict(embed_dim=embed_dim, num_heads=num_heads, **positive).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, num_heads={num_heads}")
    _check_dropout(dropout)


def _init_arguments(init_locals: dict) -> dict:
    """A model's constructor arguments, read from ``locals()`` at the top of its ``__init__``.

    Taking them from the signature rather than listing them by hand means a new option can never be
    left out of the saved config (and so silently reset on ``load``).
    """
    return {name: value for name, value in init_locals.items() if name not in ("self", "__class__")}


class _SavableModel(nn.Module):
    """Config, parameter count, embedding, checkpoint code and two training switches shared by the three models.

    The switches are attributes, not constructor arguments: they change how the model trains, not what it
    computes, so they are not part of the config and a checkpoint does not carry them.

    * ``gradient_checkpointing`` (default False): when True, each block runs under
      ``torch.utils.checkpoint`` while training. Backpropagation needs every intermediate tensor of the
      forward pass; normally all of them are kept, for every block at once. With checkpointing a block
      keeps only its input and runs its forward pass a second time during the backward pass to rebuild
      the rest: peak memory falls from all blocks' activations to one block's (plus each block's input),
      for the price of one more forward pass (about a third more compute). The random state is saved and
      restored around the recomputation, so dropout draws the same masks and the gradients are those of
      the plain run (tests/test_gradient_checkpointing.py).
    * ``moe_loss_weight`` (default 0.01, Switch Transformer's alpha): the weight of the load-balancing
      loss that models with ``ff="moe"`` add to the training loss, eq. (12).
    """

    _config: dict
    gradient_checkpointing: bool = False
    moe_loss_weight: float = 0.01

    @property
    def config(self) -> dict:
        """The constructor's arguments: ``type(model)(**model.config)`` builds the same architecture."""
        return dict(self._config)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; a tied embedding / output matrix is counted once (``parameters()`` dedups)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _run_layer(self, layer: nn.Module, *args, **kwargs):
        """``layer(*args, **kwargs)``, under gradient checkpointing when it is on and this call trains.

        Not when weights or a cache are asked for: those are inference, with nothing to backpropagate.
        ``use_reentrant=False`` is the implementation PyTorch recommends: it handles keyword arguments
        and inputs that do not require gradients, and it checks that the recomputation matches.
        """
        if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                and not kwargs.get("need_weights") and kwargs.get("cache") is None):
            return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)

    def moe_aux_loss(self) -> Optional[Tensor]:
        """The load-balancing loss of eq. (12), averaged over the MoE layers, for the last forward pass.

        None for a model without ``ff="moe"``. Averaged rather than summed, so that its minimum, 1, does not
        grow with the number of layers and one ``moe_loss_weight`` suits every depth.
        """
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoEFeedForward) and m.aux_loss is not None]
        return torch.stack(losses).mean() if losses else None

    def _with_moe_loss(self, loss: Tensor) -> Tensor:
        aux = self.moe_aux_loss()
        return loss if aux is None else loss + self.moe_loss_weight * aux.to(loss.dtype)  # eq. (12)

    def _embed(self, ids: Tensor, table: nn.Embedding, offset: int = 0) -> Tensor:
        # eq. (16): scale the embedding by sqrt(E). Embeddings start with std E^-1/2 (so that the tied
        # output layer starts with logits of unit scale, eq. (17)); times sqrt(E) they have unit scale,
        # the same as the positional codes they are added to. GPT-2 and BERT do not scale
        # (scale_embeddings=False, _emb_scale = 1).
        x = table(ids) * self._emb_scale  # (B, T, E)
        if self.pos is not None:
            x = self.pos(x, offset)  # (B, T, E)
        return self.drop(x)

    def save(self, path: Union[str, os.PathLike], extra: Optional[dict] = None) -> None:
        """Write class name, config and weights to ``path`` atomically: a crash mid-write never leaves a torn file.

        The file is a dict ``{"class": "Transformer", "config": {...}, "state_dict": {...}, "extra": extra}``.
        ``extra`` is the place for a training script's own state (optimizer and scheduler state dicts,
        step, RNG states, its arguments): anything ``torch.load(weights_only=True)`` reads back, i.e.
        tensors, numbers, strings, None, and lists, tuples and dicts of them. ``load`` ignores it unless
        asked (``return_extra=True``).
        """
        path = os.fspath(path)
        payload = {"class": type(self).__name__, "config": self.config, "state_dict": self.state_dict(),
                   "extra": extra}
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location=None, *, return_extra: bool = False):
        """Rebuild a model saved by ``save``; the model comes back in **eval mode** (dropout off).

        Call ``model.train()`` to go on training. With ``return_extra=True`` returns ``(model, extra)``,
        ``extra`` as given to ``save`` (None if none was). ``weights_only=True``: the file is data, never
        code to run. A file in any other layout (a bare state dict, or an example's checkpoint from before
        the examples saved through ``save``) is refused with a ``ValueError`` that says what it holds.
        """
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or not {"class", "config", "state_dict"} <= payload.keys():
            if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
                what = "a bare state dict"
                hint = f"build the model with its constructor and call load_state_dict(torch.load({os.fspath(path)!r}))"
            else:
                keys = sorted(map(str, payload.keys())) if isinstance(payload, dict) else type(payload).__name__
                what = f"a checkpoint in another format (keys {keys})"
                hint = ("an example's checkpoint from before they saved through Transformer.save cannot be opened "
                        "here: re-run the example, or rebuild the model from its config and load its 'model' state dict")
            raise ValueError(f"{os.fspath(path)!r} holds {what}, not one written by {cls.__name__}.save "
                             f"(a dict with 'class', 'config' and 'state_dict'); {hint}")
        if payload["class"] != cls.__name__:
            raise ValueError(f"{os.fspath(path)!r} holds a {payload['class']!r} checkpoint, not a {cls.__name__}; "
                             f"open it with {payload['class']}.load")
        model = cls(**payload["config"])
        model.load_state_dict(payload["state_dict"])
        model.eval()
        return (model, payload.get("extra")) if return_extra else model


def _init_embedding(table: nn.Embedding, embed_dim: int) -> None:
    nn.init.normal_(table.weight, mean=0.0, std=embed_dim ** -0.5)


class Transformer(_SavableModel):
    """Decoder-only language model (GPT-style): predicts token t+1 from tokens 0..t.

    ``Transformer(vocab_size, embed_dim, num_heads, num_layers, ff_dim, max_seq_length, dropout=0.1)`` is the
    seed project's published constructor and still works unchanged. Options, by keyword:
    ``position`` ("sinusoidal" default, "learned", "rotary"), ``norm`` ("layernorm", "rmsnorm"),
    ``norm_first`` (True: pre-norm), ``activation`` ("gelu", "gelu_tanh", "relu", "swiglu"),
    ``tie_weights`` (True: the output layer reuses the embedding matrix, eq. (17)), ``bias``,
    ``scale_embeddings`` (True: multiply the token embeddings by sqrt(E), eq. (16)), ``ff`` ("dense", or
    "moe": a mixture of ``num_experts`` experts of width ``ff_dim``, ``top_k`` of them per token, eqs.
    (10)-(12)). Training switches (attributes, see ``_SavableModel``): ``gradient_checkpointing``,
    ``moe_loss_weight``.

    GPT-2 is ``position="learned", norm="layernorm", norm_first=True, activation="gelu_tanh",
    tie_weights=True, bias=True, scale_embeddings=False`` with ``ff_dim = 4 * embed_dim``;
    ``Transformer.from_gpt2(folder)`` builds it that way and loads a Hugging Face GPT-2 checkpoint.

    ``forward(input_ids (B, T), targets=None, return_attention=False, *, cache=None)``:
    logits (B, T, V); with targets (B, T): (logits, loss), loss the mean cross-entropy (eq. (18)) over
    targets != -100, plus ``moe_loss_weight`` times the balancing loss with ``ff="moe"`` (eq. (12);
    ``moe_aux_loss()`` returns that term alone); with ``return_attention=True`` a list of per-layer weights (B, H, T, T) is appended
    as the last element of a tuple. ``cache`` (from ``new_cache()``) runs incrementally: positions continue
    after the cached ones.

    Training fast path: one fused QKV matmul per layer, ``F.scaled_dot_product_attention(is_causal=True)``
    with no mask tensor and no weights, no per-head Python loops; positional tables are buffers.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        ff_dim: int,
        max_seq_length: int,
        dropout: float = 0.1,
        *,
        position: str = "sinusoidal",
        norm: str = "layernorm",
        norm_first: bool = True,
        activation: str = "gelu",
        tie_weights: bool = True,
        bias: bool = True,
        scale_embeddings: bool = True,
        ff: str = "dense",
        num_experts: int = 4,
        top_k: int = 2,
    ):
        super().__init__()
        _check_dims(embed_dim, num_heads, dropout, vocab_size=vocab_size, num_layers=num_layers,
                    ff_dim=ff_dim, max_seq_length=max_seq_length)
        self._config = _init_arguments(locals())  # before any other local exists
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.max_seq_length = max_seq_length
        self._emb_scale = math.sqrt(embed_dim) if scale_embeddings else 1.0  # eq. (16)
        self.token_embedding = nn.Embedding(vocab_size, embed_dim)
        self.pos, self.rotary = _position_modules(position, embed_dim, num_heads, max_seq_length)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            DecoderOnlyBlock(embed_dim, num_heads, ff_dim, dropout, norm=norm, norm_first=norm_first,
                             activation=activation, bias=bias, ff=ff, num_experts=num_experts, top_k=top_k)
            for _ in range(num_layers)
        )
        self.norm = make_norm(norm, embed_dim, bias)
        self.lm_head = nn.Linear(embed_dim, vocab_size, bias=False)
        _init_embedding(self.token_embedding, embed_dim)
        if tie_weights:
            # eq. (17): reading a token in and writing it out use the same vector. Fewer parameters, and
            # every output row gets a gradient whenever its token appears in the input too.
            self.lm_head.weight = self.token_embedding.weight

    @classmethod
    def from_gpt2(cls, source, config=None, *, dropout: Optional[float] = None, map_location="cpu") -> "Transformer":
        """Build GPT-2 from a checkpoint in the Hugging Face layout; never downloads anything.

        ``source`` is either a folder holding ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``, or ``pytorch_model.bin``), as written by ``save_pretrained``,
        or a state dict (``GPT2LMHeadModel.state_dict()``, names with or without ``transformer.``),
        with its config passed as ``config`` (a dict such as ``config.json``'s, or an object with
        ``to_dict()`` such as ``GPT2Config``). The model is ``Transformer(..., position="learned",
        norm_first=True, activation="gelu_tanh", scale_embeddings=False)``; the Conv1D weights of GPT-2,
        stored (in, out), are transposed into our Linear layers' (out, in). A missing tensor, one of the
        wrong shape, or one this model has no place for is refused with a ``ValueError`` naming it.
        ``dropout`` defaults to the config's ``resid_pdrop``. The weights are read onto the CPU
        (``map_location`` applies to ``pytorch_model.bin``); move the model with ``.to(device)``.
        Returns the model in float32 and in eval mode.
        """
        if isinstance(source, (str, os.PathLike)):
            if config is not None:
                raise ValueError("config is read from the folder's config.json; pass config only with a state dict")
            config, state = _read_gpt2_folder(os.fspath(source), map_location)
        elif isinstance(source, dict):
            if config is None:
                raise ValueError("a GPT-2 state dict needs its config: from_gpt2(state_dict, config=...)")
            config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            state = source
        else:
            raise TypeError(f"source must be a folder path or a state dict, got {type(source).__name__}")
        options = _gpt2_options(config)
        if dropout is None:
            dropout = float(config.get("resid_pdrop", 0.1))
        model = cls(dropout=dropout, **options)
        model.load_state_dict(_gpt2_state_dict(state, options))
        return model.eval()

    def new_cache(self) -> List[KVCache]:
        """One empty ``KVCache`` per layer, for ``forward(..., cache=...)``."""
        return [KVCache(self.max_seq_length) for _ in self.layers]

    def forward(
        self,
        input_ids: Tensor,
        targets: Optional[Tensor] = None,
        return_attention: bool = False,
        *,
        cache: Optional[List[KVCache]] = None,
    ):
        offset = cache[0].length if cache is not None else 0
        _check_ids(input_ids, "input_ids", self.vocab_size, self.max_seq_length, offset)
        x = self._embed(input_ids, self.token_embedding, offset)  # (B, T, E)
        attention = []
        for i, layer in enumerate(self.layers):
            x = self._run_layer(layer, x, is_causal=True, need_weights=return_attention,
                      cache=None if cache is None else cache[i], rotary=self.rotary, positions=offset)
            if return_attention:
                x, w = x
                attention.append(w)  # (B, H, T, T_keys)
        x = self.norm(x)  # (B, T, E)
        logits = self.lm_head(x)  # (B, T, V)  eq. (17)
        out = (logits,)
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != input_ids.shape:
                got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
            loss = F.cross_entropy(logits.view(-1, self.vocab_size), targets.reshape(-1), ignore_index=-100)  # eq. (18)
            loss = self._with_moe_loss(loss)  # + alpha * balancing loss with ff="moe", eq. (12)
            out = out + (loss,)
        if return_attention:
            out = out + (attention,)
        return out[0] if len(out) == 1 else out

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        use_cache: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to each row of ``input_ids`` (B, T) -> (B, T + new).

        ``temperature=0`` is greedy (argmax). The model sees at most ``max_seq_length`` tokens: longer
        contexts are cropped to the most recent ones. With the cache, once it would overflow we re-fill it
        from the cropped window, so the cached and uncached paths see exactly the same context and give
        the same tokens. (With sinusoidal or learned positions the cropped window restarts at position 0,
        as it does without the cache; a sliding cache that kept old keys would be cheaper but would not
        equal recomputation, because those keys were computed in a context that has since been cropped.)
        Runs in eval mode (no dropout) and restores the previous mode afterwards. ``generator`` (a
        ``torch.Generator`` on the model's device) makes the sampling reproducible without touching the
        global random state.
        """
        _check_ids(input_ids, "input_ids", self.vocab_size)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        _check_sampling(temperature, top_k, top_p)
        was_training = self.training
        self.eval()
        L = self.max_seq_length
        ids = input_ids
        cache = self.new_cache() if use_cache else None
        try:
            # inference_mode rather than no_grad: it also skips autograd's version counters and view
            # tracking, most of the cost of a one-token step's many tiny ops (~1.4x faster on CPU).
            with torch.inference_mode():
                for _ in range(max_new_tokens):
                    if not use_cache:
                        logits = self(ids[:, -L:])[:, -1]  # (B, V)
                    elif cache[0].length == 0 or cache[0].length + 1 > L:
                        for c in cache:
                            c.reset()
                        logits = self(ids[:, -L:], cache=cache)[:, -1]  # (B, V): prefill the window
                    else:
                        logits = self(ids[:, -1:], cache=cache)[:, -1]  # (B, V): only the newest token
                    next_id = sample_next_token(logits, temperature, top_k, top_p, generator=generator)  # (B, 1)
                    ids = torch.cat([ids, next_id], dim=1)  # (B, T + 1)
        finally:
            self.train(was_training)
        return ids.clone()  # a normal tensor again: inference tensors cannot be saved for backward


def _check_sampling(temperature, top_k, top_p) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Pick one token per row from logits (B, V) -> (B, 1), eqs. (19)-(20).

    Temperature divides the logits (eq. (19)): below 1 it sharpens the distribution, 0 means argmax.
    ``top_k`` keeps the k most likely tokens; ``top_p`` keeps the smallest set of most likely tokens whose
    probability reaches p (the nucleus, eq. (20)), which adapts the number of candidates to how sure the
    model is. Both cut off the long tail of unlikely tokens that make samples derail. ``generator``
    (optional) is passed to ``torch.multinomial``.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits.float() / temperature  # (B, V)  eq. (19)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)  # (B, V)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p  # (B, V)  eq. (20)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)  # (B, V)
    probs = logits.softmax(dim=-1)  # (B, V)  eq. (19)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


# ---------------------------------------------------------------------------------------------------------
# Reading a GPT-2 checkpoint (Transformer.from_gpt2)
# ---------------------------------------------------------------------------------------------------------
#
# GPT-2 is this file's decoder-only model with four options set: learned positions, the tanh GELU, no
# sqrt(E) embedding scale, biases everywhere; the rest (pre-norm LayerNorm with eps 1e-5, a final norm,
# the tied output layer, 1/sqrt(Dh) attention, a 4E feed-forward) are already the defaults. What
# differs is only where the weights are stored, and one trap: GPT-2's "Conv1D" layers keep their weight
# as (in, out), the transpose of nn.Linear's (out, in). A square matrix (attn.c_proj) loads without
# complaint either way, so only equal logits prove the transpose right (tests/test_transformer_gpt2.py).

_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}

# safetensors: 8 bytes of little-endian header length, a JSON header {name: {dtype, shape,
# data_offsets}}, then the raw little-endian bytes. Simple enough to read without the package.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    start_of_data = 8 + n
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this reader does not know")
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        numel = math.prod(info["shape"])
        if end - begin != numel * dtype.itemsize or start_of_data + end > len(data):
            raise ValueError(f"{path}: tensor {name!r} of shape {info['shape']} does not fit its byte range")
        raw = bytearray(data[start_of_data + begin: start_of_data + end])  # a writable copy for frombuffer
        flat = torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        state[name] = flat.reshape(info["shape"])
    return state


def _read_gpt2_folder(folder: str, map_location) -> Tuple[dict, dict]:
    """(config, state dict) from a folder written by ``save_pretrained``."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"source {folder!r} is not a folder; from_gpt2 never downloads: save the model with "
            f"save_pretrained(folder) (or download it yourself) and pass the folder"
        )
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder!r} has no config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    pickled = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(single):
        state = _read_safetensors(single)
    elif os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(_read_safetensors(os.path.join(folder, shard)))
    elif os.path.isfile(pickled):
        state = torch.load(pickled, map_location=map_location, weights_only=True)
    else:
        raise FileNotFoundError(f"{folder!r} holds none of model.safetensors, model.safetensors.index.json, "
                                f"pytorch_model.bin")
    return config, state


def _gpt2_options(config: dict) -> dict:
    """Our constructor's arguments for a GPT-2 config; refuses the variants this model cannot express."""
    if config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config has model_type={config['model_type']!r}, expected 'gpt2'")
    activation = config.get("activation_function", "gelu_new")
    if activation not in _GPT2_ACTIVATIONS:
        raise ValueError(f"config has activation_function={activation!r}; supported: {sorted(_GPT2_ACTIVATIONS)}")
    eps = config.get("layer_norm_epsilon", 1e-5)
    unsupported = {
        "layer_norm_epsilon": (eps, abs(eps - 1e-5) > 1e-12, "1e-05 (make_norm's eps)"),
        "scale_attn_weights": (config.get("scale_attn_weights", True), not config.get("scale_attn_weights", True), "True"),
        "scale_attn_by_inverse_layer_idx": (config.get("scale_attn_by_inverse_layer_idx", False),
                                            bool(config.get("scale_attn_by_inverse_layer_idx", False)), "False"),
        "add_cross_attention": (config.get("add_cross_attention", False),
                                bool(config.get("add_cross_attention", False)), "False"),
    }
    for name, (value, bad, want) in unsupported.items():
        if bad:
            raise ValueError(f"config has {name}={value!r}; from_gpt2 supports only {name}={want}")
    E = config["n_embd"]
    return dict(
        vocab_size=config["vocab_size"], embed_dim=E, num_heads=config["n_head"], num_layers=config["n_layer"],
        ff_dim=config.get("n_inner") or 4 * E, max_seq_length=config["n_positions"], position="learned",
        norm="layernorm", norm_first=True, activation=_GPT2_ACTIVATIONS[activation],
        tie_weights=bool(config.get("tie_word_embeddings", True)), bias=True, scale_embeddings=False,
    )


def _gpt2_state_dict(state: dict, options: dict) -> dict:
    """Rename and transpose a GPT-2 state dict into ours, checking every tensor's name and shape."""
    V, E, F_, L = options["vocab_size"], options["embed_dim"], options["ff_dim"], options["max_seq_length"]
    prefix = "transformer." if any(k.startswith("transformer.") for k in state) else ""
    used = set()

    def take(name: str, shape: tuple, conv1d: bool = False) -> Tensor:
        full = prefix + name if name != "lm_head.weight" else name
        if full not in state:
            raise ValueError(f"the GPT-2 state dict has no tensor {full!r} (expected shape {shape})")
        t = state[full]
        if tuple(t.shape) != shape:
            raise ValueError(f"GPT-2 tensor {full!r} has shape {tuple(t.shape)}, expected {shape} for n_embd={E}, "
                             f"n_inner={F_}, vocab_size={V}, n_positions={L}")
        used.add(full)
        return t.t() if conv1d else t  # Conv1D (in, out) -> Linear (out, in)

    ours = {"token_embedding.weight": take("wte.weight", (V, E)), "pos.weight": take("wpe.weight", (L, E))}
    for i in range(options["num_layers"]):
        h, o = f"h.{i}.", f"layers.{i}."
        pairs = [("ln_1.weight", "norm1.weight", (E,), False), ("ln_1.bias", "norm1.bias", (E,), False),
                 ("attn.c_attn.weight", "self_attn.in_proj.weight", (E, 3 * E), True),
                 ("attn.c_attn.bias", "self_attn.in_proj.bias", (3 * E,), False),
                 ("attn.c_proj.weight", "self_attn.out_proj.weight", (E, E), True),
                 ("attn.c_proj.bias", "self_attn.out_proj.bias", (E,), False),
                 ("ln_2.weight", "norm2.weight", (E,), False), ("ln_2.bias", "norm2.bias", (E,), False),
                 ("mlp.c_fc.weight", "ff.linear1.weight", (E, F_), True), ("mlp.c_fc.bias", "ff.linear1.bias", (F_,), False),
                 ("mlp.c_proj.weight", "ff.linear2.weight", (F_, E), True),
                 ("mlp.c_proj.bias", "ff.linear2.bias", (E,), False)]
        for theirs, mine, shape, conv1d in pairs:
            ours[o + mine] = take(h + theirs, shape, conv1d)
        for buffer in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of older checkpoints: not weights
            used.add(prefix + h + buffer)
    ours["norm.weight"] = take("ln_f.weight", (E,))
    ours["norm.bias"] = take("ln_f.bias", (E,))
    if options["tie_weights"]:
        if "lm_head.weight" in state:  # saved beside the embedding; must be the same matrix
            if not torch.equal(take("lm_head.weight", (V, E)), ours["token_embedding.weight"]):
                raise ValueError("GPT-2 tensor 'lm_head.weight' differs from 'wte.weight' although the config says "
                                 "tie_word_embeddings=True")
        ours["lm_head.weight"] = ours["token_embedding.weight"]
    else:
        ours["lm_head.weight"] = take("lm_head.weight", (V, E))
    unexpected = sorted(k for k in state if k not in used)
    if unexpected:
        raise ValueError(f"the GPT-2 state dict has tensors this model has no place for: {unexpected[:5]}"
                         + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    return ours


class EncoderDecoderTransformer(_SavableModel):
    """The paper's model: an encoder reads the source, a decoder writes the target attending to it.

    Defaults follow the paper: post-norm, ReLU, LayerNorm, sinusoidal positions; every option of
    ``Transformer`` is available by keyword. The output layer is tied to the target embedding. With
    ``norm_first=False, activation="relu", norm="layernorm"`` the layer stack computes exactly what
    ``nn.Transformer(batch_first=True)`` computes (including its final encoder and decoder norms).

    Padding: source positions equal to ``pad_id`` are masked out of the encoder's self-attention and of
    the decoder's cross-attention; target positions equal to ``pad_id`` are masked out of the decoder's
    self-attention (so ``bos`` must not equal ``pad_id``). Loss targets use -100 for "ignore".

    ``forward(src_ids (B, S), tgt_ids (B, T), return_attention=False, *, targets=None)`` -> logits
    (B, T, V_tgt); with targets: (logits, loss); with return_attention the last element is
    {"encoder": [...], "decoder_self": [...], "cross": [...]} of per-layer (B, H, Tq, Tk) weights.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        embed_dim: int,
        num_heads: int,
        num_encoder_layers: int,
        num_decoder_layers: int,
        ff_dim: int,
        max_seq_length: int,
        dropout: float = 0.1,
        *,
        pad_id: int = 0,
        position: str = "sinusoidal",
        norm: str = "layernorm",
        norm_first: bool = False,
        activation: str = "relu",
        tie_weights: bool = True,
        bias: bool = True,
        scale_embeddings: bool = True,
        ff: str = "dense",
        num_experts: int = 4,
        top_k: int = 2,
    ):
        super().__init__()
        _check_dims(embed_dim, num_heads, dropout, src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size,
                    num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers, ff_dim=ff_dim,
                    max_seq_length=max_seq_length)
        self._config = _init_arguments(locals())  # before any other local exists
        self.src_vocab_size = src_vocab_size
        self.tgt_vocab_size = tgt_vocab_size
        self.embed_dim = embed_dim
        self.max_seq_length = max_seq_length
        self.pad_id = pad_id
        self._emb_scale = math.sqrt(embed_dim) if scale_embeddings else 1.0  # eq. (16)
        self.src_embedding = nn.Embedding(src_vocab_size, embed_dim)
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, embed_dim)
        self.pos, self.rotary = _position_modules(position, embed_dim, num_heads, max_seq_length)
        self.drop = nn.Dropout(dropout)
        options = dict(norm=norm, norm_first=norm_first, activation=activation, bias=bias, ff=ff,
                       num_experts=num_experts, top_k=top_k)
        self.encoder_layers = nn.ModuleList(
            EncoderBlock(embed_dim, num_heads, ff_dim, dropout, **options) for _ in range(num_encoder_layers)
        )
        self.encoder_norm = make_norm(norm, embed_dim, bias)
        self.decoder_layers = nn.ModuleList(
            DecoderBlock(embed_dim, num_heads, ff_dim, dropout, **options) for _ in range(num_decoder_layers)
        )
        self.decoder_norm = make_norm(norm, embed_dim, bias)
        self.lm_head = nn.Linear(embed_dim, tgt_vocab_size, bias=False)
        _init_embedding(self.src_embedding, embed_dim)
        _init_embedding(self.tgt_embedding, embed_dim)
        if tie_weights:
            self.lm_head.weight = self.tgt_embedding.weight  # eq. (17)

    def new_cache(self) -> List[KVCache]:
        """One empty ``KVCache`` per decoder layer (self-attention only), for ``decode(..., cache=...)``."""
        return [KVCache(self.max_seq_length) for _ in self.decoder_layers]

    def encode(self, src_ids: Tensor, return_attention: bool = False):
        """src_ids (B, S) -> (memory (B, S, E), src_mask (B, 1, 1, S) bool, True = real token)."""
        _check_ids(src_ids, "src_ids", self.src_vocab_size, self.max_seq_length)
        src_mask = (src_ids != self.pad_id)[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(src_ids, self.src_embedding)  # (B, S, E)
        attention = []
        for layer in self.encoder_layers:
            x = self._run_layer(layer, x, mask=src_mask, need_weights=return_attention, rotary=self.rotary)
            if return_attention:
                x, w = x
                attention.append(w)  # (B, H, S, S)
        memory = self.encoder_norm(x)  # (B, S, E)
        return (memory, src_mask, attention) if return_attention else (memory, src_mask)

    def decode(
        self,
        tgt_ids: Tensor,
        memory: Tensor,
        src_mask: Optional[Tensor],
        return_attention: bool = False,
        *,
        cache: Optional[List[KVCache]] = None,
        tgt_padding_mask: Optional[Tensor] = None,
    ):
        """tgt_ids (B, T), memory (B, S, E), src_mask (B, 1, 1, S) -> logits (B, T, V_tgt).

        With ``return_attention``: (logits, {"decoder_self": [...], "cross": [...]}). With ``cache`` (from
        ``new_cache()``) the target positions continue after the cached ones. The target padding mask
        (True = real token) is built from ``tgt_ids``; with a cache the earlier tokens are no longer in
        ``tgt_ids``, so pass ``tgt_padding_mask`` (B, 1, 1, cached + T) to keep masking them (as
        ``greedy_decode`` does), or leave it None to mask no target key.
        """
        offset = cache[0].length if cache is not None else 0
        _check_ids(tgt_ids, "tgt_ids", self.tgt_vocab_size, self.max_seq_length, offset)
        if memory.dim() != 3 or memory.shape[0] != tgt_ids.shape[0] or memory.shape[2] != self.embed_dim:
            raise ValueError(
                f"memory must have shape (B, S, E) = ({tgt_ids.shape[0]}, S, {self.embed_dim}) to match tgt_ids "
                f"{tuple(tgt_ids.shape)}, got {tuple(memory.shape)}"
            )
        self_mask = tgt_padding_mask
        if self_mask is None and cache is None:
            self_mask = (tgt_ids != self.pad_id)[:, None, None, :]  # (B, 1, 1, T)
        x = self._embed(tgt_ids, self.tgt_embedding, offset)  # (B, T, E)
        self_weights, cross_weights = [], []
        for i, layer in enumerate(self.decoder_layers):
            x = self._run_layer(layer, x, memory, self_mask=self_mask, memory_mask=src_mask, is_causal=True,
                      need_weights=return_attention, cache=None if cache is None else cache[i],
                      rotary=self.rotary, positions=offset)
            if return_attention:
                x, sw, cw = x
                self_weights.append(sw)  # (B, H, T, T)
                cross_weights.append(cw)  # (B, H, T, S)
        logits = self.lm_head(self.decoder_norm(x))  # (B, T, V)  eq. (17)
        if return_attention:
            return logits, {"decoder_self": self_weights, "cross": cross_weights}
        return logits

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, return_attention: bool = False, *,
                targets: Optional[Tensor] = None):
        if isinstance(src_ids, torch.Tensor) and isinstance(tgt_ids, torch.Tensor) and src_ids.dim() == 2 \
                and tgt_ids.dim() == 2 and src_ids.shape[0] != tgt_ids.shape[0]:
            raise ValueError(
                f"src_ids and tgt_ids must have the same batch size, got src_ids {tuple(src_ids.shape)} "
                f"and tgt_ids {tuple(tgt_ids.shape)}"
            )
        encoded = self.encode(src_ids, return_attention=return_attention)
        decoded = self.decode(tgt_ids, encoded[0], encoded[1], return_attention=return_attention)
        logits = decoded[0] if return_attention else decoded
        out = (logits,)
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != tgt_ids.shape:
                got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                raise ValueError(f"targets must have the shape of tgt_ids {tuple(tgt_ids.shape)}, got {got}")
            loss = F.cross_entropy(logits.reshape(-1, self.tgt_vocab_size), targets.reshape(-1), ignore_index=-100)  # eq. (18)
            loss = self._with_moe_loss(loss)  # + alpha * balancing loss with ff="moe", eq. (12)
            out = out + (loss,)
        if return_attention:
            out = out + ({"encoder": encoded[2], **decoded[1]},)
        return out[0] if len(out) == 1 else out

    @torch.no_grad()
    def greedy_decode(self, src_ids: Tensor, bos_id: int, eos_id: int, max_new_tokens: int) -> Tensor:
        """Translate by always taking the most likely next token. Returns (B, <= 1 + max_new_tokens) long.

        Every row starts with ``bos_id``; once a row has produced ``eos_id`` the rest of it is ``pad_id``;
        decoding stops as soon as every row has finished (checking that costs one host-device sync per
        step on CUDA, which is the price of stopping early). The target never grows past
        ``max_seq_length`` tokens. Uses the decoder's self-attention KV cache (the cross-attention keys and
        values of ``memory`` are re-projected at every step: simple, and cheap next to the decoder for short
        sources); runs in eval mode.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if not 0 <= value < self.tgt_vocab_size:
                raise ValueError(f"{name} must lie in [0, tgt_vocab_size={self.tgt_vocab_size}), got {value}")
        was_training = self.training
        self.eval()
        try:
            memory, src_mask = self.encode(src_ids)
            B = src_ids.shape[0]
            out = torch.full((B, 1), bos_id, dtype=torch.long, device=src_ids.device)  # (B, 1)
            finished = torch.zeros(B, dtype=torch.bool, device=src_ids.device)  # (B,)
            cache = self.new_cache()
            steps = min(max_new_tokens, self.max_seq_length - 1)
            for _ in range(steps):
                keep = (out != self.pad_id)[:, None, None, :]  # (B, 1, 1, t): same masking as a full decode
                logits = self.decode(out[:, -1:], memory, src_mask, cache=cache, tgt_padding_mask=keep)[:, -1]  # (B, V)
                next_id = logits.argmax(dim=-1)  # (B,)
                next_id = next_id.masked_fill(finished, self.pad_id)  # (B,)
                out = torch.cat([out, next_id[:, None]], dim=1)  # (B, t + 1)
                finished |= next_id == eos_id
                if bool(finished.all()):
                    break
        finally:
            self.train(was_training)
        return out


class EncoderTransformer(_SavableModel):
    """A BERT-style encoder: bidirectional self-attention over the whole input, padding masked out.

    Defaults follow BERT: post-norm, GELU, learned positions. ``forward(input_ids (B, T),
    return_attention=False, *, return_logits=False, targets=None)`` returns the hidden states (B, T, E);
    the masked-language-model head ``lm_head`` (dense, GELU, norm, then the tied output layer) turns them
    into logits (B, T, V): call ``model.lm_head(hidden)`` or pass ``return_logits=True``. With ``targets``
    (B, T) (-100 everywhere except the masked positions) it returns (logits, loss). With
    ``return_attention`` a list of per-layer (B, H, T, T) weights is appended. Every option of
    ``Transformer``, ``ff="moe"`` included, is available by keyword.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        ff_dim: int,
        max_seq_length: int,
        dropout: float = 0.1,
        *,
        pad_id: int = 0,
        position: str = "learned",
        norm: str = "layernorm",
        norm_first: bool = False,
        activation: str = "gelu",
        tie_weights: bool = True,
        bias: bool = True,
        scale_embeddings: bool = True,
        ff: str = "dense",
        num_experts: int = 4,
        top_k: int = 2,
    ):
        super().__init__()
        _check_dims(embed_dim, num_heads, dropout, vocab_size=vocab_size, num_layers=num_layers,
                    ff_dim=ff_dim, max_seq_length=max_seq_length)
        self._config = _init_arguments(locals())  # before any other local exists
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.max_seq_length = max_seq_length
        self.pad_id = pad_id
        self._emb_scale = math.sqrt(embed_dim) if scale_embeddings else 1.0  # eq. (16)
        self.token_embedding = nn.Embedding(vocab_size, embed_dim)
        self.pos, self.rotary = _position_modules(position, embed_dim, num_heads, max_seq_length)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            EncoderBlock(embed_dim, num_heads, ff_dim, dropout, norm=norm, norm_first=norm_first,
                         activation=activation, bias=bias, ff=ff, num_experts=num_experts, top_k=top_k)
            for _ in range(num_layers)
        )
        self.norm = make_norm(norm, embed_dim, bias)
        # BERT's MLM head: one more non-linear layer before the vocabulary, so the last encoder layer
        # need not be linearly decodable into tokens and can keep features useful for other tasks.
        self.lm_head = nn.Sequential(
            nn.Linear(embed_dim, embed_dim, bias=bias),
            nn.GELU(),
            make_norm(norm, embed_dim, bias),
            nn.Linear(embed_dim, vocab_size, bias=False),
        )
        _init_embedding(self.token_embedding, embed_dim)
        if tie_weights:
            self.lm_head[-1].weight = self.token_embedding.weight  # eq. (17)

    def forward(self, input_ids: Tensor, return_attention: bool = False, *, return_logits: bool = False,
                targets: Optional[Tensor] = None):
        _check_ids(input_ids, "input_ids", self.vocab_size, self.max_seq_length)
        mask = (input_ids != self.pad_id)[:, None, None, :]  # (B, 1, 1, T)
        x = self._embed(input_ids, self.token_embedding)  # (B, T, E)
        attention = []
        for layer in self.layers:
            x = self._run_layer(layer, x, mask=mask, need_weights=return_attention, rotary=self.rotary)
            if return_attention:
                x, w = x
                attention.append(w)  # (B, H, T, T)
        hidden = self.norm(x)  # (B, T, E)
        out = (hidden,)
        if return_logits or targets is not None:
            logits = self.lm_head(hidden)  # (B, T, V)
            out = (logits,)
            if targets is not None:
                if not isinstance(targets, torch.Tensor) or targets.shape != input_ids.shape:
                    got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                    raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
                loss = F.cross_entropy(logits.reshape(-1, self.vocab_size), targets.reshape(-1), ignore_index=-100)  # eq. (18)
                loss = self._with_moe_loss(loss)  # + alpha * balancing loss with ff="moe", eq. (12)
                out = out + (loss,)
        if return_attention:
            out = out + (attention,)
        return out[0] if len(out) == 1 else out


# ---------------------------------------------------------------------------------------------------------
# 8. Demo: learn to reverse digit strings, then generate
# ---------------------------------------------------------------------------------------------------------


def _reverse_task(batch_size: int, n_digits: int, generator: torch.Generator):
    """Sequences "d1 .. dn SEP dn .. d1"; the loss covers only the reversed half (the rest is the prompt)."""
    SEP = 10
    digits = torch.randint(0, 10, (batch_size, n_digits), generator=generator)  # (B, n)
    sep = torch.full((batch_size, 1), SEP)  # (B, 1)
    seq = torch.cat([digits, sep, digits.flip(1)], dim=1)  # (B, 2n + 1)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()  # (B, 2n), (B, 2n)
    targets[:, : n_digits - 1] = -100  # predicting the random prompt digits is impossible: do not score it
    return inputs, targets


def _demo(steps: int = 200, max_seconds: float = 12.0) -> None:
    # One thread: the matrices here are tiny, so threads gain little, and on a busy machine a second
    # thread that is not scheduled stalls every parallel region (10x slower in our measurements).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n = 6
    model = Transformer(vocab_size=11, embed_dim=64, num_heads=4, num_layers=2, ff_dim=256,
                        max_seq_length=2 * n + 1, dropout=0.0)
    print(f"decoder-only Transformer, {model.num_parameters():,} parameters; task: reverse {n} digits")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start, step = time.perf_counter(), 0
    # A step budget, so the result does not depend on the machine's speed, and a time cap, so a busy
    # machine still finishes promptly.
    while step < steps and time.perf_counter() - start < max_seconds:
        inputs, targets = _reverse_task(64, n, gen)
        _, loss = model(inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - start:4.1f} s)")
        step += 1
    print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - start:4.1f} s)")

    model.eval()
    inputs, _ = _reverse_task(200, n, gen)
    prompts = inputs[:, : n + 1]  # (200, n + 1): digits and the separator
    out = model.generate(prompts, max_new_tokens=n, temperature=0.0)  # (200, 2n + 1)
    answers = out[:, n + 1:]  # (200, n)
    correct = (answers == prompts[:, :n].flip(1)).all(dim=1).float().mean().item()
    show = lambda row: "".join("|" if int(t) == 10 else str(int(t)) for t in row)  # noqa: E731
    print(f"sample: {show(prompts[0, :n])} -> {show(answers[0])}   (exact-match accuracy on 200 new strings: {correct:.0%})")


if __name__ == "__main__":
    _demo()
