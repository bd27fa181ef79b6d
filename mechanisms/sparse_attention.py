"""Sparse attention: attention weights with exact zeros, from top-k softmax, sparsemax or 1.5-entmax.

Papers: Guangxiang Zhao, Junyang Lin, Zhiyuan Zhang, Xuancheng Ren, Qi Su, Xu Sun, "Explicit Sparse
Transformer: Concentrated Attention Through Explicit Selection", 2019, arXiv:1912.11637 (method="topk");
Andre F. T. Martins, Ramon F. Astudillo, "From Softmax to Sparsemax: A Sparse Model of Attention and
Multi-Label Classification", 2016, arXiv:1602.02068 (method="sparsemax"); Ben Peters, Vlad Niculae,
Andre F. T. Martins, "Sparse Sequence-to-Sequence Models", 2019, arXiv:1905.05702 (method="entmax15").

Idea: softmax gives every visible key a positive weight, however irrelevant, so a long context dilutes
every average. Three ways to get exact zeros instead: keep only the k largest scores of each query and
softmax those (top-k); project the scores onto the probability simplex, which cuts off every key whose
score is more than a data-dependent threshold below the top (sparsemax); or the 1.5-entmax mapping,
between the two (softmax is 1-entmax, sparsemax 2-entmax), sparse but smoother than sparsemax.
Everything else is multi-head attention.

Equation:  head_h = pi(Q_h K_h^T / sqrt(Dh), M) V_h,  out = Concat(head_1..head_H) W^O + b^O, with pi =
           topk:      softmax over the keys whose score is among the k largest of the row (others 0),
           sparsemax: p = argmin_{p in simplex} ||p - z||^2 = max(z - tau, 0),  sum(p) = 1,
           entmax15:  p = max(z / 2 - tau, 0)^2,  sum(p) = 1.

Complexity in sequence length (Tq queries, Tk keys, width d): time O(Tq * Tk * d) for the scores plus
O(Tq * Tk * log Tk) for the sort (sparsemax, entmax15) or the top-k selection; memory O(H * Tq * Tk):
the weights are always formed explicitly (no fused kernel computes these maps), so the fused and explicit
paths are one path. The zeros save nothing in this dense implementation; they change what is computed.

Reduces to / oracle: method="topk" with top_k >= Tk is softmax attention, equal to
torch.nn.MultiheadAttention with copied weights; sparsemax equals an independent sort-based projection onto
the simplex and its backward the closed-form Jacobian; 1.5-entmax equals a bisection for its threshold and
its backward its closed-form Jacobian (tests/test_sparse_attention.py).

Docs page: docs/mechanisms/sparse_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

_METHODS = ("topk", "sparsemax", "entmax15")


def _prepare(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.dtype]:
    """Scores shifted so each row's largest is 0, in float32 at least (sort and cumsum lose too much in 16 bits).

    Adding a constant to a row changes none of the three maps (their threshold moves with it). A row with no
    finite score (-inf everywhere) is shifted by 0, not by -inf, so it stays free of NaN.
    """
    dtype = scores.dtype
    z = scores.float() if dtype in (torch.float16, torch.bfloat16) else scores
    top = z.amax(dim=-1, keepdim=True)  # (..., 1)
    top = top.masked_fill(top == float("-inf"), 0.0)
    return z - top, dtype  # (..., n): largest finite entry 0, masked entries -inf


class _Sparsemax(torch.autograd.Function):
    """sparsemax over the last dimension, with the closed-form Jacobian of eq. (6) as its backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        z, dtype = _prepare(scores)  # (..., n)
        # Only keys within 1 of the top score can be in the support (tau >= max - 1), so clamping at -2 changes
        # no output and turns a masked -inf into a finite number the arithmetic below can use.
        z = z.clamp(min=-2.0)  # (..., n)
        z_sorted = z.sort(dim=-1, descending=True).values  # (..., n)
        rank = torch.arange(1, z.size(-1) + 1, device=z.device, dtype=z.dtype)  # (n,): 1, 2, ..., n
        cumulative = z_sorted.cumsum(dim=-1)  # (..., n)
        # eq. (5): the j-th largest score is in the support iff 1 + j z_(j) > z_(1) + ... + z_(j).
        support = (1 + rank * z_sorted > cumulative).sum(dim=-1, keepdim=True)  # (..., 1), always >= 1
        tau = (cumulative.gather(-1, support - 1) - 1) / support  # (..., 1)  eq. (5)
        probs = (z - tau).clamp(min=0.0)  # (..., n)  eq. (4)
        ctx.save_for_backward(probs)
        return probs.to(dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        inside = (probs > 0).to(probs.dtype)  # (..., n): s, the indicator of the support
        grad = grad_output.to(probs.dtype) * inside  # (..., n)
        # eq. (6): J = diag(s) - s s^T / |S|, so J^T g = s * (g - mean of g over the support).
        grad = grad - inside * grad.sum(dim=-1, keepdim=True) / inside.sum(dim=-1, keepdim=True)  # (..., n)
        return grad.to(grad_output.dtype)


class _Entmax15(torch.autograd.Function):
    """1.5-entmax over the last dimension (exact, by sorting), with the closed-form Jacobian of eq. (9)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        z, dtype = _prepare(scores)  # (..., n)
        # eq. (7) uses z / 2. tau >= max(z) / 2 - 1, so entries below -1 after halving are never in the support:
        # clamping at -2 changes no output and makes masked -inf finite.
        x = (z / 2).clamp(min=-2.0)  # (..., n)
        x_sorted = x.sort(dim=-1, descending=True).values  # (..., n)
        rank = torch.arange(1, x.size(-1) + 1, device=x.device, dtype=x.dtype)  # (n,)
        # eq. (8): if the support is the top j entries, sum_i (x_i - tau)^2 = 1 is a quadratic in tau whose
        # root is mean - sqrt((1 - j * variance) / j) over those j entries.
        mean = x_sorted.cumsum(dim=-1) / rank  # (..., n)
        mean_sq = (x_sorted ** 2).cumsum(dim=-1) / rank  # (..., n)
        variance_sum = rank * (mean_sq - mean ** 2)  # (..., n): sum of squared deviations of the top j
        tau_j = mean - torch.sqrt(((1 - variance_sum) / rank).clamp(min=0.0))  # (..., n)  eq. (8)
        support = (tau_j <= x_sorted).sum(dim=-1, keepdim=True)  # (..., 1): the largest consistent j
        tau = tau_j.gather(-1, support - 1)  # (..., 1)
        probs = (x - tau).clamp(min=0.0) ** 2  # (..., n)  eq. (7)
        ctx.save_for_backward(probs)
        return probs.to(dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        root = probs.sqrt()  # (..., n): g = p^(1/2), zero outside the support
        grad = grad_output.to(probs.dtype) * root  # (..., n)
        # eq. (9): J = diag(g) - g g^T / sum(g), so J^T u = g * u - g * (g . u) / sum(g).
        grad = grad - root * grad.sum(dim=-1, keepdim=True) / root.sum(dim=-1, keepdim=True)  # (..., n)
        return grad.to(grad_output.dtype)


def sparsemax(scores: torch.Tensor) -> torch.Tensor:
    """Sparsemax over the last dimension: the Euclidean projection of each row onto the simplex, eq. (4).

    -inf entries (masked keys) get exactly 0. A row with no finite entry gives the uniform distribution
    (SparseAttention never passes one: it zeroes such rows itself).
    """
    return _Sparsemax.apply(scores)


def entmax15(scores: torch.Tensor) -> torch.Tensor:
    """1.5-entmax over the last dimension, eq. (7): max(z/2 - tau, 0)^2 with tau such that the row sums to 1.

    -inf entries get exactly 0; a row with no finite entry gives the uniform distribution.
    """
    return _Entmax15.apply(scores)


def topk_softmax(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Softmax over the top_k largest entries of each row, eq. (3); every other entry gets exactly 0.

    Entries tied with the k-th largest are all kept. top_k >= the row length is plain softmax. -inf entries
    get 0; a row with no finite entry gives NaN, as softmax does (SparseAttention never passes one).
    """
    _check_positive_int(top_k, "top_k")
    k = min(top_k, scores.size(-1))
    kth = scores.topk(k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest score of each row
    # The threshold is not differentiated: which keys survive is a discrete choice, like a mask.
    return torch.softmax(scores.masked_fill(scores < kth.detach(), float("-inf")), dim=-1)  # eq. (3)


class SparseAttention(nn.Module):
    """Multi-head attention whose softmax is replaced by a sparse map: top-k softmax, sparsemax or 1.5-entmax.

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H; head_dim = d_model // num_heads.
        method: "topk" (Zhao et al.), "sparsemax" (Martins & Astudillo) or "entmax15" (Peters et al.).
        top_k: how many keys each query keeps with method="topk" (required there, refused otherwise);
            top_k >= the number of keys is softmax attention.
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the four projections (query, key, value, output) have a bias.
    """

    def __init__(self, d_model: int, num_heads: int, method: str = "sparsemax", top_k: Optional[int] = None,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_dropout(dropout)
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if method == "topk":
            _check_positive_int(top_k, "top_k")
        elif top_k is not None:
            raise ValueError(f"top_k applies only to method='topk'; got top_k={top_k!r} with method={method!r}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.method = method
        self.top_k = top_k
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """The module's map from scores (-inf = masked) to weights over the last dimension."""
        if self.method == "topk":
            return topk_softmax(scores, self.top_k)  # eq. (3)
        if self.method == "sparsemax":
            return sparsemax(scores)  # eq. (4)
        return entmax15(scores)  # eq. (7)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from `query` to `key`/`value` (both default to `query`: self-attention).

        mask: bool, True = may attend, (Tq, Tk) or broadcastable 4-D (B, H, Tq, Tk).
        key_padding_mask: bool (B, Tk), True = a real token.
        is_causal: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned, as a KV cache needs).
        Returns (B, Tq, d_model), or (output, weights (B, H, Tq, Tk) taken before dropout) with need_weights;
        the weights contain exact zeros.
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
        merged = _merge_masks(mask, key_padding_mask, is_causal, tq, tk, query.device)  # eq. (2)

        q = self.q_proj(query).view(batch, tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, Dh)
        k = self.k_proj(key).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)
        v = self.v_proj(value).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)

        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, Tq, Tk)  eq. (1)
        row_has_key = None
        if merged is not None:
            # A query row with no visible key: give it every key (any finite answer will do), zero it below.
            row_has_key = merged.any(dim=-1, keepdim=True)  # (B, H, Tq, 1) or (Tq, 1)
            scores = scores.masked_fill(~(merged | ~row_has_key), float("-inf"))  # masked keys: weight 0
        weights = self.normalize(scores)  # (B, H, Tq, Tk); rows sum to 1, with exact zeros
        if row_has_key is not None:
            weights = weights.masked_fill(~row_has_key, 0.0)  # a query that may see nothing gets no weight
        # Dropout drops whole query-key links, then rescales by 1 / (1 - p) so the expectation is unchanged.
        dropout_p = self.dropout if self.training else 0.0
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
        out = dropped @ v  # (B, H, Tq, Dh)  eq. (1)
        out = out.transpose(1, 2).reshape(batch, tq, self.d_model)  # (B, Tq, d_model): concatenate the heads
        out = self.out_proj(out)  # (B, Tq, d_model)  eq. (1)
        return (out, weights) if need_weights else out


