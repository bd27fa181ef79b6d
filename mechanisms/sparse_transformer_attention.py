"""Sparse Transformer attention: causal factorised patterns, "strided" and "fixed", without a dense mask.

Paper: Rewon Child, Scott Gray, Alec Radford, Ilya Sutskever (2019), "Generating Long Sequences with Sparse
Transformers", arXiv:1904.10509.

Idea: replace the full causal pattern (each token sees every earlier one, O(T^2)) by two small patterns A1, A2
whose composition covers it: if token i sees k through one and k saw j through the other, two layers carry
j's information to i. With stride l ~ sqrt(T) each token attends to O(sqrt(T)) keys. "strided": A1 = the
previous l tokens, A2 = every l-th token before (for data with period l, like image rows). "fixed": A1 = the
tokens of the same block of l, A2 = the last c "summary" tokens of every earlier block (for text). Each head
attends to the union A1 | A2 (the paper's "merged" head).

Equations (page eq. (1)-(6)), positions i (query), j (key), all causal (j <= i):
    strided:  A1 = { j : i - l < j <= i },             A2 = { j : (i - j) mod l = 0 }
    fixed:    A1 = { j : floor(j / l) = floor(i / l) }, A2 = { j : j mod l >= l - c }
    o_i = sum_{j in A1 | A2} softmax_j(q_i . k_j / sqrt(Dh)) v_j
Computed on the (T/l, l) grid of positions i = a l + r: A1 is a band of blocks, A2 is attention along a grid
column (strided) or to the n c summary keys (fixed), in one softmax over both key sets.

Complexity in sequence length T with stride l: time and memory O(T (2l + T/l)) strided, O(T (l + c T/l))
fixed; O(T sqrt(T)) with l = sqrt(T). need_weights=True additionally assembles dense (B, H, T, T) weights.

Reduces to / oracle: dense causal attention with the union mask of eq. (3) for every (T, l, c); full causal
attention when l >= T (one block); tests/test_sparse_transformer_attention.py.

Docs page: docs/mechanisms/sparse_transformer_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def sparse_transformer_masks(t: int, pattern: str, stride: int, num_summary: int = 1,
                             device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The dense (T, T) masks A1 and A2 of eq. (1) or (2), causal; True = query i may attend key j.

    Dense on purpose: this is the picture of the pattern, for the figure and for checking its properties; the
    module never builds it.
    """
    i = torch.arange(t, device=device)[:, None]  # (T, 1)
    j = torch.arange(t, device=device)[None, :]  # (1, T)
    causal = j <= i
    if pattern == "strided":
        a1 = causal & (i - j < stride)  # eq. (1): the previous l tokens
        a2 = causal & ((i - j) % stride == 0)  # eq. (1): every l-th token back
    elif pattern == "fixed":
        a1 = causal & (j // stride == i // stride)  # eq. (2): the same block
        a2 = causal & (j % stride >= stride - num_summary)  # eq. (2): the summary tokens
    else:
        raise ValueError(f"pattern must be 'strided' or 'fixed', got {pattern!r}")
    return a1, a2


class SparseTransformerAttention(nn.Module):
    """Causal multi-head attention over the union of the two factorised patterns, batch-first (B, T, d_model).

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H (all attend with the same pattern, the paper's merged head).
        pattern: "strided" or "fixed", eq. (1) / (2).
        stride: l >= 1, the block length (strided: also the step of A2). The paper uses l ~ sqrt(T).
        num_summary: c, 1 <= c <= stride: how many tokens at the end of each block summarise it ("fixed" only;
            "strided" has no summary tokens and ignores it).
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the projections have a bias.

    forward(query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=False, need_weights=False):
    key and value default to query and must have its length. The pattern is causal by construction, so
    is_causal=True changes nothing. A general dense `mask` is refused (it would need the (T, T) matrix).
    """

    def __init__(self, d_model: int, num_heads: int, pattern: str = "strided", stride: int = 4,
                 num_summary: int = 1, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        if pattern not in ("strided", "fixed"):
            raise ValueError(f"pattern must be 'strided' or 'fixed', got {pattern!r}")
        _check_positive_int(stride, "stride")
        _check_positive_int(num_summary, "num_summary")
        if num_summary > stride:
            raise ValueError(f"num_summary must be at most stride={stride}, got {num_summary}")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.pattern = pattern
        self.stride = stride
        self.num_summary = num_summary
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (f"pattern={self.pattern!r}, stride={self.stride}, num_summary={self.num_summary}, "
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
        _check_matching(query, "query", key, "key", 1, "length")  # the pattern is on positions of one sequence
        _check_matching(key, "key", value, "value", 1, "length")
        if mask is not None:
            raise ValueError("mask is not supported by SparseTransformerAttention: a general (Tq, Tk) mask needs the "
                             "dense matrix the factorised pattern avoids; use key_padding_mask (B, Tk) instead (got "
                             f"mask of shape {tuple(getattr(mask, 'shape', ()))}); the pattern is already causal")
        batch, t, _ = query.shape
        _check_key_padding_mask(key_padding_mask, batch, t)
        device = query.device
        heads, dh, l = self.num_heads, self.head_dim, self.stride
        n = math.ceil(t / l)  # rows of the (n, l) grid of positions i = a l + r
        pad = n * l - t
        split = lambda y: y.view(batch, t, heads, dh).transpose(1, 2)  # noqa: E731  (B, H, T, Dh)
        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        real = torch.ones(batch, t, dtype=torch.bool, device=device) if key_padding_mask is None else key_padding_mask
        real = F.pad(real, (0, pad), value=False)  # (B, n l): the grid's padding is never attended
        q_grid = F.pad(q, (0, 0, 0, pad)).view(batch, heads, n, l, dh)  # (B, H, n, l, Dh)
        k_pad, v_pad = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))  # (B, H, n l, Dh)
        k_grid, v_grid = k_pad.view(batch, heads, n, l, dh), v_pad.view(batch, heads, n, l, dh)  # (B, H, n, l, Dh)
        a = torch.arange(n, device=device).view(n, 1, 1)  # query row of the grid
        r = torch.arange(l, device=device).view(1, l, 1)  # query column
        i = a * l + r  # (n, l, 1): query positions, eq. (5)
        scale = 1.0 / math.sqrt(dh)

        # ---- part 1, A1 as a band of blocks (eq. (1), (2)): keys of block a - 1 and a (strided) or a (fixed).
        if self.pattern == "strided":
            k1 = F.pad(k, (0, 0, l, pad)).unfold(2, 2 * l, l).transpose(-1, -2)  # (B, H, n, 2l, Dh)
            v1 = F.pad(v, (0, 0, l, pad)).unfold(2, 2 * l, l).transpose(-1, -2)  # (B, H, n, 2l, Dh)
            j1 = (a - 1) * l + torch.arange(2 * l, device=device).view(1, 1, 2 * l)  # (n, 1, 2l) key positions
            ok1 = (j1 <= i) & (j1 > i - l)  # (n, l, 2l): the previous l tokens, eq. (1)
        else:
            k1, v1 = k_grid, v_grid  # (B, H, n, l, Dh): the query's own block
            j1 = a * l + torch.arange(l, device=device).view(1, 1, l)  # (n, 1, l)
            ok1 = j1 <= i  # (n, l, l): same block, causal, eq. (2)
        j1 = j1.expand(n, l, -1)  # (n, l, K1)
        ok1 = ok1 & (j1 >= 0) & real[:, j1.clamp(min=0)]  # (B, n, l, K1)
        s1 = q_grid @ k1.transpose(-2, -1)  # (B, H, n, l, K1)

        # ---- part 2, A2 minus what part 1 already holds (eq. (3) is a union: no key counted twice).
        if self.pattern == "strided":
            # Every l-th token back = the same grid column r in an earlier row a' < a (a' = a is i itself, in A1).
            s2 = torch.einsum("bhard,bhsrd->bhars", q_grid, k_grid)  # (B, H, n, l, n): query (a, r), key (a', r)
            rows = torch.arange(n, device=device).view(1, 1, n)
            j2 = (rows * l + r).expand(n, l, n)  # (n, l, n) key positions a' l + r
            ok2 = (rows < a).expand(n, l, n)  # (n, l, n)
        else:
            # The last c tokens of every earlier block (those of the query's own block are in A1).
            c = self.num_summary
            k_sum, v_sum = k_grid[:, :, :, l - c:], v_grid[:, :, :, l - c:]  # (B, H, n, c, Dh)
            s2 = torch.einsum("bhard,bhsud->bharsu", q_grid, k_sum).flatten(-2)  # (B, H, n, l, n c)
            rows = torch.arange(n, device=device).view(n, 1).expand(n, c).reshape(1, 1, n * c)  # block of each key
            j2 = rows * l + (l - c) + torch.arange(c, device=device).repeat(n).view(1, 1, n * c)  # (1, 1, n c)
            j2 = j2.expand(n, l, -1)  # (n, l, n c)
            ok2 = (rows < a).expand(n, l, -1)  # (n, l, n c)
        ok2 = ok2 & real[:, j2]  # (B, n, l, K2)

        # ---- one softmax over both key sets, eq. (3)-(4)
        allowed = torch.cat((ok1, ok2), dim=-1)[:, None]  # (B, 1, n, l, K1 + K2)
        scores = torch.cat((s1, s2), dim=-1) * scale  # (B, H, n, l, K1 + K2)
        row_any = allowed.any(dim=-1, keepdim=True)  # a row with no visible key (all padded) returns zeros
        scores = scores.masked_fill(~(allowed | ~row_any), float("-inf"))
        weights = torch.softmax(scores, dim=-1) * row_any  # (B, H, n, l, K1 + K2)
        p = self.dropout if self.training else 0.0
        dropped = F.dropout(weights, p=p) if p > 0.0 else weights  # unbiased: 1 / (1 - p)
        w1, w2 = dropped[..., :s1.size(-1)], dropped[..., s1.size(-1):]
        out = w1 @ v1  # (B, H, n, l, Dh)
        if self.pattern == "strided":
            out = out + torch.einsum("bhars,bhsrd->bhard", w2, v_grid)  # (B, H, n, l, Dh)
        else:
            out = out + w2 @ v_sum.flatten(2, 3)[:, :, None]  # (B, H, n, l, Dh)
        out = out.reshape(batch, heads, n * l, dh)[:, :, :t]  # (B, H, T, Dh)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, t, self.d_model))  # (B, T, d_model)  eq. (6)
        if not need_weights:
            return out
        # Dense (B, H, T, T) weights for inspection only (O(T^2)): scatter each slot to its key position.
        index = torch.cat((j1, j2), dim=-1).clamp(0, n * l - 1).reshape(1, 1, n * l, -1)  # (1, 1, n l, K1 + K2)
        dense = weights.new_zeros(batch, heads, n * l, n * l)
        dense = dense.scatter_add(-1, index.expand(batch, heads, -1, -1), weights.flatten(2, 3))
        return out, dense[:, :, :t, :t]


def _demo() -> None:
    """Demo of `python mechanisms/sparse_transformer_attention.py`; the guard at the end of the file calls it."""
    torch.manual_seed(0)
    batch, t, d_model, num_heads, stride = 2, 14, 16, 4, 4
    x = torch.randn(batch, t, d_model)
    for pattern in ("strided", "fixed"):
        attn = SparseTransformerAttention(d_model, num_heads, pattern, stride, num_summary=2).eval()
        with torch.no_grad():
            out = attn(x)
            # Oracle inline: dense attention with the union mask of eq. (3).
            a1, a2 = sparse_transformer_masks(t, pattern, stride, num_summary=2)
            split = lambda y: y.view(batch, t, num_heads, -1).transpose(1, 2)  # noqa: E731
            q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
            scores = (q @ k.transpose(-2, -1) / math.sqrt(d_model // num_heads)).masked_fill(~(a1 | a2), float("-inf"))
            dense = attn.out_proj((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, t, d_model))
        diff = (out - dense).abs().max().item()
        keys = (a1 | a2).sum(-1).float().mean().item()
        print(f"{pattern}: output shape {tuple(out.shape)}; {keys:.1f} keys per query on average (full causal: "
              f"{(t + 1) / 2:.1f}); max |factorised - dense masked attention| = {diff:.2e}")
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
