"""Transformer-XL attention: segment-level recurrence with a memory, and relative positions with biases u and v.

Paper: Zihang Dai, Zhilin Yang, Yiming Yang, Jaime Carbonell, Quoc V. Le, Ruslan Salakhutdinov,
"Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context", 2019, arXiv:1901.02860.

Idea: a language model trained on fixed-length segments cannot see past the segment boundary, and the first
tokens of every segment see almost nothing. Transformer-XL keeps the hidden states of the previous segment
as a memory (no gradient flows into it) and lets the current segment attend over [memory; segment], so the
context grows with every layer and segment. Absolute positions would collide across segments (token 0 of
every segment), so positions enter only as the distance i - j: the score splits into content (a), content-
dependent position (b), a global content bias u (c) and a global position bias v (d).

Equation:  h~ = [SG(memory); h],  q = h W_q,  k = h~ W_k,  v = h~ W_v,  r_x = sinusoid(x),
           A_ij = (q_i . k_j  +  q_i . W_r r_{i'-j}  +  u . k_j  +  v . W_r r_{i'-j}) / sqrt(Dh)   (a)+(b)+(c)+(d)
           with i' = M + i the query's position among the M + T keys; causal: j <= i'.
           out = Concat_h(softmax(A) v) W_o;  new memory = SG([memory; h])[-mem_len:].

Complexity in sequence length (segment T, memory M, width d): time O(T * (M + T) * d), memory O(H * T * (M + T));
the relative terms add O((M + T) * d^2) for projecting the sinusoids; the memory state is O(M * d).

Reduces to / oracle: with no memory and the relative terms zero (W_r = 0, u = v = 0) it is causal multi-head
attention, equal to torch.nn.MultiheadAttention with copied weights; the four-term score against an explicit
loop; the relative shift against an explicit gather; two segments with memory equal the matching rows of one
pass over their concatenation (tests/test_transformer_xl.py).

Docs page: docs/mechanisms/transformer_xl.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoid_positions(distances: torch.Tensor, d_model: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """r_x of eq. (3) for each distance x: (L,) -> (L, d_model), sines in the first half, cosines in the second.

    Computed in `dtype` (float32, or float64 for a float64 model; 16-bit types would round the angles).
    """
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d_model, 2, device=distances.device, dtype=dtype) / d_model))
    angles = distances.to(dtype)[:, None] * inv_freq[None, :]  # (L, d_model / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (L, d_model)


def relative_shift(scores: torch.Tensor) -> torch.Tensor:
    """Turn scores indexed by distance into scores indexed by key, eq. (7): the paper's pad-and-reshape trick.

    scores[..., i, l] belongs to distance L - 1 - l (the columns run from the farthest distance to 0). The
    result's [..., i, j] is scores[..., i, j + T - 1 - i], the entry of distance (L - T + i) - j, for every key
    j <= L - T + i; entries above that (future keys) are meaningless and must be masked. (..., T, L) -> (..., T, L).
    """
    *lead, t, length = scores.shape
    padded = F.pad(scores, (1, 0))  # (..., T, L + 1): one zero column in front
    padded = padded.reshape(*lead, length + 1, t)  # (..., L + 1, T): the same numbers, rows cut differently
    return padded[..., 1:, :].reshape(*lead, t, length)  # (..., T, L): row i moved left by T - 1 - i


class TransformerXLAttention(nn.Module):
    """Transformer-XL's relative multi-head attention with a memory of past hidden states. Always causal.

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H; head_dim = d_model // num_heads.
        mem_len: how many past positions the returned memory keeps (0: no recurrence).
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the query, key, value and output projections have a bias (the paper's code has none;
            W_r never has one).

    Parameters beyond multi-head attention: pos_proj (W_r, d_model -> d_model, no bias) and the global
    biases u = content_bias, v = position_bias, each (H, Dh), initialised to zero.
    """

    def __init__(self, d_model: int, num_heads: int, mem_len: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        if not isinstance(mem_len, int) or isinstance(mem_len, bool) or mem_len < 0:
            raise ValueError(f"mem_len must be a non-negative integer, got {mem_len!r}")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.mem_len = mem_len
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)  # W_{k,E}: keys from content
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.pos_proj = nn.Linear(d_model, d_model, bias=False)  # W_{k,R}: keys from relative positions
        self.content_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))  # u, term (c)
        self.position_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))  # v, term (d)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, query: torch.Tensor, memory: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False
                ) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Attend from the segment `query` (B, T, d_model) over [memory; query], causally.

        memory: (B, M, d_model) hidden states of the previous segment(s) (what the last call returned), or None.
        mask: bool, True = may attend, (T, M + T) or broadcastable 4-D (B, H, T, M + T); ANDed with causality.
        key_padding_mask: bool (B, M + T), True = a real token, over the memory and the segment.
        Returns (output (B, T, d_model), new_memory (B, min(mem_len, M + T), d_model), detached), and with
        need_weights also the weights (B, H, T, M + T) taken before dropout: (output, new_memory, weights).
        """
        _check_sequence(query, "query", self.d_model, "d_model")
        batch, t, _ = query.shape
        if memory is None:
            memory = query.new_zeros(batch, 0, self.d_model)
        _check_sequence(memory, "memory", self.d_model, "d_model")
        _check_matching(query, "query", memory, "memory", 0, "batch size")
        m = memory.size(1)
        length = m + t
        _check_mask(mask, (batch, self.num_heads, t, length))
        _check_key_padding_mask(key_padding_mask, batch, length)
        # eq. (5): query i is position M + i of the M + T keys, so the causal mask is bottom-right aligned.
        merged = _merge_masks(mask, key_padding_mask, True, t, length, query.device)  # (T, L) or 4-D

        # eq. (1): the memory is a constant (stop-gradient): no gradient flows back into the previous segment.
        context = torch.cat([memory.detach(), query], dim=1)  # (B, L, d_model)
        q = self.q_proj(query).view(batch, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)  eq. (2)
        k = self.k_proj(context).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        v = self.v_proj(context).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        # eq. (3): one sinusoid per distance L-1, ..., 1, 0 (farthest first, the order relative_shift expects).
        distances = torch.arange(length - 1, -1, -1, device=query.device)  # (L,)
        exact = torch.float64 if query.dtype == torch.float64 else torch.float32
        r = sinusoid_positions(distances, self.d_model, exact).to(query.dtype)  # (L, d_model)
        r = self.pos_proj(r).view(length, self.num_heads, self.head_dim).transpose(0, 1)  # (H, L, Dh): W_r r_x

        # eq. (4): (a) + (c) = (q_i + u) . k_j and (b) + (d) = (q_i + v) . W_r r_{i'-j}.
        q_content = q + self.content_bias[None, :, None, :]  # (B, H, T, Dh)
        q_position = q + self.position_bias[None, :, None, :]  # (B, H, T, Dh)
        by_distance = q_position @ r.transpose(-2, -1)  # (B, H, T, L): column l is distance L - 1 - l
        position_scores = relative_shift(by_distance)  # (B, H, T, L): column j is key j  eq. (7)
        scale = 1.0 / math.sqrt(self.head_dim)

        row_has_key = merged.any(dim=-1, keepdim=True)  # (T, 1) or (B, H, T, 1)
        visible = merged | ~row_has_key  # a row with no key gets every key (finite), zeroed below
        # Future keys hold meaningless numbers after the shift; -inf removes them (and masked keys) exactly.
        bias = (position_scores * scale).masked_fill(~visible, float("-inf"))  # (B, H, T, L)
        dropout_p = self.dropout if self.training else 0.0
        if not need_weights:
            # (a) + (c) is a dot product the fused kernel computes; (b) + (d) enters as an additive bias.
            out = F.scaled_dot_product_attention(q_content, k, v, attn_mask=bias, dropout_p=dropout_p,
                                                 scale=scale)  # (B, H, T, Dh)  eq. (6)
            weights = None
        else:
            scores = (q_content @ k.transpose(-2, -1)) * scale + bias  # (B, H, T, L)  eq. (4)
            weights = torch.softmax(scores, dim=-1)  # (B, H, T, L)  eq. (6)
            dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
            out = dropped @ v  # (B, H, T, Dh)  eq. (6)
            weights = weights.masked_fill(~row_has_key, 0.0)
        out = out.masked_fill(~row_has_key, 0.0)  # a query that may see nothing returns zeros
        out = out.transpose(1, 2).reshape(batch, t, self.d_model)  # (B, T, d_model): concatenate the heads
        out = self.out_proj(out)  # (B, T, d_model)  eq. (6)

        # eq. (8): the next segment's memory is the last mem_len positions of [memory; segment], detached.
        new_memory = context[:, length - min(self.mem_len, length):].detach()  # (B, min(mem_len, L), d_model)
        return (out, new_memory, weights) if need_weights else (out, new_memory)


