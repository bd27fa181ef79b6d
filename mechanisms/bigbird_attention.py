"""BigBird attention: block-sparse window + global + random blocks, computed block by block.

Paper: Manzil Zaheer, Guru Guruganesh, Avinava Dubey, Joshua Ainslie, Chris Alberti, Santiago Ontanon, Philip
Pham, Anirudh Ravula, Qifan Wang, Li Yang, Amr Ahmed (2020), "Big Bird: Transformers for Longer Sequences",
arXiv:2007.14062.

Idea: cut the sequence into blocks of `block_size` tokens. Each query block attends to (1) a window of
neighbouring blocks, (2) a few global blocks, which in turn attend to everything, and (3) a few random blocks.
The window gives locality, the global blocks a two-step path between any two tokens, and the random blocks
short paths in expectation, like a random graph; with O(1) blocks per query block the cost is linear in T.
The paper proves that this sparse pattern keeps full attention's expressive power (universal approximation,
Turing completeness) thanks to the global tokens.

Equations (page eq. (1)-(6)), blocks c (queries) and c' (keys), b = block_size, w = (num_window_blocks-1)/2:
    block of position i: floor(i / b)
    layout  L[c, c'] = [c < g] or [c' < g] or [|c - c'| <= w] or [c' in R_c]   (R_c: r random blocks)
    mask    M_ij = L[floor(i/b), floor(j/b)] and real_j (and j <= i with is_causal)
    o_i = sum_j softmax_j(q_i . k_j / sqrt(Dh) + log M_ij) v_j
Computed by gathering, for each query block, its g + 2w + 1 + r key blocks (no T x T matrix).

Complexity in sequence length T: time and memory O(T b (g + 2w + 1 + r)) for the sparse blocks plus O(g b T)
for the global rows: linear in T at fixed block size and block counts. need_weights=True additionally
assembles dense (B, H, T, T) weights for inspection.

Reduces to / oracle: dense attention with the token mask of eq. (3) for every layout; full attention when the
window covers every block and there are no random blocks (tests/test_bigbird_attention.py).

Docs page: docs/mechanisms/bigbird_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def bigbird_block_layout(num_blocks: int, num_window_blocks: int = 3, num_global_blocks: int = 1,
                         num_random_blocks: int = 1, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The block layout of eq. (2): (L (n, n) bool, random (n, r) long, -1 = no block).

    Global blocks are the first g blocks. Each other query block c draws r random key blocks among those that
    are neither global nor in its window (fewer if there are not enough), with a generator seeded by `seed`,
    so the layout is a fixed function of (seed, num_blocks): the same in training and evaluation.
    """
    n, g, w = num_blocks, num_global_blocks, (num_window_blocks - 1) // 2
    blocks = torch.arange(n)
    layout = ((blocks[:, None] - blocks[None, :]).abs() <= w) | (blocks[:, None] < g) | (blocks[None, :] < g)
    random = torch.full((n, num_random_blocks), -1, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    for c in range(g, n):
        candidates = blocks[~layout[c]]  # neither global nor in the window
        chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:num_random_blocks]]
        random[c, :chosen.numel()] = chosen
    rows = torch.arange(n)[:, None].expand_as(random)
    layout[rows[random >= 0], random[random >= 0]] = True  # eq. (2): the random blocks R_c
    return layout, random


