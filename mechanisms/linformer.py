"""Linformer: self-attention with keys and values projected along the sequence to k rows.

Paper: Sinong Wang, Belinda Z. Li, Madian Khabsa, Han Fang, Hao Ma (2020), "Linformer: Self-Attention with
Linear Complexity", arXiv:2006.04768.

Idea: the softmax attention matrix of a trained model is approximately low-rank, so a query does not need n
separate keys: k << n learned mixtures of them will do. Linformer multiplies the (n, Dh) keys and values on
the sequence axis by learned (k, n) matrices E and F, then attends from each of the n queries to the k
projected rows: an (n, k) score matrix instead of (n, n), linear in n at fixed k.

Equations (page eq. (1)-(4)):
    K_bar = E_T K,  V_bar = F_T V        (E_T, F_T: the first T columns of E, F in R^{k x n})
    head = softmax(Q K_bar^T / sqrt(Dh)) V_bar
    padding: K_j, V_j := 0 for padded j, so K_bar = sum over real j of E[:, j] K_j
    out = Concat(heads) W^O

Complexity in sequence length T (queries Tq, keys Tk <= max_seq_len): time O(Tq k Dh H + k Tk d), memory
O(H Tq k): linear in T at fixed k. The projection mixes every position with every other, so there is no
causal form, and a general (Tq, Tk) mask has no meaning for the k projected rows: both are refused.

Reduces to / oracle: with k = n = T and E = F = the identity (or one permutation for both) it is exactly
multi-head attention (checked against torch.nn.MultiheadAttention in tests/test_linformer.py).

Docs page: docs/mechanisms/linformer.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


class LinformerAttention(nn.Module):
    """Multi-head attention over k sequence-projected keys and values, batch-first (B, T, d_model).

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H; they share E and F (the paper's "headwise sharing").
        max_seq_len: n, the longest key sequence; E and F have n columns, and a sequence of length T uses the
            first T of them (its positions).
        proj_dim: k, the number of projected key/value rows.
        share_kv: use one matrix for keys and values, F = E (the paper's "key-value sharing").
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the four linear projections have a bias.

    forward(query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=False, need_weights=False):
    key/value default to query. key_padding_mask (B, Tk), True = real token: padded keys and values are set
    to zero before the projection, so they contribute nothing (see the page). `mask` and `is_causal` are
    refused (ValueError): the k projected rows mix all positions. need_weights=True returns the softmax
    weights over the k projected rows, (B, H, Tq, k), taken before dropout; each row sums to 1.
    """

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int, proj_dim: int, share_kv: bool = False,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_positive_int(max_seq_len, "max_seq_len")
        _check_positive_int(proj_dim, "proj_dim")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.max_seq_len = max_seq_len
        self.proj_dim = proj_dim
        self.share_kv = share_kv
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # E and F of eq. (1): (k, n), initialised N(0, 1/k) so that a projected row keeps the scale of one key
        # (a random projection in the sense of the Johnson-Lindenstrauss lemma the paper builds on).
        self.e_proj = nn.Parameter(torch.randn(proj_dim, max_seq_len) / math.sqrt(proj_dim))
        self.f_proj = None if share_kv else nn.Parameter(torch.randn(proj_dim, max_seq_len) / math.sqrt(proj_dim))

    def extra_repr(self) -> str:
        return (f"max_seq_len={self.max_seq_len}, proj_dim={self.proj_dim}, share_kv={self.share_kv}, "
                f"dropout={self.dropout}")

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        key = query if key is None else key
        value = key if value is None else value
        _check_sequence(query, "query", self.d_model, "d_model")
        _check_sequence(key, "key", self.d_model, "d_model")
        _check_sequence(value, "value", self.d_model, "d_model")
        _check_matching(query, "query", key, "key", 0, "batch size")
        _check_matching(key, "key", value, "value", 0, "batch size")
        _check_matching(key, "key", value, "value", 1, "length")
        _check_max_len(key, "key", self.max_seq_len)
        if mask is not None:
            raise ValueError("mask is not supported by LinformerAttention: the k projected key rows mix all "
                             "positions, so a (Tq, Tk) mask has nothing to apply to; pass padding as "
                             f"key_padding_mask (B, Tk) (got mask of shape {tuple(getattr(mask, 'shape', ()))})")
        if is_causal:
            raise ValueError("is_causal=True is not supported by LinformerAttention: projecting the keys along the "
                             "sequence mixes future positions into every projected row (the paper's model is "
                             "bidirectional)")
        batch, tq, _ = query.shape
        tk = key.size(1)
        _check_key_padding_mask(key_padding_mask, batch, tk)
        split = lambda y, t: y.view(batch, t, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = split(self.q_proj(query), tq)  # (B, H, Tq, Dh)
        k = split(self.k_proj(key), tk)  # (B, H, Tk, Dh)
        v = split(self.v_proj(value), tk)  # (B, H, Tk, Dh)
        if key_padding_mask is not None:
            # eq. (3): a padded token's key and value rows are zero, so it adds nothing to any projected row.
            real = key_padding_mask[:, None, :, None].to(k.dtype)  # (B, 1, Tk, 1)
            k, v = k * real, v * real
        e = self.e_proj[:, :tk].to(k.dtype)  # (k, Tk): the columns of this sequence's positions
        f = e if self.f_proj is None else self.f_proj[:, :tk].to(v.dtype)  # (k, Tk)
        k_bar = e @ k  # (B, H, k, Dh)  eq. (1)
        v_bar = f @ v  # (B, H, k, Dh)  eq. (1)
        scale = 1.0 / math.sqrt(self.head_dim)
        dropout_p = self.dropout if self.training else 0.0
        if not need_weights:
            heads = F.scaled_dot_product_attention(q, k_bar, v_bar, dropout_p=dropout_p, scale=scale)  # (B, H, Tq, Dh)
            weights = None
        else:
            weights = torch.softmax((q @ k_bar.transpose(-2, -1)) * scale, dim=-1)  # (B, H, Tq, k)  eq. (2)
            dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights  # unbiased: 1 / (1 - p)
            heads = dropped @ v_bar  # (B, H, Tq, Dh)  eq. (2)
        out = self.out_proj(heads.transpose(1, 2).reshape(batch, tq, self.d_model))  # (B, Tq, d_model)  eq. (4)
        return (out, weights) if need_weights else out


def _demo() -> None:
    """Demo of `python mechanisms/linformer.py`; the guard at the end of the file calls it."""
    torch.manual_seed(0)
    batch, t, d_model, num_heads = 2, 12, 16, 4
    # The limit case: k = n = T with E = F = I is multi-head attention.
    attn = LinformerAttention(d_model, num_heads, max_seq_len=t, proj_dim=t).eval()
    with torch.no_grad():
        attn.e_proj.copy_(torch.eye(t))
        attn.f_proj.copy_(torch.eye(t))
        x = torch.randn(batch, t, d_model)
        out = attn(x)
        split = lambda y: y.view(batch, t, num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
        full = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d_model // num_heads), dim=-1) @ v
        expected = attn.out_proj(full.transpose(1, 2).reshape(batch, t, d_model))
    diff = (out - expected).abs().max().item()
    small = LinformerAttention(d_model, num_heads, max_seq_len=64, proj_dim=4).eval()
    _, weights = small(x, need_weights=True)
    print(f"output shape {tuple(out.shape)}; with k = 4 the weights are {tuple(weights.shape)} = (B, H, T, k)")
    print(f"max |Linformer (k = n = T, E = F = I) - multi-head attention| = {diff:.2e}")
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


def _check_max_len(x: torch.Tensor, name: str, max_seq_len: int) -> None:
    """Raise unless the (B, T, ...) tensor `x` is at most `max_seq_len` long."""
    if x.size(1) > max_seq_len:
        raise ValueError(f"{name} has length {x.size(1)} but max_seq_len is {max_seq_len}; "
                         f"expected shape (B, T <= {max_seq_len}, ...), got {tuple(x.shape)}")


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


if __name__ == "__main__":
    _demo()