def _demo() -> None:
    """The demo `python mechanisms/transformer_xl.py` runs (called at the end of the file, after the helpers)."""
    torch.manual_seed(0)
    attn = TransformerXLAttention(d_model=32, num_heads=4, mem_len=8).eval()
    with torch.no_grad():
        attn.content_bias.normal_()
        attn.position_bias.normal_()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        whole, _ = attn(x)  # one pass over 16 tokens
        first, memory = attn(x[:, :8])  # two segments of 8, the second reading the first from memory
        second, _ = attn(x[:, 8:], memory=memory)
    diff = max((first - whole[:, :8]).abs().max().item(), (second - whole[:, 8:]).abs().max().item())
    print(f"output shape {tuple(second.shape)}; memory shape {tuple(memory.shape)}")
    print(f"max |two segments with memory - one pass over both| = {diff:.2e}")
    assert diff < 1e-5, diff


# =====================================================================================================
# Input checks and mask helpers, identical letter for letter in every mechanism file that uses them
# (tests/test_shared_helpers.py compares the copies). Fix one copy, fix them all.
# =====================================================================================================


def _check_dropout(dropout: float, name: str = "dropout") -> None:
    """Raise unless `dropout` is a probability in [0, 1)."""
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {dropout!r}")


def _check_positive_int(value: int, name: str) -> None:
    """Raise unless `value` is a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_divisible(numerator: int, numerator_name: str, denominator: int, denominator_name: str) -> None:
    """Raise unless `denominator` divides `numerator` (both already checked positive)."""
    if numerator % denominator != 0:
        raise ValueError(f"{numerator_name}={numerator} is not divisible by {denominator_name}={denominator}; "
                         f"choose {numerator_name} as a multiple of {denominator_name}")


def _check_sequence(x: torch.Tensor, name: str, width: int, width_name: str) -> None:
    """Raise unless `x` is a batch-first (B, T, width) tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.size(-1) != width:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (B, T, {width_name}) = (B, T, {width}), got {got}")


