"""Attention pooling: a few learned queries summarise a padded sequence; and its ancestor, Nadaraya-Watson regression.

Papers: the learned-query pooling is the "pooling by multihead attention" (PMA) of Juho Lee,
Yoonho Lee, Jungtaek Kim, Adam R. Kosiorek, Seungjin Choi, Yee Whye Teh, "Set Transformer: A
Framework for Attention-based Permutation-Invariant Neural Networks", 2018, arXiv:1810.00825.
Its ancestor is kernel regression: E. A. Nadaraya, "On Estimating Regression", 1964, and
G. S. Watson, "Smooth Regression Analysis", 1964 (no arXiv ids: journal papers).

Idea: mean pooling weights every token equally. Attention pooling lets a learned query vector
decide how much each token counts: the query is scored against every token's key, a softmax over
the real (unmasked) tokens gives the weights, and the pooled vector is the weighted mean of the
values. With num_queries > 1 the sequence is summarised into that many vectors. Nadaraya-Watson
regression is the same recipe with no learning at all: the prediction at x is a mean of the
training targets y_i weighted by a softmax of -(x - x_i)^2 / (2 h^2).

Equations (page eq. (1)-(5)):
    Nadaraya-Watson:  f(x) = sum_i K((x - x_i)/h) y_i / sum_j K((x - x_j)/h),  K(u) = exp(-u^2/2)
                           = sum_i softmax_i(-||x - x_i||^2 / (2 h^2)) y_i
    pooling, per head: a_qt = softmax_t(p_q . (W_k x_t) / sqrt(Dh))  over the unmasked tokens t
                       pooled_q = W_o [sum_t a_qt W_v x_t]_heads

Complexity in sequence length T (num_queries Q fixed): time O(Q * T * d_model), memory O(H * Q * T):
linear in T, because only Q queries attend, never T of them.

Reduces to: mean pooling when the scores are all zero (queries set to zero): the output is
W_o(mean of W_v x_t over the unmasked tokens). nadaraya_watson is checked against an explicit loop
(tests/test_attention_pooling.py).

Docs page: docs/mechanisms/attention_pooling.md
"""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def nadaraya_watson(x_query: torch.Tensor, x_train: torch.Tensor, y_train: torch.Tensor,
                    bandwidth: float) -> torch.Tensor:
    """Nadaraya-Watson kernel regression with a Gaussian kernel of width `bandwidth` (h > 0).

    Args:
        x_query: (M,) or (M, D) points at which to predict.
        x_train: (N,) or (N, D) training inputs (same D as x_query).
        y_train: (N,) or (N, Dy) training targets.
    Returns:
        (M,) or (M, Dy): at each query point, the kernel-weighted mean of y_train.
    """
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
    xq = x_query.unsqueeze(-1) if x_query.dim() == 1 else x_query  # (M, D)
    xt = x_train.unsqueeze(-1) if x_train.dim() == 1 else x_train  # (N, D)
    if xq.dim() != 2 or xt.dim() != 2 or xq.shape[1] != xt.shape[1]:
        raise ValueError(f"x_query and x_train must be (M,) / (N,) or (M, D) / (N, D) with the same D, "
                         f"got x_query {tuple(x_query.shape)} and x_train {tuple(x_train.shape)}")
    if y_train.dim() not in (1, 2) or y_train.shape[0] != xt.shape[0]:
        raise ValueError(f"y_train must have shape (N,) or (N, Dy) with N = {xt.shape[0]}, "
                         f"got {tuple(y_train.shape)}")
    sq_dist = (xq.unsqueeze(1) - xt.unsqueeze(0)).pow(2).sum(-1)  # (M, N)  ||x - x_i||^2
    # The Gaussian kernel's constant factor cancels in the ratio, so the ratio is a softmax. eq. (2)
    weights = torch.softmax(-sq_dist / (2.0 * bandwidth ** 2), dim=-1)  # (M, N)
    return weights @ y_train  # (M,) or (M, Dy)  eq. (1)


