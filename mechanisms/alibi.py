"""ALiBi: attention with linear biases instead of position embeddings.

Paper: Ofir Press, Noah A. Smith, Mike Lewis (2021), "Train Short, Test Long: Attention with Linear
Biases Enables Input Length Extrapolation", arXiv:2108.12409.

Idea: add no position vectors at all. Instead, each head h subtracts from every query-key score a
penalty proportional to their distance, m_h * (i - j), with a fixed, head-specific slope m_h. Heads with
large slopes look only at recent tokens, heads with small slopes look far back; the penalty is defined
for any distance, which lets a model trained on short sequences run on longer ones.

Equations (page eq. (1)-(4)):
    slopes, n heads a power of two:  m_h = 2^(-8h/n),  h = 1..n    (geometric, start = ratio = 2^(-8/n))
    other n: the n' = 2^floor(log2 n) slopes of n', then the slopes 1, 3, 5, ... of 2n', n - n' of them
    bias  B_h(i, j) = -m_h * (i - j)   for a causal model (j <= i);  -m_h * |i - j| when not causal
    s_ij = q_i . k_j / sqrt(Dh) + B_h(i, j),   alpha = softmax_j(s),   o_i = sum_j alpha_ij v_j

Complexity in sequence length T: O(T^2) time; memory O(T^2) for the bias (and the scores on the
explicit path), like standard attention. No parameters are added; the slopes are fixed.

Reduces to: plain multi-head attention when every slope is zero; the slopes are checked against the
paper's rule and the bias against B(i, j) depending only on i - j. Tests: tests/test_alibi.py.

Docs page: docs/mechanisms/alibi.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The head slopes m_1..m_n of the paper, as a float32 tensor (num_heads,)."""
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

    def power_of_two(n):
        # eq. (1): a geometric sequence whose first term and ratio are both 2^(-8/n)
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    n_low = 2 ** int(math.floor(math.log2(num_heads)))   # largest power of two <= num_heads
    slopes = power_of_two(n_low)
    if n_low < num_heads:
        # eq. (2): the paper's rule for other head counts: take the odd-numbered slopes (1st, 3rd, ...)
        # of the 2 * n_low sequence; they fall between the ones already taken.
        slopes += power_of_two(2 * n_low)[0::2][: num_heads - n_low]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(num_heads: int, Tq: int, Tk: int, causal: bool = True, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The bias B_h(i, j) of eq. (3), shape (num_heads, Tq, Tk).

    Queries are the last Tq of the Tk key positions (query i is at position i + Tk - Tq), the alignment
    of a KV cache. causal=True gives -m_h * (i - j), the paper's bias (positive for keys after the query,
    which the causal mask removes anyway); causal=False gives -m_h * |i - j|.
    """
    if Tq > Tk or Tq <= 0:
        raise ValueError(f"need 0 < Tq <= Tk (queries are the last Tq of the Tk keys), got Tq={Tq}, Tk={Tk}")
    return _linear_bias(alibi_slopes(num_heads).to(device), Tq, Tk, causal).to(dtype)  # (H, Tq, Tk)


def _linear_bias(slopes: torch.Tensor, Tq: int, Tk: int, causal: bool) -> torch.Tensor:
    """eq. (3) for the given slopes (H,), in float32 whatever the model dtype: (H, Tq, Tk)."""
    i = torch.arange(Tk - Tq, Tk, device=slopes.device, dtype=torch.float32).view(Tq, 1)
    j = torch.arange(Tk, device=slopes.device, dtype=torch.float32).view(1, Tk)
    distance = i - j if causal else (i - j).abs()                      # (Tq, Tk)
    return -slopes.float().view(-1, 1, 1) * distance                   # (H, Tq, Tk), eq. (3)


class ALiBiAttention(nn.Module):
    """Multi-head attention with the linear biases of eq. (3)-(4) and no position embeddings.

    Args: d_model, num_heads, dropout, bias as in multi-head attention. The slopes are a fixed buffer
    `slopes` (num_heads,), not a parameter (the paper found learning them did not help).

    forward(query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=True, need_weights=False)
        is_causal defaults to True because ALiBi was defined for causal language models; with
        is_causal=False the bias is the symmetric -m_h |i - j| (an extension, not in the paper).
        query (B, Tq, d_model); key, value (B, Tk, d_model), default to query; queries are the last
        Tq of the Tk key tokens. mask: bool, True = may attend, (Tq, Tk) or 4-D broadcastable to
        (B, H, Tq, Tk); a 1-D or 3-D mask raises ValueError. key_padding_mask: bool (B, Tk), True = a
        real key. mask, key_padding_mask and the causal mask are combined by a logical AND.
        Returns (B, Tq, d_model), or (output, weights (B, H, Tq, Tk) before dropout).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # Fixed, so not saved in the state dict (persistent=False): it is rebuilt from num_heads.
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)  # (H,)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None,
                value: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = True,
                need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        key = query if key is None else key
        value = key if value is None else value
        _check_sequence(query, "query", self.d_model, "d_model")
        _check_sequence(key, "key", self.d_model, "d_model")
        _check_sequence(value, "value", self.d_model, "d_model")
        _check_matching(query, "query", key, "key", 0, "batch size")
        _check_matching(key, "key", value, "value", 0, "batch size")
        _check_matching(key, "key", value, "value", 1, "length")
        B, Tq, _ = query.shape
        Tk = key.shape[1]
        if Tq > Tk:
            raise ValueError(f"query is longer than key: queries are the last Tq of the Tk key tokens, "
                             f"got query {tuple(query.shape)} and key {tuple(key.shape)}")
        H, Dh = self.num_heads, self.head_dim
        _check_mask(mask, (B, H, Tq, Tk))
        _check_key_padding_mask(key_padding_mask, B, Tk)
        # Bottom-right aligned causal mask: query i is token Tk - Tq + i of the key sequence (KV cache).
        allowed = _merge_masks(mask, key_padding_mask, is_causal, Tq, Tk, query.device)  # (.., Tq, Tk) or None

        q = self.q_proj(query).view(B, Tq, H, Dh).transpose(1, 2)       # (B, H, Tq, Dh)
        k = self.k_proj(key).view(B, Tk, H, Dh).transpose(1, 2)         # (B, H, Tk, Dh)
        v = self.v_proj(value).view(B, Tk, H, Dh).transpose(1, 2)       # (B, H, Tk, Dh)

        # eq. (3), from the buffer, so that a user may inspect or change the slopes.
        bias = _linear_bias(self.slopes, Tq, Tk, is_causal)              # (H, Tq, Tk)

        p = self.dropout if self.training else 0.0
        out, weights = _attend(q, k, v, allowed, bias.to(q.dtype), 1.0 / math.sqrt(Dh), p,
                               need_weights)                             # eq. (4); (B, H, Tq, Dh)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Tq, self.d_model))  # (B, Tq, d_model)
        return (out, weights) if need_weights else out