def _check_matching(reference: torch.Tensor, reference_name: str, other: torch.Tensor, other_name: str,
                    dim: int, dim_name: str) -> None:
    """Raise unless `other` has the same size as `reference` along `dim` (no silent broadcast)."""
    if other.size(dim) != reference.size(dim):
        raise ValueError(
            f"{other_name} has {dim_name} {other.size(dim)} but {reference_name} has {reference.size(dim)}; "
            f"they must match (got {other_name} of shape {tuple(other.shape)} and {reference_name} of shape "
            f"{tuple(reference.shape)})"
        )


def _check_mask(mask: Optional[torch.Tensor], expected: Tuple[int, int, int, int]) -> None:
    """Raise unless `mask` is None or a boolean tensor that broadcasts to `expected` = (B, H, Tq, Tk).

    Two forms are accepted, so that no shape is ever read two ways: 2-D (Tq, Tk), shared by every batch
    element and head, and 4-D (B, H, Tq, Tk) where any dimension may be 1. A 1-D or 3-D mask is refused:
    (B, Tk) or (B, Tq, Tk) would broadcast against the wrong dimensions without any error. Padding goes
    in `key_padding_mask` (B, Tk) instead.
    """
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a torch.bool tensor (True = may attend), got {got}; "
                        f"convert a 0/1 mask with mask.bool()")
    batch, heads, tq, tk = expected
    if mask.dim() == 2:
        fits = mask.size(0) in (1, tq) and mask.size(1) in (1, tk)
    elif mask.dim() == 4:
        fits = all(got in (1, want) for got, want in zip(mask.shape, expected))
    else:
        fits = False
    if not fits:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected (Tq, Tk) = ({tq}, {tk}) or a 4-D shape broadcastable "
            f"to (B, H, Tq, Tk) = {tuple(expected)} (each dimension 1 or equal); for padding pass "
            f"key_padding_mask of shape (B, Tk) = ({batch}, {tk}) instead"
        )


def _check_key_padding_mask(key_padding_mask: Optional[torch.Tensor], batch: int, tk: int) -> None:
    """Raise unless `key_padding_mask` is None or a (B, Tk) boolean tensor, True = a real token."""
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
        raise TypeError(f"key_padding_mask must be a torch.bool tensor (True = a real token that may be "
                        f"attended), got {got}; convert a 0/1 mask with key_padding_mask.bool()")
    if tuple(key_padding_mask.shape) != (batch, tk):
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected (B, Tk) = "
                         f"({batch}, {tk})")


def _causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) boolean mask, True where query i may see key j, aligned to the bottom-right.

    With Tq < Tk the queries are the LAST Tq positions of the sequence (a KV cache holds the earlier ones),
    so query i sits at position i + (Tk - Tq) and sees keys j <= i + (Tk - Tq).
    """
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)  # (Tq, Tk)


def _merge_masks(mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], is_causal: bool,
                 tq: int, tk: int, device: torch.device) -> Optional[torch.Tensor]:
    """AND together `mask`, `key_padding_mask` and the causal mask; None when there is nothing to mask.

    The result is (Tq, Tk) when only a 2-D mask and/or `is_causal` are given, otherwise 4-D and
    broadcastable to (B, H, Tq, Tk). All inputs must already have passed their checks.
    """
    merged = mask
    if is_causal:
        causal = _causal_mask(tq, tk, device)  # (Tq, Tk)
        merged = causal if merged is None else merged & causal
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk): one row of real keys per batch element
        merged = padding if merged is None else merged & padding
    return merged


if __name__ == "__main__":
    _demo()
