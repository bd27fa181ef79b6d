"""Scaled dot-product attention, written out explicitly (and "soft attention", its deterministic reading).

Paper: Ashish Vaswani, Noam Shazeer, Niki Parmar, Jakob Uszkoreit, Llion Jones, Aidan N. Gomez,
Lukasz Kaiser, Illia Polosukhin, "Attention Is All You Need", 2017, arXiv:1706.03762.
Soft attention: Kelvin Xu, Jimmy Ba, Ryan Kiros, Kyunghyun Cho, Aaron Courville, Ruslan Salakhutdinov,
Richard Zemel, Yoshua Bengio, "Show, Attend and Tell", 2015, arXiv:1502.03044.

Idea: every query is compared with every key by a dot product; the scores, divided by sqrt(Dh) so that
their spread does not grow with the head width, go through a softmax over the keys, and the output of
a query is the resulting weighted average of the values. Because the weights are a probability
distribution over keys, the output is the expectation of the value picked by a random "glance": Xu et
al.'s soft attention, the smooth stand-in for sampling one location.

Equation:  out = softmax(Q K^T * scale + log M) V,  scale = 1 / sqrt(Dh) by default,
           M[i, j] = 1 where query i may attend key j and 0 where it may not (log 0 = -inf).

Complexity in sequence length T (Tq queries, Tk keys): time O(Tq * Tk * Dh); memory O(Tq * Tk) for
the explicit path (the weights are materialised), O(Tq + Tk) extra for PyTorch's fused kernels.

Reduces to / oracle: this IS the reference every other mechanism reduces to; it is checked against
torch.nn.functional.scaled_dot_product_attention (tests/test_scaled_dot_product_attention.py).

Docs page: docs/mechanisms/scaled_dot_product_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
            dropout_p: float, scale: Optional[float],
            need_weights: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention on (B, H, T, Dh) tensors after validation; returns (output, weights or None).

    `mask` is the merged mask (user mask AND key padding AND causal), (Tq, Tk) or 4-D, or None.
    Fused kernel when the weights are not wanted, the explicit formula when they are: one answer.
    """
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    row_has_key = None
    if mask is not None:
        # A query row with no key to attend would be softmax over all -inf = NaN. Give such rows every key
        # (any finite answer will do), then overwrite their output with zeros: eq. (6).
        row_has_key = mask.any(dim=-1, keepdim=True)  # (B, H, Tq, 1) or (Tq, 1)
        mask = mask | ~row_has_key  # same shape as mask
    if not need_weights:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                             scale=scale)  # (B, H, Tq, Dv)
        weights = None
    else:
        scores = (query @ key.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)  eq. (1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # eq. (2): exp(-inf) = 0 weight
        weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)  eq. (4), each row sums to 1
        # Dropout drops whole query-key links, then rescales by 1 / (1 - p) so the expectation is unchanged.
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
        out = dropped @ value  # (B, H, Tq, Dv)  eq. (5)
    if row_has_key is not None:
        out = out.masked_fill(~row_has_key, 0.0)  # eq. (6): a query that may see nothing returns zeros
        if weights is not None:
            weights = weights.masked_fill(~row_has_key, 0.0)
    return out, weights


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 mask: Optional[torch.Tensor] = None,
                                 key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                                 dropout_p: float = 0.0, scale: Optional[float] = None,
                                 need_weights: bool = False
                                 ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """softmax(query key^T * scale) value, with the project's mask convention.

    Args:
        query: (B, H, Tq, Dh).  key: (B, H, Tk, Dh).  value: (B, H, Tk, Dv). Only 4-D inputs are accepted.
        mask: optional bool tensor, True = may attend, of shape (Tq, Tk) or broadcastable 4-D (B, H, Tq, Tk).
        key_padding_mask: optional bool (B, Tk), True = a real key; False keys (padding) are never attended.
        is_causal: add the causal mask, aligned bottom-right when Tq != Tk (query i sees keys j <= i + Tk - Tq).
            (F.scaled_dot_product_attention aligns its own is_causal top-left instead.)
        dropout_p: dropout on the weights; applied whenever > 0 (a function has no train/eval mode).
        scale: multiplies the scores; default 1 / sqrt(Dh).
        need_weights: also return the weights (B, H, Tq, Tk), taken before dropout.

    Returns:
        output (B, H, Tq, Dv), or (output, weights) with need_weights=True. A query row whose keys are all
        masked gets zeros in both.
    """
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be 4-D (B, H, T, D), got {got}")
    _check_matching(query, "query", key, "key", 0, "batch size")
    _check_matching(query, "query", key, "key", 1, "number of heads")
    _check_matching(query, "query", key, "key", 3, "head_dim")
    _check_matching(key, "key", value, "value", 0, "batch size")
    _check_matching(key, "key", value, "value", 1, "number of heads")
    _check_matching(key, "key", value, "value", 2, "length")
    _check_dropout(dropout_p, "dropout_p")
    batch, heads, tq, _ = query.shape
    tk = key.size(2)
    _check_mask(mask, (batch, heads, tq, tk))
    _check_key_padding_mask(key_padding_mask, batch, tk)
    # One boolean mask: the user's mask AND the real keys AND, with is_causal, eq. (3), bottom-right aligned.
    mask = _merge_masks(mask, key_padding_mask, is_causal, tq, tk, query.device)  # (Tq, Tk) or 4-D
    out, weights = _attend(query, key, value, mask, dropout_p, scale, need_weights)
    return (out, weights) if need_weights else out


def _demo() -> None:
    """The demo; the guard at the very end of the file calls it, once the shared helpers exist."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)  # Tq=5 < Tk=7
    out, weights = scaled_dot_product_attention(q, k, v, is_causal=True, need_weights=True)
    # Oracle written inline: PyTorch's kernel with the bottom-right causal mask spelled out.
    bottom_right = torch.ones(5, 7, dtype=torch.bool).tril(diagonal=7 - 5)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right)
    diff = (out - reference).abs().max().item()
    print(f"output shape {tuple(out.shape)}, weights shape {tuple(weights.shape)}")
    print(f"max |explicit - F.scaled_dot_product_attention| with a bottom-right causal mask = {diff:.2e}")
    assert diff < 1e-5, diff


# =====================================================================================================
# Input checks and mask helpers, identical letter for letter in every mechanism file that uses them
# (tests/test_shared_helpers.py compares the copies). Fix one copy, fix them all.
# =====================================================================================================


def _check_dropout(dropout: float, name: str = "dropout") -> None:
    """Raise unless `dropout` is a probability in [0, 1)."""
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {dropout!r}")


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
