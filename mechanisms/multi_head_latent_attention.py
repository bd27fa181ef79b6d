"""Multi-head latent attention (MLA): keys and values compressed jointly into one small latent per token.

Paper: DeepSeek-AI (Aixin Liu, Bei Feng, Bin Wang, et al.), "DeepSeek-V2: A Strong, Economical, and Efficient
Mixture-of-Experts Language Model", 2024, arXiv:2405.04434 (section 2.1, "Multi-Head Latent Attention").

Idea: a decoder's KV cache, not its arithmetic, limits generation. GQA and MQA shrink the cache by sharing
key/value heads, which costs quality. MLA instead caches one low-rank latent c_KV (kv_latent_dim = d_c numbers
per token) from which every head's key and value are re-created by up-projections W^UK, W^UV. Because those are
linear, they can be *absorbed*: W^UK into the query and W^UV into the output, so decoding attends directly over
the cached latents and never re-creates per-head keys. Rotary positions cannot pass through the absorption (a
rotation between W^UK and the query would depend on the key's position), so position is carried by a separate,
decoupled rotary key k^R of rope_dim = d_R numbers per token, shared by all heads and cached beside c_KV.

Equations (page eq. (1)-(10)):
    c_KV = x W^DKV,   K^C_h = c_KV W^UK_h,   V_h = c_KV W^UV_h                  (joint compression)
    Q^C_h = c_Q W^UQ_h,  c_Q = x W^DQ (or x itself),  q^R_h = RoPE(c_Q W^QR_h),  k^R = RoPE(x W^KR)
    head_h = softmax([Q^C_h, q^R_h] [K^C_h, k^R]^T / sqrt(Dh + d_R) + log M) V_h,   out = Concat(heads) W^O
    absorbed:  Q^C_h (K^C_h)^T = (Q^C_h W^UK_h^T) c_KV^T,   A_h V_h = (A_h c_KV) W^UV_h
    cache per token and layer: d_c + d_R numbers (MHA: 2 H Dh, GQA: 2 H_kv Dh, MQA: 2 Dh).

Complexity in sequence length (Tq queries, Tk keys): time O(H * Tq * Tk * (Dh + d_R)) on the naive path,
O(H * Tq * Tk * (d_c + d_R)) on the absorbed one; memory O(H * Tq * Tk) on the explicit path; the cache holds
O(Tk * (d_c + d_R)) numbers instead of multi-head attention's O(Tk * 2 * H * Dh).

Reduces to / oracle: with rope_dim = 0, kv_latent_dim = d_model and W^DKV = I it is multi-head attention with
W^K = W^UK, W^V = W^UV (checked against torch.nn.MultiheadAttention); the absorbed path equals the naive one and
cached token-by-token decoding equals recomputing the whole sequence (tests/test_multi_head_latent_attention.py).

Docs page: docs/mechanisms/multi_head_latent_attention.md
"""
import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate the feature pairs (x_i, x_{i + d/2}) of x (.., T, d) by the angles p * base^(-2i/d), eq. (5).

    positions: (T,) integers (any sign). The angles are computed in float32 (float64 for float64 input) and the
    result is cast back, because in bf16 an angle of thousands of radians loses all its digits.
    """
    half = x.size(-1) // 2
    if half == 0:
        return x  # rope_dim = 0: no decoupled rotary part
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=work) * 2.0 / x.size(-1))  # (d/2,)
    angles = positions.to(work)[:, None] * inv_freq  # (T, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # (T, d/2) each
    a, b = x[..., :half], x[..., half:]  # (.., T, d/2) each
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)  # (.., T, d)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
            dropout_p: float, need_weights: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """softmax(q k^T * scale + log mask) v with empty rows set to zero; returns (output, weights or None).

    q (B, H, Tq, Dq), k (B, H or 1, Tk, Dq), v (B, H or 1, Tk, Dv). A key/value head axis of size 1 is shared by
    every query head (the absorbed path is multi-query attention over the latent, eq. (8)).
    """
    row_has_key = None
    if mask is not None:
        # A row with no visible key would be softmax over all -inf = NaN: give it every key, zero it afterwards.
        row_has_key = mask.any(dim=-1, keepdim=True)  # (B, H, Tq, 1) or (Tq, 1)
        mask = mask | ~row_has_key  # same shape as mask
    if not need_weights:
        heads = q.size(1)
        k, v = k.expand(-1, heads, -1, -1), v.expand(-1, heads, -1, -1)  # views, (B, H, Tk, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                             scale=scale)  # (B, H, Tq, Dv)
        weights = None
    else:
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)  eq. (6)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: no weight
        weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk); each row sums to 1
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights  # unbiased: 1 / (1 - p)
        out = dropped @ v  # (B, H, Tq, Dv)
    if row_has_key is not None:
        out = out.masked_fill(~row_has_key, 0.0)  # a query that may see nothing returns zeros
        if weights is not None:
            weights = weights.masked_fill(~row_has_key, 0.0)
    return out, weights


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2), batch-first: (B, Tq, d_model) queries, (B, Tk, d_model) keys.

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H; head_dim Dh = d_model // num_heads is the width of K^C_h, Q^C_h and V_h.
        kv_latent_dim: d_c, width of the cached latent c_KV from which all keys and values are re-created.
        q_latent_dim: d_c', width of the query latent c_Q (query compression, which saves activations in
            training, not cache); None projects queries straight from the input, as DeepSeek-V2-Lite does.
        rope_dim: d_R, width of the decoupled rotary query/key part per head; even, 0 switches it off (then the
            module has no notion of position).
        rope_base: base of the rotary frequencies, eq. (5).
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the down-projections, the rotary projections and W^O have a bias. The up-projections W^UK,
            W^UV never have one (as in the paper): a bias there could not be absorbed into the latent cache.

    forward(query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=False, need_weights=False)
    computes the naive path (keys and values re-created per head). Keys and values come from ONE input through
    the shared latent, so `value` must be None or the very tensor passed as `key`. Positions: keys sit at
    0..Tk-1 and the queries at the last Tq of them (bottom-right, as with a cache and `is_causal`).
    step(query, cache=None, absorbed=True) decodes with the latent-only cache (eq. (8)-(10)).
    """

    def __init__(self, d_model: int, num_heads: int, kv_latent_dim: int, q_latent_dim: Optional[int] = None,
                 rope_dim: int = 0, rope_base: float = 10000.0, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_positive_int(kv_latent_dim, "kv_latent_dim")
        if q_latent_dim is not None:
            _check_positive_int(q_latent_dim, "q_latent_dim")
        if not isinstance(rope_dim, int) or isinstance(rope_dim, bool) or rope_dim < 0 or rope_dim % 2:
            raise ValueError(f"rope_dim must be an even integer >= 0 (features rotate in pairs), got {rope_dim!r}")
        if not isinstance(rope_base, (int, float)) or isinstance(rope_base, bool) or not rope_base > 1:
            raise ValueError(f"rope_base must be a number > 1, got {rope_base!r}")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.kv_latent_dim = kv_latent_dim
        self.q_latent_dim = q_latent_dim
        self.rope_dim = rope_dim
        self.rope_base = float(rope_base)
        self.dropout = dropout
        inner = num_heads * self.head_dim
        # Keys and values: ONE down-projection to the latent that is cached, eq. (1), and two up-projections
        # that re-create H heads from it, eq. (2).
        self.kv_down = nn.Linear(d_model, kv_latent_dim, bias=bias)  # W^DKV
        self.k_up = nn.Linear(kv_latent_dim, inner, bias=False)  # W^UK
        self.v_up = nn.Linear(kv_latent_dim, inner, bias=False)  # W^UV
        # Queries: optionally compressed too, eq. (3) (this saves activation memory, not cache).
        q_width = d_model if q_latent_dim is None else q_latent_dim
        self.q_down = None if q_latent_dim is None else nn.Linear(d_model, q_latent_dim, bias=bias)  # W^DQ
        self.q_up = nn.Linear(q_width, inner, bias=bias)  # W^UQ
        # The decoupled rotary parts, eq. (4): H query heads of width d_R, one key of width d_R for all heads.
        self.q_rope = nn.Linear(q_width, num_heads * rope_dim, bias=bias) if rope_dim else None  # W^QR
        self.k_rope = nn.Linear(d_model, rope_dim, bias=bias) if rope_dim else None  # W^KR
        self.out_proj = nn.Linear(inner, d_model, bias=bias)  # W^O
        # The score of eq. (6) is a dot product of width Dh + d_R; the absorbed path must keep this scale.
        self.scale = 1.0 / math.sqrt(self.head_dim + rope_dim)

    def extra_repr(self) -> str:
        return (f"kv_latent_dim={self.kv_latent_dim}, q_latent_dim={self.q_latent_dim}, rope_dim={self.rope_dim}, "
                f"dropout={self.dropout}")

    # ------------------------------------------------------------------ the pieces of eq. (1)-(4)
    def _queries(self, query: torch.Tensor, positions: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Q^C (B, H, Tq, Dh) and the rotated q^R (B, H, Tq, d_R) or None, eq. (3)-(4)."""
        batch, tq, _ = query.shape
        c_q = query if self.q_down is None else self.q_down(query)  # (B, Tq, d_c')  eq. (3)
        q_c = self.q_up(c_q).view(batch, tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, Dh)
        if self.q_rope is None:
            return q_c, None
        q_r = self.q_rope(c_q).view(batch, tq, self.num_heads, self.rope_dim).transpose(1, 2)  # (B, H, Tq, d_R)
        return q_c, _rope(q_r, positions, self.rope_base)  # (B, H, Tq, d_R)  eq. (4)

    def _latents(self, key: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What a decoder caches per token: [c_KV, RoPE(x W^KR)], (B, Tk, d_c + d_R), eq. (1), (4), (10)."""
        c_kv = self.kv_down(key)  # (B, Tk, d_c)  eq. (1)
        if self.k_rope is None:
            return c_kv
        k_r = _rope(self.k_rope(key), positions, self.rope_base)  # (B, Tk, d_R)  eq. (4): rotated once, cached
        return torch.cat((c_kv, k_r), dim=-1)  # (B, Tk, d_c + d_R)

    def _naive(self, q_c: torch.Tensor, q_r: Optional[torch.Tensor], latents: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-create every head's key and value from the latents: q, k (B, H, T, Dh + d_R), v (B, H, Tk, Dh)."""
        batch, tk, _ = latents.shape
        c_kv, k_r = latents[..., :self.kv_latent_dim], latents[..., self.kv_latent_dim:]  # (B, Tk, d_c), (B, Tk, d_R)
        k_c = self.k_up(c_kv).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh) eq. (2)
        v = self.v_up(c_kv).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)  eq. (2)
        if q_r is None:
            return q_c, k_c, v
        k_r = k_r[:, None].expand(-1, self.num_heads, -1, -1)  # (B, H, Tk, d_R): one rotary key for all heads
        return torch.cat((q_c, q_r), dim=-1), torch.cat((k_c, k_r), dim=-1), v  # eq. (6): [q^C, q^R], [k^C, k^R]

    def _finish(self, heads: torch.Tensor) -> torch.Tensor:
        """Concatenate (B, H, Tq, Dh) heads and apply W^O, eq. (7)."""
        batch, _, tq, _ = heads.shape
        return self.out_proj(heads.transpose(1, 2).reshape(batch, tq, self.num_heads * self.head_dim))  # (B, Tq, d)

    # ------------------------------------------------------------------ training / prefill: the naive path
    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from `query` (B, Tq, d_model) to `key` (B, Tk, d_model), default `query`.

        value: None or `key` itself (keys and values share the latent). mask: bool, True = may attend, (Tq, Tk)
        or broadcastable 4-D (B, H, Tq, Tk). key_padding_mask: bool (B, Tk), True = real token. is_causal:
        query i sees keys j <= i + (Tk - Tq). Returns (B, Tq, d_model), or (output, weights (B, H, Tq, Tk)
        taken before dropout) when need_weights=True.
        """
        key = query if key is None else key
        if value is not None and value is not key:
            raise ValueError("value must be None or the same tensor as key: multi-head latent attention computes "
                             "keys AND values from one input through the shared latent c_KV (eq. (1)); got a "
                             f"separate value of shape {tuple(value.shape) if isinstance(value, torch.Tensor) else value}")
        _check_sequence(query, "query", self.d_model, "d_model")
        _check_sequence(key, "key", self.d_model, "d_model")
        _check_matching(query, "query", key, "key", 0, "batch size")
        batch, tq, _ = query.shape
        tk = key.size(1)
        _check_mask(mask, (batch, self.num_heads, tq, tk))
        _check_key_padding_mask(key_padding_mask, batch, tk)
        merged = _merge_masks(mask, key_padding_mask, is_causal, tq, tk, query.device)  # (Tq, Tk) or 4-D

        key_positions = torch.arange(tk, device=query.device)  # (Tk,): keys at 0..Tk-1
        query_positions = torch.arange(tq, device=query.device) + (tk - tq)  # (Tq,): the last Tq positions
        q_c, q_r = self._queries(query, query_positions)  # (B, H, Tq, Dh), (B, H, Tq, d_R) or None
        q, k, v = self._naive(q_c, q_r, self._latents(key, key_positions))  # (B, H, T, Dh + d_R), v (B, H, Tk, Dh)
        dropout_p = self.dropout if self.training else 0.0  # dropout is off in eval()
        heads, weights = _attend(q, k, v, merged, self.scale, dropout_p, need_weights)  # (B, H, Tq, Dh)
        out = self._finish(heads)  # (B, Tq, d_model)  eq. (7)
        return (out, weights) if need_weights else out

    # ------------------------------------------------------------------ decoding: the latent-only cache
    def step(self, query: torch.Tensor, cache: Optional[torch.Tensor] = None, absorbed: bool = True
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Causal decoding of the new tokens `query` (B, Tn, d_model) after the cached ones; returns (out, cache).

        cache: None or (B, Tp, d_c + d_R), the latents [c_KV, RoPE(k^R)] of the Tp earlier tokens, eq. (10); the
        returned cache has Tp + Tn rows. absorbed=True attends over the latents directly (eq. (8)-(9));
        absorbed=False re-creates every head's keys and values from the cache first (the naive path).
        """
        _check_sequence(query, "query", self.d_model, "d_model")
        batch, tn, _ = query.shape
        width = self.kv_latent_dim + self.rope_dim
        if cache is not None and (not isinstance(cache, torch.Tensor) or cache.dim() != 3
                                  or cache.size(0) != batch or cache.size(2) != width):
            got = tuple(cache.shape) if isinstance(cache, torch.Tensor) else type(cache).__name__
            raise ValueError(f"cache must have shape (B, Tp, kv_latent_dim + rope_dim) = ({batch}, Tp, {width}), "
                             f"got {got}")
        past = 0 if cache is None else cache.size(1)
        positions = torch.arange(past, past + tn, device=query.device)  # (Tn,): the new tokens' positions
        new = self._latents(query, positions)  # (B, Tn, d_c + d_R)
        cache = new if cache is None else torch.cat((cache, new), dim=1)  # (B, Tk, d_c + d_R), Tk = Tp + Tn
        causal = _causal_mask(tn, cache.size(1), query.device)  # (Tn, Tk), bottom-right
        q_c, q_r = self._queries(query, positions)  # (B, H, Tn, Dh), (B, H, Tn, d_R) or None
        dropout_p = self.dropout if self.training else 0.0
        if not absorbed:
            q, k, v = self._naive(q_c, q_r, cache)  # per-head keys and values, rebuilt every step
            heads, _ = _attend(q, k, v, causal, self.scale, dropout_p, False)  # (B, H, Tn, Dh)
            return self._finish(heads), cache
        d_c = self.kv_latent_dim
        # eq. (8): Q^C_h (K^C_h)^T = (Q^C_h W^UK_h^T) c_KV^T. nn.Linear stores W^UK as (H*Dh, d_c); head h's
        # block (Dh, d_c) maps a head query to the latent space, so scores are taken against c_KV itself.
        w_uk = self.k_up.weight.view(self.num_heads, self.head_dim, d_c)  # (H, Dh, d_c)
        q_lat = torch.einsum("bhtd,hdc->bhtc", q_c, w_uk)  # (B, H, Tn, d_c)
        q = q_lat if q_r is None else torch.cat((q_lat, q_r), dim=-1)  # (B, H, Tn, d_c + d_R)
        # Every head reads the same cache: multi-query attention with head width d_c + d_R over the latents,
        # keeping the scale 1 / sqrt(Dh + d_R) of eq. (6), since the dot products are the same numbers.
        k = cache[:, None]  # (B, 1, Tk, d_c + d_R)
        v = cache[:, None, :, :d_c]  # (B, 1, Tk, d_c)
        o_lat, _ = _attend(q, k, v, causal, self.scale, dropout_p, False)  # (B, H, Tn, d_c): A_h c_KV
        w_uv = self.v_up.weight.view(self.num_heads, self.head_dim, d_c)  # (H, Dh, d_c)
        heads = torch.einsum("bhtc,hdc->bhtd", o_lat, w_uv)  # (B, H, Tn, Dh)  eq. (9): (A_h c_KV) W^UV_h
        return self._finish(heads), cache

    def cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes this layer caches per token, eq. (10): (kv_latent_dim + rope_dim) * bytes_per_element."""
        return cache_elements_per_token("MLA", kv_latent_dim=self.kv_latent_dim,
                                        rope_dim=self.rope_dim) * bytes_per_element


def cache_elements_per_token(kind: str, num_heads: int = 0, head_dim: int = 0, num_kv_heads: int = 0,
                             kv_latent_dim: int = 0, rope_dim: int = 0) -> int:
    """Numbers one layer caches per token, eq. (10): "MHA" 2 H Dh, "GQA" 2 H_kv Dh, "MQA" 2 Dh, "MLA" d_c + d_R."""
    if kind == "MHA":
        return 2 * num_heads * head_dim
    if kind == "GQA":
        return 2 * num_kv_heads * head_dim
    if kind == "MQA":
        return 2 * head_dim
    if kind == "MLA":
        return kv_latent_dim + rope_dim
    raise ValueError(f"kind must be one of 'MHA', 'GQA', 'MQA', 'MLA', got {kind!r}")


# DeepSeek-V2's attention shape (paper, section 3.1.2): 60 layers, H = 128 heads of Dh = 128, d_c = 512 = 4 Dh,
# d_R = 64 = Dh / 2. The GQA row uses 8 key/value groups, a common choice (e.g. Llama 2 70B).
DEEPSEEK_V2 = {"num_layers": 60, "num_heads": 128, "head_dim": 128, "kv_latent_dim": 512, "rope_dim": 64}


def cache_table(num_kv_heads: int = 8, bytes_per_element: int = 2) -> List[Dict[str, Union[str, int, float]]]:
    """Cache per token of DeepSeek-V2's attention shape as MHA, GQA (num_kv_heads groups), MQA and MLA, eq. (10).

    Each row: kind, elements (per token and layer), bytes_per_token (all layers), ratio to MHA.
    """
    shape = DEEPSEEK_V2
    rows = []
    for kind in ("MHA", "GQA", "MQA", "MLA"):
        elements = cache_elements_per_token(kind, shape["num_heads"], shape["head_dim"], num_kv_heads,
                                            shape["kv_latent_dim"], shape["rope_dim"])
        rows.append({"kind": kind, "elements": elements,
                     "bytes_per_token": elements * shape["num_layers"] * bytes_per_element,
                     "ratio": elements / (2 * shape["num_heads"] * shape["head_dim"])})
    return rows


def _demo() -> None:
    """Demo of `python mechanisms/multi_head_latent_attention.py`; the guard at the end of the file calls it."""
    torch.manual_seed(0)
    d_model, num_heads, d_c, d_r = 32, 4, 12, 4
    mla = MultiHeadLatentAttention(d_model, num_heads, kv_latent_dim=d_c, q_latent_dim=16, rope_dim=d_r).eval()
    x = torch.randn(2, 9, d_model)
    with torch.no_grad():
        full = mla(x, is_causal=True)  # the naive path over the whole sequence
        cache, outs = None, []
        for t in range(x.size(1)):  # token by token with the latent-only cache and the absorbed path
            out, cache = mla.step(x[:, t:t + 1], cache)
            outs.append(out)
        diff = (torch.cat(outs, dim=1) - full).abs().max().item()
    print(f"output shape {tuple(full.shape)}; cache {tuple(cache.shape)} = (B, T, kv_latent_dim + rope_dim)")
    print(f"max |absorbed cached decoding - naive full recompute| = {diff:.2e}")
    assert diff < 1e-5, diff
    print("cache per token, DeepSeek-V2 shape (60 layers, 128 heads of 128, d_c = 512, d_R = 64), 16-bit:")
    for row in cache_table():
        print(f"  {row['kind']}: {row['elements']:>6} numbers per layer, {row['bytes_per_token'] / 1024:8.1f} KiB "
              f"per token, {row['ratio']:.4f} of MHA")


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
