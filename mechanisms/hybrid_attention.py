"""Hybrid attention (Based): sliding-window softmax attention plus global Taylor linear attention.

Paper: Simran Arora, Sabri Eyuboglu, Michael Zhang, Aman Timalsina, Silas Alberti, Dylan Zinsley, James Zou,
Atri Rudra, Christopher Re, "Simple linear attention language models balance the recall-throughput
tradeoff", 2024, arXiv:2402.18668 (the Based architecture).

Idea: softmax attention recalls any earlier token exactly but keeps a cache that grows with the sequence;
linear attention keeps a fixed-size state but blurs what it stores. Based combines a small sliding window of
exact softmax attention (precise local shifts and comparisons) with global linear attention whose feature
map is the 2nd-order Taylor expansion of exp, phi(q).phi(k) = 1 + q.k + (q.k)^2 / 2, on a small projected
feature dimension d' (feature_dim). Here both branches live in one layer and read the same values: each
head's output is the average of the two branches' outputs (Based stacks them as separate layers; this file
puts them side by side so that one module is one "Based mixer").

Equations (page): window W(i) = {j : i - w <= j <= i} (causal) or {j : |i - j| <= w}         eq. (1)
                  o_swa_i = sum_{j in W(i)} softmax_j(q_i.k_j / sqrt(Dh)) v_j                 eq. (2)
                  phi(x) = [1, x, vec(x x^T) / sqrt(2)],  phi(a).phi(b) = 1 + a.b + (a.b)^2 / 2  eq. (3), (4)
                  o_lin_i = sum_j phi(a_i).phi(b_j) v_j / sum_j phi(a_i).phi(b_j)            eq. (5)
                  recurrent: S_i = S_{i-1} + phi(b_i) v_i^T,  z_i = z_{i-1} + phi(b_i)      eq. (6)
                  chunkwise: exact inside a chunk, the state S of earlier chunks outside      eq. (7)
                  out = Concat_h((o_swa + o_lin) / 2) W^O + b^O                               eq. (8)
with a = W_a x / d'^(1/4), b = W_b x / d'^(1/4) (so that a.b = (W_a x).(W_b x) / sqrt(d'), as in Based).

Complexity in sequence length T, with window w, feature size F = 1 + d' + d'^2 and chunk size C:
sliding window O(T w Dh) time and O(T w) memory (computed in blocks of w); linear branch O(T (C + F) Dh)
time and O(T C + (T / C) F Dh) memory in its chunkwise causal form, O(F Dh) state per head when decoding
token by token. The explicit path (need_weights=True, or an arbitrary `mask`) is dense: O(T^2).

Reduces to / oracle: with linear_branch=False and window >= T - 1 it is multi-head attention (causal with
is_causal=True); the kernel identity eq. (4) is checked exactly; the chunkwise and global forms equal the
token-by-token recurrence `taylor_linear_attention_recurrent` and an explicit double loop over eq. (5)
(tests/test_hybrid_attention.py).

Docs page: docs/mechanisms/hybrid_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [1, x, vec(x x^T) / sqrt(2)] on the last axis, eq. (3): (..., d') -> (..., 1 + d' + d'^2).

    Chosen so that phi(a).phi(b) = 1 + a.b + (a.b)^2 / 2, eq. (4): the second-order Taylor polynomial of
    exp(a.b). It is positive for every a.b (its minimum, at a.b = -1, is 1/2), so the normaliser of eq. (5)
    never vanishes while a row has a key.
    """
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0)  # (..., d'^2)
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)  # (..., 1 + d' + d'^2)


