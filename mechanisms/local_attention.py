"""Local (sliding-window) multi-head self-attention, computed in blocks.

Paper: Iz Beltagy, Matthew E. Peters, Arman Cohan (2020), "Longformer: The Long-Document
Transformer", arXiv:2004.05150 (sliding-window attention). The blocked way of computing it, where a
block of queries looks at its own block of keys and the neighbouring blocks, is the "local 1D
attention" of Parmar et al. (2018), "Image Transformer", arXiv:1802.05751.

Idea: most of what a token needs is nearby, so each query attends only to the keys within a fixed
distance `window` of it. If the sequence is cut into blocks of `window` tokens, every key a query may
see lies in the query's own block or in a neighbouring block, so the scores are computed block
against three blocks (two when causal) and a (T, T) score matrix is never formed.

Window (page eq. (1)), for a query at position i and a key at position j:
    symmetric:  j is visible  iff  |i - j| <= window          (at most 2*window + 1 keys)
    causal:     j is visible  iff  i - window <= j <= i        (at most window + 1 keys)
Attention (eq. (2), (3)):
    s_ij = q_i . k_j / sqrt(Dh)  for visible, unmasked j;  alpha_i = softmax_j(s_ij);  o_i = sum_j alpha_ij v_j

Complexity in sequence length T: time O(T * window), memory O(T * window) (block size b = window,
each of the ceil(T / b) query blocks scores 3b keys, or 2b when causal). `need_weights=True`
additionally assembles the dense (B, H, T, T) weights for inspection: that tensor is O(T^2) and is
meant for small T only.

Reduces to: standard multi-head attention when window >= T - 1 (causal: causal attention), and it
equals dense attention with the band mask of eq. (1) for every (T, window); both are tested in
tests/test_local_attention.py.

Docs page: docs/mechanisms/local_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


class LocalAttention(nn.Module):
    """Sliding-window multi-head self-attention with the window of eq. (1), computed in blocks.

    Args:
        d_model: width of the input and output vectors.
        num_heads: number of heads; must divide d_model.
        window: w >= 0. Symmetric: query i sees keys with |i - j| <= w. Causal: i - w <= j <= i.
        causal: choose the causal (left-only) window instead of the symmetric one. It is a constructor
            argument, not a forward flag, because it decides the shape of the window and therefore
            how many neighbour blocks are computed.
        dropout: dropout probability on the attention weights (training mode only).
        bias: whether the four projections have a bias.

    forward(query, key=None, value=None, mask=None, key_padding_mask=None, need_weights=False):
        query: (B, T, d_model). key, value: (B, T, d_model), default to query; they must have the
            same length as query because the window is defined on positions of one sequence.
        key_padding_mask: optional bool (B, T), True = a real token; padding is never attended.
        mask: optional bool per-key mask, True = may attend, 4-D broadcastable to (B, H, 1, T), e.g.
            (B, 1, 1, T) or one row of keys per head (1, H, 1, T); ANDed with key_padding_mask. A dense
            (.., T, T) or 2-D mask is rejected: it would cost the O(T^2) memory that the blocked
            computation avoids (the window itself is the mask of eq. (1)). There is no is_causal:
            the causal window is the constructor's `causal`, because it decides the block layout.
        Returns (B, T, d_model), or (output, weights) with dense weights (B, H, T, T) taken before
        dropout when need_weights=True (O(T^2) memory: for inspection of small T only).
    """

    def __init__(self, d_model: int, num_heads: int, window: int, causal: bool = False,
                 dropout: float = 0.0, bias: bool = True):
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ValueError(f"window must be an int >= 0, got {window!r}")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.window = window
        self.causal = causal
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return f"window={self.window}, causal={self.causal}, dropout={self.dropout}"

    # ---------------------------------------------------------------- validation
    def _check_key_mask(self, mask, B, T):
        """`mask` may only hide keys (the same for every query): 4-D broadcastable to (B, H, 1, T)."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor (True = may attend), got {got}")
        expected = (B, self.num_heads, 1, T)
        if mask.dim() != 4 or any(m not in (1, e) for m, e in zip(mask.shape, expected)):
            raise ValueError(f"mask must be a per-key mask broadcastable to (B, H, 1, T) = {expected}, "
                             f"got {tuple(mask.shape)}; for padding pass key_padding_mask of shape (B, T) = "
                             f"({B}, {T}); a dense (T, T) mask is not supported (the window is the mask)")

    # ---------------------------------------------------------------- forward
    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None,
                value: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        key = query if key is None else key
        value = key if value is None else value
        _check_sequence(query, "query", self.d_model, "d_model")
        _check_sequence(key, "key", self.d_model, "d_model")
        _check_sequence(value, "value", self.d_model, "d_model")
        _check_matching(query, "query", key, "key", 0, "batch size")
        _check_matching(query, "query", key, "key", 1, "length")  # the window lives on ONE sequence
        _check_matching(key, "key", value, "value", 0, "batch size")
        _check_matching(key, "key", value, "value", 1, "length")
        B, T, _ = query.shape
        H, Dh = self.num_heads, self.head_dim
        if mask is not None:
            self._check_key_mask(mask, B, T)
        _check_key_padding_mask(key_padding_mask, B, T)
        if key_padding_mask is not None:
            padding = key_padding_mask[:, None, None, :]  # (B, 1, 1, T)
            mask = padding if mask is None else mask & padding  # (B, H|1, 1, T): one row of real keys

        q = self.q_proj(query).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(key).view(B, T, H, Dh).transpose(1, 2)    # (B, H, T, Dh)
        v = self.v_proj(value).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)

        # Block size b: a query block of b tokens plus one block on each side covers every key within
        # distance b, so b = window suffices (eq. (4)). At least 1 (window 0 = "self only"); at most T,
        # so a window longer than the sequence does not pad the sequence to the window's length.
        b = min(max(self.window, 1), T)
        n = math.ceil(T / b)                 # number of query blocks
        pad = n * b - T                      # padding that makes T a multiple of b
        right = 0 if self.causal else 1      # neighbour blocks to the right: none when causal
        span = (2 + right) * b               # keys per query block: left, own (and right) block

        # Queries: pad the end and cut into blocks.
        q_blk = F.pad(q, (0, 0, 0, pad)).view(B, H, n, b, Dh)  # (B, H, n, b, Dh)
        # Keys/values: one padding block in front (the left neighbour of block 0), `pad` + right*b at the
        # end; then the window of `span` keys for block c starts at padded index c*b.
        kv_pad = (0, 0, b, pad + right * b)
        k_blk = F.pad(k, kv_pad).unfold(2, span, b).transpose(-1, -2)  # (B, H, n, span, Dh)
        v_blk = F.pad(v, kv_pad).unfold(2, span, b).transpose(-1, -2)  # (B, H, n, span, Dh)

        allowed = self._block_mask(mask, B, T, b, n, pad, right, span, query.device)  # (B|1, H|1, n, b, span)
        # A query with no visible key (all of its window padded out) returns zeros: give such rows one
        # harmless all-True row for the softmax/kernel (so nothing is -inf everywhere, no NaN in the forward
        # or backward pass), then zero their output.
        row_any = allowed.any(dim=-1, keepdim=True)  # (B|1, H|1, n, b, 1)
        safe = allowed | ~row_any                    # (B|1, H|1, n, b, span)
        p = self.dropout if self.training else 0.0

        if need_weights:
            # Explicit path, eq. (2)-(3), still blocked; only the returned copy of the weights is dense.
            scores = q_blk @ k_blk.transpose(-1, -2) / math.sqrt(Dh)       # (B, H, n, b, span)
            scores = scores.masked_fill(~safe, float("-inf"))
            weights = torch.softmax(scores, dim=-1) * row_any             # (B, H, n, b, span)
            out_blk = F.dropout(weights, p, self.training) @ v_blk        # (B, H, n, b, Dh)
        else:
            # Fused kernel on the blocks: the leading (B, H, n) dims are batch dims for SDPA.
            out_blk = F.scaled_dot_product_attention(q_blk, k_blk, v_blk, attn_mask=safe,
                                                     dropout_p=p)         # (B, H, n, b, Dh)
            out_blk = out_blk * row_any

        out = out_blk.reshape(B, H, n * b, Dh)[:, :, :T]                  # (B, H, T, Dh)
        out = self.out_proj(out.transpose(1, 2).reshape(B, T, self.d_model))  # (B, T, d_model), eq. (5)
        if need_weights:
            return out, self._dense_weights(weights, T, b, n, right)
        return out

    # ---------------------------------------------------------------- helpers
    def _block_mask(self, mask, B, T, b, n, pad, right, span, device):
        """Boolean (B|1, H|1, n, b, span): which key of each block window a query may see."""
        # Offset inside a block window: query row r of block c is position c*b + r, key column s is
        # position (c-1)*b + s, so i - j = b + r - s does not depend on c: one (b, span) band for all blocks.
        r = torch.arange(b, device=device).view(b, 1)
        s = torch.arange(span, device=device).view(1, span)
        dist = b + r - s                                                  # (b, span), i - j
        if self.causal:
            band = (dist >= 0) & (dist <= self.window)                    # eq. (1), causal
        else:
            band = dist.abs() <= self.window                              # eq. (1), symmetric
        # Which padded key positions are real tokens (the padding must never be attended).
        real = torch.zeros(b + T + pad + right * b, dtype=torch.bool, device=device)
        real[b:b + T] = True
        real_blk = real.unfold(0, span, b)                                # (n, span)
        allowed = band & real_blk.view(n, 1, span)                        # (n, b, span)
        allowed = allowed.view(1, 1, n, b, span)                          # (1, 1, n, b, span)
        if mask is not None:
            m = F.pad(mask[:, :, 0, :], (b, pad + right * b), value=False)  # (B|1, H|1, padded T)
            m = m.unfold(-1, span, b)                                     # (B|1, H|1, n, span)
            allowed = allowed & m.unsqueeze(-2)                           # (B|1, H|1, n, b, span)
        return allowed

    @staticmethod
    def _dense_weights(weights, T, b, n, right):
        """Scatter the blocked weights into a dense (B, H, T, T) matrix (O(T^2): inspection only)."""
        B, H = weights.shape[:2]
        span = weights.shape[-1]
        # Dense in padded key coordinates: key column c*b + s of block c is position (c-1)*b + s.
        dense = weights.new_zeros(B, H, n * b, b + n * b + right * b)    # (B, H, n*b, padded T)
        for c in range(n):
            dense[:, :, c * b:(c + 1) * b, c * b:c * b + span] = weights[:, :, c]
        return dense[:, :, :T, b:b + T]                                   # (B, H, T, T)


def _demo() -> None:
    """The demo; the guard at the very end of the file calls it, once the shared helpers exist."""
    torch.manual_seed(0)
    B, T, d_model, num_heads, window = 2, 11, 16, 4, 3
    attn = LocalAttention(d_model, num_heads, window).eval()
    x = torch.randn(B, T, d_model)
    out, weights = attn(x, need_weights=True)
    print("output shape:", tuple(out.shape), " weights shape:", tuple(weights.shape))

    # Checked fact: the blocked computation equals dense attention with the band mask of eq. (1).
    H, Dh = num_heads, d_model // num_heads
    q = attn.q_proj(x).view(B, T, H, Dh).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, H, Dh).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, H, Dh).transpose(1, 2)
    i = torch.arange(T).view(T, 1)
    j = torch.arange(T).view(1, T)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(Dh)).masked_fill((i - j).abs() > window, float("-inf"))
    dense = attn.out_proj((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, d_model))
    diff = (attn(x) - dense).abs().max().item()
    print(f"max |blocked - dense band-masked attention| = {diff:.2e}")
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
