"""Rotary position embedding (RoPE) and a multi-head self-attention that uses it.

Paper: Jianlin Su, Yu Lu, Shengfeng Pan, Ahmed Murtadha, Bo Wen, Yunfeng Liu (2021), "RoFormer:
Enhanced Transformer with Rotary Position Embedding", arXiv:2104.09864.

Idea: instead of adding a position vector to the input, rotate each query and key. The head
dimension is cut into Dh/2 pairs; the pair i of a vector at position m is turned by the angle
m * theta_i. A rotation by m followed by the inverse of a rotation by n is a rotation by n - m, so the
score between a query at m and a key at n depends on the positions only through n - m: absolute
positions go in, relative positions come out of the dot product.

Equations (page eq. (1)-(6)):
    theta_i = base^(-2i / Dh),  i = 0 .. Dh/2 - 1
    pair (a, b) at position m  ->  (a cos(m theta_i) - b sin(m theta_i),  a sin(m theta_i) + b cos(m theta_i))
    interleaved pairs:  (x_0, x_1), (x_2, x_3), ...            (the RoFormer paper)
    half-split pairs:   (x_0, x_{Dh/2}), (x_1, x_{Dh/2+1}), ... (GPT-NeoX / LLaMA code)
    <R_m q, R_n k> = <q, R_{n-m} k>
    s_ij = <R_{p_i} q_i, R_{p_j} k_j> / sqrt(Dh)
The two pairings are one fixed permutation of the features apart (eq. (7)); a checkpoint trained with
one must be run with the same one.

Complexity in sequence length T: the rotation is O(T * Dh) time and memory; the attention around it
is standard, O(T^2) time (and O(T^2) memory on the explicit path).

Reduces to: plain multi-head attention when every token has the same position (all angles equal,
the rotations cancel in eq. (5)); the rotation itself is checked against an explicit 2x2 rotation
per pair. Tests: tests/test_rotary_embedding.py.

Docs page: docs/mechanisms/rotary_embedding.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Turn every feature pair of x (.., T, Dh) by the angles whose cos/sin are (.., T, Dh/2)."""
    half = x.shape[-1] // 2
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]            # (.., T, Dh/2) each, eq. (3)
    else:
        a, b = x[..., :half], x[..., half:]          # (.., T, Dh/2) each, eq. (4)
    a_rot = a * cos - b * sin                        # eq. (2), first coordinate
    b_rot = a * sin + b * cos                        # eq. (2), second coordinate
    if interleaved:
        return torch.stack((a_rot, b_rot), dim=-1).flatten(-2)  # (.., T, Dh), pairs back side by side
    return torch.cat((a_rot, b_rot), dim=-1)                    # (.., T, Dh), halves back in place


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (B, H, T, Dh) and keys (B, H_kv, T, Dh) by the angles given as cos and sin, as
    RotaryEmbedding.cos_sin returns them: (T, Dh/2) for positions shared by the batch, (B, T, Dh/2) for
    per-sequence positions (lined up with the batch axis, never with the heads), or 4-D broadcastable to
    (B, H, T, Dh/2). `interleaved` picks the pairing, eq. (3) or (4)."""
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 4 or x.shape[-1] % 2 != 0:
            raise ValueError(f"{name} must have shape (B, H, T, Dh) with an even Dh, got {tuple(x.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[-2] != k.shape[-2]:
        raise ValueError(f"q and k must share B, T and Dh to use one cos/sin table, got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    B, H, T, half = q.shape[0], q.shape[1], q.shape[2], q.shape[3] // 2
    if not isinstance(cos, torch.Tensor) or not isinstance(sin, torch.Tensor) or cos.shape != sin.shape:
        raise ValueError(f"cos and sin must be tensors of one shape, got cos {tuple(getattr(cos, 'shape', ()))} "
                         f"and sin {tuple(getattr(sin, 'shape', ()))}")
    if cos.dim() == 2:
        fits = cos.shape == (T, half)                                     # (T, Dh/2): one table for all
    elif cos.dim() == 3:
        fits = cos.shape[0] in (1, B) and cos.shape[1:] == (T, half)      # (B, T, Dh/2): per sequence
    elif cos.dim() == 4:
        fits = all(got in (1, want) for got, want in zip(cos.shape, (B, H, T, half))) and cos.shape[-1] == half
    else:
        fits = False
    if not fits:
        raise ValueError(f"cos and sin must have shape (T, Dh/2) = ({T}, {half}), (B, T, Dh/2) = ({B}, {T}, "
                         f"{half}) or 4-D broadcastable to (B, H, T, Dh/2) = ({B}, {H}, {T}, {half}); got cos "
                         f"{tuple(cos.shape)} and sin {tuple(sin.shape)} for q {tuple(q.shape)}")
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                     # (B, 1, T, Dh/2): same angle per head
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)


class RotaryEmbedding(nn.Module):
    """The rotations of eq. (1)-(4) for one head dimension.

    Args:
        head_dim: Dh, the per-head width; must be even (features are rotated in pairs).
        base: the base of the frequencies theta_i = base^(-2i/Dh) of eq. (1).
        max_seq_len: positions must lie in [0, max_seq_len). RoPE can compute any angle, but a model
            has only seen the positions it was trained on; the check makes extrapolation explicit.
        interleaved: True pairs (x_0, x_1), (x_2, x_3), ... as in the RoFormer paper; False (default)
            pairs (x_i, x_{i+Dh/2}) as in GPT-NeoX and LLaMA code.

    forward(q, k, positions=None, offset=0) rotates q and k (B, H, T, Dh) that sit at the same
    positions: `positions` (T,) or (B, T) integers, default offset + [0, 1, ..., T-1]. With a KV cache,
    pass offset = number of cached tokens and rotate only the new tokens; cached keys stay rotated.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, max_seq_len: int = 4096,
                 interleaved: bool = False):
        super().__init__()
        if head_dim <= 0 or head_dim % 2 != 0:
            raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
        if not base > 0:
            raise ValueError(f"base must be positive, got {base}")
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.head_dim = head_dim
        self.base = float(base)
        self.max_seq_len = max_seq_len
        self.interleaved = interleaved

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, base={self.base}, max_seq_len={self.max_seq_len}, "
                f"interleaved={self.interleaved}")

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles m * theta_i, each of shape positions.shape + (Dh/2,)."""
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
        if positions.numel() and (positions.min() < 0 or positions.max() >= self.max_seq_len):
            raise ValueError(f"positions must lie in [0, max_seq_len) = [0, {self.max_seq_len}), got values "
                             f"from {int(positions.min())} to {int(positions.max())}")
        # The angles are computed in float32 (float64 for float64 inputs) whatever the model dtype:
        # m * theta_i reaches thousands of radians, and bf16 would lose the angle entirely.
        work = torch.float64 if dtype == torch.float64 else torch.float32
        i = torch.arange(self.head_dim // 2, device=positions.device, dtype=work)
        theta = self.base ** (-2.0 * i / self.head_dim)                   # (Dh/2,), eq. (1)
        angles = positions.to(work).unsqueeze(-1) * theta                 # (.., T, Dh/2)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: Optional[torch.Tensor] = None,
                offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        for name, x in (("q", q), ("k", k)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.head_dim:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must have shape (B, H, T, head_dim) with head_dim={self.head_dim}, "
                                 f"got {got}")
        if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
            raise ValueError(f"k must have the batch size and length of q, (B, H_kv, T, head_dim) = "
                             f"({q.shape[0]}, H_kv, {q.shape[2]}, {self.head_dim}); got q {tuple(q.shape)} "
                             f"and k {tuple(k.shape)}")
        positions = _positions(positions, offset, q.shape[0], q.shape[2], q.device)
        cos, sin = self.cos_sin(positions, q.dtype)                       # (T, Dh/2) or (B, T, Dh/2)
        return apply_rotary(q, k, cos, sin, self.interleaved)


def _positions(positions, offset, B, T, device):
    """Default positions offset + [0..T-1]; otherwise check that the given ones are (T,) or (B, T)."""
    if positions is None:
        return torch.arange(offset, offset + T, device=device)            # (T,)
    if offset != 0:
        raise ValueError(f"give either positions or offset, not both (offset={offset})")
    if positions.shape not in ((T,), (B, T)):
        raise ValueError(f"positions must have shape (T,) = ({T},) or (B, T) = ({B}, {T}), "
                         f"got {tuple(positions.shape)}")
    return positions


class RotarySelfAttention(nn.Module):
    """Multi-head attention whose queries and keys are rotated by RoPE before the dot product, eq. (6).

    Args: d_model, num_heads, dropout, bias as in multi-head attention; base, max_seq_len and
    interleaved are passed to RotaryEmbedding.

    forward(query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=False,
            need_weights=False, positions=None)
        query (B, Tq, d_model); key, value (B, Tk, d_model), default to query.
        positions: integer positions of the Tk key tokens, (Tk,) or (B, Tk), default [0..Tk-1]. The
            queries are the last Tq of those tokens (positions[..., -Tq:]), the same bottom-right
            alignment as is_causal: with a KV cache, key = cached + new tokens, query = new tokens.
        mask: bool, True = may attend, (Tq, Tk) or 4-D broadcastable to (B, H, Tq, Tk); a 1-D or 3-D
            mask raises ValueError. key_padding_mask: bool (B, Tk), True = a real key. mask,
            key_padding_mask and the causal mask are combined by a logical AND.
        Returns (B, Tq, d_model), or (output, weights (B, H, Tq, Tk) before dropout).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 base: float = 10000.0, max_seq_len: int = 4096, interleaved: bool = False):
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
        self.rotary = RotaryEmbedding(self.head_dim, base, max_seq_len, interleaved)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None,
                value: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                need_weights: bool = False, positions: Optional[torch.Tensor] = None
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

        if positions is None:  # default positions 0..Tk-1 must stay below max_seq_len
            _check_max_len(query, "query", self.rotary.max_seq_len)
            _check_max_len(key, "key", self.rotary.max_seq_len)
        k_pos = _positions(positions, 0, B, Tk, query.device)            # (Tk,) or (B, Tk)
        q_pos = k_pos[..., Tk - Tq:]                                     # (Tq,) or (B, Tq)
        cos_q, sin_q = self.rotary.cos_sin(q_pos, q.dtype)               # (.., Tq, Dh/2)
        cos_k, sin_k = self.rotary.cos_sin(k_pos, k.dtype)               # (.., Tk, Dh/2)
        if k_pos.dim() == 2:                                             # per-sequence positions
            cos_q, sin_q = cos_q.unsqueeze(1), sin_q.unsqueeze(1)        # (B, 1, Tq, Dh/2)
            cos_k, sin_k = cos_k.unsqueeze(1), sin_k.unsqueeze(1)        # (B, 1, Tk, Dh/2)
        # eq. (6): rotate each query and key by its own position; values are not rotated.
        q = _rotate(q, cos_q, sin_q, self.rotary.interleaved)            # (B, H, Tq, Dh)
        k = _rotate(k, cos_k, sin_k, self.rotary.interleaved)            # (B, H, Tk, Dh)

        p = self.dropout if self.training else 0.0
        out, weights = _attend(q, k, v, allowed, None, 1.0 / math.sqrt(Dh), p, need_weights)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Tq, self.d_model))  # (B, Tq, d_model)
        return (out, weights) if need_weights else out


