"""Relative position attention: Shaw et al.'s clipped relative representations and T5's bucketed bias.

Papers: Peter Shaw, Jakob Uszkoreit, Ashish Vaswani (2018), "Self-Attention with Relative Position
Representations", arXiv:1803.02155. Colin Raffel, Noam Shazeer, Adam Roberts, Katherine Lee, Sharan
Narang, Michael Matena, Yanqi Zhou, Wei Li, Peter J. Liu (2019), "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer" (T5), arXiv:1910.10683.

Idea: what matters between two tokens is often how far apart they are, not where each one is. Shaw et al.
learn one vector per clipped distance j - i in [-k, k] and add it to the key (inside the score) and to
the value (inside the output). T5 keeps only a learned scalar per head and per distance "bucket":
distances below a threshold get their own bucket, longer ones share logarithmically wider buckets, and
everything beyond max_distance shares the last one.

Equations (page eq. (1)-(7)):
    Shaw:  r_ij = clip(j - i, -k, k)
           e_ij = q_i . (k_j + a^K[r_ij]) / sqrt(Dh),  alpha_i = softmax_j(e_ij)
           z_i  = sum_j alpha_ij (v_j + a^V[r_ij])
    T5:    s_ij = q_i . k_j + b_h[bucket(j - i)]     (no 1/sqrt(Dh): T5 folds it into W_Q's initialisation)
           bucket(n) = n for n < n_exact, else n_exact + floor(log(n / n_exact) / log(max_distance / n_exact)
                       * (n_buckets - n_exact)), capped at n_buckets - 1 (one half of the buckets per
                       direction when bidirectional)

Complexity in sequence length T: O(T^2) time, O(T^2) memory for the scores, plus O(T * k) for Shaw
(the relative terms are computed against the 2k+1 table rows and gathered, never as a (T, T, Dh) tensor)
and O(T^2) for T5's bias.

Reduces to: plain multi-head attention when the relative tables are zero (for T5: with scale 1);
the outputs depend on positions only through j - i, so shifting every position changes nothing. Shaw
is checked against an explicit double loop; the bucket function against hand-derived values.
Tests: tests/test_relative_position.py.

Docs page: docs/mechanisms/relative_position.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


# ====================================================================== Shaw et al. (2018)
class ShawRelativeAttention(nn.Module):
    """Multi-head attention with learned relative position representations a^K, a^V, eq. (1)-(3).

    Args:
        d_model, num_heads, dropout, bias: as in multi-head attention.
        max_relative_position: k >= 1, the clipping distance. There are 2k + 1 representations, for the
            distances -k .. k; farther keys share the one at -k or k. As in the paper, the tables
            (2k+1, Dh) are shared by all heads.

    forward(query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=False,
            need_weights=False, positions=None)
        query (B, Tq, d_model); key, value (B, Tk, d_model), default to query.
        positions: integer positions of the Tk key tokens, (Tk,) or (B, Tk), default [0..Tk-1]; the
            queries are the last Tq of them (the alignment of is_causal and of a KV cache).
        mask: bool, True = may attend, (Tq, Tk) or 4-D broadcastable to (B, H, Tq, Tk); a 1-D or 3-D
            mask raises ValueError. key_padding_mask: bool (B, Tk), True = a real key. mask,
            key_padding_mask and the causal mask are combined by a logical AND.
        Returns (B, Tq, d_model), or (output, weights (B, H, Tq, Tk) before dropout).
    There is no fused path: eq. (3) needs the weights themselves to add the a^V term.
    """

    def __init__(self, d_model: int, num_heads: int, max_relative_position: int, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        _check_config(d_model, num_heads, dropout)
        _check_positive_int(max_relative_position, "max_relative_position")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.max_relative_position = max_relative_position
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        num_rel = 2 * max_relative_position + 1
        # Row r holds the representation of the distance r - k. Initialised like a key/value
        # of unit-ish size so that the relative terms matter from the first step.
        self.rel_key = nn.Parameter(torch.randn(num_rel, self.head_dim) / math.sqrt(self.head_dim))
        self.rel_value = nn.Parameter(torch.randn(num_rel, self.head_dim) / math.sqrt(self.head_dim))

    def extra_repr(self) -> str:
        return f"max_relative_position={self.max_relative_position}, dropout={self.dropout}"

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None,
                value: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                need_weights: bool = False, positions: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        key = query if key is None else key
        value = key if value is None else value
        B, Tq, Tk = _check_inputs(query, key, value, self.d_model)
        H, Dh, K = self.num_heads, self.head_dim, self.max_relative_position
        allowed = _allowed(mask, key_padding_mask, is_causal, B, H, Tq, Tk, query.device)  # (.., Tq, Tk) or None
        rel = _relative_positions(positions, B, Tq, Tk, query.device)     # (1|B, 1, Tq, Tk), j - i

        q = self.q_proj(query).view(B, Tq, H, Dh).transpose(1, 2)       # (B, H, Tq, Dh)
        k = self.k_proj(key).view(B, Tk, H, Dh).transpose(1, 2)         # (B, H, Tk, Dh)
        v = self.v_proj(value).view(B, Tk, H, Dh).transpose(1, 2)       # (B, H, Tk, Dh)

        idx = (rel.clamp(-K, K) + K).expand(B, H, Tq, Tk)               # (B, H, Tq, Tk), eq. (1)
        # eq. (4): q_i . a^K[r_ij] is one of only 2k+1 numbers per query: score q against the table,
        # then pick the right entry for each key. This avoids a (Tq, Tk, Dh) tensor of a^K_ij.
        q_table = q @ self.rel_key.t()                                   # (B, H, Tq, 2k+1)
        scores = (q @ k.transpose(-1, -2) + q_table.gather(-1, idx)) / math.sqrt(Dh)  # (B, H, Tq, Tk), eq. (2)

        row_any = None
        if allowed is not None:
            # Rows with no allowed key: let them see everything (no NaN), then zero them.
            row_any = allowed.any(dim=-1, keepdim=True)                  # (.., Tq, 1)
            scores = scores.masked_fill(~(allowed | ~row_any), float("-inf"))
        weights = torch.softmax(scores, dim=-1)                          # (B, H, Tq, Tk)
        if row_any is not None:
            weights = weights * row_any
        p = self.dropout if self.training else 0.0
        alpha = F.dropout(weights, p) if p > 0 else weights
        # eq. (3) and (5): sum_j alpha_ij a^V[r_ij] = sum_r (total weight at distance r) * a^V[r].
        per_distance = alpha.new_zeros(B, H, Tq, 2 * K + 1).scatter_add(-1, idx, alpha)  # (B, H, Tq, 2k+1)
        out = alpha @ v + per_distance @ self.rel_value                  # (B, H, Tq, Dh)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Tq, self.d_model))  # (B, Tq, d_model)
        return (out, weights) if need_weights else out


# ====================================================================== T5 (Raffel et al. 2019)
def t5_relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True,
                                num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Map relative positions j - i (key minus query, integer tensor) to buckets in [0, num_buckets), eq. (6).

    bidirectional: half of the buckets for keys before (or at) the query, half for keys after it.
    Otherwise only keys at or before the query are told apart; all later keys share bucket 0.
    Within one direction (n_b buckets, distance n >= 0): n < n_b / 2 gets bucket n; larger distances
    get logarithmically wider buckets up to max_distance; all farther ones share bucket n_b - 1.
    """
    if relative_position.dtype.is_floating_point or relative_position.dtype == torch.bool:
        raise TypeError(f"relative_position must be an integer tensor, got dtype {relative_position.dtype}")
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    max_exact = per_direction // 2
    if max_exact < 1:
        raise ValueError(f"num_buckets must be at least {4 if bidirectional else 2} "
                         f"(bidirectional={bidirectional}), got {num_buckets}")
    if max_distance <= max_exact:
        raise ValueError(f"max_distance must exceed the exact range {max_exact} "
                         f"(num_buckets={num_buckets}), got {max_distance}")
    if bidirectional:
        # keys after the query (j - i > 0) use the upper half of the buckets
        offset = (relative_position > 0).long() * per_direction
        n = relative_position.abs()
    else:
        offset = torch.zeros_like(relative_position)
        n = (-relative_position).clamp(min=0)           # how far back the key is; later keys -> 0
    # Log-spaced buckets, computed in float32 like the reference implementation; clamping n from
    # below only keeps log() finite for the small n that the torch.where below discards anyway.
    log_ratio = torch.log(n.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (per_direction - max_exact)).long()
    large = large.clamp(max=per_direction - 1)          # everything beyond max_distance shares the last
    return offset + torch.where(n < max_exact, n, large)


