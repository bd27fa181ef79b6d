"""Convolutional attention: Primer's multi-DConv-head attention, a causal depthwise convolution after Q, K, V.

Paper: David R. So, Wojciech Manke, Hanxiao Liu, Zihang Dai, Noam Shazeer, Quoc V. Le, "Primer: Searching
for Efficient Transformers for Language Modeling", 2021, arXiv:2109.08668.

Idea: an architecture search over TensorFlow programs for cheaper language models kept two changes that
work everywhere: squared ReLU, and this one. After the query, key and value projections, every channel is
convolved along the sequence with its own short kernel (width 3, causal: the token and the two before it).
A query or key is then a learned mix of a few neighbouring tokens rather than one, so a single layer can
match "the token after an earlier A" (an induction step) that otherwise needs two layers. The rest is
multi-head attention; with the delta kernel (1 on the current token, 0 before it) it IS multi-head
attention.

Equation:  Q = X_q W^Q + b^Q, K = X_k W^K + b^K, V = X_v W^V + b^V           (projections)
           Q~[t, c] = sum_{s=0}^{k-1} w^Q[c, s] Q[t - s, c] + beta^Q[c]        (Q[t] = 0 for t < 0; same for K, V)
           head_h = softmax(Q~_h K~_h^T / sqrt(Dh) + log M) V~_h,  out = Concat(heads) W^O + b^O.

Complexity in sequence length (Tq queries, Tk keys, width d, kernel k): time O(Tq * Tk * d) for the
attention plus O((Tq + Tk) * d * k) for the convolutions; memory O(H * Tq * Tk) explicit, O((Tq + Tk) * d)
fused. k * d extra parameters per convolution.

Reduces to / oracle: the delta kernel with zero convolution bias is multi-head attention, equal to
torch.nn.MultiheadAttention with copied weights; for any kernel it equals an explicit loop over the
convolution sum and the attention formula (tests/test_convolutional_attention.py).

Docs page: docs/mechanisms/convolutional_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
            dropout_p: float, need_weights: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scaled dot-product attention on (B, H, T, Dh) tensors; returns (output, weights or None).

    `mask` is the merged boolean mask (True = may attend), already including the causal part. The fused
    kernel runs when the weights are not wanted, the explicit formula when they are: one answer.
    """
    scale = 1.0 / math.sqrt(query.size(-1))
    row_has_key = None
    if mask is not None:
        # A query row with no key to attend would be softmax over all -inf = NaN. Give such rows every key
        # (any finite answer will do), then overwrite their output with zeros.
        row_has_key = mask.any(dim=-1, keepdim=True)  # (B, H, Tq, 1) or (Tq, 1)
        mask = mask | ~row_has_key  # same shape as mask
    if not need_weights:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                             scale=scale)  # (B, H, Tq, Dh)
        weights = None
    else:
        scores = (query @ key.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)  eq. (4)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: no weight
        weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk); each row sums to 1
        # Dropout drops whole query-key links, then rescales by 1 / (1 - p) so the expectation is unchanged.
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
        out = dropped @ value  # (B, H, Tq, Dh)  eq. (4)
    if row_has_key is not None:
        out = out.masked_fill(~row_has_key, 0.0)  # a query that may see nothing returns zeros
        if weights is not None:
            weights = weights.masked_fill(~row_has_key, 0.0)
    return out, weights


