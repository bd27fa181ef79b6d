"""Adaptive attention span: causal attention in which each head learns how far back it looks.

Paper: Sainbayar Sukhbaatar, Edouard Grave, Piotr Bojanowski, Armand Joulin, "Adaptive Attention Span in
Transformers", 2019, arXiv:1905.07799.

Idea: in a character-level language model most heads need only a few dozen past tokens, a few need
thousands. Each head h gets a learned span z_h; the softmax weight of a key at distance x is multiplied by a
soft mask that is 1 up to distance z_h, falls linearly to 0 over the next R tokens (the ramp) and is 0
beyond, and the row is renormalised. The mask is differentiable in z_h, so the span is learned by gradient
descent, and an L1 penalty on the spans makes each head keep only the context it pays for. Keys beyond
max_h z_h + R get exactly zero weight, so a cache (or the key range) can be cut there.

Equation:  x_ij = (i + Tk - Tq) - j                     (how far key j lies behind query i; causal: x >= 0)
           m_z(x) = clamp((R + z - x) / R, 0, 1),       z_h = max_span * span_fraction_h
           a_ij = m_z(x_ij) exp(s_ij) / sum_l m_z(x_il) exp(s_il),  s_ij = q_i . k_j / sqrt(Dh)
           out = Concat_h(a^h V_h) W^O + b^O,           loss = task loss + lambda / H * sum_h z_h.

Complexity in sequence length (Tq queries, Tk keys, width d): time O(Tq * Tk * d) and memory O(H * Tq * Tk)
as written here (dense, explicit); a key cache needs only the last ceil(max_h z_h + R) keys
(cache_length()), which is where the paper's savings come from.

Reduces to / oracle: every span z_h >= Tk - 1 gives mask 1 on every past key: causal multi-head attention,
equal to torch.nn.MultiheadAttention with a causal mask and copied weights; the mask function and the
attention against the formula written out in the test; the span receives a gradient and the penalty is
the documented sum (tests/test_adaptive_span.py).

Docs page: docs/mechanisms/adaptive_span.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_span_mask(distance: torch.Tensor, span: torch.Tensor, ramp: float) -> torch.Tensor:
    """The soft mask m_z(x) = clamp((R + z - x) / R, 0, 1) of eq. (3), broadcast over distance and span.

    1 for x <= z, a linear ramp down to 0 over the next R positions, 0 for x >= z + R. Differentiable in z
    on the ramp (slope 1 / R), which is how the span learns.
    """
    return ((ramp + span - distance) / ramp).clamp(min=0.0, max=1.0)


class AdaptiveSpanAttention(nn.Module):
    """Causal multi-head attention with a learned soft span per head (Sukhbaatar et al. 2019).

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H, each with its own span.
        max_span: the largest span S a head can learn, in tokens; z_h = S * span_fraction_h, fraction in [0, 1].
        ramp: the length R of the linear ramp of the soft mask, in tokens (the paper uses 32).
        init_span: the span every head starts with, in tokens, 0 <= init_span <= max_span (the paper: 0).
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the four projections (query, key, value, output) have a bias.

    Call clamp_span_() after every optimiser step (as the paper's code does) to keep each span in
    [0, max_span]; add span_penalty() times lambda / H to the loss to make the spans shrink.
    """

    def __init__(self, d_model: int, num_heads: int, max_span: int, ramp: int = 32, init_span: float = 0.0,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_positive_int(max_span, "max_span")
        _check_positive_int(ramp, "ramp")
        _check_dropout(dropout)
        if not isinstance(init_span, (int, float)) or isinstance(init_span, bool) or not 0 <= init_span <= max_span:
            raise ValueError(f"init_span must be a number of tokens in [0, max_span] = [0, {max_span}], "
                             f"got {init_span!r}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.max_span = max_span
        self.ramp = ramp
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # eq. (6): the span is learned as a fraction of max_span, so that one learning rate suits any max_span
        # (the gradient of the loss with respect to the fraction is max_span times that with respect to z).
        self.span_fraction = nn.Parameter(torch.full((num_heads,), init_span / max_span))

    def spans(self) -> torch.Tensor:
        """z_h in tokens, eq. (6): a (H,) tensor, differentiable."""
        return self.max_span * self.span_fraction  # (H,)

    def span_penalty(self) -> torch.Tensor:
        """sum_h z_h, eq. (7): add lambda / num_heads times this (summed over layers) to the training loss."""
        return self.spans().sum()

    @torch.no_grad()
    def clamp_span_(self) -> None:
        """Keep every span in [0, max_span]; call after each optimiser step."""
        self.span_fraction.clamp_(0.0, 1.0)

    def cache_length(self) -> int:
        """How many past keys can get a non-zero weight, eq. (8): ceil(max_h z_h + R), at least 1."""
        return max(1, math.ceil(self.spans().max().item() + self.ramp))

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                need_weights: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Causal attention from `query` to `key`/`value` (both default to `query`: self-attention).

        Always causal: the span is a distance into the past. With Tk > Tq the queries are the last Tq of the
        Tk positions (the keys include a cache of earlier tokens), so query i sits at position i + Tk - Tq.
        mask: bool, True = may attend, (Tq, Tk) or broadcastable 4-D (B, H, Tq, Tk).
        key_padding_mask: bool (B, Tk), True = a real token.
        Returns (B, Tq, d_model), or (output, weights (B, H, Tq, Tk) taken before dropout) with need_weights.
        """
        key = query if key is None else key
        value = key if value is None else value
        _check_sequence(query, "query", self.d_model, "d_model")
        _check_sequence(key, "key", self.d_model, "d_model")
        _check_sequence(value, "value", self.d_model, "d_model")
        _check_matching(query, "query", key, "key", 0, "batch size")
        _check_matching(key, "key", value, "value", 0, "batch size")
        _check_matching(key, "key", value, "value", 1, "length")
        batch, tq, _ = query.shape
        tk = key.size(1)
        if tk < tq:
            raise ValueError(f"key has length {tk} but query has length {tq}; causal attention with a span needs "
                             f"Tk >= Tq (the queries are the last Tq of the Tk positions)")
        _check_mask(mask, (batch, self.num_heads, tq, tk))
        _check_key_padding_mask(key_padding_mask, batch, tk)
        hard = _merge_masks(mask, key_padding_mask, True, tq, tk, query.device)  # (Tq, Tk) or 4-D  eq. (2)

        q = self.q_proj(query).view(batch, tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, Dh)
        k = self.k_proj(key).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)
        v = self.v_proj(value).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, Tq, Tk)  eq. (1)

        # eq. (2): query i is position i + Tk - Tq; key j lies x_ij = i + Tk - Tq - j positions behind it.
        position = torch.arange(tq, device=query.device) + (tk - tq)  # (Tq,)
        distance = (position[:, None] - torch.arange(tk, device=query.device)[None, :]).to(scores.dtype)  # (Tq, Tk)
        soft = soft_span_mask(distance, self.spans().to(scores.dtype).view(-1, 1, 1), self.ramp)  # (H, Tq, Tk)  eq. (3)
        soft = soft * hard  # (B or 1, H, Tq, Tk): the causal, user and padding masks are hard zeros

        # eq. (4): softmax, times the soft mask, renormalised. Subtracting the row maximum (over all keys, as
        # softmax does) keeps exp finite; it cancels in the ratio.
        scores = scores.masked_fill(soft == 0, float("-inf"))  # (B, H, Tq, Tk): keys the mask removes entirely
        row_has_key = (soft > 0).any(dim=-1, keepdim=True)  # (B, H, Tq, 1)
        scores = scores.masked_fill(~row_has_key, 0.0)  # a row with no key: any finite value, zeroed below
        unnormalised = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * soft  # (B, H, Tq, Tk)
        weights = unnormalised / unnormalised.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
        weights = weights.masked_fill(~row_has_key, 0.0)  # (B, H, Tq, Tk); each row with a key sums to 1
        # Dropout drops whole query-key links, then rescales by 1 / (1 - p) so the expectation is unchanged.
        dropout_p = self.dropout if self.training else 0.0
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
        out = dropped @ v  # (B, H, Tq, Dh)  eq. (5)
        out = out.transpose(1, 2).reshape(batch, tq, self.d_model)  # (B, Tq, d_model): concatenate the heads
        out = self.out_proj(out)  # (B, Tq, d_model)  eq. (5)
        return (out, weights) if need_weights else out


