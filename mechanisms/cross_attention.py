"""Cross-attention: queries from one sequence, keys and values from another of a different width and length.

Paper: Ashish Vaswani, Noam Shazeer, Niki Parmar, Jakob Uszkoreit, Llion Jones, Aidan N. Gomez,
Lukasz Kaiser, Illia Polosukhin, "Attention Is All You Need", 2017, arXiv:1706.03762 (the decoder's
"encoder-decoder attention", Section 3.2.3).

Idea: a sequence x (a sentence being translated, the tokens of a text-to-image model) reads from a
second sequence, the context (the encoded source sentence, an image's patches, retrieved passages).
Only the queries come from x; keys and values are projected from the context, whose width context_dim
and length Tk need not match x's. Each query row looks at the whole context and at nothing else of x.

Equation:  head_h = softmax(Q_h K_h^T / sqrt(Dh) + log M) V_h,   Q = x W^Q (d_model -> d_model),
           K = context W^K, V = context W^V (context_dim -> d_model),   out = Concat(heads) W^O.

Complexity in the lengths (Tq queries, Tk context tokens): time O(Tq * Tk * d_model) plus the projections
O(Tq * d_model^2 + Tk * context_dim * d_model); memory O(H * Tq * Tk) on the explicit path, O(Tq + Tk)
rows on the fused path. It is linear in each length, quadratic in neither alone.

Reduces to / oracle: with context = x and context_dim = d_model it is multi-head self-attention; it is
checked against torch.nn.MultiheadAttention(d_model, num_heads, kdim=context_dim, vdim=context_dim,
batch_first=True) with copied weights (tests/test_cross_attention.py).

Docs page: docs/mechanisms/cross_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
            dropout_p: float, scale: Optional[float],
            need_weights: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention on (B, H, T, Dh) tensors after validation; returns (output, weights or None).

    Fused kernel when the weights are not wanted, the explicit formula when they are: one answer.
    """
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    row_has_key = None
    if mask is not None:
        # A query row with no key to attend would be softmax over all -inf = NaN. Give such rows every key
        # (any finite answer will do), then overwrite their output with zeros.
        row_has_key = mask.any(dim=-1, keepdim=True)  # (B, H, Tq, 1) or (Tq, 1)
        mask = mask | ~row_has_key  # same shape as mask
    if not need_weights:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                             scale=scale)  # (B, H, Tq, Dv)
        weights = None
    else:
        scores = (query @ key.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: no weight
        weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk); each row sums to 1
        # Dropout drops whole query-key links, then rescales by 1 / (1 - p) so the expectation is unchanged.
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
        out = dropped @ value  # (B, H, Tq, Dv)
    if row_has_key is not None:
        out = out.masked_fill(~row_has_key, 0.0)  # a query that may see nothing returns zeros
        if weights is not None:
            weights = weights.masked_fill(~row_has_key, 0.0)
    return out, weights


class CrossAttention(nn.Module):
    """Multi-head cross-attention, batch-first: x (B, Tq, d_model) reads from context (B, Tk, context_dim).

    Args:
        d_model: width of x and of the output; must be divisible by num_heads.
        context_dim: width of the context tokens (may differ from d_model).
        num_heads: number of heads H; each works in head_dim = d_model // num_heads dimensions.
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the four projections have a bias.
    """

    def __init__(self, d_model: int, context_dim: int, num_heads: int, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(context_dim, "context_dim")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_dropout(dropout)
        self.d_model = d_model
        self.context_dim = context_dim
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        # The only difference from self-attention: the key and value maps start from context_dim, eq. (1),
        # so a query and a key meet in the same d_model-wide space however wide the context is.
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(context_dim, d_model, bias=bias)
        self.v_proj = nn.Linear(context_dim, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None,
                need_weights: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Each token of `x` (B, Tq, d_model) attends over all tokens of `context` (B, Tk, context_dim).

        mask: bool, True = may attend, (Tq, Tk) or broadcastable 4-D (B, H, Tq, Tk).
        key_padding_mask: bool (B, Tk), True = a real context token; the context's padding is never attended.
        There is no is_causal: x and context are different sequences, so
        "the future" of a query is not defined among the context's positions.
        Returns (B, Tq, d_model), or (output, weights (B, H, Tq, Tk) taken before dropout) with need_weights.
        """
        _check_sequence(x, "x", self.d_model, "d_model")
        _check_sequence(context, "context", self.context_dim, "context_dim")
        _check_matching(x, "x", context, "context", 0, "batch size")
        batch, tq, _ = x.shape
        tk = context.size(1)
        _check_mask(mask, (batch, self.num_heads, tq, tk))
        _check_key_padding_mask(key_padding_mask, batch, tk)
        mask = _merge_masks(mask, key_padding_mask, False, tq, tk, x.device)  # (Tq, Tk) or 4-D, or None

        # eq. (1): queries from x, keys and values from the context, all cut into H heads of width Dh.
        q = self.q_proj(x).view(batch, tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, Dh)
        k = self.k_proj(context).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)
        v = self.v_proj(context).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)

        dropout_p = self.dropout if self.training else 0.0  # dropout is off in eval()
        out, weights = _attend(q, k, v, mask, dropout_p, None, need_weights)  # (B, H, Tq, Dh)  eq. (2)
        out = out.transpose(1, 2).reshape(batch, tq, self.d_model)  # (B, Tq, d_model): concatenate the heads
        out = self.out_proj(out)  # (B, Tq, d_model)  eq. (3)
        return (out, weights) if need_weights else out


def _demo() -> None:
    """The demo; the guard at the very end of the file calls it, once the shared helpers exist."""
    torch.manual_seed(0)
    d_model, context_dim, num_heads = 32, 20, 4
    attention = CrossAttention(d_model, context_dim, num_heads).eval()
    x, context = torch.randn(2, 5, d_model), torch.randn(2, 9, context_dim)  # different widths and lengths
    padding = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])  # (B, Tk): the second context is shorter
    out = attention(x, context, key_padding_mask=padding)  # (B, Tq, d_model)
    # Oracle inline: PyTorch's module with kdim/vdim and the same weights (its padding mask: True = ignore).
    ref = nn.MultiheadAttention(d_model, num_heads, kdim=context_dim, vdim=context_dim, batch_first=True).eval()
    with torch.no_grad():
        ref.q_proj_weight.copy_(attention.q_proj.weight)
        ref.k_proj_weight.copy_(attention.k_proj.weight)
        ref.v_proj_weight.copy_(attention.v_proj.weight)
        ref.in_proj_bias.copy_(torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]))
        ref.out_proj.weight.copy_(attention.out_proj.weight)
        ref.out_proj.bias.copy_(attention.out_proj.bias)
        expected, _ = ref(x, context, context, key_padding_mask=~padding)
        diff = (out - expected).abs().max().item()
    print(f"x {tuple(x.shape)} reads context {tuple(context.shape)} -> output shape {tuple(out.shape)}")
    print(f"max |CrossAttention - nn.MultiheadAttention(kdim, vdim)| with copied weights = {diff:.2e}")
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
