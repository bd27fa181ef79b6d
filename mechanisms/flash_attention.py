"""FlashAttention: exact softmax attention computed tile by tile, never holding the T x T matrix.

Papers: Tri Dao, Daniel Y. Fu, Stefano Ermon, Atri Rudra, Christopher Re, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness", 2022, arXiv:2205.14135; Tri Dao, "FlashAttention-2:
Faster Attention with Better Parallelism and Work Partitioning", 2023, arXiv:2307.08691.

Idea: softmax attention needs each row's maximum and sum before it can weight the values, which seems
to require the whole row of scores. The online softmax keeps, per query, a running maximum m, a running
sum l and a running weighted sum of values, and rescales them when a new tile of keys raises the
maximum; one pass over key tiles gives the exact answer. The backward pass stores only the output and
one number per query, the log-sum-exp L = m + log l, and recomputes each tile of probabilities as
exp(S - L) when it needs it. Memory is O(T * Dh) plus one tile, instead of O(T^2). This file writes the
algorithm in plain PyTorch (a Python loop over tiles, as an autograd.Function), to teach it; the speed
of the real thing comes from doing the same loop inside one GPU kernel, in fast on-chip memory.

Equation:  for each key tile j:  m' = max(m, rowmax(S_ij)),  P = exp(S_ij - m'),
           l' = exp(m - m') l + rowsum(P),  O' = exp(m - m') O + P V_j;   finally O = O / l,  L = m + log l.
           Backward: P_ij = exp(S_ij - L_i),  D_i = rowsum(dO_i * O_i),  dV_j += P^T dO_i,
           dS = P * (dO_i V_j^T - D_i),  dQ_i += dS K_j / sqrt(Dh),  dK_j += dS^T Q_i / sqrt(Dh).

Complexity: time O(Tq * Tk * Dh), as standard attention (half of it with is_causal, whose tiles above the
diagonal are skipped); extra memory O((Tq + Tk) * Dh + block_size_q * block_size_k) per batch and head.

Reduces to / oracle: it is exact: output, log-sum-exp and the gradients dQ, dK, dV equal the naive
softmax(Q K^T / sqrt(Dh)) V and its autograd for every tile size, divisible or not, with causal and padding
masks (tests/test_flash_attention.py::test_forward_and_lse_equal_naive_attention_for_every_tile_size and
::test_gradients_equal_autograd_of_naive_attention_for_every_tile_size).

Docs page: docs/mechanisms/flash_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch


def _tile_visible(q_start: int, q_end: int, k_start: int, k_end: int, offset: int, is_causal: bool,
                  key_padding_mask: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """Which (query, key) pairs of one tile may attend: (B or 1, 1, bq, bk) bool, or None if all may.

    Built per tile, so no (Tq, Tk) mask ever exists. Causal is bottom-right aligned: query i sits at position
    i + offset with offset = Tk - Tq, and sees keys j <= i + offset, eq. (1).
    """
    visible = None
    if is_causal:
        rows = torch.arange(q_start, q_end, device=device)[:, None] + offset  # (bq, 1)
        cols = torch.arange(k_start, k_end, device=device)[None, :]  # (1, bk)
        visible = (cols <= rows)[None, None]  # (1, 1, bq, bk)
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, k_start:k_end]  # (B, 1, 1, bk)
        visible = padding if visible is None else visible & padding  # (B, 1, bq, bk)
    return visible


def _first_invisible_key(q_end: int, offset: int, tk: int, is_causal: bool) -> int:
    """With is_causal, the last query of a tile sees keys < q_end + offset; tiles from there on are skipped."""
    return min(tk, q_end + offset) if is_causal else tk


class FlashAttentionFunction(torch.autograd.Function):
    """The tiled forward of eq. (2)-(5) and the tiled backward of eq. (6)-(9), as one autograd.Function."""

    @staticmethod
    def forward(ctx, query, key, value, key_padding_mask, is_causal, block_size_q, block_size_k):
        batch, heads, tq, head_dim = query.shape
        tk = key.size(2)
        scale = 1.0 / math.sqrt(head_dim)
        offset = tk - tq
        # Half precision inputs accumulate in float32, as the CUDA kernels do: m, l and O are sums of many terms.
        acc_dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
        out = torch.zeros(batch, heads, tq, value.size(-1), dtype=acc_dtype, device=query.device)  # (B, H, Tq, Dv)
        lse = torch.full((batch, heads, tq), float("-inf"), dtype=acc_dtype, device=query.device)  # (B, H, Tq)
        for q_start in range(0, tq, block_size_q):
            q_end = min(q_start + block_size_q, tq)
            q_tile = query[:, :, q_start:q_end].to(acc_dtype)  # (B, H, bq, Dh)
            # The running statistics of eq. (2)-(4) for this tile of queries.
            row_max = torch.full(q_tile.shape[:-1], float("-inf"), dtype=acc_dtype, device=query.device)  # (B, H, bq)
            row_sum = torch.zeros_like(row_max)  # (B, H, bq)
            acc = torch.zeros(*q_tile.shape[:-1], value.size(-1), dtype=acc_dtype, device=query.device)  # (B, H, bq, Dv)
            for k_start in range(0, _first_invisible_key(q_end, offset, tk, is_causal), block_size_k):
                k_end = min(k_start + block_size_k, tk)
                k_tile = key[:, :, k_start:k_end].to(acc_dtype)  # (B, H, bk, Dh)
                v_tile = value[:, :, k_start:k_end].to(acc_dtype)  # (B, H, bk, Dv)
                scores = (q_tile @ k_tile.transpose(-2, -1)) * scale  # (B, H, bq, bk)  eq. (1)
                visible = _tile_visible(q_start, q_end, k_start, k_end, offset, is_causal, key_padding_mask,
                                        query.device)
                if visible is not None:
                    scores = scores.masked_fill(~visible, float("-inf"))  # exp(-inf) = 0: no weight
                new_max = torch.maximum(row_max, scores.amax(dim=-1))  # (B, H, bq)  eq. (2)
                # A row that has seen no visible key yet has max -inf; subtracting 0 instead keeps exp() at 0, not NaN.
                safe_max = new_max.masked_fill(new_max == float("-inf"), 0.0)  # (B, H, bq)
                probs = torch.exp(scores - safe_max[..., None])  # (B, H, bq, bk)  eq. (2)
                rescale = torch.exp(row_max - safe_max)  # (B, H, bq): exp(m - m') shrinks the old sums  eq. (3)
                row_sum = rescale * row_sum + probs.sum(dim=-1)  # (B, H, bq)  eq. (3)
                acc = rescale[..., None] * acc + probs @ v_tile  # (B, H, bq, Dv)  eq. (4)
                row_max = new_max
            # eq. (5): divide once at the end; a row with no visible key (l = 0) outputs zeros and has L = -inf.
            has_key = row_sum > 0  # (B, H, bq)
            out[:, :, q_start:q_end] = acc / torch.where(has_key, row_sum, 1.0)[..., None]  # (B, H, bq, Dv)
            lse[:, :, q_start:q_end] = torch.where(has_key, row_max + torch.log(row_sum), float("-inf"))  # (B, H, bq)
        ctx.save_for_backward(query, key, value, out, lse, key_padding_mask)
        ctx.settings = (is_causal, block_size_q, block_size_k)
        ctx.mark_non_differentiable(lse)
        return out.to(query.dtype), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse, key_padding_mask = ctx.saved_tensors
        is_causal, block_size_q, block_size_k = ctx.settings
        tq, head_dim, tk = query.size(2), query.size(3), key.size(2)
        scale = 1.0 / math.sqrt(head_dim)
        offset = tk - tq
        acc_dtype = out.dtype
        grad_out = grad_out.to(acc_dtype)
        # eq. (7): D_i = sum_d dO_id O_id equals sum_j P_ij dP_ij, the term the softmax Jacobian subtracts.
        delta = (grad_out * out).sum(dim=-1)  # (B, H, Tq)
        # A row with no visible key has L = -inf; any finite L makes its P = exp(-inf - L) = 0, as it should be.
        lse = lse.masked_fill(lse == float("-inf"), 0.0)  # (B, H, Tq)
        grad_query = torch.zeros_like(query, dtype=acc_dtype)  # (B, H, Tq, Dh)
        grad_key = torch.zeros_like(key, dtype=acc_dtype)  # (B, H, Tk, Dh)
        grad_value = torch.zeros_like(value, dtype=acc_dtype)  # (B, H, Tk, Dv)
        # FlashAttention-2 order: the outer loop over key tiles owns dK_j and dV_j; dQ is accumulated in place.
        for k_start in range(0, tk, block_size_k):
            k_end = min(k_start + block_size_k, tk)
            k_tile = key[:, :, k_start:k_end].to(acc_dtype)  # (B, H, bk, Dh)
            v_tile = value[:, :, k_start:k_end].to(acc_dtype)  # (B, H, bk, Dv)
            # With is_causal, query i sees key k_start only if i >= k_start - offset: earlier query tiles are skipped.
            first_q = max(0, k_start - offset) if is_causal else 0
            for q_start in range((first_q // block_size_q) * block_size_q, tq, block_size_q):
                q_end = min(q_start + block_size_q, tq)
                q_tile = query[:, :, q_start:q_end].to(acc_dtype)  # (B, H, bq, Dh)
                scores = (q_tile @ k_tile.transpose(-2, -1)) * scale  # (B, H, bq, bk)  eq. (1)
                visible = _tile_visible(q_start, q_end, k_start, k_end, offset, is_causal, key_padding_mask,
                                        query.device)
                if visible is not None:
                    scores = scores.masked_fill(~visible, float("-inf"))
                probs = torch.exp(scores - lse[:, :, q_start:q_end, None])  # (B, H, bq, bk)  eq. (6): recomputed
                d_out = grad_out[:, :, q_start:q_end]  # (B, H, bq, Dv)
                grad_value[:, :, k_start:k_end] += probs.transpose(-2, -1) @ d_out  # (B, H, bk, Dv)  eq. (8)
                d_probs = d_out @ v_tile.transpose(-2, -1)  # (B, H, bq, bk)  eq. (8)
                d_scores = probs * (d_probs - delta[:, :, q_start:q_end, None])  # (B, H, bq, bk)  eq. (7)
                grad_query[:, :, q_start:q_end] += (d_scores @ k_tile) * scale  # (B, H, bq, Dh)  eq. (9)
                grad_key[:, :, k_start:k_end] += (d_scores.transpose(-2, -1) @ q_tile) * scale  # (B, H, bk, Dh)  eq. (9)
        return (grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype),
                None, None, None, None)


def flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False,
                    block_size_q: int = 64, block_size_k: int = 64,
                    key_padding_mask: Optional[torch.Tensor] = None,
                    return_lse: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Exact softmax(Q K^T / sqrt(Dh)) V, computed in tiles of block_size_q queries by block_size_k keys.

    query (B, H, Tq, Dh), key (B, H, Tk, Dh), value (B, H, Tk, Dv). is_causal: bottom-right aligned, query i
    sees keys j <= i + (Tk - Tq). key_padding_mask: bool (B, Tk), True = a real token. A query with no visible
    key returns zeros (and L = -inf). Returns (B, H, Tq, Dv), or (output, lse (B, H, Tq)) with return_lse,
    where lse_i = log sum_j exp(S_ij) over the visible keys: the one number per query the backward keeps.
    A general (Tq, Tk) mask is not taken: it would itself be the T x T tensor this algorithm exists to avoid.
    """
    _check_heads(query, "query")
    _check_heads(key, "key")
    _check_heads(value, "value")
    for name, tensor in (("key", key), ("value", value)):
        if tensor.shape[:2] != query.shape[:2]:
            raise ValueError(f"{name} has (B, H) = {tuple(tensor.shape[:2])} but query has "
                             f"{tuple(query.shape[:2])}; they must match (got {name} of shape "
                             f"{tuple(tensor.shape)}, query of shape {tuple(query.shape)})")
    if key.size(-1) != query.size(-1):
        raise ValueError(f"key has head width {key.size(-1)} but query has {query.size(-1)}; expected key of shape "
                         f"(B, H, Tk, {query.size(-1)}), got {tuple(key.shape)}")
    if value.size(2) != key.size(2):
        raise ValueError(f"value has length {value.size(2)} but key has {key.size(2)}; expected value of shape "
                         f"(B, H, {key.size(2)}, Dv), got {tuple(value.shape)}")
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but query has {query.dtype}; they must match")
    _check_positive_int(block_size_q, "block_size_q")
    _check_positive_int(block_size_k, "block_size_k")
    _check_key_padding_mask(key_padding_mask, query.size(0), key.size(2))
    out, lse = FlashAttentionFunction.apply(query, key, value, key_padding_mask, bool(is_causal),
                                            block_size_q, block_size_k)
    return (out, lse) if return_lse else out


