"""Sigmoid attention: each (query, key) weight is an independent sigmoid, not a softmax over the row.

Paper: Jason Ramapuram, Federico Danieli, Eeshan Dhekane, Floris Weers, Dan Busbridge, Pierre Ablin, Tatiana
Likhomanenko, Jagrit Digani, Zijin Gu, Amitis Shidani, Russ Webb, "Theory, Analysis, and Best Practices for
Sigmoid Self-Attention", 2024, arXiv:2409.04431.

Idea: replace softmax(S) by sigmoid(S + b) element-wise. A weight no longer competes with the other keys of
its row (rows do not sum to 1), which removes the row-wise reduction (FlashSigmoid is faster than
FlashAttention for that reason) and a source of attention sinks. Without care the output then grows with
the number of keys; the paper's fix is a bias b = -log(n) for n keys, which makes every weight start near
1/n, the size of a uniform softmax weight.

Equation:  head_h = sigmoid(Q_h K_h^T / sqrt(Dh) + b) V_h  (masked pairs weigh exactly 0),  b = -log(Tk),
           out = Concat(head_1, ..., head_H) W^O.

Complexity: time O(Tq * Tk * d) and memory O(H * Tq * Tk), as multi-head attention (no fused kernel in PyTorch).

Reduces to / oracle: equals the formula written as an explicit loop over (query, key) pairs
(tests/test_sigmoid_attention.py::test_matches_the_formula_pair_by_pair_with_masks); with zero scores every
weight is 1/(Tk + 1) exactly and rows sum to Tk/(Tk + 1), not 1
(tests/test_sigmoid_attention.py::test_rows_are_not_normalised); it is never softmax attention
(tests/test_sigmoid_attention.py::test_distinct_from_softmax_attention_with_the_same_weights).

Docs page: docs/mechanisms/sigmoid_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


class SigmoidAttention(nn.Module):
    """Multi-head sigmoid attention, batch-first: (B, Tq, d_model) queries, (B, Tk, d_model) keys and values.

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H; head_dim = d_model // num_heads.
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the four projections have a bias.
        attn_bias: the constant b added to every score; None (default) = -log(Tk), the paper's choice,
            recomputed for each call from the number of keys Tk passed (padding included: a padded batch uses
            its padded length). Pass a number to fix b, e.g. -log(max_seq_len) for a decoder.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 attn_bias: Optional[float] = None) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_dropout(dropout)
        if attn_bias is not None and (not isinstance(attn_bias, (int, float)) or isinstance(attn_bias, bool)
                                      or not math.isfinite(attn_bias)):
            raise ValueError(f"attn_bias must be None (= -log(Tk)) or a finite number, got {attn_bias!r}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.dropout = dropout
        self.attn_bias = attn_bias
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from `query` to `key`/`value` (both default to `query`).

        mask: bool, True = may attend, (Tq, Tk) or broadcastable 4-D (B, H, Tq, Tk). key_padding_mask: bool
        (B, Tk), True = a real token. is_causal: bottom-right aligned. Returns (B, Tq, d_model), or (output,
        weights (B, H, Tq, Tk)) taken before dropout; the weights are NOT normalised (rows do not sum to 1).
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
        _check_mask(mask, (batch, self.num_heads, tq, tk))
        _check_key_padding_mask(key_padding_mask, batch, tk)
        visible = _merge_masks(mask, key_padding_mask, is_causal, tq, tk, query.device)

        q = self.q_proj(query).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, Tq, Dh)
        k = self.k_proj(key).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, Tk, Dh)
        v = self.v_proj(value).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, Tk, Dh)
        b = -math.log(tk) if self.attn_bias is None else self.attn_bias  # eq. (2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + b  # (B, H, Tq, Tk)  eq. (1)
        weights = torch.sigmoid(scores)  # (B, H, Tq, Tk): each pair on its own, no sum over the row  eq. (1)
        if visible is not None:
            # A masked pair weighs exactly 0 (sigmoid never reaches 0 by itself). A row with no visible key is all
            # zeros, so it returns 0 with no special case and no NaN: nothing is divided by a row sum.
            weights = weights.masked_fill(~visible, 0.0)  # (B, H, Tq, Tk)
        dropped = F.dropout(weights, p=self.dropout) if self.training and self.dropout > 0 else weights
        out = dropped @ v  # (B, H, Tq, Dh)  eq. (1)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tq, self.d_model))  # (B, Tq, d_model)  eq. (3)
        return (out, weights) if need_weights else out


def _demo() -> None:
    """Sigmoid attention on random data against the formula, and its unnormalised rows (python sigmoid_attention.py)."""
    torch.manual_seed(0)
    attn = SigmoidAttention(d_model=32, num_heads=4).eval()
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        out, weights = attn(x, is_causal=True, need_weights=True)
        q, k, v = (p(x).view(2, 10, 4, 8).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        w = torch.sigmoid(q @ k.transpose(-2, -1) / math.sqrt(8) - math.log(10)).tril()  # causal: zeros above
        expected = attn.out_proj((w @ v).transpose(1, 2).reshape(2, 10, 32))
    diff = (out - expected).abs().max().item()
    print(f"output shape {tuple(out.shape)}; row sums of the weights range "
          f"{weights.sum(-1).min().item():.3f}..{weights.sum(-1).max().item():.3f} (softmax: always 1)")
    print(f"max |SigmoidAttention - inline formula| = {diff:.2e}")
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
