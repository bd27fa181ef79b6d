"""Longformer attention: a sliding window computed in blocks, plus symmetric global tokens.

Paper: Iz Beltagy, Matthew E. Peters, Arman Cohan (2020), "Longformer: The Long-Document Transformer",
arXiv:2004.05150.

Idea: each token attends to the keys within `window` positions of it (a band, so the cost is linear in the
sequence length), and a few task-chosen *global* tokens (a [CLS] token, the question in QA) attend to every
token and are attended by every token, so information can still cross the whole sequence in one layer. The
band is computed block against three neighbouring blocks, never as a (T, T) masked matrix; the global part
is G extra key columns for every query and G extra full rows. Global rows use their own projections
Q_g, K_g, V_g when `global_projections=True`, as in the paper.

Equations (page eq. (1)-(6)), for positions i (query) and j (key):
    band      B_ij = |i - j| <= window        (causal: additionally j <= i)
    pattern   M_ij = B_ij or g_i or g_j        (g = global_mask; AND key padding, AND causal)
    local i:  o_i = sum_j softmax_j(q_i . k_j / sqrt(Dh) + log M_ij) v_j
    global i: o_i = sum_j softmax_j(q^g_i . k^g_j / sqrt(Dh) + log M_ij) v^g_j   (all j)
    blocks:   query i = c b + r, key j = (c - 1) b + s, s < 3b; b = window

Complexity in sequence length T with window w and G global tokens: time and memory O(T (w + G) + G T), i.e.
linear in T at fixed w and G. need_weights=True additionally assembles dense (B, H, T, T) weights for
inspection (O(T^2), small T only).

Reduces to / oracle: dense softmax attention with the mask M of eq. (2) for every (T, window, global set);
full multi-head attention when window >= T - 1 (tests/test_longformer_attention.py).

Docs page: docs/mechanisms/longformer_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def _softmax_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
                    dropout_p: float, need_weights: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """softmax(q k^T scale + log allowed) v over the last two axes; rows with no allowed key give zeros.

    q (..., Lq, Dh), k and v (..., Lk, Dh), allowed a boolean broadcastable to (..., Lq, Lk). Returns the output
    and, when need_weights, the weights (before dropout).
    """
    row_any = allowed.any(dim=-1, keepdim=True)  # (..., Lq, 1)
    safe = allowed | ~row_any  # an empty row gets every key (finite softmax), zeroed below
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, dropout_p=dropout_p, scale=scale)  # (.., Lq, Dh)
        return out * row_any, None
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., Lq, Lk)  eq. (3), (4)
    scores = scores.masked_fill(~safe, float("-inf"))  # exp(-inf) = 0
    weights = torch.softmax(scores, dim=-1) * row_any  # (..., Lq, Lk); each visible row sums to 1
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights  # unbiased: 1 / (1 - p)
    return dropped @ v, weights  # (..., Lq, Dh)


class LongformerAttention(nn.Module):
    """Sliding-window multi-head attention with symmetric global tokens, batch-first (B, T, d_model).

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H.
        window: w >= 0, one-sided: token i sees keys with |i - j| <= w (2w + 1 keys; the paper's "window size"
            is the two-sided 2w). With is_causal: i - w <= j <= i.
        global_projections: give global rows their own Q_g, K_g, V_g (the paper's choice, eq. (4)); False uses
            the local projections for them too.
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the projections have a bias.

    forward(query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=False, need_weights=False,
    global_mask=None): key and value default to query and must have its length (the window is defined on the
    positions of one sequence). global_mask: bool (B, T), True = a global token. A general dense `mask` is
    refused: it cannot be applied without the (T, T) matrix this module exists to avoid.
    """

    def __init__(self, d_model: int, num_heads: int, window: int, global_projections: bool = True,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ValueError(f"window must be an integer >= 0, got {window!r}")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.window = window
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        # eq. (4): the rows of global tokens attend with their own projections.
        self.global_projections = global_projections
        self.q_global = nn.Linear(d_model, d_model, bias=bias) if global_projections else None
        self.k_global = nn.Linear(d_model, d_model, bias=bias) if global_projections else None
        self.v_global = nn.Linear(d_model, d_model, bias=bias) if global_projections else None
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return f"window={self.window}, global_projections={self.global_projections}, dropout={self.dropout}"

    def _heads(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        batch, t, _ = x.shape
        return layer(x).view(batch, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False, global_mask: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        key = query if key is None else key
        value = key if value is None else value
        _check_sequence(query, "query", self.d_model, "d_model")
        _check_sequence(key, "key", self.d_model, "d_model")
        _check_sequence(value, "value", self.d_model, "d_model")
        _check_matching(query, "query", key, "key", 0, "batch size")
        _check_matching(key, "key", value, "value", 0, "batch size")
        _check_matching(query, "query", key, "key", 1, "length")  # one sequence: the band is |i - j| <= w
        _check_matching(key, "key", value, "value", 1, "length")
        if mask is not None:
            raise ValueError("mask is not supported by LongformerAttention: a general (Tq, Tk) mask needs the dense "
                             "matrix that the banded computation avoids; use key_padding_mask (B, Tk), is_causal "
                             f"and global_mask (B, T) instead (got mask of shape {tuple(getattr(mask, 'shape', ()))})")
        batch, t, _ = query.shape
        _check_key_padding_mask(key_padding_mask, batch, t)
        if global_mask is not None and (not isinstance(global_mask, torch.Tensor) or global_mask.dtype != torch.bool
                                        or tuple(global_mask.shape) != (batch, t)):
            got = (global_mask.dtype, tuple(global_mask.shape)) if isinstance(global_mask, torch.Tensor) else global_mask
            raise ValueError(f"global_mask must be a torch.bool tensor of shape (B, T) = ({batch}, {t}), got {got}")
        device = query.device
        real = torch.ones(batch, t, dtype=torch.bool, device=device) if key_padding_mask is None else key_padding_mask
        is_global = torch.zeros(batch, t, dtype=torch.bool, device=device) if global_mask is None else global_mask
        q, k, v = self._heads(self.q_proj, query), self._heads(self.k_proj, key), self._heads(self.v_proj, value)
        scale = 1.0 / math.sqrt(self.head_dim)
        dropout_p = self.dropout if self.training else 0.0

        # The global tokens of each sequence, gathered to the front: idx (B, G), padded slots marked invalid.
        count = is_global.sum(dim=-1)  # (B,)
        num_global = int(count.max()) if t > 0 else 0
        order = torch.argsort((~is_global).to(torch.int8), dim=-1, stable=True)  # global positions first
        idx = order[:, :num_global]  # (B, G)
        valid = torch.arange(num_global, device=device) < count[:, None]  # (B, G)

        # ---- local rows: band of eq. (1) in blocks of b = w (eq. (5)), plus the G global key columns (eq. (2))
        b = min(max(self.window, 1), t)
        n = math.ceil(t / b)  # query blocks
        pad = n * b - t
        span = 3 * b  # keys per query block: the block before, its own, the block after
        q_blk = F.pad(q, (0, 0, 0, pad)).view(batch, self.num_heads, n, b, self.head_dim)  # (B, H, n, b, Dh)
        k_blk = F.pad(k, (0, 0, b, pad + b)).unfold(2, span, b).transpose(-1, -2)  # (B, H, n, 3b, Dh)
        v_blk = F.pad(v, (0, 0, b, pad + b)).unfold(2, span, b).transpose(-1, -2)  # (B, H, n, 3b, Dh)
        i = (torch.arange(n, device=device)[:, None] * b + torch.arange(b, device=device)).view(n, b, 1)  # (n, b, 1)
        j = (torch.arange(n, device=device)[:, None] * b - b + torch.arange(span, device=device)).view(n, 1, span)
        band = ((i - j).abs() <= self.window) & (j >= 0) & (j < t)  # (n, b, 3b)  eq. (1)
        if is_causal:
            band = band & (j <= i)
        real_blk = F.pad(real, (b, pad + b), value=False).unfold(1, span, b)  # (B, n, 3b): padding never attended
        allowed_band = band & real_blk[:, :, None, :]  # (B, n, b, 3b)
        gpos = idx[:, None, None, :]  # (B, 1, 1, G): positions of the global keys
        allowed_glob = (valid & real.gather(1, idx))[:, None, None, :] & ((i[None] - gpos).abs() > self.window)
        if is_causal:  # a global key already inside the band is counted there, not twice (eq. (2) is an OR)
            allowed_glob = allowed_glob & (gpos <= i[None])  # (B, n, b, G)
        k_cat = torch.cat((k_blk, k.gather(2, idx[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim))
                           [:, :, None].expand(-1, -1, n, -1, -1)), dim=3)  # (B, H, n, 3b + G, Dh)
        v_cat = torch.cat((v_blk, v.gather(2, idx[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim))
                           [:, :, None].expand(-1, -1, n, -1, -1)), dim=3)  # (B, H, n, 3b + G, Dh)
        allowed = torch.cat((allowed_band, allowed_glob), dim=-1)[:, None]  # (B, 1, n, b, 3b + G)
        out_blk, w_blk = _softmax_attend(q_blk, k_cat, v_cat, allowed, scale, dropout_p, need_weights)
        out = out_blk.reshape(batch, self.num_heads, n * b, self.head_dim)[:, :, :t]  # (B, H, T, Dh)  eq. (3)

        # ---- global rows: G queries against all T keys (eq. (4)), written over their local rows.
        w_glob = None
        if num_global > 0:
            if self.global_projections:
                qg_all, kg, vg = (self._heads(self.q_global, query), self._heads(self.k_global, key),
                                  self._heads(self.v_global, value))  # (B, H, T, Dh) each
            else:
                qg_all, kg, vg = q, k, v
            qg = qg_all.gather(2, idx[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim))  # (B, H, G, Dh)
            allowed_rows = valid[:, :, None] & real[:, None, :]  # (B, G, T)
            if is_causal:
                allowed_rows = allowed_rows & (torch.arange(t, device=device) <= idx[:, :, None])
            out_g, w_glob = _softmax_attend(qg, kg, vg, allowed_rows[:, None], scale, dropout_p,
                                            need_weights)  # (B, H, G, Dh)
            scattered = torch.zeros_like(out).scatter_add(
                2, idx[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim),
                out_g * valid[:, None, :, None])  # (B, H, T, Dh): each valid global row at its position
            out = torch.where(is_global[:, None, :, None], scattered, out)  # (B, H, T, Dh)

        out = self.out_proj(out.transpose(1, 2).reshape(batch, t, self.d_model))  # (B, T, d_model)  eq. (6)
        if not need_weights:
            return out
        return out, self._dense_weights(w_blk, w_glob, idx, valid, is_global, t, b, n)

    def _dense_weights(self, w_blk: torch.Tensor, w_glob: Optional[torch.Tensor], idx: torch.Tensor,
                       valid: torch.Tensor, is_global: torch.Tensor, t: int, b: int, n: int) -> torch.Tensor:
        """Scatter the blocked and global weights into a dense (B, H, T, T) matrix (O(T^2): inspection only)."""
        batch, heads = w_blk.shape[:2]
        span, g = 3 * b, idx.size(1)
        dense = w_blk.new_zeros(batch, heads, n * b, (n + 2) * b)  # rows: padded queries; columns: padded keys
        for c in range(n):  # block c's 3b keys start at padded column c b (eq. (5))
            dense[:, :, c * b:(c + 1) * b, c * b:c * b + span] = w_blk[:, :, c, :, :span]
        dense = dense[:, :, :t, b:b + t].contiguous()  # (B, H, T, T)
        if g:
            cols = w_blk[..., span:].reshape(batch, heads, n * b, g)[:, :, :t]  # (B, H, T, G): global key columns
            dense = dense.scatter_add(-1, idx[:, None, None, :].expand(-1, heads, t, -1), cols * valid[:, None, None])
            rows = dense.new_zeros(batch, heads, t, t).scatter_add(
                2, idx[:, None, :, None].expand(-1, heads, -1, t), w_glob * valid[:, None, :, None])  # (B, H, T, T)
            dense = torch.where(is_global[:, None, :, None], rows, dense)
        return dense


def longformer_mask(t: int, window: int, global_mask: Optional[torch.Tensor] = None,
                    is_causal: bool = False) -> torch.Tensor:
    """The dense pattern M of eq. (2) as a boolean (B, 1, T, T) (or (1, 1, T, T)) mask: the oracle and the figure."""
    pos = torch.arange(t)
    allowed = ((pos[:, None] - pos[None, :]).abs() <= window)[None, None]  # (1, 1, T, T)  eq. (1)
    if global_mask is not None:
        allowed = allowed | global_mask[:, None, :, None] | global_mask[:, None, None, :]  # (B, 1, T, T)  eq. (2)
    if is_causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])
    return allowed


def _demo() -> None:
    """Demo of `python mechanisms/longformer_attention.py`; the guard at the end of the file calls it."""
    torch.manual_seed(0)
    batch, t, d_model, num_heads, window = 2, 13, 16, 4, 2
    attn = LongformerAttention(d_model, num_heads, window, global_projections=False).eval()
    x = torch.randn(batch, t, d_model)
    global_mask = torch.zeros(batch, t, dtype=torch.bool)
    global_mask[0, 0] = global_mask[1, [0, 7]] = True
    with torch.no_grad():
        out = attn(x, global_mask=global_mask)
        # Oracle inline: dense attention with the band-plus-global mask of eq. (2).
        split = lambda y: y.view(batch, t, num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
        scores = (q @ k.transpose(-2, -1) / math.sqrt(d_model // num_heads))
        scores = scores.masked_fill(~longformer_mask(t, window, global_mask), float("-inf"))
        dense = attn.out_proj((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, t, d_model))
    diff = (out - dense).abs().max().item()
    print(f"output shape {tuple(out.shape)}; window {window}, global tokens {global_mask.sum(-1).tolist()}")
    print(f"max |blocked Longformer - dense band-plus-global masked attention| = {diff:.2e}")
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