class T5RelativeAttention(nn.Module):
    """Multi-head attention with T5's learned, bucketed relative bias per head, eq. (6)-(7).

    Args:
        d_model, num_heads, dropout, bias: as in multi-head attention (T5 itself uses bias=False).
        num_buckets, max_distance, bidirectional: passed to t5_relative_position_bucket. T5's encoder
            is bidirectional; its decoder uses bidirectional=False together with is_causal=True.
    The scores are NOT divided by sqrt(Dh), as in T5; to keep the logits of a fresh model at the usual
    size, W_Q is initialised 1/sqrt(Dh) smaller (T5 folds the scaling into the initialisation).

    forward(query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=False,
            need_weights=False, positions=None)
        as for ShawRelativeAttention. Returns (B, Tq, d_model), or (output, weights (B, H, Tq, Tk)).
    """

    def __init__(self, d_model: int, num_heads: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = True, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        _check_config(d_model, num_heads, dropout)
        t5_relative_position_bucket(torch.zeros(1, dtype=torch.long), bidirectional, num_buckets,
                                    max_distance)       # validates the bucket settings early
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        with torch.no_grad():
            self.q_proj.weight.mul_(self.head_dim ** -0.5)
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)  # b_h[bucket]

    def extra_repr(self) -> str:
        return (f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}, dropout={self.dropout}")

    def position_bias(self, relative_position: torch.Tensor) -> torch.Tensor:
        """The bias b_h[bucket(j - i)] for relative positions (.., Tq, Tk): shape (.., H, Tq, Tk)."""
        buckets = t5_relative_position_bucket(relative_position, self.bidirectional, self.num_buckets,
                                              self.max_distance)        # (.., Tq, Tk)
        return self.relative_attention_bias(buckets).movedim(-1, -3)     # (.., H, Tq, Tk)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None,
                value: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                need_weights: bool = False, positions: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        key = query if key is None else key
        value = key if value is None else value
        B, Tq, Tk = _check_inputs(query, key, value, self.d_model)
        H, Dh = self.num_heads, self.head_dim
        allowed = _allowed(mask, key_padding_mask, is_causal, B, H, Tq, Tk, query.device)  # (.., Tq, Tk) or None
        rel = _relative_positions(positions, B, Tq, Tk, query.device)     # (1|B, 1, Tq, Tk)

        q = self.q_proj(query).view(B, Tq, H, Dh).transpose(1, 2)       # (B, H, Tq, Dh)
        k = self.k_proj(key).view(B, Tk, H, Dh).transpose(1, 2)         # (B, H, Tk, Dh)
        v = self.v_proj(value).view(B, Tk, H, Dh).transpose(1, 2)       # (B, H, Tk, Dh)

        bias = self.position_bias(rel[:, 0])                             # (1|B, H, Tq, Tk), eq. (7)
        p = self.dropout if self.training else 0.0
        out, weights = _attend(q, k, v, allowed, bias.to(q.dtype), 1.0, p, need_weights)  # (B, H, Tq, Dh)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Tq, self.d_model))  # (B, Tq, d_model)
        return (out, weights) if need_weights else out