class AttentionPooling(nn.Module):
    """Pool a (B, T, d_model) sequence into (B, num_queries, d_model) with learned queries.

    Args:
        d_model: model width; split into num_heads heads of head_dim = d_model // num_heads.
        num_queries: how many vectors Q the sequence is summarised into.
        num_heads: heads per query; each head weighs the tokens its own way.
        bias: learned biases on the key, value and output projections.
        dropout: dropout on the attention weights (training only).
    """

    def __init__(self, d_model: int, num_queries: int = 1, num_heads: int = 1, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_queries, "num_queries")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_dropout(dropout)
        self.d_model, self.num_queries, self.num_heads = d_model, num_queries, num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        # The queries are parameters themselves; a W_q applied to a parameter would add nothing.
        # Scaled like the rows of a projected token, so the initial scores are O(1).
        self.queries = nn.Parameter(torch.randn(num_queries, d_model) / math.sqrt(d_model))  # p_q
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)  # W_k
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)  # W_v
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # W_o

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Pool the sequence.

        Args:
            x: (B, T, d_model), the (padded) sequence; it supplies the keys and the values.
            mask: bool, True = query q may look at token t, the project's rule: (Q, T) shared by the
                batch, or 4 dims broadcastable to (B, H, Q, T). A 2-D mask is (Q, T), never (B, T).
            key_padding_mask: bool (B, T), True = a real token: the usual way to pool a padded batch.
                ANDed with `mask`.
            need_weights: also return the attention weights (B, H, Q, T), taken before dropout.

        Returns:
            (B, Q, d_model), or (pooled, weights). A head with no real token to look at contributes
            zeros before W_o, so an all-padding sequence pools to W_o's bias (zero with bias=False),
            never NaN.
        """
        _check_sequence(x, "x", self.d_model, "d_model")
        B, T, _ = x.shape
        H, Q, Dh = self.num_heads, self.num_queries, self.head_dim
        _check_mask(mask, (B, H, Q, T))
        _check_key_padding_mask(key_padding_mask, B, T)
        mask = _merge_masks(mask, key_padding_mask, False, Q, T, x.device)  # (Q, T) or (B|1, H|1, Q|1, T), or None

        q = self.queries.view(Q, H, Dh).transpose(0, 1).unsqueeze(0).expand(B, H, Q, Dh)  # (B, H, Q, Dh)
        k = self.k_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        v = self.v_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        dropout_p = self.dropout if self.training else 0.0

        row_alive = None if mask is None else mask.any(dim=-1, keepdim=True)  # (.., Q|1, 1)
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)  # (B, H, Q, T)  eq. (3)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
                scores = scores.masked_fill(~row_alive, 0.0)  # no NaN from 0/0 on empty rows
            weights = torch.softmax(scores, dim=-1)  # (B, H, Q, T)  eq. (4)
            if mask is not None:
                weights = weights.masked_fill(~mask, 0.0)
            heads = F.dropout(weights, dropout_p, training=self.training) @ v  # (B, H, Q, Dh)  eq. (5)
        else:
            # The same eq. (3)-(5) through PyTorch's fused kernel. Empty rows are let through to
            # every token and zeroed below, so no backend ever computes 0/0 for them.
            attn_mask = None if mask is None else mask | ~row_alive
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # (B, H, Q, Dh)
        if row_alive is not None:
            heads = heads.masked_fill(~row_alive, 0.0)  # a head with nothing to see contributes 0
        pooled = self.out_proj(heads.transpose(1, 2).reshape(B, Q, H * Dh))  # (B, Q, d_model)  eq. (5)
        if need_weights:
            return pooled, weights
        return pooled


def _demo() -> None:
    """The demo; the guard at the very end of the file calls it, once the shared helpers exist."""
    torch.manual_seed(0)
    B, T, d_model = 3, 7, 8
    pool = AttentionPooling(d_model, num_queries=2, num_heads=2)
    x = torch.randn(B, T, d_model)
    lengths = torch.tensor([7, 4, 2])
    mask = torch.arange(T) < lengths[:, None]  # (B, T): True on the real tokens
    pooled = pool(x, key_padding_mask=mask)
    print("pooled shape:", tuple(pooled.shape))

    # Checked fact: with zero queries every score is 0, so pooling is the mean over the real tokens.
    with torch.no_grad():
        pool.queries.zero_()
        v = pool.v_proj(x)
        mean = torch.stack([v[b, : lengths[b]].mean(dim=0) for b in range(B)])  # (B, d_model)
        expected = pool.out_proj(mean).unsqueeze(1).expand(B, 2, d_model)  # (B, Q, d_model)
        diff = (pool(x, key_padding_mask=mask) - expected).abs().max().item()
    print(f"zero queries: max |pooled - W_o(mean of W_v x over real tokens)| = {diff:.2e}")
    assert diff < 1e-5

    xs = torch.linspace(0, 5, 40)
    fit = nadaraya_watson(torch.tensor([2.5]), xs, torch.sin(xs), bandwidth=0.3)
    print(f"Nadaraya-Watson at x=2.5: {fit.item():.3f} (sin(2.5) = {math.sin(2.5):.3f})")


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
