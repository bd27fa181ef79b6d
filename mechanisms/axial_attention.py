"""Axial attention: multi-head self-attention along the rows of an image, then along its columns.

Paper: Jonathan Ho, Nal Kalchbrenner, Dirk Weissenborn, Tim Salimans, "Axial Attention in
Multidimensional Transformers", 2019, arXiv:1912.12180.

Idea: full self-attention over an H x W image compares every pixel with every other, (HW)^2 scores. Axial
attention attends along one axis at a time: each pixel attends to the W pixels of its row, then (with
separate weights) to the H pixels of its column. Each pass is ordinary multi-head attention on a batch of
lines; after both, every pixel has a path from every other pixel, at HW(H + W) scores instead of (HW)^2.

Equation:  Y[i, :] = MHA_row(X[i, :])  for every row i          (attention over j' within row i)
           Z[:, j] = MHA_col(Y[:, j])  for every column j       (attention over i' within column j)
           score count: full H*W*H*W, axial H*W*(H + W), ratio (H + W) / (H * W).

Complexity for an H x W image, d = d_model: time O(HW (H + W) d + HW d^2), memory O(heads * HW * max(H, W))
on the explicit path (one line's weights at a time per pass), against O(heads * (HW)^2) for full attention.

Reduces to / oracle: each pass equals torch.nn.MultiheadAttention applied to every row (then every column)
with copied weights (tests/test_axial_attention.py::test_rows_then_columns_equal_torch_multihead_attention);
on a 1 x W image the column pass sees one pixel, and the whole layer is multi-head attention over the row
followed by the column pass's value and output maps (tests/test_axial_attention.py::
test_on_a_single_row_it_is_multi_head_attention).

Docs page: docs/mechanisms/axial_attention.md
"""
import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


class _AxisAttention(nn.Module):
    """Multi-head self-attention over a batch of lines (N, L, C): one pass of axial attention."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, lines: torch.Tensor, padding: Optional[torch.Tensor], is_causal: bool,
                need_weights: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        n, length, d_model = lines.shape
        q = self.q_proj(lines).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)  # (N, h, L, Dh)
        k = self.k_proj(lines).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)  # (N, h, L, Dh)
        v = self.v_proj(lines).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)  # (N, h, L, Dh)
        mask = _merge_masks(None, padding, is_causal, length, length, lines.device)  # (L, L) or (N, 1, L, L)
        row_has_key = None
        if mask is not None:
            # A pixel whose whole line is padded would be softmax over all -inf = NaN. Give such rows every
            # key (any finite answer will do), then overwrite their output with zeros.
            row_has_key = mask.any(dim=-1, keepdim=True)  # (L, 1) or (N, 1, L, 1)
            mask = mask | ~row_has_key  # same shape as mask
        dropout_p = self.dropout if self.training else 0.0
        if not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (N, h, L, Dh)
            weights = None
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (N, h, L, L)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: no weight
            weights = torch.softmax(scores, dim=-1)  # (N, h, L, L): over the keys of the same line
            dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
            out = dropped @ v  # (N, h, L, Dh)
        if row_has_key is not None:
            out = out.masked_fill(~row_has_key, 0.0)  # a pixel that may see nothing gets zero attention
            if weights is not None:
                weights = weights.masked_fill(~row_has_key, 0.0)
        out = out.transpose(1, 2).reshape(n, length, d_model)  # (N, L, C): concatenate the heads
        return self.out_proj(out), weights  # (N, L, C)


class AxialAttention(nn.Module):
    """Axial self-attention over (B, H, W, C) images: a row pass, then a column pass, each multi-head.

    Args:
        d_model: number of channels C; must be divisible by num_heads.
        num_heads: number of attention heads in each pass; head_dim = d_model // num_heads.
        dropout: dropout probability on the attention weights of both passes, active only in training mode.
        bias: whether the projections (four per pass) have a bias.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        # Two independent multi-head attentions: the paper's row and column attention have their own weights.
        self.row_attn = _AxisAttention(d_model, num_heads, dropout, bias)
        self.col_attn = _AxisAttention(d_model, num_heads, dropout, bias)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]]:
        """Row attention, then column attention.

        x: (B, H, W, C) with C = d_model (channels last).
        key_padding_mask: bool (B, H, W), True = a real pixel; padded pixels are never attended to, and a
            pixel whose row or column has no real pixel gets zero attention in that pass.
        is_causal: pixel (i, j) sees (i, j' <= j) in the row pass and (i' <= i, j) in the column pass, so no
            output depends on a later pixel in raster order (eq. (3)).
        Returns (B, H, W, C), or (output, (row_weights (B, H, heads, W, W), col_weights (B, W, heads, H, H)))
        with need_weights, both taken before dropout.
        """
        _check_image(x, self.d_model)
        batch, height, width, channels = x.shape
        _check_pixel_mask(key_padding_mask, batch, height, width)

        # eq. (1): every row of every image is one sequence of W pixels.
        rows = x.reshape(batch * height, width, channels)  # (B*H, W, C)
        row_pad = None if key_padding_mask is None else key_padding_mask.reshape(batch * height, width)  # (B*H, W)
        y, row_weights = self.row_attn(rows, row_pad, is_causal, need_weights)  # (B*H, W, C)
        y = y.view(batch, height, width, channels)  # (B, H, W, C)

        # eq. (2): every column is one sequence of H pixels; the row pass already mixed each row into it.
        cols = y.transpose(1, 2).reshape(batch * width, height, channels)  # (B*W, H, C)
        col_pad = None
        if key_padding_mask is not None:
            col_pad = key_padding_mask.transpose(1, 2).reshape(batch * width, height)  # (B*W, H)
        z, col_weights = self.col_attn(cols, col_pad, is_causal, need_weights)  # (B*W, H, C)
        out = z.view(batch, width, height, channels).transpose(1, 2)  # (B, H, W, C)
        if not need_weights:
            return out
        row_weights = row_weights.view(batch, height, self.num_heads, width, width)  # (B, H, heads, W, W)
        col_weights = col_weights.view(batch, width, self.num_heads, height, height)  # (B, W, heads, H, H)
        return out, (row_weights, col_weights)