# ---------------------------------------------------------------- mechanism helpers
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
    B, T, d_model, num_heads = 2, 10, 32, 4
    attn = RotarySelfAttention(d_model, num_heads).eval()
    x = torch.randn(B, T, d_model)
    out = attn(x, is_causal=True)
    print("output shape:", tuple(out.shape))

    # Checked fact: <R_m q, R_n k> depends only on n - m (eq. (5)), checked with an explicit 2x2
    # rotation per pair, written out here independently of the module.
    rope = RotaryEmbedding(8, interleaved=True)

    def rotate_by_hand(x, m):
        y = x.clone()
        for i in range(4):
            ang = m * 10000.0 ** (-2 * i / 8)
            c, s = math.cos(ang), math.sin(ang)
            y[2 * i], y[2 * i + 1] = c * x[2 * i] - s * x[2 * i + 1], s * x[2 * i] + c * x[2 * i + 1]
        return y

    qv, kv = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    dots = [float(rotate_by_hand(qv, m) @ rotate_by_hand(kv, m + 3)) for m in (0, 5, 17)]
    q_rot, k_rot = rope(qv.view(1, 1, 1, 8), kv.view(1, 1, 1, 8), positions=torch.tensor([5]))
    gap = max(abs(d - dots[0]) for d in dots)
    print(f"<R_m q, R_(m+3) k> for m = 0, 5, 17: {[round(d, 6) for d in dots]}; largest gap {gap:.1e}")
    hand = (rotate_by_hand(qv, 5) - q_rot.flatten()).abs().max().item()
    print(f"max |module rotation - hand rotation| = {hand:.1e}")
    assert gap < 1e-12 and hand < 1e-12


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


def _check_max_len(x: torch.Tensor, name: str, max_seq_len: int) -> None:
    """Raise unless the (B, T, ...) tensor `x` is at most `max_seq_len` long."""
    if x.size(1) > max_seq_len:
        raise ValueError(f"{name} has length {x.size(1)} but max_seq_len is {max_seq_len}; "
                         f"expected shape (B, T <= {max_seq_len}, ...), got {tuple(x.shape)}")


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