def _demo() -> None:
    """The demo `python mechanisms/adaptive_span.py` runs (called at the end of the file, after the helpers)."""
    torch.manual_seed(0)
    attn = AdaptiveSpanAttention(d_model=32, num_heads=4, max_span=16, ramp=4, init_span=3.0).eval()
    x = torch.randn(2, 12, 32)
    out, weights = attn(x, need_weights=True)
    # Oracle inline for one head: softmax over the causal keys, times m_z(x), renormalised.
    with torch.no_grad():
        q = attn.q_proj(x)[..., :8]
        k = attn.k_proj(x)[..., :8]
        scores = q @ k.transpose(-2, -1) / math.sqrt(8)  # (B, T, T) for head 0
        dist = torch.arange(12)[:, None] - torch.arange(12)[None, :]
        m = ((4 + 3.0 - dist) / 4).clamp(0, 1) * (dist >= 0)
        expected = torch.softmax(scores.masked_fill(dist < 0, float("-inf")), dim=-1) * m
        expected = expected / expected.sum(-1, keepdim=True)
        diff = (weights[:, 0] - expected).abs().max().item()
    far = weights[:, :, 11, :11 - attn.cache_length() + 1]  # keys cache_length() or more positions back
    print(f"output shape {tuple(out.shape)}; spans {attn.spans().tolist()} tokens; keys {attn.cache_length()} or "
          f"more positions back get weight {far.abs().max():.1f}")
    print(f"max |head-0 weights - softmax * m_z(x), renormalised| = {diff:.2e}")
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
