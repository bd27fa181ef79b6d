"""Differential attention (DIFF Transformer): the difference of two softmax maps cancels common-mode noise.

Paper: Tianzhu Ye, Li Dong, Yuqing Xia, Yutao Sun, Yi Zhu, Gao Huang, Furu Wei, "Differential Transformer",
2024, arXiv:2410.05258.

Idea: softmax can never give a key exactly zero weight, so every head spreads some attention over irrelevant
context. Each differential head computes two softmax maps from two halves of its query and key, and
subtracts the second, scaled by a learned scalar lambda, from the first, like a differential amplifier:
what both maps share (the spread-out noise) cancels, what only the first has (the relevant keys) remains.
lambda is re-parameterised through exponentials of learned vectors and starts at lambda_init, which grows
with depth; each head's output is normalised (RMSNorm) and scaled by (1 - lambda_init).

Equation:  [Q1; Q2] = X W_Q,  [K1; K2] = X W_K,  V = X W_V   (each head: two query/key halves of width d,
           values of width 2d),
           DiffAttn = (softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d))) V,
           lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,  lambda_init = 0.8 - 0.6 exp(-0.3 l),
           head_h = (1 - lambda_init) RMSNorm(DiffAttn_h),  out = Concat(heads) W_O.

Complexity: time O(Tq * Tk * d_model) (twice the score computations of a head of width d), memory
O(2 * H * Tq * Tk) on the explicit path, O((Tq + Tk) * d_model) fused.

Reduces to / oracle: against the formula written out (tests/test_differential_attention.py::
test_matches_the_formula_written_out); lambda = 0 is softmax attention followed by the per-head RMSNorm
(tests/test_differential_attention.py::test_lambda_zero_is_softmax_attention_up_to_the_normalisation);
identical halves with lambda = 1 give zero attention (tests/test_differential_attention.py::
test_identical_halves_with_lambda_one_cancel_exactly).

Docs page: docs/mechanisms/differential_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def lambda_init_schedule(layer_index: int) -> float:
    """lambda_init = 0.8 - 0.6 exp(-0.3 l), eq. (4), for the 0-based layer index l (the paper's l - 1)."""
    if not isinstance(layer_index, int) or isinstance(layer_index, bool) or layer_index < 0:
        raise ValueError(f"layer_index must be a non-negative integer, got {layer_index!r}")
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class DifferentialAttention(nn.Module):
    """Multi-head differential attention, batch-first: (B, Tq, d_model) queries, (B, Tk, d_model) keys and values.

    Args:
        d_model: width of the inputs and the output; must be divisible by 2 * num_heads.
        num_heads: number of differential heads H; each has two query/key halves of width
            head_dim = d_model // num_heads // 2 and values of width 2 * head_dim (as in the paper, H is half
            the number of heads a standard Transformer of the same width would have).
        layer_index: 0-based depth of this layer, which sets lambda_init by eq. (4).
        lambda_init: overrides the schedule with a fixed value (None = use the schedule).
        dropout: dropout probability on both softmax maps, active only in training mode.
        bias: whether the four projections have a bias.
    """

    def __init__(self, d_model: int, num_heads: int, layer_index: int = 0, lambda_init: Optional[float] = None,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", 2 * num_heads, "2 * num_heads")
        _check_dropout(dropout)
        schedule = lambda_init_schedule(layer_index)
        if lambda_init is not None and (not isinstance(lambda_init, (int, float)) or isinstance(lambda_init, bool)
                                        or not math.isfinite(lambda_init)):
            raise ValueError(f"lambda_init must be None (= the schedule of layer_index) or a finite number, "
                             f"got {lambda_init!r}")
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = d_model // num_heads // 2
        self.layer_index = layer_index
        self.lambda_init = schedule if lambda_init is None else float(lambda_init)
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)  # 2H query halves of width d
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)  # 2H key halves of width d
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)  # H values of width 2d
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # The re-parameterisation of lambda, eq. (3): four vectors shared by the heads of the layer.
        self.lambda_q1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_q2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.norm = nn.RMSNorm(2 * self.head_dim, eps=1e-5)  # per head, with a learned scale, eq. (5)

    def lambda_value(self) -> torch.Tensor:
        """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, eq. (3): a scalar tensor with a gradient."""
        return (torch.exp(torch.dot(self.lambda_q1, self.lambda_k1)) - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
                + self.lambda_init)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from `query` to `key`/`value` (both default to `query`).

        mask: bool, True = may attend, (Tq, Tk) or broadcastable 4-D (B, H, Tq, Tk), H = num_heads (one row per
        differential head, shared by its two maps). key_padding_mask: bool (B, Tk), True = a real token.
        is_causal: bottom-right aligned. Returns (B, Tq, d_model), or (output, weights (B, H, Tq, Tk)) where the
        weights are the differential map softmax_1 - lambda softmax_2 before dropout (rows sum to 1 - lambda).
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

        # Half 1 of head h is query/key head 2h, half 2 is head 2h + 1 (the paper's code lays them out this way).
        q = self.q_proj(query).view(batch, tq, self.num_heads, 2, self.head_dim).permute(3, 0, 2, 1, 4)  # (2, B, H, Tq, d)
        k = self.k_proj(key).view(batch, tk, self.num_heads, 2, self.head_dim).permute(3, 0, 2, 1, 4)  # (2, B, H, Tk, d)
        v = self.v_proj(value).view(batch, tk, self.num_heads, 2 * self.head_dim).transpose(1, 2)  # (B, H, Tk, 2d)
        lam = self.lambda_value().to(query.dtype)  # ()  eq. (3)
        row_has_key = None
        if visible is not None:
            # A row with no visible key: softmax over all -inf is NaN. Unmask the row, then zero its output.
            row_has_key = visible.any(dim=-1, keepdim=True)  # (B, H, Tq, 1) or (Tq, 1)
            visible = visible | ~row_has_key
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if not need_weights:
            # Two fused softmax attentions sharing the values: softmax_1 V - lambda softmax_2 V, eq. (2).
            out1 = F.scaled_dot_product_attention(q[0], k[0], v, attn_mask=visible, dropout_p=dropout_p)  # (B, H, Tq, 2d)
            out2 = F.scaled_dot_product_attention(q[1], k[1], v, attn_mask=visible, dropout_p=dropout_p)  # (B, H, Tq, 2d)
            out = out1 - lam * out2  # (B, H, Tq, 2d)  eq. (2)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (2, B, H, Tq, Tk)
            if visible is not None:
                scores = scores.masked_fill(~visible, float("-inf"))
            maps = torch.softmax(scores, dim=-1)  # (2, B, H, Tq, Tk): two ordinary attention maps
            weights = maps[0] - lam * maps[1]  # (B, H, Tq, Tk)  eq. (2)
            if dropout_p > 0.0:
                maps = F.dropout(maps, p=dropout_p)  # each map dropped and rescaled, as in the fused path
            out = (maps[0] - lam * maps[1]) @ v  # (B, H, Tq, 2d)  eq. (2)
        if row_has_key is not None:
            out = out.masked_fill(~row_has_key, 0.0)  # a query that may see nothing returns zeros
            if weights is not None:
                weights = weights.masked_fill(~row_has_key, 0.0)
        out = self.norm(out) * (1.0 - self.lambda_init)  # (B, H, Tq, 2d)  eq. (5)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tq, self.d_model))  # (B, Tq, d_model)  eq. (6)
        return (out, weights) if need_weights else out


def _demo() -> None:
    """Differential attention on random data: fused path against the explicit one (python differential_attention.py)."""
    torch.manual_seed(0)
    attn = DifferentialAttention(d_model=32, num_heads=2, layer_index=3).eval()
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        fused = attn(x, is_causal=True)
        explicit, weights = attn(x, is_causal=True, need_weights=True)
    diff = (fused - explicit).abs().max().item()
    lam = attn.lambda_value().item()
    print(f"output shape {tuple(fused.shape)}; lambda_init {attn.lambda_init:.4f}, lambda {lam:.4f}; rows of the "
          f"differential map sum to {weights.sum(-1).mean().item():.4f} = 1 - lambda")
    print(f"max |fused - explicit| = {diff:.2e}")
    assert diff < 1e-5 and abs(weights.sum(-1).mean().item() - (1 - lam)) < 1e-5, diff


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
