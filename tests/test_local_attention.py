"""Tests for mechanisms/local_attention.py (sliding-window attention computed in blocks).

The oracle is dense attention written out here from the module's projection weights, with the band
mask of the page's eq. (1) built independently as a (T, T) matrix.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mechanisms.local_attention import LocalAttention

TOL64 = 1e-10  # float64: blocked vs dense differ only by summation order


def make(d_model=8, num_heads=2, window=2, causal=False, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    return LocalAttention(d_model, num_heads, window, causal=causal, dropout=dropout, bias=bias)


def band(T, window, causal):
    """(T, T) bool: key j visible from query i, written from the definition of the window."""
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            allowed[i, j] = (i - window <= j <= i) if causal else abs(i - j) <= window
    return allowed


def dense_oracle(mod, x, allowed, kv=None):
    """Plain multi-head attention with the module's projection weights and a dense bool mask."""
    kv = x if kv is None else kv
    B, T, D = x.shape
    H = mod.num_heads
    Dh = D // H
    q = mod.q_proj(x).view(B, T, H, Dh).transpose(1, 2)
    k = mod.k_proj(kv).view(B, T, H, Dh).transpose(1, 2)
    v = mod.v_proj(kv).view(B, T, H, Dh).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(Dh)).masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    out = (weights @ v).transpose(1, 2).reshape(B, T, D)
    return mod.out_proj(out), weights


# ------------------------------------------------------------------ oracle and limit case
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_window_at_least_length_equals_full_attention(causal, need_weights):
    T = 7
    for window in (T - 1, T, 3 * T):
        mod = make(window=window, causal=causal).double()
        x = torch.randn(2, T, 8, dtype=torch.float64)
        full = torch.ones(T, T, dtype=torch.bool)
        if causal:
            full = full.tril()
        expected, _ = dense_oracle(mod, x, full)
        got = mod(x, need_weights=need_weights)
        got = got[0] if need_weights else got
        assert (got - expected).abs().max() < TOL64, f"window={window} differs from full attention (tol {TOL64})"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,window", [(1, 0), (5, 0), (5, 1), (6, 2), (7, 2), (8, 3), (10, 3), (13, 4),
                                      (16, 4), (17, 5), (9, 8), (4, 9)])
def test_blocked_equals_dense_band_oracle(T, window, causal):
    mod = make(window=window, causal=causal).double()
    x = torch.randn(2, T, 8, dtype=torch.float64)
    expected, expected_w = dense_oracle(mod, x, band(T, window, causal))
    fused = mod(x)
    explicit, weights = mod(x, need_weights=True)
    assert (fused - expected).abs().max() < TOL64, f"fused blocked path != dense oracle (tol {TOL64})"
    assert (explicit - expected).abs().max() < TOL64, f"explicit blocked path != dense oracle (tol {TOL64})"
    assert weights.shape == (2, 2, T, T)
    assert (weights - expected_w).abs().max() < TOL64, "assembled dense weights != oracle weights"


def test_blocked_with_key_padding_mask_equals_oracle():
    T, window = 11, 3
    for causal in (False, True):
        mod = make(window=window, causal=causal).double()
        x = torch.randn(2, T, 8, dtype=torch.float64)
        padding = torch.ones(2, T, dtype=torch.bool)
        padding[0, 2:5] = False
        padding[1, -3:] = False
        expected, expected_w = dense_oracle(mod, x, band(T, window, causal) & padding[:, None, None, :])
        out, weights = mod(x, key_padding_mask=padding, need_weights=True)
        assert (mod(x, key_padding_mask=padding) - expected).abs().max() < TOL64
        assert (out - expected).abs().max() < TOL64
        assert (weights - expected_w).abs().max() < TOL64
        # the per-key 4-D `mask` form gives the same, and ANDs with key_padding_mask
        assert (mod(x, mask=padding[:, None, None, :]) - expected).abs().max() < TOL64
        per_head = torch.ones(1, 2, 1, T, dtype=torch.bool)
        per_head[0, 1, 0, 6] = False  # head 1 may not see key 6
        both, _ = dense_oracle(mod, x, band(T, window, causal) & padding[:, None, None, :] & per_head)
        assert (mod(x, mask=per_head, key_padding_mask=padding) - both).abs().max() < TOL64