def _demo() -> None:
    """The demo `python mechanisms/sparse_attention.py` runs (called at the end of the file, after the helpers)."""
    torch.manual_seed(0)
    scores = torch.randn(4, 6, dtype=torch.float64) * 2
    # Oracle inline for sparsemax: the Euclidean projection onto the simplex by bisection on the threshold.
    low, high = scores.amax(-1, keepdim=True) - 1, scores.amax(-1, keepdim=True)
    for _ in range(100):
        mid = (low + high) / 2
        too_big = (scores - mid).clamp(min=0).sum(-1, keepdim=True) > 1
        low, high = torch.where(too_big, mid, low), torch.where(too_big, high, mid)
    diff = (sparsemax(scores) - (scores - low).clamp(min=0)).abs().max().item()
    attn = SparseAttention(32, 4, method="entmax15").eval()
    x = torch.randn(2, 10, 32) * 4
    out, weights = attn(x, is_causal=True, need_weights=True)
    print(f"output shape {tuple(out.shape)}; {(weights == 0).float().mean():.0%} of the entmax15 weights are "
          f"exactly 0 (the causal mask alone hides {45 / 100:.0%})")
    print(f"max |sparsemax - bisection projection onto the simplex| = {diff:.2e}")
    assert diff < 1e-10, diff
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)


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