def causal_depthwise_conv(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """Convolve each channel of a (B, T, C) sequence with its own kernel over the current and past k-1 tokens.

    eq. (2): y[t, c] = sum_s w[c, s] x[t - s, c] + beta[c], with x[t] = 0 for t < 0. PyTorch's Conv1d computes
    a cross-correlation, so conv.weight[c, 0, k - 1 - s] is w[c, s]: the LAST tap multiplies the current token.
    Padding k-1 zeros on the left only (none on the right) is what makes it causal.
    """
    k = conv.kernel_size[0]
    x = F.pad(x.transpose(1, 2), (k - 1, 0))  # (B, C, T + k - 1): k-1 zeros before the first token
    return conv(x).transpose(1, 2)  # (B, T, C)


class ConvolutionalAttention(nn.Module):
    """Multi-DConv-head attention (Primer): causal depthwise convolutions on Q, K and V, then multi-head attention.

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H; head_dim = d_model // num_heads.
        kernel_size: width k of the causal depthwise convolutions (Primer: 3); 1 is a per-channel scale.
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the projections and the convolutions have a bias.
    """

    def __init__(self, d_model: int, num_heads: int, kernel_size: int = 3, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_positive_int(kernel_size, "kernel_size")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.kernel_size = kernel_size
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        # groups=d_model makes each convolution depthwise: channel c has its own kernel and sees only channel c,
        # so heads stay separate (a head's Dh channels are convolved, never mixed with another head's).
        self.q_conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, bias=bias)
        self.k_conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, bias=bias)
        self.v_conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from `query` to `key`/`value` (both default to `query`: self-attention).

        The convolutions always look back only; `is_causal` makes the attention causal too (bottom-right
        aligned: query i sees keys j <= i + Tk - Tq).
        mask: bool, True = may attend, (Tq, Tk) or broadcastable 4-D (B, H, Tq, Tk).
        key_padding_mask: bool (B, Tk), True = a real token. Padded keys and values are zeroed BEFORE the
            convolutions, so a padded token's content cannot leak into a real neighbour; in self-attention
            (key omitted) the padded queries are zeroed too.
        Returns (B, Tq, d_model), or (output, weights (B, H, Tq, Tk) taken before dropout) with need_weights.
        """
        self_attention = key is None
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
        merged = _merge_masks(mask, key_padding_mask, is_causal, tq, tk, query.device)  # eq. (5)

        q = self.q_proj(query)  # (B, Tq, d_model)  eq. (1)
        k = self.k_proj(key)  # (B, Tk, d_model)  eq. (1)
        v = self.v_proj(value)  # (B, Tk, d_model)  eq. (1)
        if key_padding_mask is not None:
            # eq. (3): a padded position contributes zero to its neighbours' convolutions, as the zeros before
            # the first token do. Masking its attention weight alone would not stop that leak.
            real = key_padding_mask[..., None]  # (B, Tk, 1)
            k = k.masked_fill(~real, 0.0)  # (B, Tk, d_model)
            v = v.masked_fill(~real, 0.0)  # (B, Tk, d_model)
            if self_attention:
                q = q.masked_fill(~real, 0.0)  # (B, Tq, d_model): the same tokens are the queries
        q = causal_depthwise_conv(q, self.q_conv)  # (B, Tq, d_model)  eq. (2)
        k = causal_depthwise_conv(k, self.k_conv)  # (B, Tk, d_model)  eq. (2)
        v = causal_depthwise_conv(v, self.v_conv)  # (B, Tk, d_model)  eq. (2)

        q = q.view(batch, tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, Dh)
        k = k.view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)
        v = v.view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)
        dropout_p = self.dropout if self.training else 0.0  # dropout is off in eval()
        out, weights = _attend(q, k, v, merged, dropout_p, need_weights)  # (B, H, Tq, Dh)  eq. (4)
        out = out.transpose(1, 2).reshape(batch, tq, self.d_model)  # (B, Tq, d_model): concatenate the heads
        out = self.out_proj(out)  # (B, Tq, d_model)  eq. (6)
        return (out, weights) if need_weights else out


def _demo() -> None:
    """The demo `python mechanisms/convolutional_attention.py` runs (called at the end of the file, after the helpers)."""
    torch.manual_seed(0)
    d_model, num_heads, batch, seq = 32, 4, 2, 10
    attn = ConvolutionalAttention(d_model, num_heads, kernel_size=3).eval()
    x = torch.randn(batch, seq, d_model)
    out = attn(x, is_causal=True)  # the fused path
    # Oracle inline: the convolution as a loop over the current and the two previous tokens, then attention.
    with torch.no_grad():
        def conv(t, layer):
            w = layer.weight[:, 0, :]  # (d_model, 3): w[:, 2] multiplies the current token
            return torch.stack([sum(w[:, 2 - s] * t[:, i - s] for s in range(3) if i - s >= 0) + layer.bias
                                for i in range(seq)], dim=1)
        q = conv(attn.q_proj(x), attn.q_conv).view(batch, seq, num_heads, -1).transpose(1, 2)
        k = conv(attn.k_proj(x), attn.k_conv).view(batch, seq, num_heads, -1).transpose(1, 2)
        v = conv(attn.v_proj(x), attn.v_conv).view(batch, seq, num_heads, -1).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d_model // num_heads)
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        heads = torch.softmax(scores, dim=-1) @ v  # (B, H, T, Dh)
        expected = attn.out_proj(heads.transpose(1, 2).reshape(batch, seq, d_model))
        diff = (out - expected).abs().max().item()
    print(f"output shape {tuple(out.shape)}; {3 * d_model * 3} convolution weights on top of multi-head attention")
    print(f"max |ConvolutionalAttention - explicit loop| = {diff:.2e}")
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
