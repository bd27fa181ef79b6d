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


def _check_mask(mask: Optional[torch.Tensor], expected: Tuple[int, int, int, int]) -> None:
    """Raise unless `mask` is None or a boolean tensor that broadcasts to `expected` = (B, H, Tq, Tk).

    Two forms are accepted, so that no shape is ever read two ways: 2-D (Tq, Tk), shared by every batch
    element and head, and 4-D (B, H, Tq, Tk) where any dimension may be 1. A 1-D or 3-D mask is refused:
    (B, Tk) or (B, Tq, Tk) would broadcast against the wrong dimensions without any error.
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
            f"to (B, H, Tq, Tk) = {tuple(expected)} (each dimension 1 or equal); a (B, Tk) key-padding mask "
            f"becomes (B, 1, 1, Tk) = ({batch}, 1, 1, {tk}) with mask[:, None, None, :]"
        )


def _pooling_mask(mask: Optional[torch.Tensor], expected: Tuple[int, int, int, int]) -> Optional[torch.Tensor]:
    """Validate the mask and return it with 4 dims broadcastable to `expected` = (B, H, Q, T).

    This module's one exception to the project's rule: a 2-D mask is a key-padding mask of exactly
    (B, T), the natural input for pooling (a pooling query has no position, so a per-query (Q, T)
    mask is rarely needed and would be ambiguous with (B, T) whenever B == Q). Every other mask goes
    through _check_mask, the project's rule: bool, 4 dims broadcastable to (B, H, Q, T), e.g. (B, 1, 1, T).
    """
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 2:
        B, _, _, T = expected
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"a 2-D mask must be a key-padding mask of shape (B, T) = ({B}, {T}), "
                             f"got {tuple(mask.shape)}")
        mask = mask[:, None, None, :]  # (B, 1, 1, T)
    _check_mask(mask, expected)  # dtype; 1-D and 3-D masks; the 4-D rule
    return mask


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
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries must be a positive int, got {num_queries!r}")
        if not isinstance(num_heads, int) or num_heads < 1 or d_model % num_heads != 0:
            raise ValueError(f"d_model must be divisible by num_heads, got d_model={d_model}, num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.d_model, self.num_queries, self.num_heads = d_model, num_queries, num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        # The queries are parameters themselves; a W_q applied to a parameter would add nothing.
        # Scaled like the rows of a projected token, so the initial scores are O(1).
        self.queries = nn.Parameter(torch.randn(num_queries, d_model) / math.sqrt(d_model))  # p_q
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)  # W_k
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)  # W_v
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # W_o

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Pool the sequence.

        Args:
            x: (B, T, d_model), the (padded) sequence; it supplies the keys and the values.
            mask: bool, True = a real token. Either (B, T) (key padding, this module's one
                exception to the project's rule: here a 2-D mask is (B, T), never (Q, T)) or 4 dims
                broadcastable to (B, H, Q, T).
            need_weights: also return the attention weights (B, H, Q, T), taken before dropout.

        Returns:
            (B, Q, d_model), or (pooled, weights). A head with no real token to look at contributes
            zeros before W_o, so an all-padding sequence pools to W_o's bias (zero with bias=False),
            never NaN.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, d_model={self.d_model}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        H, Q, Dh = self.num_heads, self.num_queries, self.head_dim
        mask = _pooling_mask(mask, (B, H, Q, T))  # (B|1, H|1, Q|1, T) or None

        q = self.queries.view(Q, H, Dh).transpose(0, 1).unsqueeze(0).expand(B, H, Q, Dh)  # (B, H, Q, Dh)
        k = self.k_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        v = self.v_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        dropout_p = self.dropout if self.training else 0.0

        row_alive = None if mask is None else mask.any(dim=-1, keepdim=True)  # (B|1, H|1, Q|1, 1)
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


if __name__ == "__main__":
    torch.manual_seed(0)
    B, T, d_model = 3, 7, 8
    pool = AttentionPooling(d_model, num_queries=2, num_heads=2)
    x = torch.randn(B, T, d_model)
    lengths = torch.tensor([7, 4, 2])
    mask = torch.arange(T) < lengths[:, None]  # (B, T): True on the real tokens
    pooled = pool(x, mask=mask)
    print("pooled shape:", tuple(pooled.shape))

    # Checked fact: with zero queries every score is 0, so pooling is the mean over the real tokens.
    with torch.no_grad():
        pool.queries.zero_()
        v = pool.v_proj(x)
        mean = torch.stack([v[b, : lengths[b]].mean(dim=0) for b in range(B)])  # (B, d_model)
        expected = pool.out_proj(mean).unsqueeze(1).expand(B, 2, d_model)  # (B, Q, d_model)
        diff = (pool(x, mask=mask) - expected).abs().max().item()
    print(f"zero queries: max |pooled - W_o(mean of W_v x over real tokens)| = {diff:.2e}")
    assert diff < 1e-5

    xs = torch.linspace(0, 5, 40)
    fit = nadaraya_watson(torch.tensor([2.5]), xs, torch.sin(xs), bandwidth=0.3)
    print(f"Nadaraya-Watson at x=2.5: {fit.item():.3f} (sin(2.5) = {math.sin(2.5):.3f})")
