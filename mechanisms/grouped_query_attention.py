"""Grouped-query attention (GQA), with multi-query attention (MQA) as its one-group case.

Papers: Noam Shazeer, "Fast Transformer Decoding: One Write-Head is All You Need", 2019, arXiv:1911.02150
(multi-query attention); Joshua Ainslie, James Lee-Thorp, Michiel de Jong, Yury Zemlyanskiy, Federico
Lebron, Sumit Sanghai, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints", 2023, arXiv:2305.13245.

Idea: when a decoder generates token by token it keeps every past key and value (the KV cache), and
reading that cache, not arithmetic, is what limits its speed. GQA keeps num_heads query heads but only
num_kv_heads key/value heads; each key/value head is shared by a group of G = num_heads / num_kv_heads
consecutive query heads, so the cache shrinks by the factor num_kv_heads / num_heads. num_kv_heads = 1 is
Shazeer's multi-query attention; num_kv_heads = num_heads is ordinary multi-head attention.

Equation:  head_h = softmax(Q_h K_g(h)^T / sqrt(Dh) + log M) V_g(h),  g(h) = floor(h / G),  G = H / H_kv,
           out = Concat(head_1, ..., head_H) W^O,
           KV-cache bytes = 2 * layers * batch * T * H_kv * Dh * bytes_per_element.

Complexity in sequence length (Tq queries, Tk keys): time O(H * Tq * Tk * Dh), as multi-head attention;
memory O(H * Tq * Tk) on the explicit path; the cached keys and values take O(Tk * H_kv * Dh) instead of
O(Tk * H * Dh).

Reduces to / oracle: num_kv_heads = num_heads is multi-head attention with the same weights; checked
against torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True) and against an explicit
repeat_interleave of the key/value heads (tests/test_grouped_query_attention.py).

Docs page: docs/mechanisms/grouped_query_attention.md
"""
import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def _attend_grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                    dropout_p: float,
                    need_weights: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention where H query heads share H_kv key/value heads; returns (output, weights or None).

    query (B, H, Tq, Dh), key (B, H_kv, Tk, Dh), value (B, H_kv, Tk, Dh). Query head h reads key/value
    head h // G. The key/value heads are never copied H / H_kv times: the explicit path lines each group
    of G query heads up against its one key/value head and lets broadcasting share it. `mask` is the
    merged mask (user mask AND key padding AND causal), (Tq, Tk) or 4-D, or None.
    """
    heads, head_dim = query.size(1), query.size(3)
    kv_heads = key.size(1)
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    row_has_key = None
    if mask is not None:
        # A query row with no key to attend would be softmax over all -inf = NaN. Give such rows every key
        # (any finite answer will do), then overwrite their output with zeros.
        row_has_key = mask.any(dim=-1, keepdim=True)  # (B, H, Tq, 1) or (Tq, 1)
        mask = mask | ~row_has_key  # same shape as mask
    if not need_weights:
        # PyTorch's kernel does the same grouping itself when told enable_gqa=True.
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                             scale=scale, enable_gqa=True)  # (B, H, Tq, Dh)
        weights = None
    else:
        # Query head h = g * G + r is member r of group g, eq. (2): splitting the head axis into (H_kv, G)
        # puts group g's G query heads next to key/value head g.
        q = query.unflatten(1, (kv_heads, group))  # (B, H_kv, G, Tq, Dh)
        k = key.unsqueeze(2)  # (B, H_kv, 1, Tk, Dh): the 1 broadcasts over the G heads of the group
        v = value.unsqueeze(2)  # (B, H_kv, 1, Tk, Dh)
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, H_kv, G, Tq, Tk)  eq. (3)
        scores = scores.flatten(1, 2)  # (B, H, Tq, Tk): back to one axis of query heads, as the mask has
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: no weight
        weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk); each row sums to 1
        # Dropout drops whole query-key links, then rescales by 1 / (1 - p) so the expectation is unchanged.
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
        out = dropped.unflatten(1, (kv_heads, group)) @ v  # (B, H_kv, G, Tq, Dh)  eq. (3)
        out = out.flatten(1, 2)  # (B, H, Tq, Dh)
    if row_has_key is not None:
        out = out.masked_fill(~row_has_key, 0.0)  # a query that may see nothing returns zeros
        if weights is not None:
            weights = weights.masked_fill(~row_has_key, 0.0)
    return out, weights


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention, batch-first: (B, Tq, d_model) queries, (B, Tk, d_model) keys and values.

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of query heads H; head_dim = d_model // num_heads.
        num_kv_heads: number of key/value heads H_kv; must divide num_heads. 1 = multi-query attention,
            num_heads = multi-head attention.
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the four projections have a bias.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_positive_int(num_kv_heads, "num_kv_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_divisible(num_heads, "num_heads", num_kv_heads, "num_kv_heads")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        # Queries keep all H heads; keys and values get only H_kv heads of the same width, eq. (1). These two
        # narrower maps are where the parameters and, at generation time, the cache are saved.
        self.q_proj = nn.Linear(d_model, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, d_model, bias=bias)

    def kv_cache_ratio(self) -> float:
        """Size of this layer's KV cache relative to multi-head attention's: num_kv_heads / num_heads, eq. (7)."""
        return self.num_kv_heads / self.num_heads

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from `query` to `key`/`value` (both default to `query`: self-attention).

        mask: bool, True = may attend, (Tq, Tk) or broadcastable 4-D (B, H, Tq, Tk) with H = num_heads
        (one mask row per QUERY head).
        key_padding_mask: bool (B, Tk), True = a real key; False keys (padding) are never attended.
        is_causal: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned, as a KV cache needs).
        Returns (B, Tq, d_model), or (output, weights (B, num_heads, Tq, Tk) taken before dropout).
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
        # One boolean mask: the user's mask AND the real keys AND, with is_causal, the causal mask of eq. (4).
        mask = _merge_masks(mask, key_padding_mask, is_causal, tq, tk, query.device)  # (Tq, Tk) or 4-D

        q = self.q_proj(query).view(batch, tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, Dh)
        k = self.k_proj(key).view(batch, tk, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, Tk, Dh)
        v = self.v_proj(value).view(batch, tk, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, Tk, Dh)
        # k and v are what a decoder would cache: H_kv heads instead of H, eq. (6).

        dropout_p = self.dropout if self.training else 0.0  # dropout is off in eval()
        out, weights = _attend_grouped(q, k, v, mask, dropout_p, need_weights)  # (B, H, Tq, Dh)
        out = out.transpose(1, 2).reshape(batch, tq, self.d_model)  # (B, Tq, d_model): concatenate the heads
        out = self.out_proj(out)  # (B, Tq, d_model)  eq. (5)
        return (out, weights) if need_weights else out


def kv_cache_bytes(num_layers: int, batch_size: int, seq_len: int, num_kv_heads: int, head_dim: int,
                   bytes_per_element: int = 2) -> int:
    """Bytes a decoder's KV cache holds, eq. (6): one key AND one value vector per layer, token and KV head.

    bytes_per_element: 2 for float16/bfloat16, 4 for float32, 1 for an 8-bit cache.
    """
    for value, name in ((num_layers, "num_layers"), (batch_size, "batch_size"), (seq_len, "seq_len"),
                        (num_kv_heads, "num_kv_heads"), (head_dim, "head_dim"),
                        (bytes_per_element, "bytes_per_element")):
        _check_positive_int(value, name)
    return 2 * num_layers * batch_size * seq_len * num_kv_heads * head_dim * bytes_per_element


# Published shapes of some well-known decoders: (name, layers, query heads, key/value heads, head_dim).
COMMON_CONFIGS = (
    ("Llama 2 7B", 32, 32, 32, 128),
    ("Llama 2 70B", 80, 64, 8, 128),
    ("Mistral 7B", 32, 32, 8, 128),
    ("Llama 3 8B", 32, 32, 8, 128),
    ("Falcon 7B", 32, 71, 1, 64),
)


def kv_cache_table(seq_len: int = 4096, batch_size: int = 1,
                   bytes_per_element: int = 2) -> List[Dict[str, Union[str, int, float]]]:
    """The KV-cache ratio of eq. (7) and the cache size of eq. (6) for each of COMMON_CONFIGS.

    Each row: name, num_layers, num_heads, num_kv_heads, head_dim, ratio (num_kv_heads / num_heads),
    cache_bytes (this model) and mha_cache_bytes (the same model with num_kv_heads = num_heads).
    """
    rows = []
    for name, num_layers, num_heads, num_kv_heads, head_dim in COMMON_CONFIGS:
        rows.append({
            "name": name, "num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
            "head_dim": head_dim, "ratio": num_kv_heads / num_heads,
            "cache_bytes": kv_cache_bytes(num_layers, batch_size, seq_len, num_kv_heads, head_dim,
                                          bytes_per_element),
            "mha_cache_bytes": kv_cache_bytes(num_layers, batch_size, seq_len, num_heads, head_dim,
                                              bytes_per_element),
        })
    return rows


def _demo() -> None:
    """The demo; the guard at the very end of the file calls it, once the shared helpers exist."""
    torch.manual_seed(0)
    d_model, num_heads, num_kv_heads = 32, 8, 2
    gqa = GroupedQueryAttention(d_model, num_heads, num_kv_heads).eval()
    x = torch.randn(2, 10, d_model)
    out = gqa(x, is_causal=True)  # the fused path
    # Oracle inline: copy each key/value head to the G query heads of its group, then plain attention.
    with torch.no_grad():
        group = num_heads // num_kv_heads
        q = gqa.q_proj(x).view(2, 10, num_heads, -1).transpose(1, 2)  # (B, H, T, Dh)
        k = gqa.k_proj(x).view(2, 10, num_kv_heads, -1).transpose(1, 2).repeat_interleave(group, dim=1)
        v = gqa.v_proj(x).view(2, 10, num_kv_heads, -1).transpose(1, 2).repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d_model // num_heads)
        scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
        heads = torch.softmax(scores, dim=-1) @ v  # (B, H, T, Dh)
        expected = gqa.out_proj(heads.transpose(1, 2).reshape(2, 10, d_model))
        diff = (out - expected).abs().max().item()
    print(f"output shape {tuple(out.shape)}; KV cache {num_kv_heads}/{num_heads} = {gqa.kv_cache_ratio():.2f} "
          f"of multi-head attention's")
    print(f"max |GroupedQueryAttention - repeat_interleave oracle| = {diff:.2e}")
    assert diff < 1e-5, diff
    print("KV cache at 4096 tokens, batch 1, 16-bit:")
    for row in kv_cache_table():
        print(f"  {row['name']:<12} H={row['num_heads']:<3} H_kv={row['num_kv_heads']:<3} "
              f"ratio={row['ratio']:.3f}  {row['cache_bytes'] / 2**30:.3f} GiB "
              f"(multi-head: {row['mha_cache_bytes'] / 2**30:.3f} GiB)")


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