def _check_heads(x: torch.Tensor, name: str) -> None:
    """Raise unless `x` is a floating-point (B, H, T, Dh) tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (B, H, T, Dh), got {got}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _demo() -> None:
    """Run tiled attention on random data and check it against the naive oracle (python flash_attention.py)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    padding = torch.ones(2, 50, dtype=torch.bool)
    padding[1, 40:] = False  # the second sequence is 40 tokens long
    out, lse = flash_attention(q, k, v, is_causal=True, block_size_q=16, block_size_k=12,
                               key_padding_mask=padding, return_lse=True)
    out.pow(2).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    # Oracle inline: the T x T matrix, masked, softmax, and autograd for the gradients.
    for t in (q, k, v):
        t.grad = None
    scores = q @ k.transpose(-2, -1) / math.sqrt(16)  # (B, H, T, T)
    visible = torch.ones(50, 50, dtype=torch.bool).tril() & padding[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v
    expected.pow(2).sum().backward()
    diff = max((out - expected).abs().max().item(), (lse - torch.logsumexp(scores, -1)).abs().max().item(),
               *[(g - t.grad).abs().max().item() for g, t in zip(grads, (q, k, v))])
    print(f"output shape {tuple(out.shape)}; tiles of 16 queries x 12 keys, causal, one padded sequence")
    print(f"max |flash - naive| over output, log-sum-exp, dQ, dK, dV = {diff:.2e}")
    assert diff < 1e-10, diff


# =====================================================================================================
# Input checks and mask helpers, identical letter for letter in every mechanism file that uses them
# (tests/test_shared_helpers.py compares the copies). Fix one copy, fix them all.
# =====================================================================================================


def _check_positive_int(value: int, name: str) -> None:
    """Raise unless `value` is a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