def taylor_linear_attention_recurrent(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal Taylor linear attention one token at a time, eq. (6): the form a decoder runs.

    a, b: (B, H, T, d') scaled query/key features; v: (B, H, T, Dh). Keeps only the state S (F, Dh) and the
    normaliser z (F,) per head, whatever T is. Returns (B, H, T, Dh).
    """
    phi_a, phi_b = taylor_feature_map(a), taylor_feature_map(b)  # (B, H, T, F)
    state = v.new_zeros(*v.shape[:2], phi_b.size(-1), v.size(-1))  # (B, H, F, Dh)
    norm = v.new_zeros(*v.shape[:2], phi_b.size(-1))  # (B, H, F)
    outputs = []
    for t in range(v.size(2)):
        state = state + phi_b[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, F, Dh)  eq. (6)
        norm = norm + phi_b[:, :, t]  # (B, H, F)
        numerator = (phi_a[:, :, t, :, None] * state).sum(-2)  # (B, H, Dh)
        denominator = (phi_a[:, :, t] * norm).sum(-1, keepdim=True)  # (B, H, 1)
        outputs.append(numerator / denominator)
    return torch.stack(outputs, dim=2)  # (B, H, T, Dh)


def _taylor_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """phi(a_i).phi(b_j) for all pairs without building the features, eq. (4): (..., Tq, d'), (..., Tk, d')."""
    s = a @ b.transpose(-2, -1)  # (..., Tq, Tk)
    return 1.0 + s + 0.5 * s * s  # (..., Tq, Tk)


def _linear_global(a, b, v, keep):
    """Non-causal eq. (5) through the state: every query reads the same S = sum_j phi(b_j) v_j^T."""
    phi_b = taylor_feature_map(b)  # (B, H, Tk, F)
    if keep is not None:
        phi_b = phi_b * keep  # padded keys add nothing to S or z
    phi_a = taylor_feature_map(a)  # (B, H, Tq, F)
    state = phi_b.transpose(-2, -1) @ v  # (B, H, F, Dh)
    norm = phi_b.sum(-2)  # (B, H, F)
    numerator = phi_a @ state  # (B, H, Tq, Dh)
    denominator = (phi_a * norm.unsqueeze(-2)).sum(-1, keepdim=True)  # (B, H, Tq, 1)
    return numerator, denominator


def _linear_chunkwise_causal(a, b, v, keep, chunk_size):
    """Causal eq. (5) in chunks of C tokens, eq. (7): a C x C kernel inside each chunk, the running state of
    all earlier chunks outside it. Never forms a (T, T) matrix; exactly equal to eq. (6)."""
    batch, heads, t, _ = a.shape
    c = min(chunk_size, t)
    n = math.ceil(t / c)
    pad = n * c - t
    keep = torch.ones_like(b[..., :1]) if keep is None else keep.expand(batch, heads, t, 1)  # (B, H, T, 1)
    a_c = F.pad(a, (0, 0, 0, pad)).unflatten(2, (n, c))  # (B, H, n, C, d')
    b_c = F.pad(b, (0, 0, 0, pad)).unflatten(2, (n, c))  # (B, H, n, C, d')
    v_c = F.pad(v, (0, 0, 0, pad)).unflatten(2, (n, c))  # (B, H, n, C, Dh)
    keep_c = F.pad(keep, (0, 0, 0, pad)).unflatten(2, (n, c))  # (B, H, n, C, 1): padding is never a key
    # Inside the chunk: the exact kernel of eq. (4), lower-triangular (key j <= query i).
    tril = torch.ones(c, c, dtype=torch.bool, device=a.device).tril()  # (C, C)
    kernel = _taylor_kernel(a_c, b_c) * tril * keep_c.transpose(-2, -1)  # (B, H, n, C, C)
    numerator = kernel @ v_c  # (B, H, n, C, Dh)
    denominator = kernel.sum(-1, keepdim=True)  # (B, H, n, C, 1)
    # Across chunks: chunk m's contribution phi(b)^T v, summed over the chunks strictly before each chunk.
    phi_b = taylor_feature_map(b_c) * keep_c  # (B, H, n, C, F)
    chunk_state = phi_b.transpose(-2, -1) @ v_c  # (B, H, n, F, Dh)
    chunk_norm = phi_b.sum(-2)  # (B, H, n, F)
    state = F.pad(chunk_state.cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :n]  # (B, H, n, F, Dh): chunks < m
    norm = F.pad(chunk_norm.cumsum(2), (0, 0, 1, 0))[:, :, :n]  # (B, H, n, F)
    phi_a = taylor_feature_map(a_c)  # (B, H, n, C, F)
    numerator = numerator + phi_a @ state  # (B, H, n, C, Dh)  eq. (7)
    denominator = denominator + (phi_a * norm.unsqueeze(-2)).sum(-1, keepdim=True)  # (B, H, n, C, 1)
    return numerator.flatten(2, 3)[:, :, :t], denominator.flatten(2, 3)[:, :, :t]  # (B, H, T, Dh), (B, H, T, 1)


def _window_blocked(q, k, v, keep, window, causal, dropout_p):
    """Eq. (1)-(2) in blocks of b = window tokens: a query block meets its own block and the block before it
    (and after it, when not causal), so no (T, T) score matrix exists. Returns (output, row_has_key)."""
    batch, heads, t, head_dim = q.shape
    blk = min(max(window, 1), t)
    n = math.ceil(t / blk)
    pad = n * blk - t
    right = 0 if causal else 1
    span = (2 + right) * blk  # keys per query block
    q_blk = F.pad(q, (0, 0, 0, pad)).unflatten(2, (n, blk))  # (B, H, n, b, Dh)
    kv_pad = (0, 0, blk, pad + right * blk)
    k_blk = F.pad(k, kv_pad).unfold(2, span, blk).transpose(-1, -2)  # (B, H, n, span, Dh)
    v_blk = F.pad(v, kv_pad).unfold(2, span, blk).transpose(-1, -2)  # (B, H, n, span, Dh)
    # Query row r of block m is position m*b + r, key column s is position (m-1)*b + s: i - j = b + r - s.
    dist = blk + torch.arange(blk, device=q.device)[:, None] - torch.arange(span, device=q.device)  # (b, span)
    band = (dist >= 0) & (dist <= window) if causal else dist.abs() <= window  # (b, span)  eq. (1)
    real = torch.zeros(batch, blk + t + pad + right * blk, dtype=torch.bool, device=q.device)  # (B, padded T)
    real[:, blk:blk + t] = True if keep is None else keep[:, 0, :, 0]
    real_blk = real.unfold(1, span, blk)  # (B, n, span)
    allowed = band & real_blk[:, None, :, None, :]  # (B, 1, n, b, span)
    row_has_key = allowed.any(-1, keepdim=True)  # (B, 1, n, b, 1)
    safe = allowed | ~row_has_key  # a row with no key gets every key, then its output is zeroed
    out = F.scaled_dot_product_attention(q_blk, k_blk, v_blk, attn_mask=safe, dropout_p=dropout_p)  # (B, H, n, b, Dh)
    out = (out * row_has_key).flatten(2, 3)[:, :, :t]  # (B, H, T, Dh)
    return out, row_has_key.flatten(2, 3)[:, :, :t]  # (B, H, T, Dh), (B, 1, T, 1)


class HybridAttention(nn.Module):
    """Based's hybrid: sliding-window softmax attention plus global Taylor linear attention, one layer.

    Args:
        d_model: width of inputs and output; must be divisible by num_heads.
        num_heads: number of heads H; head_dim Dh = d_model // num_heads.
        window: w >= 0, the softmax branch's window of eq. (1) (causal: i - w <= j <= i; else |i - j| <= w).
        feature_dim: d', width of the linear branch's query/key features (Based uses 16); the state per head
            has (1 + d' + d'^2) x Dh numbers.
        linear_branch: keep the global linear branch; False leaves sliding-window attention alone.
        dropout: dropout on the sliding-window branch's softmax weights (training only). The linear branch
            is computed through its state, where no per-pair weight exists to drop.
        bias: whether the projections have a bias.

    forward(query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=False,
    need_weights=False) -> (B, Tq, d_model), or (output, weights (B, H, Tq, Tk)): the weights of the mixture,
    (softmax-window weights + linear weights) / 2 per row, taken before dropout.
    Fast path (no `mask`, Tq = Tk, need_weights=False): window in blocks, linear branch chunkwise (causal) or
    through its global state. Otherwise the explicit dense path of eq. (2) and (5), which accepts any mask.
    """

    chunk_size = 64  # C of eq. (7); any value gives the same output (tested), it only trades time for memory

    def __init__(self, d_model: int, num_heads: int, window: int, feature_dim: int = 16, linear_branch: bool = True,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ValueError(f"window must be an integer >= 0, got {window!r}")
        _check_positive_int(feature_dim, "feature_dim")
        if not isinstance(linear_branch, bool):
            raise ValueError(f"linear_branch must be True or False, got {linear_branch!r}")
        _check_dropout(dropout)
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.window, self.feature_dim, self.linear_branch, self.dropout = window, feature_dim, linear_branch, dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)  # one set of values, read by both branches
        if linear_branch:
            # Based projects queries and keys of the linear branch to a small d' so that the state stays small.
            self.feature_q_proj = nn.Linear(d_model, num_heads * feature_dim, bias=bias)
            self.feature_k_proj = nn.Linear(d_model, num_heads * feature_dim, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return f"window={self.window}, feature_dim={self.feature_dim}, linear_branch={self.linear_branch}"

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
        batch, tq, _ = query.shape
        tk = key.size(1)
        heads, head_dim = self.num_heads, self.head_dim
        _check_mask(mask, (batch, heads, tq, tk))
        _check_key_padding_mask(key_padding_mask, batch, tk)

        q = self.q_proj(query).view(batch, tq, heads, head_dim).transpose(1, 2)  # (B, H, Tq, Dh)
        k = self.k_proj(key).view(batch, tk, heads, head_dim).transpose(1, 2)  # (B, H, Tk, Dh)
        v = self.v_proj(value).view(batch, tk, heads, head_dim).transpose(1, 2)  # (B, H, Tk, Dh)
        a = b = None
        if self.linear_branch:
            # Divide by d'^(1/4) on each side, so a.b = q'.k' / sqrt(d') as in Based's Taylor map.
            root = self.feature_dim ** 0.25
            a = self.feature_q_proj(query).view(batch, tq, heads, -1).transpose(1, 2) / root  # (B, H, Tq, d')
            b = self.feature_k_proj(key).view(batch, tk, heads, -1).transpose(1, 2) / root  # (B, H, Tk, d')
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if mask is None and tq == tk and not need_weights:
            keep = None if key_padding_mask is None else key_padding_mask[:, None, :, None]  # (B, 1, Tk, 1)
            out, has_window = _window_blocked(q, k, v, keep, self.window, is_causal, dropout_p)  # (B, H, T, Dh)
            if self.linear_branch:
                keep_f = None if keep is None else keep.to(v.dtype)
                if is_causal:
                    numerator, denominator = _linear_chunkwise_causal(a, b, v, keep_f, self.chunk_size)
                else:
                    numerator, denominator = _linear_global(a, b, v, keep_f)
                out = self._mix(out, has_window, numerator, denominator)  # (B, H, T, Dh)
        else:
            out, weights = self._explicit(q, k, v, a, b, mask, key_padding_mask, is_causal, dropout_p)
        out = out.transpose(1, 2).reshape(batch, tq, self.d_model)  # (B, Tq, d_model): concatenate heads
        out = self.out_proj(out)  # (B, Tq, d_model)  eq. (8)
        return (out, weights) if need_weights else out

    @staticmethod
    def _mix(window_out, has_window, numerator, denominator):
        """Eq. (8): the average of the two branches; a branch with no visible key in a row drops out."""
        has_linear = denominator > 0  # (B, H, Tq, 1)
        linear_out = numerator / torch.where(has_linear, denominator, torch.ones_like(denominator))  # eq. (5)
        count = (has_window.to(numerator.dtype) + has_linear.to(numerator.dtype)).clamp_min(1.0)  # (B, H, Tq, 1)
        return (window_out + linear_out) / count  # (B, H, Tq, Dh)

    def _explicit(self, q, k, v, a, b, mask, key_padding_mask, is_causal, dropout_p):
        """Dense eq. (2) and (5) with any mask; returns (output, mixture weights (B, H, Tq, Tk))."""
        tq, tk = q.size(2), k.size(2)
        visible = _merge_masks(mask, key_padding_mask, is_causal, tq, tk, q.device)  # (Tq, Tk) or 4-D, or None
        if visible is None:
            visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device)  # (Tq, Tk)
        # The window, eq. (1), with query i at position i + Tk - Tq (bottom-right, as the causal mask).
        dist = torch.arange(tq, device=q.device)[:, None] + (tk - tq) - torch.arange(tk, device=q.device)  # (Tq, Tk)
        band = (dist >= 0) & (dist <= self.window) if is_causal else dist.abs() <= self.window  # (Tq, Tk)
        in_window = visible & band  # (B, H, Tq, Tk) or (Tq, Tk)
        has_window = in_window.any(-1, keepdim=True)  # (..., Tq, 1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, Tq, Tk)
        scores = scores.masked_fill(~(in_window | ~has_window), float("-inf"))  # empty rows: any finite answer
        window_weights = torch.softmax(scores, dim=-1) * has_window  # (B, H, Tq, Tk)  eq. (2)
        dropped = F.dropout(window_weights, p=dropout_p) if dropout_p > 0.0 else window_weights
        if not self.linear_branch:
            return dropped @ v, window_weights  # (B, H, Tq, Dh), (B, H, Tq, Tk)
        kernel = _taylor_kernel(a, b).masked_fill(~visible, 0.0)  # (B, H, Tq, Tk)  eq. (4)
        denominator = kernel.sum(-1, keepdim=True)  # (B, H, Tq, 1)
        has_linear = denominator > 0
        linear_weights = kernel / torch.where(has_linear, denominator, torch.ones_like(denominator))  # eq. (5)
        count = (has_window.to(v.dtype) + has_linear.to(v.dtype)).clamp_min(1.0)  # (B, H, Tq, 1)
        out = (dropped @ v + linear_weights @ v) / count  # (B, H, Tq, Dh)  eq. (8)
        return out, (window_weights + linear_weights) / count


def _demo() -> None:
    """Demo of `python mechanisms/hybrid_attention.py`; the guard at the end of the file calls it."""
    torch.manual_seed(0)
    d_model, num_heads, window, T = 32, 4, 3, 20
    attn = HybridAttention(d_model, num_heads, window=window, feature_dim=4).eval()
    attn.chunk_size = 8  # three chunks over 20 tokens
    x = torch.randn(2, T, d_model)
    with torch.no_grad():
        fast = attn(x, is_causal=True)  # blocked window + chunkwise linear branch
        dense, weights = attn(x, is_causal=True, need_weights=True)  # explicit (T, T) path
        # Oracle inline: the linear branch token by token (eq. (6)) and the window by a dense band mask.
        q = attn.q_proj(x).view(2, T, num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).view(2, T, num_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).view(2, T, num_heads, -1).transpose(1, 2)
        a = attn.feature_q_proj(x).view(2, T, num_heads, -1).transpose(1, 2) / 4 ** 0.25
        b = attn.feature_k_proj(x).view(2, T, num_heads, -1).transpose(1, 2) / 4 ** 0.25
        i, j = torch.arange(T)[:, None], torch.arange(T)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(d_model // num_heads)).masked_fill(
            (j > i) | (j < i - window), float("-inf"))
        heads = (torch.softmax(scores, -1) @ v + taylor_linear_attention_recurrent(a, b, v)) / 2
        expected = attn.out_proj(heads.transpose(1, 2).reshape(2, T, d_model))
    diff = max((fast - expected).abs().max().item(), (dense - expected).abs().max().item())
    print(f"output shape {tuple(fast.shape)}, weights {tuple(weights.shape)}")
    print(f"max |HybridAttention (fast and explicit) - recurrent + band-mask oracle| = {diff:.2e}")
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