def attention_score_counts(height: int, width: int) -> Dict[str, Union[int, float]]:
    """Attention scores per head for one H x W image, eq. (4): full self-attention against axial."""
    _check_positive_int(height, "height")
    _check_positive_int(width, "width")
    full = (height * width) ** 2  # every pixel with every pixel
    axial = height * width * width + width * height * height  # rows, then columns
    return {"height": height, "width": width, "full": full, "axial": axial, "ratio": axial / full}


def score_count_table(sizes: Tuple[Tuple[int, int], ...] = ((8, 8), (32, 32), (64, 64), (256, 256), (64, 1024))
                      ) -> List[Dict[str, Union[int, float]]]:
    """attention_score_counts for a few image sizes (the table on the docs page)."""
    return [attention_score_counts(h, w) for h, w in sizes]


def _check_image(x: torch.Tensor, d_model: int) -> None:
    """Raise unless `x` is a (B, H, W, d_model) channels-last image batch."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.size(-1) != d_model:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (B, H, W, d_model) = (B, H, W, {d_model}) (channels last), got {got}")


def _check_pixel_mask(key_padding_mask: Optional[torch.Tensor], batch: int, height: int, width: int) -> None:
    """Raise unless `key_padding_mask` is None or a bool (B, H, W) tensor, True = a real pixel."""
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
        raise TypeError(f"key_padding_mask must be a torch.bool tensor (True = a real pixel), got {got}")
    if tuple(key_padding_mask.shape) != (batch, height, width):
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected (B, H, W) = "
                         f"({batch}, {height}, {width})")


def _demo() -> None:
    torch.manual_seed(0)
    batch, height, width, d_model = 2, 4, 5, 8
    layer = AxialAttention(d_model, num_heads=2).eval()
    x = torch.randn(batch, height, width, d_model)
    out, (row_w, col_w) = layer(x, need_weights=True)
    # The checked fact: the fused path (need_weights=False) gives the same output as the explicit one.
    diff = (layer(x) - out).abs().max().item()
    assert diff < 1e-5, diff
    # ...and after both passes pixel (0, 0) depends on every pixel of the image.
    x.requires_grad_(True)
    layer(x)[0, 0, 0].sum().backward()
    reached = (x.grad[0].abs().sum(-1) > 0).sum().item()
    assert reached == height * width
    print(f"output shape {tuple(out.shape)}; row weights {tuple(row_w.shape)}, column weights {tuple(col_w.shape)}")
    print(f"max |fused - explicit| = {diff:.1e}; pixel (0, 0) depends on {reached} of {height * width} pixels")
    for row in score_count_table():
        print(f"  {row['height']:>4} x {row['width']:<5} full {row['full']:>14,}  axial {row['axial']:>12,}  "
              f"ratio {row['ratio']:.4f}")


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