@pytest.mark.parametrize("causal", [False, True])
def test_each_output_depends_only_on_its_window(causal):
    T, window = 12, 2
    mod = make(window=window, causal=causal).double()
    x = torch.randn(1, T, 8, dtype=torch.float64)
    base = mod(x)
    visible = band(T, window, causal)
    for p in (0, 5, 11):
        x2 = x.clone()
        x2[0, p] += 1.0
        changed = (mod(x2) - base).abs().amax(dim=-1)[0] > 1e-9  # (T,)
        for i in range(T):
            # query i changes iff token p is itself or lies inside i's window
            assert bool(changed[i]) == bool(visible[i, p]), f"query {i}, perturbed token {p}"


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [False, True])
def test_blocked_path_never_materialises_a_T_by_T_tensor(causal):
    T, window = 512, 4
    mod = make(window=window, causal=causal)
    x = torch.randn(1, T, 8)
    mask = torch.ones(1, 1, 1, T, dtype=torch.bool)
    with torch.no_grad():
        for need_weights in (False, True):
            with _LargestTensor() as rec:
                mod(x, mask=mask, need_weights=need_weights)
            if need_weights:
                # the dense weights for inspection are O(T^2): proves the recorder sees them
                assert rec.largest >= T * T
            else:
                # largest blocked tensor: B*H*ceil(T/w)*w*3w = 2*512*12 elements, far below T*T
                assert rec.largest <= 2 * T * 3 * window * 2, f"an intermediate had {rec.largest} elements"


# ------------------------------------------------------------------ masks


# ------------------------------------------------------------------ gradients


# ------------------------------------------------------------------ distinct, arguments, dropout
def test_distinct_from_plain_multi_head_attention():
    T = 9
    mod = make(window=2).double()
    x = torch.randn(2, T, 8, dtype=torch.float64)
    plain, _ = dense_oracle(mod, x, torch.ones(T, T, dtype=torch.bool))
    assert (mod(x) - plain).abs().max() > 1e-3


def test_every_constructor_argument_changes_the_output():
    x = torch.randn(2, 9, 8)
    ref = make(window=2)
    base = ref(x)
    state = ref.state_dict()

    def variant(**kw):
        args = dict(d_model=8, num_heads=2, window=2, causal=False, dropout=0.0, bias=True)
        args.update(kw)
        mod = LocalAttention(**args)
        mod.load_state_dict({k: v for k, v in state.items() if k in mod.state_dict()})
        return mod

    assert not torch.allclose(variant(window=3)(x), base)
    assert not torch.allclose(variant(causal=True)(x), base)
    assert not torch.allclose(variant(num_heads=4)(x), base)
    assert not torch.allclose(variant(bias=False)(x), base)
    assert not torch.allclose(variant(dropout=0.5).train()(x), base)
    assert make(d_model=12, num_heads=3)(torch.randn(2, 9, 12)).shape == (2, 9, 12)


# ------------------------------------------------------------------ bad input


def test_key_padding_mask_is_per_batch_element_and_a_dense_mask_is_refused_when_batch_equals_length():
    # B == T == 5: a (B, T) padding tensor has the shape of a (T, T) mask. As `key_padding_mask` it is read
    # per batch element (the oracle), and as `mask` it is refused: local attention takes no dense mask.
    T, window = 5, 1
    mod = make(window=window).double()
    x = torch.randn(T, T, 8, dtype=torch.float64)
    padding = torch.ones(T, T, dtype=torch.bool)
    padding[torch.arange(T), torch.arange(T)] = False  # batch element b has token b padded
    expected, _ = dense_oracle(mod, x, band(T, window, False) & padding[:, None, None, :])
    assert (mod(x, key_padding_mask=padding) - expected).abs().max() < TOL64
    with pytest.raises(ValueError, match=r"mask.*key_padding_mask of shape \(B, T\) = \(5, 5\)"):
        mod(x, mask=padding)
    with pytest.raises(ValueError, match="mask"):
        mod(x, mask=torch.ones(5, 1, T, T, dtype=torch.bool))  # dense masks are not blocked


def test_mechanism_specific_bad_input():
    with pytest.raises(ValueError, match="window"):
        LocalAttention(8, 2, -1)
    with pytest.raises(ValueError, match="key"):
        make()(torch.randn(2, 5, 8), torch.randn(2, 6, 8))  # the window needs ONE sequence: same length