# ====================================================================== mechanism helpers
def _check_config(d_model, num_heads, dropout):
    """The constructor arguments both classes share."""
    _check_positive_int(d_model, "d_model")
    _check_positive_int(num_heads, "num_heads")
    _check_divisible(d_model, "d_model", num_heads, "num_heads")
    _check_dropout(dropout)


def _check_inputs(query, key, value, d_model):
    """Validate (B, T, d_model) inputs; return B, Tq, Tk."""
    _check_sequence(query, "query", d_model, "d_model")
    _check_sequence(key, "key", d_model, "d_model")
    _check_sequence(value, "value", d_model, "d_model")
    _check_matching(query, "query", key, "key", 0, "batch size")
    _check_matching(key, "key", value, "value", 0, "batch size")
    _check_matching(key, "key", value, "value", 1, "length")
    if query.shape[1] > key.shape[1]:
        raise ValueError(f"query is longer than key: queries are the last Tq of the Tk key tokens, "
                         f"got query {tuple(query.shape)} and key {tuple(key.shape)}")
    return query.shape[0], query.shape[1], key.shape[1]


def _relative_positions(positions, B, Tq, Tk, device):
    """j - i for every (query, key) pair: (1, 1, Tq, Tk) or, for per-sequence positions, (B, 1, Tq, Tk)."""
    if positions is None:
        positions = torch.arange(Tk, device=device)                     # (Tk,)
    elif positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    elif positions.shape not in ((Tk,), (B, Tk)):
        raise ValueError(f"positions must have shape (Tk,) = ({Tk},) or (B, Tk) = ({B}, {Tk}), "
                         f"got {tuple(positions.shape)}")
    pos = positions.view(-1, 1, Tk)                                      # (1|B, 1, Tk)
    q_pos = pos[..., Tk - Tq:]                                           # (1|B, 1, Tq): queries = last Tq
    return (pos - q_pos.transpose(-1, -2)).unsqueeze(1)                  # (1|B, 1, Tq, Tk)


