"""Self-attention: one head, one sequence, the formula exactly as a learner first meets it.

Paper: Ashish Vaswani, Noam Shazeer, Niki Parmar, Jakob Uszkoreit, Llion Jones, Aidan N. Gomez,
Lukasz Kaiser, Illia Polosukhin, "Attention Is All You Need", 2017, arXiv:1706.03762 (Section 3.2.1).

Idea: every token of a sequence X asks a question (its query X W_Q), advertises what it holds (its key
X W_K) and offers a message (its value X W_V). Each token's output is the average of all messages,
weighted by a softmax of how well its query matches each key. "Self" means the queries, keys and values
all come from the same sequence.

Equation:  Y = softmax(Q K^T / sqrt(d_model)) V,  Q = X W_Q + b_Q,  K = X W_K + b_K,  V = X W_V + b_V,
           with an optional mask (a blocked pair gets score -inf) and an optional causal mask (j <= i).
There is no output projection: one head needs nothing to mix, and the output width is already d_model.

Complexity in sequence length T: time O(T^2 * d_model + T * d_model^2); memory O(T^2) on the explicit
path (need_weights=True), O(T * d_model) on the fused path.

Reduces to / oracle: the explicit formula above, and torch.nn.MultiheadAttention(num_heads=1) with the
same W_Q, W_K, W_V and its output projection set to the identity (tests/test_self_attention.py).

Docs page: docs/mechanisms/self_attention.md
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


class SelfAttention(nn.Module):
    """Single-head self-attention, batch-first: (B, T, d_model) in, (B, T, d_model) out.

    Args:
        d_model: width of the tokens, and of the queries, keys and values.
        bias: whether W_Q, W_K, W_V have a bias.
        dropout: dropout probability on the attention weights, active only in training mode.
    """

    def __init__(self, d_model: int, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_dropout(dropout)
        self.d_model = d_model
        self.dropout = dropout
        # Three learned views of the same token, eq. (1).
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)  # W_Q: what am I looking for?
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)  # W_K: what do I contain?
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)  # W_V: what do I pass on if chosen?

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                need_weights: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Every token of `x` (B, T, d_model) attends to every token of `x`.

        mask: bool, True = may attend, (T, T) or broadcastable 4-D (B, 1, T, T).
        key_padding_mask: bool (B, T), True = a real token; padding tokens are never attended.
        is_causal: token i sees only tokens j <= i.
        Returns (B, T, d_model), or (output, weights (B, 1, T, T) taken before dropout) with need_weights.
        """
        _check_sequence(x, "x", self.d_model, "d_model")
        batch, seq_len, _ = x.shape
        _check_mask(mask, (batch, 1, seq_len, seq_len))
        _check_key_padding_mask(key_padding_mask, batch, seq_len)
        mask = _merge_masks(mask, key_padding_mask, is_causal, seq_len, seq_len, x.device)  # (T, T) or 4-D
        # One head is the H = 1 case of (B, H, T, Dh): the head axis is added so the shared attention helper,
        # and the mask convention (B, H, Tq, Tk), apply unchanged.
        q = self.q_proj(x).unsqueeze(1)  # (B, 1, T, d_model)  eq. (1)
        k = self.k_proj(x).unsqueeze(1)  # (B, 1, T, d_model)  eq. (1)
        v = self.v_proj(x).unsqueeze(1)  # (B, 1, T, d_model)  eq. (1)
        dropout_p = self.dropout if self.training else 0.0  # dropout is off in eval()
        # Scores eq. (2), mask eq. (3), softmax eq. (4), weighted sum of values eq. (5); the scale is
        # 1 / sqrt(d_model) because the single head is d_model wide.
        out, weights = _attend(q, k, v, mask, dropout_p, None, need_weights)  # (B, 1, T, d_model)
        out = out.squeeze(1)  # (B, T, d_model)
        return (out, weights) if need_weights else out


def _demo() -> None:
    """The demo; the guard at the very end of the file calls it, once the shared helpers exist."""
    torch.manual_seed(0)
    d_model = 16
    attention = SelfAttention(d_model).eval()
    x = torch.randn(2, 7, d_model)
    out = attention(x)  # the fused path
    _, weights = attention(x, need_weights=True)  # the explicit path, for the weights
    # Oracle inline: the formula as written on the page, one line per symbol.
    with torch.no_grad():
        Q, K, V = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
        expected = torch.softmax(Q @ K.transpose(1, 2) / math.sqrt(d_model), dim=-1) @ V
        diff = (out - expected).abs().max().item()
    print(f"output shape {tuple(out.shape)}, weights shape {tuple(weights.shape)}")
    print(f"max |SelfAttention - softmax(Q K^T / sqrt(d_model)) V| = {diff:.2e}")
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


def _check_sequence(x: torch.Tensor, name: str, width: int, width_name: str) -> None:
    """Raise unless `x` is a batch-first (B, T, width) tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.size(-1) != width:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (B, T, {width_name}) = (B, T, {width}), got {got}")


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
