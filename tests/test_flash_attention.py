"""mechanisms/flash_attention.py: exact against naive attention, and tiled for real.

The oracle is written here: the full (B, H, Tq, Tk) score matrix, masked, softmax, times V, with autograd
for the gradients and torch.logsumexp for the log-sum-exp. FlashAttention is exact, so there is no limit
case and no "distinct from attention" test: it must equal attention everywhere. What is specific to it is
that it never builds the T x T matrix (checked by recording every tensor it creates), that causal masking
skips the tiles above the diagonal, and that the online softmax survives scores that overflow exp().
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mechanisms.flash_attention import flash_attention

FP64_TOL = 1e-10
TILES = [(1, 1), (3, 5), (4, 4), (7, 2), (64, 64)]  # 10 and 7 are not multiples of 3, 4 or 7; 64 > T
LENGTHS = [(10, 10), (7, 10), (10, 7)]  # self, fewer queries (a KV cache), more queries than keys


def _qkv(b=2, h=2, tq=10, tk=10, dh=4, dv=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, dh, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(b, h, tk, dh, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(b, h, tk, dv, generator=g, dtype=dtype).requires_grad_())


def _padding(b, tk):
    padding = torch.ones(b, tk, dtype=torch.bool)
    padding[1, tk - 3:] = False  # the second sequence ends 3 tokens early
    padding[1, 1] = False  # and has a hole
    return padding


def _naive(q, k, v, is_causal, padding):
    """softmax(Q K^T / sqrt(Dh)) V with the full matrix; rows with no visible key give 0 and L = -inf."""
    tq, tk = q.size(2), k.size(2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    visible = torch.ones(q.size(0), 1, tq, tk, dtype=torch.bool)
    if is_causal:
        visible = visible & torch.tensor([[j <= i + tk - tq for j in range(tk)] for i in range(tq)])
    if padding is not None:
        visible = visible & padding[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    has_key = visible.any(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    return weights @ v, lse


@pytest.mark.parametrize("tq,tk", LENGTHS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_forward_and_lse_equal_naive_attention_for_every_tile_size(tq, tk, is_causal, padded):
    q, k, v = _qkv(tq=tq, tk=tk)
    padding = _padding(2, tk) if padded else None
    expected, expected_lse = _naive(q, k, v, is_causal, padding)
    finite = expected_lse.isfinite()
    for block_q, block_k in TILES:
        out, lse = flash_attention(q, k, v, is_causal=is_causal, block_size_q=block_q, block_size_k=block_k,
                                   key_padding_mask=padding, return_lse=True)
        assert (out - expected).abs().max() < FP64_TOL, (block_q, block_k)
        assert torch.equal(lse.isinf(), expected_lse.isinf())  # -inf exactly where a query sees no key
        assert (lse[finite] - expected_lse[finite]).abs().max() < FP64_TOL, (block_q, block_k)


@pytest.mark.parametrize("tq,tk", LENGTHS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_gradients_equal_autograd_of_naive_attention_for_every_tile_size(tq, tk, is_causal):
    q, k, v = _qkv(tq=tq, tk=tk)
    padding = _padding(2, tk)
    upstream = torch.randn(2, 2, tq, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = torch.autograd.grad(_naive(q, k, v, is_causal, padding)[0], (q, k, v), upstream)
    for block_q, block_k in TILES:
        out = flash_attention(q, k, v, is_causal=is_causal, block_size_q=block_q, block_size_k=block_k,
                              key_padding_mask=padding)
        ours = torch.autograd.grad(out, (q, k, v), upstream)
        for name, a, b in zip(("dQ", "dK", "dV"), ours, expected):
            assert (a - b).abs().max() < FP64_TOL, (name, block_q, block_k)


def test_a_query_before_the_first_key_gets_zeros_and_lse_minus_infinity():
    # Bottom-right causal with Tq > Tk: query i sees keys j <= i - 3, so queries 0..2 see nothing.
    q, k, v = _qkv(tq=8, tk=5)
    out, lse = flash_attention(q, k, v, is_causal=True, block_size_q=2, block_size_k=2, return_lse=True)
    assert (out[:, :, :3] == 0).all() and (lse[:, :, :3] == float("-inf")).all()
    assert lse[:, :, 3:].isfinite().all()
    out.pow(2).sum().backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))
    assert (q.grad[:, :, :3] == 0).all()


def test_online_softmax_survives_scores_that_overflow_exp():
    # Scores near 1e4: exp() overflows float32 and float64 alike unless the running maximum is subtracted.
    q, k, v = _qkv(tq=9, tk=9)
    with torch.no_grad():
        q.mul_(300.0)
        k.mul_(300.0)
    out = flash_attention(q, k, v, block_size_q=4, block_size_k=3)
    expected, _ = _naive(q, k, v, False, None)
    assert out.isfinite().all()
    assert (out - expected).abs().max() < FP64_TOL


class _RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor any aten operator returns, and counts the matrix products."""

    def __init__(self):
        super().__init__()
        self.shapes, self.matmuls = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("bmm", "mm", "matmul"):
            self.matmuls += 1
        for r in (result if isinstance(result, (tuple, list)) else (result,)):
            if isinstance(r, torch.Tensor):
                self.shapes.append(tuple(r.shape))
        return result


def test_the_t_by_t_matrix_is_never_built_forward_or_backward():
    t, block = 24, 8
    q, k, v = _qkv(b=1, h=2, tq=t, tk=t, dh=4, dv=4)
    with _RecordShapes() as record:
        out = flash_attention(q, k, v, is_causal=True, block_size_q=block, block_size_k=block,
                              key_padding_mask=torch.ones(1, t, dtype=torch.bool))
        out.sum().backward()
    biggest = max(math.prod(s) for s in record.shapes)
    assert biggest <= 2 * t * 4, f"a tensor of {biggest} elements: more than the (B, H, T, Dh) inputs"
    assert not any(len(s) >= 2 and s[-2:] == (t, t) for s in record.shapes), "a (T, T) tensor was built"
    # ...while the naive oracle under the same recorder builds (B, H, T, T) tensors: the recorder can see them.
    with _RecordShapes() as naive:
        _naive(q, k, v, True, None)[0].sum().backward()
    assert any(s[-2:] == (t, t) for s in naive.shapes if len(s) >= 2)


def test_causal_attention_skips_the_tiles_above_the_diagonal():
    t, block = 16, 4  # 4 x 4 tiles; causal needs the 10 on or below the diagonal
    q, k, v = _qkv(b=1, h=1, tq=t, tk=t)
    counts = {}
    for is_causal in (False, True):
        with _RecordShapes() as record:
            flash_attention(q, k, v, is_causal=is_causal, block_size_q=block, block_size_k=block).sum().backward()
        counts[is_causal] = record.matmuls
    # forward: 2 products per tile (Q K^T, P V); backward: 5 per tile (S, dV, dP, dQ, dK).
    assert counts[False] == 16 * (2 + 5)
    assert counts[True] == 10 * (2 + 5)


def test_tile_sizes_and_padding_are_checked_by_name():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="block_size_k"):
        flash_attention(q, k, v, block_size_k=0)
    with pytest.raises(ValueError, match="block_size_q"):
        flash_attention(q, k, v, block_size_q=2.5)
    with pytest.raises(ValueError, match="value"):
        flash_attention(q, k, v[:, :, :4])
    with pytest.raises(TypeError, match="key_padding_mask"):
        flash_attention(q, k, v, key_padding_mask=torch.ones(2, 10))