def _allowed(mask, key_padding_mask, is_causal, B, H, Tq, Tk, device):
    """Check the masks and AND them with the causal mask into one bool (.., Tq, Tk), or None."""
    _check_mask(mask, (B, H, Tq, Tk))
    _check_key_padding_mask(key_padding_mask, B, Tk)
    # Causal is bottom-right aligned: query i is token Tk - Tq + i of the key sequence (KV-cache convention).
    return _merge_masks(mask, key_padding_mask, is_causal, Tq, Tk, device)  # (Tq, Tk) or 4-D, or None


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
    B, T, d_model, num_heads = 2, 9, 16, 4
    x = torch.randn(B, T, d_model)
    shaw = ShawRelativeAttention(d_model, num_heads, max_relative_position=2).eval()
    t5 = T5RelativeAttention(d_model, num_heads, num_buckets=8, max_distance=16).eval()
    print("output shapes:", tuple(shaw(x).shape), tuple(t5(x).shape))

    # Checked fact: Shaw's efficient gather/scatter form equals eq. (2)-(3) written as a double loop.
    H, Dh, K = num_heads, d_model // num_heads, 2
    with torch.no_grad():
        q = shaw.q_proj(x).view(B, T, H, Dh).transpose(1, 2)
        k = shaw.k_proj(x).view(B, T, H, Dh).transpose(1, 2)
        v = shaw.v_proj(x).view(B, T, H, Dh).transpose(1, 2)
        z = torch.zeros(B, H, T, Dh)
        for i in range(T):
            a_k = torch.stack([shaw.rel_key[max(-K, min(K, j - i)) + K] for j in range(T)])    # (T, Dh)
            a_v = torch.stack([shaw.rel_value[max(-K, min(K, j - i)) + K] for j in range(T)])  # (T, Dh)
            e = ((k + a_k) @ q[:, :, i].unsqueeze(-1)).squeeze(-1) / math.sqrt(Dh)           # (B, H, T)
            z[:, :, i] = (torch.softmax(e, -1).unsqueeze(-1) * (v + a_v)).sum(-2)
        loop = shaw.out_proj(z.transpose(1, 2).reshape(B, T, d_model))
        diff = (shaw(x) - loop).abs().max().item()
    print(f"max |Shaw module - double-loop formula| = {diff:.1e}")
    print("T5 buckets of j - i = -20..20:",
          t5_relative_position_bucket(torch.arange(-20, 21), num_buckets=8, max_distance=16).tolist())
    assert diff < 1e-5


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
