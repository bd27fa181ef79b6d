"""The Dual Attention Transformer: relational attention, dual attention, symbols, blocks and models.

Paper: Awni Altabaa, John Lafferty (2024), "Disentangling and Integrating Relational and Sensory Information
in Transformer Architectures", arXiv:2405.16727. The ablations RCA and disentangled RCA come from Awni Altabaa,
Taylor Webb, Jonathan Cohen, John Lafferty (2023), "Abstractors and relational cross-attention", arXiv:2304.00195.

Idea: an attention head of a Transformer moves *sensory* information: token i receives a mix of the values
W_v x_j of the tokens it attends to. A relational attention head moves *relational* information instead: the
message from j to i is the vector of learned relations r(x_i, x_j) between the two, tagged with a symbol s_j
that says who sent it (its position, or a learned "role"). Dual attention runs both kinds of heads side by
side in one layer; the Dual Attention Transformer (DAT) is a Transformer built from such layers.

Equation (per relational head h, eq. (1)-(5) of the page):
    alpha_ij = softmax_j(<W_q^attn x_i, W_k^attn x_j> / sqrt(d_k))
    r_ij[l]  = phi(<W_q^rel,l x_i, W_k^rel,l x_j> / sqrt(d_r)),     l = 1..n_relations
    A_i^h    = sum_j alpha_ij (W_r^h r_ij + W_s^h s_j)  = W_r^h (sum_j alpha_ij r_ij) + sum_j alpha_ij W_s^h s_j
    RA(x)_i  = W_o concat_h A_i^h;   DualAttention(x) = concat(SelfAttention(x), RA(x)).
The second form of A_i^h is what the code computes: the alpha-weighted sum of the relations is taken
before W_r, so only the (B, n_relations, T, T) relation tensor exists, never a (B, T, T, d) one.

Complexity in sequence length T: time O(T^2 (H d_k + R d_r + H R + H Dh)), memory O(H T^2 + R T^2) for the
weights and relations (R = n_relations); position-relative symbols add O(T^2 d) for the symbol table.

Reduces to / oracle: with n_heads_ra = 0, DualAttention is multi-head attention with the same weights; with
W_r = 0, relational attention is attention over the symbols; an explicit loop over (i, j, head, relation) in
float64; and the published package dual-attention 0.0.7 with copied weights (every class here keeps its class
names, constructor arguments, forward signatures and state_dict keys), all in tests/test_dual_attention.py.

Docs page: docs/mechanisms/dual_attention.md
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# A note on names. The project says `num_heads`, `mask` and `dropout`; this file says `n_heads`, `attn_mask`
# and `dropout_rate` where the published package does, so that a checkpoint and a constructor call written
# for the package work here unchanged. The project's `key_padding_mask` (B, Tk), True = a real token, is an
# extra keyword-only argument of every attention module.

_ACTIVATIONS = {
    "relu": nn.ReLU(),
    "sigmoid": nn.Sigmoid(),
    "tanh": nn.Tanh(),
    "gelu": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(),
    "softmax": nn.Softmax(dim=-1),
    "identity": nn.Identity(),
}


def _activation(name: str, argument: str) -> nn.Module:
    """The activation called `name` (the package's names); a ValueError naming `argument` otherwise."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"{argument} must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


# ----------------------------------------------------------------------------------------------------------
# Small pieces shared by the attention modules: RoPE, masked softmax, symbol and cache checks.


def _rope_tables(dim: int, end: int, theta: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles p * theta^(-2k/dim), each (end, dim // 2), as in llama2.c."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))  # (dim/2,)
    angles = torch.outer(torch.arange(end).float(), freqs)  # (end, dim/2)
    return torch.cos(angles), torch.sin(angles)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2k], x[2k+1]) of x (B, T, H, D) by the angles of cos/sin (T, D/2): RoPE."""
    if cos.shape != (x.size(1), x.size(-1) // 2) or sin.shape != cos.shape:
        raise ValueError(f"freqs_cos and freqs_sin must have shape (T, key_dim / 2) = ({x.size(1)}, "
                         f"{x.size(-1) // 2}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32, as the package; float64 stays
    pairs = x.to(dtype).unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]  # (B, T, H, D/2) each
    cos, sin = cos.to(dtype)[None, :, None, :], sin.to(dtype)[None, :, None, :]  # (1, T, 1, D/2)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)  # (B, T, H, D/2, 2)
    return rotated.flatten(-2).type_as(x)  # (B, T, H, D)


def _masked_softmax(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over keys (the LAST axis) of the allowed entries; a row with no allowed key gets all zeros.

    Such a row would be softmax over all -inf = NaN. It is given every key for the softmax (any finite
    answer will do) and then zeroed, so its output is exactly zero and its gradients are finite.
    """
    if mask is None:
        return torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    row_has_key = mask.any(dim=-1, keepdim=True)  # (..., Tq, 1)
    scores = scores.masked_fill(~(mask | ~row_has_key), float("-inf"))  # (B, H, Tq, Tk)
    return torch.softmax(scores, dim=-1).masked_fill(~row_has_key, 0.0)  # (B, H, Tq, Tk)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads * D) -> (B, T, heads, D)."""
    return t.unflatten(-1, (heads, -1))  # (B, T, heads, D)


def _cache_append(cache: Optional[Dict[str, torch.Tensor]], name: str, new: torch.Tensor, dim: int) -> torch.Tensor:
    """With a KV cache, append `new` to the cached tensor `name` along `dim` and return the whole; else `new`."""
    if cache is None:
        return new
    if name in cache:
        new = torch.cat((cache[name], new), dim=dim)
    cache[name] = new
    return new


def _cached_length(cache: Optional[Dict[str, torch.Tensor]], name: str, dim: int) -> int:
    """How many key positions `cache` already holds (0 without a cache)."""
    return 0 if cache is None or name not in cache else cache[name].size(dim)


def _masks(x: torch.Tensor, heads: int, tk: int, attn_mask: Optional[torch.Tensor],
           key_padding_mask: Optional[torch.Tensor], is_causal: bool) -> Optional[torch.Tensor]:
    """Check and AND together attn_mask (True = may attend), key_padding_mask and the causal mask."""
    batch, tq = x.size(0), x.size(1)
    _check_mask(attn_mask, (batch, heads, tq, tk))
    _check_key_padding_mask(key_padding_mask, batch, tk)
    return _merge_masks(attn_mask, key_padding_mask, is_causal, tq, tk, x.device)  # (Tq, Tk) or (B|1, ., Tq, Tk)


# ----------------------------------------------------------------------------------------------------------
# Standard attention (the sensory heads of dual attention), with the package's names.


class Attention(nn.Module):
    """Multi-head (grouped-query) attention with RoPE, the package's `Attention`, batch-first.

    Args (the package's):
        d_model: width of the inputs. n_heads: number of query heads. dropout: on the attention weights.
        key_dim: width of one query/key head (default head_dim). n_kv_heads: key/value heads (GQA; default
        n_heads). add_bias_kv: bias on the key and value projections. add_bias_out: bias on the output
        projection. total_n_heads: heads of the whole dual-attention layer; head_dim = d_model //
        total_n_heads and the output has n_heads * head_dim features (d_model when total_n_heads = n_heads).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, key_dim: Optional[int] = None,
                 n_kv_heads: Optional[int] = None, add_bias_kv: bool = False, add_bias_out: bool = False,
                 total_n_heads: Optional[int] = None) -> None:
        super().__init__()
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.total_n_heads = n_heads if total_n_heads is None else total_n_heads
        _check_heads(d_model, n_heads, self.n_kv_heads, self.total_n_heads)
        _check_dropout(dropout)
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.add_bias_kv, self.add_bias_out = add_bias_kv, add_bias_out
        self.head_dim = d_model // self.total_n_heads
        self.key_dim = self.head_dim if key_dim is None else key_dim
        _check_positive_int(self.key_dim, "key_dim")
        self.n_rep_kv = n_heads // self.n_kv_heads
        # The scale belongs to the width of the dot product, key_dim (the package used head_dim).  eq. (1)
        self.attn_scale = 1.0 / math.sqrt(self.key_dim)
        self.wq = nn.Linear(d_model, n_heads * self.key_dim, bias=False)
        self.wk = nn.Linear(d_model, self.n_kv_heads * self.key_dim, bias=add_bias_kv)
        self.wv = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=add_bias_kv)
        self.wo = nn.Linear(n_heads * self.head_dim, n_heads * self.head_dim, bias=add_bias_out)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                freqs_cos: Optional[torch.Tensor] = None, freqs_sin: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, need_weights: bool = False, *,
                key_padding_mask: Optional[torch.Tensor] = None,
                kv_cache: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns (output (B, Tq, n_heads * head_dim), weights (B, n_heads, Tq, Tk) or None), as the package.

        attn_mask: bool, True = may attend, (Tq, Tk) or 4-D broadcastable to (B, n_heads, Tq, Tk).
        is_causal: bottom-right aligned (the queries are the last Tq positions). kv_cache: a dict this call
        appends its keys and values to, so that the next call attends to them too (generation).
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
        q = _split_heads(self.wq(query), self.n_heads)  # (B, Tq, H, Dk)
        k = _split_heads(self.wk(key), self.n_kv_heads)  # (B, Tk_new, H_kv, Dk)
        v = _split_heads(self.wv(value), self.n_kv_heads)  # (B, Tk_new, H_kv, Dh)
        if freqs_cos is not None and freqs_sin is not None:
            q, k = _rotate(q, freqs_cos, freqs_sin), _rotate(k, freqs_cos, freqs_sin)  # RoPE on q and k only
        k = _cache_append(kv_cache, "k", k.transpose(1, 2), 2)  # (B, H_kv, Tk, Dk): past keys + new keys
        v = _cache_append(kv_cache, "v", v.transpose(1, 2), 2)  # (B, H_kv, Tk, Dh)
        k = k.repeat_interleave(self.n_rep_kv, dim=1)  # (B, H, Tk, Dk): query head h reads kv head h // G
        v = v.repeat_interleave(self.n_rep_kv, dim=1)  # (B, H, Tk, Dh)
        q = q.transpose(1, 2)  # (B, H, Tq, Dk)
        mask = _masks(query, self.n_heads, k.size(2), attn_mask, key_padding_mask, is_causal)
        dropout_p = self.dropout if self.training else 0.0
        if not need_weights:
            # The fused kernel; rows with no key are handled as in _masked_softmax.
            row_has_key = None if mask is None else mask.any(dim=-1, keepdim=True)  # (..., Tq, 1)
            fused_mask = None if mask is None else mask | ~row_has_key
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=fused_mask, dropout_p=dropout_p,
                                                 scale=self.attn_scale)  # (B, H, Tq, Dh)
            if row_has_key is not None:
                out = out.masked_fill(~row_has_key, 0.0)  # (B, H, Tq, Dh)
            weights = None
        else:
            scores = (q @ k.transpose(-2, -1)) * self.attn_scale  # (B, H, Tq, Tk)  eq. (1)
            weights = _masked_softmax(scores, mask)  # (B, H, Tq, Tk)  eq. (1)
            out = self.attn_dropout(weights) @ v  # (B, H, Tq, Dh): dropout in training only, rescaled 1/(1-p)
        out = out.transpose(1, 2).reshape(batch, tq, self.n_heads * self.head_dim)  # (B, Tq, H * Dh)
        out = self.resid_dropout(self.wo(out))  # (B, Tq, H * Dh)
        return out, weights


# ----------------------------------------------------------------------------------------------------------
# Relational attention, the paper's new head.


class RelationalAttention(nn.Module):
    """Relational attention (the package's `RelationalAttention`): heads that retrieve relations, not values.

    Args (the package's):
        d_model: width of x and of the symbols. n_heads: relational heads. n_relations: number of learned
        relations R (default n_heads). dropout: on the attention weights and the output. key_dim: width of an
        attention query/key head (default head_dim). n_kv_heads: attention-key and symbol heads (GQA).
        rel_activation: phi of eq. (2), one of relu, sigmoid, tanh, gelu, silu, softmax, identity.
        rel_proj_dim: width d_r of one relation's query/key projection (default n_heads * head_dim / R).
        add_bias_kv: bias on the attention-key and symbol projections. add_bias_out: bias on W_o.
        total_n_heads: heads of the whole dual-attention layer (head_dim = d_model // total_n_heads).
        symmetric_rels: W_k^rel = W_q^rel, so r_ij = r_ji (eq. (2)). use_relative_positional_symbols: the
        symbols are a (Tq, Tk, d_model) table with s_(j-i) at [i, j] (eq. (6)) instead of (B, Tk, d_model).
    """

    def __init__(self, d_model: int, n_heads: int, n_relations: Optional[int] = None, dropout: float = 0.0,
                 key_dim: Optional[int] = None, n_kv_heads: Optional[int] = None, rel_activation: str = "identity",
                 rel_proj_dim: Optional[int] = None, add_bias_kv: bool = False, add_bias_out: bool = False,
                 total_n_heads: Optional[int] = None, symmetric_rels: bool = False,
                 use_relative_positional_symbols: bool = False) -> None:
        super().__init__()
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.total_n_heads = n_heads if total_n_heads is None else total_n_heads
        _check_heads(d_model, n_heads, self.n_kv_heads, self.total_n_heads)
        _check_dropout(dropout)
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.n_relations = n_heads if n_relations is None else n_relations
        _check_positive_int(self.n_relations, "n_relations")
        self.rel_activation = rel_activation
        self.rel_activation_ = _activation(rel_activation, "rel_activation")
        self.symmetric_rels = symmetric_rels
        self.add_bias_kv, self.add_bias_out = add_bias_kv, add_bias_out
        self.use_relative_positional_symbols = use_relative_positional_symbols
        self.head_dim = d_model // self.total_n_heads
        self.n_rep_kv = n_heads // self.n_kv_heads
        self.key_dim = self.head_dim if key_dim is None else key_dim
        _check_positive_int(self.key_dim, "key_dim")
        if rel_proj_dim is None:
            _check_divisible(n_heads * self.head_dim, "n_heads * head_dim", self.n_relations, "n_relations")
            rel_proj_dim = n_heads * self.head_dim // self.n_relations
        _check_positive_int(rel_proj_dim, "rel_proj_dim")
        self.rel_proj_dim = rel_proj_dim
        self.attn_scale = 1.0 / math.sqrt(self.key_dim)  # eq. (1); the package used head_dim
        self.rel_scale = 1.0 / math.sqrt(self.rel_proj_dim)  # eq. (2)

        # eq. (1): the attention projections decide WHOM token i listens to.
        self.wq_attn = nn.Linear(d_model, n_heads * self.key_dim, bias=False)
        self.wk_attn = nn.Linear(d_model, self.n_kv_heads * self.key_dim, bias=add_bias_kv)
        # eq. (2): the relation projections decide WHAT is compared: R relations, each an inner product of
        # d_r-wide projections. Symmetric relations use one map for both sides (the same module twice, so the
        # state_dict carries both names, as the package's does).
        self.wq_rel = nn.Linear(d_model, self.n_relations * rel_proj_dim, bias=False)
        self.wk_rel = self.wq_rel if symmetric_rels else nn.Linear(d_model, self.n_relations * rel_proj_dim,
                                                                    bias=False)
        # eq. (3): W_r^h maps the R relations into head h's Dh features; W_s^h (called wv, as the package
        # does: it is the "value" projection, applied to symbols) maps the symbol of the sender.
        self.wr = nn.Parameter(torch.empty(n_heads, self.head_dim, self.n_relations))  # (H, Dh, R)
        nn.init.kaiming_uniform_(self.wr, a=math.sqrt(5))
        self.wv = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=add_bias_kv)
        self.wo = nn.Linear(n_heads * self.head_dim, n_heads * self.head_dim, bias=add_bias_out)  # eq. (5)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, symbols: torch.Tensor, freqs_cos: Optional[torch.Tensor] = None,
                freqs_sin: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, *, key_padding_mask: Optional[torch.Tensor] = None,
                kv_cache: Optional[Dict[str, torch.Tensor]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output (B, Tq, n_heads * head_dim), weights (B, n_heads, Tq, Tk), relations (B, Tq, Tk, R)).

        x: (B, Tq, d_model). symbols: (B, Tk, d_model), or (Tq, Tk, d_model) with relative symbols.
        attn_mask: bool, True = may attend, (Tq, Tk) or 4-D broadcastable to (B, n_heads, Tq, Tk).
        kv_cache: a dict; this call appends the keys it computes (attention keys, relation keys and projected
        symbols) and attends over all of them, so x holds only the new positions.
        The weights are taken before dropout.
        """
        _check_sequence(x, "x", self.d_model, "d_model")
        batch, tq, _ = x.shape
        tk = _cached_length(kv_cache, "k_attn", 2) + tq
        _check_symbols(symbols, x, tk if self.use_relative_positional_symbols else tq, self.d_model,
                       self.use_relative_positional_symbols)

        # eq. (1): attention weights alpha_ij, one set per head (grouped heads share their keys).
        q_attn = _split_heads(self.wq_attn(x), self.n_heads)  # (B, Tq, H, Dk)
        k_attn = _split_heads(self.wk_attn(x), self.n_kv_heads)  # (B, Tq, H_kv, Dk)
        if freqs_cos is not None and freqs_sin is not None:
            # RoPE makes the attention position-aware; it is NOT applied to the relations, which compare
            # the two objects themselves, wherever they are.
            q_attn, k_attn = _rotate(q_attn, freqs_cos, freqs_sin), _rotate(k_attn, freqs_cos, freqs_sin)
        k_attn = _cache_append(kv_cache, "k_attn", k_attn.transpose(1, 2), 2)  # (B, H_kv, Tk, Dk)
        k_attn = k_attn.repeat_interleave(self.n_rep_kv, dim=1)  # (B, H, Tk, Dk)
        scores = (q_attn.transpose(1, 2) @ k_attn.transpose(-2, -1)) * self.attn_scale  # (B, H, Tq, Tk)  eq. (1)
        mask = _masks(x, self.n_heads, tk, attn_mask, key_padding_mask, is_causal)
        weights = _masked_softmax(scores, mask)  # (B, H, Tq, Tk): softmax over the keys j  eq. (1)
        alpha = self.attn_dropout(weights)  # (B, H, Tq, Tk); the returned weights are taken before it

        # eq. (2): relations r_ij[l] = phi(<W_q^rel,l x_i, W_k^rel,l x_j> / sqrt(d_r)), R numbers per pair.
        q_rel = _split_heads(self.wq_rel(x), self.n_relations).transpose(1, 2)  # (B, R, Tq, Dr)
        k_rel = _split_heads(self.wk_rel(x), self.n_relations).transpose(1, 2)  # (B, R, Tq, Dr)
        k_rel = _cache_append(kv_cache, "k_rel", k_rel, 2)  # (B, R, Tk, Dr)
        relations = self.rel_activation_((q_rel @ k_rel.transpose(-2, -1)) * self.rel_scale)  # (B, R, Tq, Tk)

        # eq. (4), first term: sum_j alpha_ij^h r_ij, THEN W_r^h. Summing over j first leaves (B, Tq, H, R)
        # numbers; projecting first (eq. (3) read literally) would build a (B, Tq, Tk, H, Dh) tensor.
        attended_relations = torch.einsum("bhij,brij->bihr", alpha, relations)  # (B, Tq, H, R)
        from_relations = torch.einsum("bihr,hdr->bihd", attended_relations, self.wr)  # (B, Tq, H, Dh)

        # eq. (4), second term: the symbols of the senders, sum_j alpha_ij^h W_s^h s_j.
        sv = _split_heads(self.wv(symbols), self.n_kv_heads)  # (B, Tq, H_kv, Dh) or (Tq, Tk, H_kv, Dh)
        if self.use_relative_positional_symbols:
            # eq. (6): the sender's tag is its position relative to the receiver, s_(j-i), one per pair.
            sv = sv.repeat_interleave(self.n_rep_kv, dim=2)  # (Tq, Tk, H, Dh)
            from_symbols = torch.einsum("bhij,ijhd->bihd", alpha, sv)  # (B, Tq, H, Dh)
        else:
            sv = _cache_append(kv_cache, "sv", sv.transpose(1, 2), 2)  # (B, H_kv, Tk, Dh)
            sv = sv.repeat_interleave(self.n_rep_kv, dim=1)  # (B, H, Tk, Dh)
            from_symbols = (alpha @ sv).transpose(1, 2)  # (B, Tq, H, Dh)

        out = (from_relations + from_symbols).reshape(batch, tq, self.n_heads * self.head_dim)  # (B, Tq, H * Dh)
        out = self.resid_dropout(self.wo(out))  # (B, Tq, H * Dh)  eq. (5)
        return out, weights, relations.permute(0, 2, 3, 1)  # relations as the package returns them: (B, Tq, Tk, R)


class RelationalCrossAttention(nn.Module):
    """Relational cross-attention (RCA) of the Abstractor: attention from x to x, values are the symbols.

    eq. (10): RCA(x)_i = sum_j alpha_ij W_s s_j with alpha from x alone, so the output carries which
    positions x_i relates to, not what they hold. `activation` replaces the softmax of eq. (1) (masked
    entries are zeroed after a non-softmax activation). Arguments as RelationalAttention's.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, n_kv_heads: Optional[int] = None,
                 activation: str = "softmax", add_bias_kv: bool = False, add_bias_out: bool = False,
                 total_n_heads: Optional[int] = None, use_relative_positional_symbols: bool = False) -> None:
        super().__init__()
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.total_n_heads = n_heads if total_n_heads is None else total_n_heads
        _check_heads(d_model, n_heads, self.n_kv_heads, self.total_n_heads)
        _check_dropout(dropout)
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.activation = activation
        self.activation_ = _activation(activation, "activation")
        self.add_bias_kv, self.add_bias_out = add_bias_kv, add_bias_out
        self.use_relative_positional_symbols = use_relative_positional_symbols
        self.head_dim = d_model // self.total_n_heads
        self.n_rep_kv = n_heads // self.n_kv_heads
        self.attn_scale = 1.0 / math.sqrt(self.head_dim)
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=add_bias_kv)
        self.wv = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=add_bias_kv)
        self.wo = nn.Linear(n_heads * self.head_dim, n_heads * self.head_dim, bias=add_bias_out)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, symbols: torch.Tensor, freqs_cos: Optional[torch.Tensor] = None,
                freqs_sin: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, *, key_padding_mask: Optional[torch.Tensor] = None,
                kv_cache: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (output (B, Tq, n_heads * head_dim), weights (B, n_heads, Tq, Tk) before dropout)."""
        _check_sequence(x, "x", self.d_model, "d_model")
        batch, tq, _ = x.shape
        tk = _cached_length(kv_cache, "k", 2) + tq
        _check_symbols(symbols, x, tk if self.use_relative_positional_symbols else tq, self.d_model,
                       self.use_relative_positional_symbols)
        q = _split_heads(self.wq(x), self.n_heads)  # (B, Tq, H, Dh)
        k = _split_heads(self.wk(x), self.n_kv_heads)  # (B, Tq, H_kv, Dh)
        if freqs_cos is not None and freqs_sin is not None:
            q, k = _rotate(q, freqs_cos, freqs_sin), _rotate(k, freqs_cos, freqs_sin)
        k = _cache_append(kv_cache, "k", k.transpose(1, 2), 2).repeat_interleave(self.n_rep_kv, dim=1)  # (B, H, Tk, Dh)
        scores = (q.transpose(1, 2) @ k.transpose(-2, -1)) * self.attn_scale  # (B, H, Tq, Tk)
        mask = _masks(x, self.n_heads, tk, attn_mask, key_padding_mask, is_causal)
        if self.activation == "softmax":
            weights = _masked_softmax(scores, mask)  # (B, H, Tq, Tk)
        else:
            weights = self.activation_(scores)  # (B, H, Tq, Tk)
            weights = weights if mask is None else weights * mask  # masked entries are zero AFTER phi
        alpha = self.attn_dropout(weights)  # (B, H, Tq, Tk)
        out = _attend_symbols(self, alpha, symbols, kv_cache)  # (B, Tq, H, Dh)  eq. (10)
        out = self.resid_dropout(self.wo(out.reshape(batch, tq, self.n_heads * self.head_dim)))  # (B, Tq, H * Dh)
        return out, weights


class DisentangledRelationalCrossAttention(nn.Module):
    """Disentangled RCA: separate attention and relation projections, one scalar relation per head.

    eq. (11): DisRCA(x)_i = sum_j alpha_ij^h phi(<W_q^rel,h x_i, W_k^rel,h x_j> / sqrt(Dh)) W_s^h s_j, the
    step between RCA and relational attention (which gives each message R relations and W_r). Arguments
    as RelationalAttention's.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, n_kv_heads: Optional[int] = None,
                 rel_activation: str = "identity", add_bias_kv: bool = False, add_bias_out: bool = False,
                 total_n_heads: Optional[int] = None, use_relative_positional_symbols: bool = False) -> None:
        super().__init__()
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.total_n_heads = n_heads if total_n_heads is None else total_n_heads
        _check_heads(d_model, n_heads, self.n_kv_heads, self.total_n_heads)
        _check_dropout(dropout)
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.rel_activation = rel_activation
        self.rel_activation_ = _activation(rel_activation, "rel_activation")
        self.add_bias_kv, self.add_bias_out = add_bias_kv, add_bias_out
        self.use_relative_positional_symbols = use_relative_positional_symbols
        self.head_dim = d_model // self.total_n_heads
        self.n_rep_kv = n_heads // self.n_kv_heads
        self.attn_scale = 1.0 / math.sqrt(self.head_dim)
        self.wq_attn = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk_attn = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=add_bias_kv)
        self.wq_rel = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk_rel = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=add_bias_kv)
        self.wv = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=add_bias_kv)
        self.wo = nn.Linear(n_heads * self.head_dim, n_heads * self.head_dim, bias=add_bias_out)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, symbols: torch.Tensor, freqs_cos: Optional[torch.Tensor] = None,
                freqs_sin: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, *, key_padding_mask: Optional[torch.Tensor] = None,
                kv_cache: Optional[Dict[str, torch.Tensor]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output (B, Tq, n_heads * head_dim), weights (B, H, Tq, Tk), relations (B, H, Tq, Tk))."""
        _check_sequence(x, "x", self.d_model, "d_model")
        batch, tq, _ = x.shape
        tk = _cached_length(kv_cache, "k_attn", 2) + tq
        _check_symbols(symbols, x, tk if self.use_relative_positional_symbols else tq, self.d_model,
                       self.use_relative_positional_symbols)
        q_attn = _split_heads(self.wq_attn(x), self.n_heads)  # (B, Tq, H, Dh)
        k_attn = _split_heads(self.wk_attn(x), self.n_kv_heads)  # (B, Tq, H_kv, Dh)
        if freqs_cos is not None and freqs_sin is not None:
            q_attn, k_attn = _rotate(q_attn, freqs_cos, freqs_sin), _rotate(k_attn, freqs_cos, freqs_sin)
        k_attn = _cache_append(kv_cache, "k_attn", k_attn.transpose(1, 2), 2)  # (B, H_kv, Tk, Dh)
        k_attn = k_attn.repeat_interleave(self.n_rep_kv, dim=1)  # (B, H, Tk, Dh)
        scores = (q_attn.transpose(1, 2) @ k_attn.transpose(-2, -1)) * self.attn_scale  # (B, H, Tq, Tk)
        mask = _masks(x, self.n_heads, tk, attn_mask, key_padding_mask, is_causal)
        weights = _masked_softmax(scores, mask)  # (B, H, Tq, Tk)
        q_rel = _split_heads(self.wq_rel(x), self.n_heads).transpose(1, 2)  # (B, H, Tq, Dh)
        k_rel = _split_heads(self.wk_rel(x), self.n_kv_heads).transpose(1, 2)  # (B, H_kv, Tq, Dh)
        k_rel = _cache_append(kv_cache, "k_rel", k_rel, 2).repeat_interleave(self.n_rep_kv, dim=1)  # (B, H, Tk, Dh)
        relations = self.rel_activation_((q_rel @ k_rel.transpose(-2, -1)) * self.attn_scale)  # (B, H, Tq, Tk)
        alpha = self.attn_dropout(weights * relations)  # (B, H, Tq, Tk)  eq. (11)
        out = _attend_symbols(self, alpha, symbols, kv_cache)  # (B, Tq, H, Dh)
        out = self.resid_dropout(self.wo(out.reshape(batch, tq, self.n_heads * self.head_dim)))  # (B, Tq, H * Dh)
        return out, weights, relations


def _attend_symbols(module: nn.Module, alpha: torch.Tensor, symbols: torch.Tensor,
                    kv_cache: Optional[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """sum_j alpha_ij^h W_s^h s_j (or s_(j-i)) for RCA and disentangled RCA: (B, H, Tq, Tk) -> (B, Tq, H, Dh)."""
    sv = _split_heads(module.wv(symbols), module.n_kv_heads)  # (B, Tq, H_kv, Dh) or (Tq, Tk, H_kv, Dh)
    if module.use_relative_positional_symbols:
        return torch.einsum("bhij,ijhd->bihd", alpha, sv.repeat_interleave(module.n_rep_kv, dim=2))  # (B, Tq, H, Dh)
    sv = _cache_append(kv_cache, "sv", sv.transpose(1, 2), 2)  # (B, H_kv, Tk, Dh)
    sv = sv.repeat_interleave(module.n_rep_kv, dim=1)  # (B, H, Tk, Dh)
    return (alpha @ sv).transpose(1, 2)  # (B, Tq, H, Dh)


_RELATIONAL_TYPES = {"relational_attention": RelationalAttention, "rca": RelationalCrossAttention,
                     "disrca": DisentangledRelationalCrossAttention}


class DualAttention(nn.Module):
    """Dual attention: n_heads_sa sensory (standard) heads and n_heads_ra relational heads, concatenated.

    eq. (7): DualAttention(x) = concat(Attention(x) (n_heads_sa heads, own W_o), RA(x) (n_heads_ra heads, own
    W_o)); each branch outputs its heads' share of d_model. Either count may be 0 (not both).
    Args (the package's): sa_kwargs / ra_kwargs go to Attention / the relational module; share_attn_params
    makes the sensory heads use the relational heads' attention query/key maps (n_heads_sa must equal
    n_heads_ra); ra_type: 'relational_attention', 'rca' or 'disrca'.
    """

    def __init__(self, d_model: int, n_heads_sa: int, n_heads_ra: int, dropout: float,
                 sa_kwargs: Optional[dict] = None, ra_kwargs: Optional[dict] = None,
                 share_attn_params: bool = False, ra_type: str = "relational_attention") -> None:
        super().__init__()
        for value, name in ((n_heads_sa, "n_heads_sa"), (n_heads_ra, "n_heads_ra")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if n_heads_sa + n_heads_ra == 0:
            raise ValueError("n_heads_sa and n_heads_ra are both 0; at least one head of either kind is needed")
        if ra_type not in _RELATIONAL_TYPES:
            raise ValueError(f"ra_type must be one of {sorted(_RELATIONAL_TYPES)}, got {ra_type!r}")
        if share_attn_params and n_heads_sa != n_heads_ra:
            raise ValueError(f"share_attn_params=True needs n_heads_sa == n_heads_ra, got {n_heads_sa} and "
                             f"{n_heads_ra}")
        self.d_model, self.n_heads_sa, self.n_heads_ra, self.dropout = d_model, n_heads_sa, n_heads_ra, dropout
        self.sa_kwargs = dict(sa_kwargs) if sa_kwargs is not None else {}
        self.ra_kwargs = dict(ra_kwargs) if ra_kwargs is not None else {}
        self.ra_type, self.share_attn_params = ra_type, share_attn_params
        self.use_self_attn, self.use_rel_attn = n_heads_sa > 0, n_heads_ra > 0
        self.total_n_heads = n_heads_sa + n_heads_ra
        if self.use_self_attn:
            self.self_attention = Attention(d_model=d_model, n_heads=n_heads_sa, total_n_heads=self.total_n_heads,
                                            dropout=dropout, **self.sa_kwargs)
        if self.use_rel_attn:
            self.relational_attention = _RELATIONAL_TYPES[ra_type](
                d_model=d_model, n_heads=n_heads_ra, total_n_heads=self.total_n_heads, dropout=dropout,
                **self.ra_kwargs)
        if share_attn_params:
            # Both kinds of heads then attend with the same alpha; they differ only in what they retrieve.
            # RCA names its maps wq/wk (the package looked for wq_attn there and failed).
            rel = self.relational_attention
            wq, wk = (rel.wq, rel.wk) if ra_type == "rca" else (rel.wq_attn, rel.wk_attn)
            sa = self.self_attention
            if wq.weight.shape != sa.wq.weight.shape or wk.weight.shape != sa.wk.weight.shape:
                raise ValueError("share_attn_params=True needs the same query/key shapes in both branches (key_dim, "
                                 f"n_kv_heads, add_bias_kv in sa_kwargs and ra_kwargs); got {self.sa_kwargs} and "
                                 f"{self.ra_kwargs}")
            self.self_attention.wq, self.self_attention.wk = wq, wk

    def forward(self, x: torch.Tensor, symbols: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, freqs_cos: Optional[torch.Tensor] = None,
                freqs_sin: Optional[torch.Tensor] = None, need_weights: bool = False, *,
                key_padding_mask: Optional[torch.Tensor] = None, kv_cache: Optional[Dict[str, dict]] = None):
        """Returns (output (B, Tq, d_model), self-attention weights or None, relational outputs or None).

        The relational outputs are the list [weights, relations] (RCA: [weights]), as the package returns;
        the self-attention weights are None unless need_weights=True. kv_cache: a dict, holding one cache
        per branch.
        """
        _check_sequence(x, "x", self.d_model, "d_model")
        outs, sa_scores, ra_scores = [], None, None
        if self.use_self_attn:
            cache = None if kv_cache is None else kv_cache.setdefault("sa", {})
            out, sa_scores = self.self_attention(x, x, x, freqs_cos=freqs_cos, freqs_sin=freqs_sin,
                                                 attn_mask=attn_mask, is_causal=is_causal, need_weights=need_weights,
                                                 key_padding_mask=key_padding_mask, kv_cache=cache)
            outs.append(out)  # (B, Tq, n_heads_sa * Dh)
        if self.use_rel_attn:
            cache = None if kv_cache is None else kv_cache.setdefault("ra", {})
            out, *ra_scores = self.relational_attention(x, symbols, freqs_cos=freqs_cos, freqs_sin=freqs_sin,
                                                        attn_mask=attn_mask, is_causal=is_causal,
                                                        key_padding_mask=key_padding_mask, kv_cache=cache)
            outs.append(out)  # (B, Tq, n_heads_ra * Dh)
        return torch.cat(outs, dim=-1), sa_scores, ra_scores  # (B, Tq, d_model)  eq. (7)


# ----------------------------------------------------------------------------------------------------------
# Symbol assignment: who tags the messages of relational attention.


def _sinusoids(length: int, dim: int) -> torch.Tensor:
    """(length, dim) table: [p, 2k] = sin(p / 10000^(2k/dim)), [p, 2k+1] = cos(...)  eq. (9)."""
    position = torch.arange(length).float()[:, None]  # (length, 1)
    div = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))  # (ceil(dim/2),)
    table = torch.zeros(length, dim)  # (length, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div[: dim // 2])
    return table


class SymbolicAttention(nn.Module):
    """Symbolic attention: each token retrieves a symbol from a learned library by attention (eq. (8)).

    The query is W_q x_i; the keys are learned "template features" F and the values the symbol library S,
    so s_i = softmax(W_q x_i F^T / sqrt(d / n_heads)) S per head: a soft lookup of a role by content,
    shared by all positions. Args (the package's): d_model, n_heads, n_symbols, dropout (on the lookup
    weights, in training only; the package also dropped in eval), scale (default 1 / sqrt(d / n_heads)),
    trainable_symbols.
    """

    def __init__(self, d_model: int, n_heads: int, n_symbols: int, dropout: float = 0.0,
                 scale: Optional[float] = None, trainable_symbols: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(n_heads, "n_heads")
        _check_positive_int(n_symbols, "n_symbols")
        _check_divisible(d_model, "d_model", n_heads, "n_heads")
        _check_dropout(dropout)
        self.d_model, self.n_heads, self.n_symbols, self.dropout = d_model, n_heads, n_symbols, dropout
        self.scale, self.trainable_symbols = scale, trainable_symbols
        self.q_proj = nn.Linear(d_model, d_model)
        self.template_features = nn.Parameter(torch.empty(n_symbols, d_model))  # keys F
        self.symbol_library = nn.Parameter(torch.empty(n_symbols, d_model), requires_grad=trainable_symbols)  # S
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.template_features)
        nn.init.normal_(self.symbol_library)

    def forward(self, x: torch.Tensor, *, offset: int = 0) -> torch.Tensor:
        """(B, T, d_model) -> symbols (B, T, d_model). `offset` (position of x[:, 0]) does not matter here."""
        _check_sequence(x, "x", self.d_model, "d_model")
        batch, length, _ = x.shape
        q = _split_heads(self.q_proj(x), self.n_heads).transpose(1, 2)  # (B, h, T, d/h)
        k = _split_heads(self.template_features, self.n_heads).transpose(0, 1)[None]  # (1, h, n_s, d/h)
        v = _split_heads(self.symbol_library, self.n_heads).transpose(0, 1)[None]  # (1, h, n_s, d/h)
        s = F.scaled_dot_product_attention(q, k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1),
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=self.scale)  # (B, h, T, d/h)  eq. (8)
        return s.transpose(1, 2).reshape(batch, length, self.d_model)  # (B, T, d_model)


class PositionalSymbolRetriever(nn.Module):
    """Positional symbols: s_i = S[i], one learned vector per position (eq. (9)).

    With sinusoidal=True the table is the fixed sinusoid of eq. (9) (the package left it as a TODO and
    silently learned the table; here nothing is learned and the state_dict is empty).
    """

    def __init__(self, symbol_dim: int, max_length: int, sinusoidal: bool = False) -> None:
        super().__init__()
        _check_positive_int(symbol_dim, "symbol_dim")
        _check_positive_int(max_length, "max_length")
        self.symbol_dim, self.max_length, self.sinusoidal = symbol_dim, max_length, sinusoidal
        if sinusoidal:
            self.register_buffer("sinusoids", _sinusoids(max_length, symbol_dim), persistent=False)
        else:
            self.symbol_library = nn.Embedding(max_length, symbol_dim)

    def forward(self, x: torch.Tensor, *, offset: int = 0) -> torch.Tensor:
        """(B, T, *) -> symbols (B, T, symbol_dim) of the positions offset .. offset + T - 1."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x must have shape (B, T, d_model), got {getattr(x, 'shape', type(x).__name__)}")
        batch, length = x.size(0), x.size(1)
        if offset + length > self.max_length:
            raise ValueError(f"x reaches position {offset + length - 1} but max_length is {self.max_length}; "
                             f"expected offset + T <= {self.max_length}, got offset {offset}, T {length}")
        table = self.sinusoids.to(x.dtype) if self.sinusoidal else self.symbol_library.weight  # (L, d)
        return table[offset: offset + length][None].expand(batch, -1, -1)  # (B, T, symbol_dim)


class _RelativePositionalEncoding(nn.Module):
    """A table E of 2 * max_rel_pos + 1 vectors; [i, j] of its output is E[clip(j - i)] (eq. (6))."""

    def __init__(self, dim: int, max_rel_pos: int) -> None:
        super().__init__()
        self.num_units, self.max_relative_position = dim, max_rel_pos
        self.rel_pos_embeddings = nn.Parameter(torch.empty(2 * max_rel_pos + 1, dim))
        nn.init.xavier_uniform_(self.rel_pos_embeddings)

    def forward(self, length_q: int, length_k: Optional[int] = None, offset: int = 0) -> torch.Tensor:
        """(length_q, length_k, dim); query i sits at position offset + i, key j at position j."""
        length_k = offset + length_q if length_k is None else length_k
        device = self.rel_pos_embeddings.device
        distance = torch.arange(length_k, device=device)[None, :] - torch.arange(offset, offset + length_q,
                                                                                   device=device)[:, None]  # (Tq, Tk)
        clipped = distance.clamp(-self.max_relative_position, self.max_relative_position)  # (Tq, Tk)
        return self.rel_pos_embeddings[clipped + self.max_relative_position]  # (Tq, Tk, dim)  eq. (6)


class PositionRelativeSymbolRetriever(nn.Module):
    """Position-relative symbols: the message from j to i is tagged s_(j-i), clipped to +-max_rel_pos (eq. (6))."""

    def __init__(self, symbol_dim: int, max_rel_pos: int) -> None:
        super().__init__()
        _check_positive_int(symbol_dim, "symbol_dim")
        _check_positive_int(max_rel_pos, "max_rel_pos")
        self.symbol_dim, self.max_rel_pos = symbol_dim, max_rel_pos
        self.rel_pos_enc = _RelativePositionalEncoding(dim=symbol_dim, max_rel_pos=max_rel_pos)

    def forward(self, x: torch.Tensor, *, offset: int = 0) -> torch.Tensor:
        """(B, T, *) -> (T, offset + T, symbol_dim): the rows of the queries offset .. offset + T - 1."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x must have shape (B, T, d_model), got {getattr(x, 'shape', type(x).__name__)}")
        return self.rel_pos_enc(x.size(1), offset=offset)  # (T, offset + T, symbol_dim)


_RETRIEVERS = {"symbolic_attention": SymbolicAttention, "positional_symbols": PositionalSymbolRetriever,
               "position_relative": PositionRelativeSymbolRetriever}


def _make_retriever(symbol_retrieval: str, kwargs: dict) -> nn.Module:
    if symbol_retrieval not in _RETRIEVERS:
        raise ValueError(f"symbol_retrieval must be one of {sorted(_RETRIEVERS)}, got {symbol_retrieval!r}"
                         + (" (RelationalSymbolicAttention is not part of this file)" if symbol_retrieval ==
                            "rel_sym_attn" else ""))
    return _RETRIEVERS[symbol_retrieval](**kwargs)


def _relative_ra_kwargs(symbol_retrieval: str, ra_kwargs: Optional[dict]) -> Optional[dict]:
    """Position-relative symbols need relational heads that read a (Tq, Tk, d) table: switch them on.

    The package required the user to also pass use_relative_positional_symbols=True and failed inside an
    einsum otherwise; here it follows from symbol_retrieval, and a contradicting value is an error.
    """
    if symbol_retrieval != "position_relative":
        return ra_kwargs
    ra_kwargs = dict(ra_kwargs or {})
    if ra_kwargs.get("use_relative_positional_symbols", True) is not True:
        raise ValueError("symbol_retrieval='position_relative' needs ra_kwargs['use_relative_positional_symbols'] "
                         "= True (or leave it out), got False")
    ra_kwargs["use_relative_positional_symbols"] = True
    return ra_kwargs


# ----------------------------------------------------------------------------------------------------------
# Blocks.


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight  # (B, T, d)


def _norm(d_model: int, norm_type: str) -> nn.Module:
    if norm_type == "layernorm":
        return nn.LayerNorm(d_model)
    if norm_type == "rmsnorm":
        return RMSNorm(d_model)
    if norm_type == "none":
        return nn.Identity()
    raise ValueError(f"norm_type must be 'layernorm', 'rmsnorm' or 'none', got {norm_type!r}")


class FeedForwardBlock(nn.Module):
    """linear2(act(linear1(x))), or SwiGLU linear2(silu(linear1 x) * linear3 x); dff defaults to 4 d (8/3 d)."""

    def __init__(self, embed_dim: int, dff: Optional[int] = None, activation: str = "relu",
                 use_bias: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.activation, self.use_bias = embed_dim, activation, use_bias
        self.dff = dff if dff is not None else (int(2 / 3 * 4 * embed_dim) if activation == "swiglu" else 4 * embed_dim)
        if activation != "swiglu":
            self.activation_ = _activation(activation, "activation")
        self.linear1 = nn.Linear(embed_dim, self.dff, bias=use_bias)
        self.linear2 = nn.Linear(self.dff, embed_dim, bias=use_bias)
        if activation == "swiglu":
            self.linear3 = nn.Linear(embed_dim, self.dff, bias=use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.linear2(F.silu(self.linear1(x)) * self.linear3(x))  # (B, T, d)
        return self.linear2(self.activation_(self.linear1(x)))  # (B, T, d)


class DualAttnEncoderBlock(nn.Module):
    """DualAttention + feed-forward with residuals, pre-norm (norm_first) or post-norm; the package's block."""

    def __init__(self, d_model: int, n_heads_sa: int, n_heads_ra: int, dff: int, activation: str,
                 dropout_rate: float, norm_first: bool, norm_type: str = "layernorm", sa_kwargs: Optional[dict] = None,
                 ra_kwargs: Optional[dict] = None, ra_type: str = "relational_attention",
                 share_attn_params: bool = False, bias: bool = True, causal: bool = False) -> None:
        super().__init__()
        self.d_model, self.n_heads_sa, self.n_heads_ra, self.dff = d_model, n_heads_sa, n_heads_ra, dff
        self.activation, self.dropout_rate = activation, dropout_rate
        self.norm_first, self.norm_type = norm_first, norm_type
        self.ra_type, self.share_attn_params, self.bias, self.causal = ra_type, share_attn_params, bias, causal
        self.dropout = nn.Dropout(dropout_rate)
        self.norm1 = _norm(d_model, norm_type)
        self.dual_attn = DualAttention(d_model=d_model, n_heads_sa=n_heads_sa, n_heads_ra=n_heads_ra,
                                       dropout=dropout_rate, sa_kwargs=sa_kwargs, ra_kwargs=ra_kwargs,
                                       ra_type=ra_type, share_attn_params=share_attn_params)
        self.norm2 = _norm(d_model, norm_type)
        self.ff_block = FeedForwardBlock(d_model, dff=dff, activation=activation, use_bias=bias)

    def forward(self, x: torch.Tensor, symbols: torch.Tensor, freqs_cos: Optional[torch.Tensor] = None,
                freqs_sin: Optional[torch.Tensor] = None, *, attn_mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, kv_cache: Optional[dict] = None) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model). The block's `causal` flag adds the causal mask."""
        def attend(h):
            out = self.dual_attn(h, symbols, attn_mask=attn_mask, is_causal=self.causal, freqs_cos=freqs_cos,
                                 freqs_sin=freqs_sin, key_padding_mask=key_padding_mask, kv_cache=kv_cache)[0]
            return self.dropout(out)  # (B, T, d_model)

        if self.norm_first:
            x = x + attend(self.norm1(x))
            return x + self.dropout(self.ff_block(self.norm2(x)))
        x = self.dropout(self.norm1(x + attend(x)))  # the package's post-norm form drops out here too
        return self.norm2(x + self.dropout(self.ff_block(x)))


class DualAttnDecoderBlock(nn.Module):
    """DualAttention (causal by default), cross-attention to an encoder's output, feed-forward; the package's."""

    def __init__(self, d_model: int, n_heads_sa: int, n_heads_ra: int, n_heads_cross: int, dff: int, activation: str,
                 dropout_rate: float, norm_first: bool, norm_type: str = "layernorm", sa_kwargs: Optional[dict] = None,
                 ra_kwargs: Optional[dict] = None, cross_kwargs: Optional[dict] = None,
                 ra_type: str = "relational_attention", share_attn_params: bool = False, bias: bool = True,
                 causal: bool = True) -> None:
        super().__init__()
        self.d_model, self.n_heads_sa, self.n_heads_ra = d_model, n_heads_sa, n_heads_ra
        self.n_heads_cross = n_heads_cross
        self.dff, self.activation, self.dropout_rate, self.norm_first = dff, activation, dropout_rate, norm_first
        self.norm_type, self.ra_type, self.share_attn_params = norm_type, ra_type, share_attn_params
        self.bias, self.causal = bias, causal
        self.use_self_attn, self.use_rel_attn = n_heads_sa > 0, n_heads_ra > 0
        self.dropout = nn.Dropout(dropout_rate)
        self.norm1 = _norm(d_model, norm_type)
        self.dual_attn = DualAttention(d_model=d_model, n_heads_sa=n_heads_sa, n_heads_ra=n_heads_ra,
                                       dropout=dropout_rate, sa_kwargs=sa_kwargs, ra_kwargs=ra_kwargs,
                                       ra_type=ra_type, share_attn_params=share_attn_params)
        self.norm2 = _norm(d_model, norm_type)
        self.cross_attn = Attention(d_model, n_heads_cross, dropout=dropout_rate, **(cross_kwargs or {}))
        self.norm3 = _norm(d_model, norm_type)
        self.ff_block = FeedForwardBlock(d_model, dff=dff, activation=activation, use_bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, symbols: torch.Tensor,
                freqs_cos: Optional[torch.Tensor] = None, freqs_sin: Optional[torch.Tensor] = None, *,
                attn_mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                context_key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, T, d_model), context (B, S, d_model) -> (B, T, d_model). RoPE, when given, acts on the
        dual-attention heads (the package's block had no way to pass it); never on cross-attention."""
        def attend(h):
            out = self.dual_attn(h, symbols, attn_mask=attn_mask, is_causal=self.causal, freqs_cos=freqs_cos,
                                 freqs_sin=freqs_sin, key_padding_mask=key_padding_mask)[0]
            return self.dropout(out)  # (B, T, d_model)

        def cross(h):
            out = self.cross_attn(h, context, context, key_padding_mask=context_key_padding_mask)[0]
            return self.dropout(out)  # (B, T, d_model)

        if self.norm_first:
            x = x + attend(self.norm1(x))
            x = x + cross(self.norm2(x))
            return x + self.dropout(self.ff_block(self.norm3(x)))
        x = self.norm1(x + attend(x))
        x = self.norm2(x + cross(x))
        return self.norm3(x + self.dropout(self.ff_block(x)))


# ----------------------------------------------------------------------------------------------------------
# Models.


def _relational_flops_per_token(d_model: int, n_heads_sa: int, n_heads_ra: int, ra_kwargs: Optional[dict],
                                n_ctx: int) -> int:
    """Forward multiply-adds x 2 that attention spends per token on the T x T part (eq. (13)), one layer.

    Sensory heads: scores and weighted values, 2 * H_sa * (Dk + Dh) * T. Relational heads: scores
    2 * H_ra * Dk * T, relations 2 * R * Dr * T, attended relations 2 * H_ra * R * T and attended symbols
    2 * H_ra * Dh * T. Projections are in the 6 N term.
    """
    ra_kwargs = ra_kwargs or {}
    head_dim = d_model // (n_heads_sa + n_heads_ra)
    key_dim = ra_kwargs.get("key_dim") or head_dim
    n_rel = ra_kwargs.get("n_relations") or n_heads_ra
    rel_dim = ra_kwargs.get("rel_proj_dim") or (head_dim * n_heads_ra // max(n_rel, 1))
    sensory = 2 * n_heads_sa * (head_dim + head_dim) * n_ctx
    relational = 2 * n_ctx * (n_heads_ra * key_dim + n_rel * rel_dim + n_heads_ra * n_rel + n_heads_ra * head_dim)
    return sensory + (relational if n_heads_ra > 0 else 0)


def _mfu(flops_per_iter: float, dt: float, flops_promised: float) -> float:
    if not dt > 0:
        raise ValueError(f"dt must be a positive number of seconds, got {dt!r}")
    return flops_per_iter / dt / flops_promised


def _gpt2_init(model: nn.Module, n_layers: int, activation: str) -> None:
    """Normal(0, 0.02) weights and zero biases; residual-writing layers scaled by 1/sqrt(2 n_layers) (GPT-2)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RelationalAttention):
            nn.init.normal_(module.wr, mean=0.0, std=0.02)
    last = "linear3" if activation == "swiglu" else "linear2"  # the package's choice, kept
    for name, p in model.named_parameters():
        if name.endswith(f"{last}.weight") or name.endswith("wo.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))


class DualAttnTransformerLM(nn.Module):
    """The Dual Attention Transformer language model (decoder-only), the package's `DualAttnTransformerLM`.

    forward(x (B, T) token ids, targets=None) -> (logits (B, T, vocab_size), loss or None). With n_heads_ra = 0
    it is a plain GPT-style Transformer. generate() samples with a KV cache (eq. (12)).
    Args: the package's; symbol_retrieval is 'symbolic_attention', 'positional_symbols' or 'position_relative',
    built from symbol_retrieval_kwargs, one per layer or shared (symbol_retriever_config); pos_enc_type 'pos_emb'
    (learned) or 'RoPE'; bias: biases of the feed-forward layers.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads_sa: int, n_heads_ra: int,
                 symbol_retrieval_kwargs: dict, dff: int, dropout_rate: float, activation: str, norm_first: bool,
                 max_block_size: int, norm_type: str = "layernorm", sa_kwargs: Optional[dict] = None,
                 ra_kwargs: Optional[dict] = None, ra_type: str = "relational_attention",
                 share_attn_params: bool = False, symbol_retrieval: str = "symbolic_attention",
                 symbol_retriever_config: Optional[dict] = None, pos_enc_type: str = "pos_emb",
                 bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(vocab_size, "vocab_size")
        _check_positive_int(n_layers, "n_layers")
        _check_positive_int(max_block_size, "max_block_size")
        if pos_enc_type not in ("pos_emb", "RoPE"):
            raise ValueError(f"pos_enc_type must be 'pos_emb' or 'RoPE', got {pos_enc_type!r}")
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.n_heads_sa, self.n_heads_ra, self.dff, self.dropout_rate = n_heads_sa, n_heads_ra, dff, dropout_rate
        self.activation, self.norm_first, self.norm_type = activation, norm_first, norm_type
        self.block_size = max_block_size
        self.ra_type, self.share_attn_params, self.symbol_retriever = ra_type, share_attn_params, symbol_retrieval
        self.pos_enc_type, self.bias = pos_enc_type, bias
        self.n_heads = n_heads_sa + n_heads_ra
        self.ra_kwargs = _relative_ra_kwargs(symbol_retrieval, ra_kwargs)
        self.sa_kwargs = sa_kwargs
        self.symbol_retriever_config = dict(symbol_retriever_config or {})
        shared = self.symbol_retriever_config.setdefault("shared_symbol_retriever", True)
        tie_library = self.symbol_retriever_config.setdefault("weight_tie_symbol_library", False)
        if shared:
            # One retriever called by every layer (listed once per layer, as the package's ModuleList does).
            retrievers = [_make_retriever(symbol_retrieval, symbol_retrieval_kwargs)] * n_layers
        else:
            retrievers = [_make_retriever(symbol_retrieval, symbol_retrieval_kwargs) for _ in range(n_layers)]
            if tie_library:
                if symbol_retrieval == "position_relative":
                    raise ValueError("weight_tie_symbol_library=True is not available for position_relative symbols")
                for r in retrievers[1:]:
                    r.symbol_library = retrievers[0].symbol_library
        layers = dict(
            token_embedder=nn.Embedding(vocab_size, d_model),
            dropout=nn.Dropout(dropout_rate),
            symbol_retrievers=nn.ModuleList(retrievers),
            blocks=nn.ModuleList([DualAttnEncoderBlock(
                d_model=d_model, n_heads_sa=n_heads_sa, n_heads_ra=n_heads_ra, dff=dff, dropout_rate=dropout_rate,
                activation=activation, norm_first=norm_first, norm_type=norm_type, sa_kwargs=sa_kwargs,
                ra_kwargs=self.ra_kwargs, ra_type=ra_type, share_attn_params=share_attn_params, bias=bias,
                causal=True) for _ in range(n_layers)]),
            norm=_norm(d_model, norm_type),
            final_out=nn.Linear(d_model, vocab_size, bias=False),
        )
        if pos_enc_type == "pos_emb":
            layers["positional_embedder"] = nn.Embedding(max_block_size, d_model)
        else:
            cos, sin = _rope_tables(d_model // self.n_heads, max_block_size)  # (T_max, Dh/2) each
            self.register_buffer("freqs_cos", cos, persistent=False)
            self.register_buffer("freqs_sin", sin, persistent=False)
        self.layers = nn.ModuleDict(layers)
        self.layers.token_embedder.weight = self.layers.final_out.weight  # tied input and output embeddings
        _gpt2_init(self, n_layers, activation)

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                kv_cache: Optional[List[dict]] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy against targets or None).

        kv_cache: a list of n_layers dicts (empty at first); x then holds only the tokens after the cached ones.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.is_floating_point() or x.is_complex() \
                or x.dtype == torch.bool:
            raise ValueError(f"x must be a (B, T) tensor of integer token ids, got "
                             f"{getattr(x, 'shape', type(x).__name__)} {getattr(x, 'dtype', '')}")
        if kv_cache is not None and len(kv_cache) != self.n_layers:
            raise ValueError(f"kv_cache must be a list of n_layers = {self.n_layers} dicts, got {len(kv_cache)}")
        offset = 0 if not kv_cache else kv_cache[0].get("length", 0)
        t = x.size(1)
        if offset + t > self.block_size:
            raise ValueError(f"x has length {t} after {offset} cached tokens, but max_block_size is "
                             f"{self.block_size}; expected offset + T <= {self.block_size}")
        h = self.layers.token_embedder(x)  # (B, T, d)
        freqs_cos = freqs_sin = None
        if self.pos_enc_type == "pos_emb":
            h = h + self.layers.positional_embedder(torch.arange(offset, offset + t, device=x.device))  # (B, T, d)
        else:
            freqs_cos, freqs_sin = self.freqs_cos[offset: offset + t], self.freqs_sin[offset: offset + t]
        h = self.layers.dropout(h)  # built and never applied in the package
        for i, (retriever, block) in enumerate(zip(self.layers.symbol_retrievers, self.layers.blocks)):
            symbols = retriever(h, offset=offset)  # (B, T, d) or (T, offset + T, d)
            cache = None if kv_cache is None else kv_cache[i]
            h = block(h, symbols, freqs_cos=freqs_cos, freqs_sin=freqs_sin, kv_cache=cache)  # (B, T, d)
            if cache is not None:
                cache["length"] = offset + t
        logits = self.layers.final_out(self.layers.norm(h))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (each shared tensor once); without the position table when non_embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_enc_type == "pos_emb":
            n -= self.layers.positional_embedder.weight.numel()
        return n

    def estimate_flops_per_token(self) -> int:
        """Training FLOPs per token at full context, eq. (13): 6 N + 3 L (attention's T x T work)."""
        per_layer = _relational_flops_per_token(self.d_model, self.n_heads_sa, self.n_heads_ra, self.ra_kwargs,
                                                self.block_size)
        return 6 * self.get_num_params() + 3 * self.n_layers * per_layer

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, flops_promised: float = 312e12) -> float:
        """Model FLOPs utilisation: achieved FLOP/s over `flops_promised` (default A100 bf16 peak, 312 TFLOP/s)."""
        return _mfu(self.estimate_flops_per_token() * self.block_size * fwdbwd_per_iter, dt, flops_promised)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, *, use_cache: bool = True) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); returns (B, T + max_new_tokens).

        With use_cache, each new token is run through the model alone, attending to the cache (eq. (12)).
        Once the sequence is longer than max_block_size the window slides, every position changes, and the
        cache is useless: from then on each step recomputes the last max_block_size tokens, as without it.
        """
        cache = [dict() for _ in range(self.n_layers)] if use_cache else None
        fresh = idx
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= self.block_size:
                logits, _ = self(fresh, kv_cache=cache)  # (B, T_new, vocab)
            else:
                logits, _ = self(idx[:, -self.block_size:])  # (B, T, vocab)
            logits = logits[:, -1, :] / temperature  # (B, vocab)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k)
                logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
            idx_next = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
            fresh = idx_next
        return idx


class _SinusoidalPositionalEncoding(nn.Module):
    """x * sqrt(d_model) (when scale) + the sinusoid of each position; `pe` is saved, as in the package."""

    def __init__(self, d_model: int, scale: bool = True, dropout: float = 0.1, max_len: int = 2048) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.scale = math.sqrt(d_model) if scale else 1
        self.register_buffer("pe", _sinusoids(max_len, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(1) > self.pe.size(0):
            raise ValueError(f"sequence has length {x.size(1)} but the block size is {self.pe.size(0)}")
        return self.dropout(self.scale * x + self.pe[: x.size(1)])  # (B, T, d)


def _embedder(spec: dict, d_model: int, name: str) -> nn.Module:
    if spec.get("type") == "token":
        return nn.Embedding(spec["vocab_size"], d_model)
    if spec.get("type") == "vector":
        return nn.Linear(spec["dim"], d_model)
    raise ValueError(f"{name}['type'] must be 'token' or 'vector', got {spec.get('type')!r}")


class Seq2SeqDualAttnTransformer(nn.Module):
    """Encoder-decoder Dual Attention Transformer, the package's `Seq2SeqDualAttnTransformer`.

    forward(x (B, S) source, y (B, T) target input, targets=None) -> (logits, loss): logits (B, T, out_dim)
    with targets, else only the last position's (B, 1, out_dim), as the package. One symbol retriever serves
    every encoder and decoder layer. encoder_kwargs / decoder_kwargs are DualAttnEncoderBlock's /
    DualAttnDecoderBlock's arguments. tie_weights ties target_embedder.weight to final_out.weight.
    """

    def __init__(self, input_spec: dict, output_spec: dict, symbol_retrieval: str, symbol_retrieval_kwargs: dict,
                 d_model: int, out_dim: int, n_layers_enc: int, n_layers_dec: int, encoder_kwargs: dict,
                 decoder_kwargs: dict, in_block_size: int, out_block_size: int, tie_weights: bool = True,
                 loss_ignore_idx: int = -1) -> None:
        super().__init__()
        for value, name in ((d_model, "d_model"), (out_dim, "out_dim"), (n_layers_enc, "n_layers_enc"),
                            (n_layers_dec, "n_layers_dec"), (in_block_size, "in_block_size"),
                            (out_block_size, "out_block_size")):
            _check_positive_int(value, name)
        self.input_spec, self.output_spec, self.d_model, self.out_dim = input_spec, output_spec, d_model, out_dim
        self.n_layers_enc, self.n_layers_dec = n_layers_enc, n_layers_dec
        self.in_block_size, self.out_block_size, self.loss_ignore_idx = in_block_size, out_block_size, loss_ignore_idx
        self.encoder_kwargs = dict(encoder_kwargs)
        self.decoder_kwargs = dict(decoder_kwargs)
        for kwargs in (self.encoder_kwargs, self.decoder_kwargs):
            relative = _relative_ra_kwargs(symbol_retrieval, kwargs.get("ra_kwargs"))
            if relative is not None:
                kwargs["ra_kwargs"] = relative
        self.tie_weights = tie_weights
        tieable = output_spec.get("type") == "token" and output_spec.get("vocab_size") == out_dim
        if tie_weights and not tieable:
            raise ValueError(f"tie_weights=True needs output_spec type 'token' with vocab_size == out_dim = {out_dim}, "
                             f"got {output_spec}; pass tie_weights=False")
        self.layers = nn.ModuleDict(dict(
            source_embedder=_embedder(input_spec, d_model, "input_spec"),
            target_embedder=_embedder(output_spec, d_model, "output_spec"),
            source_pos_embedder=_SinusoidalPositionalEncoding(d_model, dropout=0.0, max_len=in_block_size),
            target_pos_embedder=_SinusoidalPositionalEncoding(d_model, dropout=0.0, max_len=out_block_size),
            symbol_retriever=_make_retriever(symbol_retrieval, symbol_retrieval_kwargs),
            encoder_blocks=nn.ModuleList([DualAttnEncoderBlock(d_model, **self.encoder_kwargs)
                                          for _ in range(n_layers_enc)]),
            # n_layers_dec decoder blocks (the package built n_layers_enc of them)
            decoder_blocks=nn.ModuleList([DualAttnDecoderBlock(d_model, **self.decoder_kwargs)
                                          for _ in range(n_layers_dec)]),
            final_out=nn.Linear(d_model, out_dim),
        ))
        if tie_weights:
            self.layers.target_embedder.weight = self.layers.final_out.weight  # the package set a stray `.weights`

    def forward(self, x: torch.Tensor, y: torch.Tensor, targets: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.layers.source_pos_embedder(self.layers.source_embedder(x))  # (B, S, d)
        y = self.layers.target_pos_embedder(self.layers.target_embedder(y))  # (B, T, d)
        for block in self.layers.encoder_blocks:
            x = block(x, self.layers.symbol_retriever(x))  # (B, S, d)
        for block in self.layers.decoder_blocks:
            y = block(y, x, self.layers.symbol_retriever(y))  # (B, T, d)
        if targets is None:
            return self.layers.final_out(y[:, [-1], :]), None  # (B, 1, out_dim)
        logits = self.layers.final_out(y)  # (B, T, out_dim)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=self.loss_ignore_idx)
        return logits, loss

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, flops_promised: float = 312e12) -> float:
        """MFU of one training iteration of a (in_block_size, out_block_size) batch, eq. (13) per stack.

        Encoder parameters act on S = in_block_size tokens, the rest on T = out_block_size; attention adds
        its T x T work per layer, and cross-attention 2 * H_cross * 2 Dh * S per decoder token.
        """
        s, t = self.in_block_size, self.out_block_size
        enc = sum(p.numel() for p in self.layers.encoder_blocks.parameters()) + sum(
            p.numel() for p in self.layers.source_embedder.parameters())
        flops = 6 * enc * s + 6 * (self.get_num_params() - enc) * t
        for blocks, n_ctx, n_tok in ((self.layers.encoder_blocks, s, s), (self.layers.decoder_blocks, t, t)):
            for block in blocks:
                attn = block.dual_attn
                flops += 3 * n_tok * _relational_flops_per_token(self.d_model, attn.n_heads_sa, attn.n_heads_ra,
                                                                 attn.ra_kwargs, n_ctx)
        for block in self.layers.decoder_blocks:
            flops += 3 * t * 2 * block.n_heads_cross * 2 * block.cross_attn.head_dim * s
        return _mfu(flops * fwdbwd_per_iter, dt, flops_promised)


class _Patchify(nn.Module):
    """(B, C, H, W) image -> (B, (H/p1) (W/p2), p1 p2 C) patches, row-major, the package's einops order."""

    def __init__(self, patch_height: int, patch_width: int) -> None:
        super().__init__()
        self.p1, self.p2 = patch_height, patch_width

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.dim() != 4 or img.size(2) % self.p1 or img.size(3) % self.p2:
            raise ValueError(f"x must be (B, C, H, W) with H divisible by {self.p1} and W by {self.p2}, "
                             f"got {tuple(img.shape)}")
        b, c, h, w = img.shape
        patches = img.reshape(b, c, h // self.p1, self.p1, w // self.p2, self.p2)  # (B, C, h, p1, w, p2)
        return patches.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // self.p1) * (w // self.p2), -1)  # (B, N, p1 p2 C)


class VisionDualAttnTransformer(nn.Module):
    """ViT with dual-attention encoder blocks, the package's `VisionDualAttnTransformer`.

    forward(x (B, C, H, W)) -> logits (B, num_classes). Each patch of patch_size is a token, a class token
    is prepended, learned positions are added. image_shape is (channels, width, height) and patch_size
    (width, height), in the package's order. For (B, 3, 36, 36) images with 12 x 12 patches: 9 patch tokens
    + 1 class token, so positional symbols need max_length >= 10.
    """

    def __init__(self, image_shape: Tuple[int, int, int], patch_size: Tuple[int, int], num_classes: int, d_model: int,
                 n_layers: int, n_heads_sa: int, n_heads_ra: int, dff: int, dropout_rate: float, activation: str,
                 norm_first: bool, symbol_retrieval: str, symbol_retrieval_kwargs: dict,
                 ra_type: str = "relational_attention", ra_kwargs: Optional[dict] = None,
                 sa_kwargs: Optional[dict] = None, norm_type: str = "layernorm", bias: bool = True,
                 pool: str = "cls") -> None:
        super().__init__()
        self.img_channels, self.img_width, self.img_height = image_shape
        self.patch_width, self.patch_height = patch_size
        if self.img_width % self.patch_width or self.img_height % self.patch_height:
            raise ValueError(f"patch_size {tuple(patch_size)} must divide the image (width, height) "
                             f"({self.img_width}, {self.img_height})")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.num_classes = num_classes
        self.num_patches = (self.img_width // self.patch_width) * (self.img_height // self.patch_height)
        self.patch_dim = self.patch_width * self.patch_height * self.img_channels
        self.pool, self.d_model, self.n_layers = pool, d_model, n_layers
        self.n_heads_sa, self.n_heads_ra = n_heads_sa, n_heads_ra
        self.dff, self.dropout_rate, self.activation, self.norm_first = dff, dropout_rate, activation, norm_first
        self.norm_type, self.bias, self.ra_type, self.symbol_retrieval = norm_type, bias, ra_type, symbol_retrieval
        self.ra_kwargs = _relative_ra_kwargs(symbol_retrieval, ra_kwargs) or {}
        self.sa_kwargs = sa_kwargs if sa_kwargs is not None else {}
        self.symbol_retriever = _make_retriever(symbol_retrieval, symbol_retrieval_kwargs)
        self.to_patch_embedding = nn.Sequential(
            _Patchify(self.patch_height, self.patch_width),
            nn.LayerNorm(self.patch_dim),
            nn.Linear(self.patch_dim, d_model),
            nn.LayerNorm(d_model),
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, self.num_patches + 1, d_model))
        self.cls_token = nn.Parameter(torch.randn(1, 1, d_model))
        self.dropout = nn.Dropout(dropout_rate)
        self.encoder_blocks = nn.ModuleList([DualAttnEncoderBlock(
            d_model=d_model, n_heads_sa=n_heads_sa, n_heads_ra=n_heads_ra, dff=dff, dropout_rate=dropout_rate,
            activation=activation, norm_first=norm_first, norm_type=norm_type, bias=bias, causal=False,
            ra_type=ra_type, ra_kwargs=self.ra_kwargs, sa_kwargs=self.sa_kwargs) for _ in range(n_layers)])
        self.final_out = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(x)  # (B, N, d)
        cls = self.cls_token.expand(x.size(0), -1, -1)  # (B, 1, d)
        x = torch.cat((cls, x), dim=1) + self.pos_embedding[:, : x.size(1) + 1]  # (B, N + 1, d)
        x = self.dropout(x)
        for block in self.encoder_blocks:
            x = block(x, self.symbol_retriever(x))  # (B, N + 1, d)
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)  # (B, d)
        return self.final_out(x)  # (B, num_classes)

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _demo() -> None:
    torch.manual_seed(0)
    d_model, n_heads, T = 32, 4, 6
    ra = RelationalAttention(d_model, n_heads, n_relations=2, symmetric_rels=True).eval()
    x, s = torch.randn(2, T, d_model), torch.randn(2, T, d_model)
    out, alpha, rel = ra(x, s, is_causal=True)
    # Oracle inline: eq. (3) read literally, building every message W_r r_ij + W_s s_j, then summing.
    with torch.no_grad():
        hd = ra.head_dim
        messages = torch.einsum("bijr,hdr->bijhd", rel, ra.wr) + ra.wv(s).view(2, 1, T, n_heads, hd)  # (B, T, T, H, Dh)
        literal = ra.wo(torch.einsum("bhij,bijhd->bihd", alpha, messages).reshape(2, T, d_model))
    diff = (out - literal).abs().max().item()
    print(f"RelationalAttention output {tuple(out.shape)}, weights {tuple(alpha.shape)}, relations {tuple(rel.shape)}")
    print(f"max |relation sum before W_r - messages built per pair| = {diff:.2e}")
    assert diff < 1e-5, diff
    asym = (rel - rel.transpose(1, 2)).abs().max().item()
    print(f"symmetric_rels=True: max |r_ij - r_ji| = {asym:.2e}")
    assert asym < 1e-5, asym
    lm = DualAttnTransformerLM(vocab_size=11, d_model=d_model, n_layers=2, n_heads_sa=2, n_heads_ra=2,
                               symbol_retrieval_kwargs=dict(symbol_dim=d_model, max_length=16), dff=64,
                               dropout_rate=0.0, activation="swiglu", norm_first=True, max_block_size=16,
                               symbol_retrieval="positional_symbols", pos_enc_type="RoPE").eval()
    prompt = torch.randint(0, 11, (2, 3))
    torch.manual_seed(1)
    cached = lm.generate(prompt, 8, top_k=4)
    torch.manual_seed(1)
    uncached = lm.generate(prompt, 8, top_k=4, use_cache=False)
    print(f"DualAttnTransformerLM: {lm.get_num_params():,} parameters; cached and uncached generation agree: "
          f"{torch.equal(cached, uncached)}")
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------------------------------------------------
# Input checks of this file alone (the shared ones follow the banner below).


def _check_symbols(symbols: torch.Tensor, x: torch.Tensor, tk: int, d_model: int, relative: bool) -> None:
    """Raise unless `symbols` is (B, Tk, d_model) or, for position-relative symbols, (Tq, Tk, d_model)."""
    want = (x.size(1), tk, d_model) if relative else (x.size(0), tk, d_model)
    if not isinstance(symbols, torch.Tensor) or tuple(symbols.shape) != want:
        got = tuple(symbols.shape) if isinstance(symbols, torch.Tensor) else type(symbols).__name__
        form = ("(Tq, Tk, d_model): position-relative symbols, s_(j-i) at [i, j]" if relative else
                "(B, Tk, d_model): one symbol per key position")
        hint = ("" if relative else "; position-relative symbols (a (Tq, Tk, d_model) table) need "
                "use_relative_positional_symbols=True")
        raise ValueError(f"symbols must have shape {form} = {want}, got {got}{hint}")


def _check_heads(d_model: int, n_heads: int, n_kv_heads: int, total_n_heads: int) -> None:
    """The head counts of an attention module: positive, n_kv_heads | n_heads, total_n_heads | d_model."""
    _check_positive_int(d_model, "d_model")
    _check_positive_int(n_heads, "n_heads")
    _check_positive_int(n_kv_heads, "n_kv_heads")
    _check_positive_int(total_n_heads, "total_n_heads")
    _check_divisible(n_heads, "n_heads", n_kv_heads, "n_kv_heads")
    _check_divisible(d_model, "d_model", total_n_heads, "total_n_heads")


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