def _attend(q, k, v, allowed, bias, scale, dropout_p, need_weights):
    """softmax(q k^T * scale + bias) v over the allowed keys; a query with no allowed key gives zeros.

    q (B, H, Tq, Dh), k and v (B, H, Tk, Dh); allowed: bool broadcastable to (B, H, Tq, Tk) or None;
    bias: float broadcastable to (B, H, Tq, Tk) or None. Fused kernel unless need_weights.
    """
    row_any = None
    if allowed is not None:
        # A row with no allowed key would be -inf everywhere (NaN after softmax, in the forward and the
        # backward pass). Let such rows see every key, then multiply their result by zero.
        row_any = allowed.any(dim=-1, keepdim=True)                      # (.., Tq, 1)
        allowed = allowed | ~row_any                                     # (.., Tq, Tk)
    weights = None
    if need_weights:
        scores = (q @ k.transpose(-1, -2)) * scale                       # (B, H, Tq, Tk)
        if bias is not None:
            scores = scores + bias
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1)                          # (B, H, Tq, Tk)
        if row_any is not None:
            weights = weights * row_any
        dropped = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
        out = dropped @ v                                                # (B, H, Tq, Dh)
    else:
        attn_mask = allowed
        if bias is not None:
            attn_mask = bias.to(q.dtype)
            if allowed is not None:
                attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))  # (B|1, H, Tq, Tk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                             scale=scale)                # (B, H, Tq, Dh)
    if row_any is not None:
        out = out * row_any
    return out, weights


def _demo() -> None:
    """The demo; the guard at the very end of the file calls it, once the shared helpers exist."""
    torch.manual_seed(0)
    B, T, d_model, num_heads = 2, 12, 24, 6
    attn = ALiBiAttention(d_model, num_heads).eval()
    out = attn(torch.randn(B, T, d_model))
    print("output shape:", tuple(out.shape))

    # Checked fact: the slopes for 6 heads follow the paper's rule, written out by hand:
    # the 4-head sequence 2^-2, 2^-4, 2^-6, 2^-8, then the 1st and 3rd of the 8-head sequence 2^-1, 2^-3.
    expected = torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3])
    print("slopes for 6 heads:", [round(s, 6) for s in attn.slopes.tolist()])
    diff = (attn.slopes - expected).abs().max().item()
    print(f"max |slopes - paper's rule| = {diff:.1e}")
    assert diff == 0.0


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