class BigBirdAttention(nn.Module):
    """Block-sparse multi-head attention (window + global + random blocks), batch-first (B, T, d_model).

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H.
        block_size: b, tokens per block. T need not be a multiple: the last block is padded and the padding
            never attended.
        num_window_blocks: odd, the blocks around (and including) a query's block that it attends: 3 = the block
            itself and one on each side.
        num_global_blocks: g, the first g blocks are global: they attend to every token and every token attends
            to them. 0 = none.
        num_random_blocks: r, random key blocks per (non-global) query block, eq. (2).
        seed: seeds the random blocks, so that the layout is a fixed function of (seed, number of blocks).
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the projections have a bias.

    forward(query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=False, need_weights=False):
    key and value default to query and must have its length. A general dense `mask` is refused (it would need
    the (T, T) matrix the block-sparse computation avoids).
    """

    def __init__(self, d_model: int, num_heads: int, block_size: int, num_window_blocks: int = 3,
                 num_global_blocks: int = 1, num_random_blocks: int = 1, seed: int = 0, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_positive_int(block_size, "block_size")
        _check_positive_int(num_window_blocks, "num_window_blocks")
        if num_window_blocks % 2 == 0:
            raise ValueError(f"num_window_blocks must be odd (the block and as many on each side), got {num_window_blocks}")
        for value, name in ((num_global_blocks, "num_global_blocks"), (num_random_blocks, "num_random_blocks"),
                            (seed, "seed")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.block_size = block_size
        self.num_window_blocks = num_window_blocks
        self.num_global_blocks = num_global_blocks
        self.num_random_blocks = num_random_blocks
        self.seed = seed
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, num_window_blocks={self.num_window_blocks}, "
                f"num_global_blocks={self.num_global_blocks}, num_random_blocks={self.num_random_blocks}, "
                f"seed={self.seed}, dropout={self.dropout}")

    def layout(self, t: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The block layout this module uses for sequences of length t (see bigbird_block_layout)."""
        return bigbird_block_layout(math.ceil(t / self.block_size), self.num_window_blocks, self.num_global_blocks,
                                    self.num_random_blocks, self.seed)

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
        _check_matching(query, "query", key, "key", 1, "length")  # blocks are positions of one sequence
        _check_matching(key, "key", value, "value", 1, "length")
        if mask is not None:
            raise ValueError("mask is not supported by BigBirdAttention: a general (Tq, Tk) mask needs the dense "
                             "matrix the block-sparse computation avoids; use key_padding_mask (B, Tk) and "
                             f"is_causal instead (got mask of shape {tuple(getattr(mask, 'shape', ()))})")
        batch, t, _ = query.shape
        _check_key_padding_mask(key_padding_mask, batch, t)
        device = query.device
        heads, dh, b = self.num_heads, self.head_dim, self.block_size
        n = math.ceil(t / b)  # blocks, eq. (1)
        pad = n * b - t
        g = min(self.num_global_blocks, n)
        w = (self.num_window_blocks - 1) // 2
        scale = 1.0 / math.sqrt(dh)
        p = self.dropout if self.training else 0.0
        split = lambda y: y.view(batch, t, heads, dh).transpose(1, 2)  # noqa: E731  (B, H, T, Dh)
        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        real = torch.ones(batch, t, dtype=torch.bool, device=device) if key_padding_mask is None else key_padding_mask
        real = F.pad(real, (0, pad), value=False)  # (B, n b): the last block's padding is never attended
        q_blk = F.pad(q, (0, 0, 0, pad)).view(batch, heads, n, b, dh)  # (B, H, n, b, Dh)
        k_blk = F.pad(k, (0, 0, 0, pad)).view(batch, heads, n, b, dh)  # (B, H, n, b, Dh)
        v_blk = F.pad(v, (0, 0, 0, pad)).view(batch, heads, n, b, dh)  # (B, H, n, b, Dh)

        # ---- the key blocks of every query block, eq. (5): g global, 2w + 1 window, r random (slot -1 = none).
        _, random = self.layout(t)  # (n, r)
        blocks = torch.arange(n)
        glob = torch.arange(g).expand(n, g)  # (n, g)
        window = blocks[:, None] + torch.arange(-w, w + 1)  # (n, 2w + 1)
        window = window.masked_fill((window < g) | (window >= n), -1)  # out of range, or already a global slot
        slots = torch.cat((glob, window, random), dim=1).to(device)  # (n, K) key block per slot
        valid = slots >= 0  # (n, K)
        slots = slots.clamp(min=0)
        k_sel = k_blk[:, :, slots].flatten(3, 4)  # (B, H, n, K b, Dh): gathered, not a T x T matrix
        v_sel = v_blk[:, :, slots].flatten(3, 4)  # (B, H, n, K b, Dh)
        j = (slots[:, :, None] * b + torch.arange(b, device=device)).flatten(1, 2)  # (n, K b) key positions
        allowed = valid.repeat_interleave(b, dim=1)[None] & real[:, j]  # (B, n, K b)  eq. (3)
        allowed = allowed[:, :, None, :]  # (B, n, 1, K b)
        if is_causal:
            i = (blocks.to(device)[:, None] * b + torch.arange(b, device=device))[:, :, None]  # (n, b, 1)
            allowed = allowed & (j[:, None, :] <= i)  # (B, n, b, K b)
        out_blk, w_blk = _attend(q_blk, k_sel, v_sel, allowed[:, None], scale, p, need_weights)  # (B, H, n, b, Dh)
        out = out_blk.reshape(batch, heads, n * b, dh)  # (B, H, n b, Dh)  eq. (4)

        # ---- global query blocks attend to every key (eq. (2), [c < g]); their rows replace the block rows.
        w_glob = None
        if g > 0:
            allowed_g = real[:, None, None, :]  # (B, 1, 1, n b)
            if is_causal:
                i = torch.arange(g * b, device=device)[:, None]
                allowed_g = allowed_g & (torch.arange(n * b, device=device)[None, :] <= i)  # (B, 1, g b, n b)
            k_all, v_all = k_blk.flatten(2, 3), v_blk.flatten(2, 3)  # (B, H, n b, Dh)
            out_g, w_glob = _attend(q_blk[:, :, :g].flatten(2, 3), k_all, v_all, allowed_g, scale, p,
                                    need_weights)  # (B, H, g b, Dh)
            out = torch.cat((out_g, out[:, :, g * b:]), dim=2)  # (B, H, n b, Dh)
        out = out[:, :, :t]  # (B, H, T, Dh)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, t, self.d_model))  # (B, T, d_model)  eq. (6)
        if not need_weights:
            return out
        # Dense (B, H, T, T) weights for inspection only (O(T^2)): scatter each gathered key to its position.
        dense = w_blk.new_zeros(batch, heads, n * b, n * b)
        index = j[:, None, :].expand(n, b, -1).reshape(1, 1, n * b, -1).expand(batch, heads, -1, -1)
        dense = dense.scatter_add(-1, index, w_blk.flatten(2, 3))  # (B, H, n b, n b)
        if g > 0:
            dense = torch.cat((w_glob, dense[:, :, g * b:]), dim=2)
        return out, dense[:, :, :t, :t]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
            dropout_p: float, need_weights: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """softmax(q k^T scale + log allowed) v on the last two axes (eq. (4)); rows with no allowed key give zeros."""
    row_any = allowed.any(dim=-1, keepdim=True)  # (..., Lq, 1)
    safe = allowed | ~row_any  # an empty row gets every key (finite softmax), zeroed below
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, dropout_p=dropout_p, scale=scale)  # (.., Lq, Dh)
        return out * row_any, None
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., Lq, Lk)
    weights = torch.softmax(scores.masked_fill(~safe, float("-inf")), dim=-1) * row_any  # (..., Lq, Lk)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights  # unbiased: 1 / (1 - p)
    return dropped @ v, weights  # (..., Lq, Dh)


def _demo() -> None:
    """Demo of `python mechanisms/bigbird_attention.py`; the guard at the end of the file calls it."""
    torch.manual_seed(0)
    batch, t, d_model, num_heads, block = 2, 22, 16, 4, 3
    attn = BigBirdAttention(d_model, num_heads, block, num_window_blocks=3, num_global_blocks=1,
                            num_random_blocks=1).eval()
    x = torch.randn(batch, t, d_model)
    with torch.no_grad():
        out = attn(x)
        # Oracle inline: dense attention with the block layout expanded to tokens, eq. (3).
        layout, _ = attn.layout(t)
        blocks = torch.arange(t) // block
        allowed = layout[blocks[:, None], blocks[None, :]]  # (T, T)
        split = lambda y: y.view(batch, t, num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
        scores = (q @ k.transpose(-2, -1) / math.sqrt(d_model // num_heads)).masked_fill(~allowed, float("-inf"))
        dense = attn.out_proj((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, t, d_model))
    diff = (out - dense).abs().max().item()
    print(f"output shape {tuple(out.shape)}; {allowed.float().mean().item():.0%} of the (T, T) pairs attended")
    print(f"max |block-sparse BigBird - dense attention with the block mask| = {diff:.2e}")
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
