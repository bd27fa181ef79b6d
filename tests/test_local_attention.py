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
        mask = torch.ones(2, 1, 1, T, dtype=torch.bool)
        mask[0, ..., 2:5] = False
        mask[1, ..., -3:] = False
        expected, expected_w = dense_oracle(mod, x, band(T, window, causal) & mask)
        out, weights = mod(x, mask=mask, need_weights=True)
        assert (mod(x, mask=mask) - expected).abs().max() < TOL64
        assert (out - expected).abs().max() < TOL64
        assert (weights - expected_w).abs().max() < TOL64


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


# ------------------------------------------------------------------ masks and causality
def test_masked_keys_get_zero_weight_and_do_not_matter():
    T = 9
    mod = make(window=3)
    x = torch.randn(2, T, 8)
    mask = torch.ones(2, 1, 1, T, dtype=torch.bool)
    mask[:, ..., 4:6] = False
    out, weights = mod(x, mask=mask, need_weights=True)
    assert weights[..., 4:6].abs().max() == 0
    kv = x.clone()
    kv[:, 4:6] = torch.randn(2, 2, 8) * 10  # change masked keys/values only
    out2 = mod(x, kv, kv, mask=mask)
    assert torch.allclose(out, out2, atol=1e-6)


def test_causal_future_token_does_not_change_earlier_outputs():
    T = 10
    mod = make(window=3, causal=True)
    x = torch.randn(1, T, 8)
    base = mod(x)
    x2 = x.clone()
    x2[0, 6] += 5.0
    out = mod(x2)
    assert torch.equal(out[0, :6], base[0, :6])
    assert not torch.allclose(out[0, 6], base[0, 6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_row_gives_zeros_not_nan(dtype, need_weights):
    T = 8
    mod = make(window=2, bias=False).to(dtype)
    x = torch.randn(2, T, 8, dtype=dtype)
    mask = torch.ones(2, 1, 1, T, dtype=torch.bool)
    mask[0] = False                      # batch 0: every key masked
    mask[1, ..., :5] = False             # batch 1, causal window: queries 0..4 see nothing
    mod.causal = True
    result = mod(x, mask=mask, need_weights=need_weights)
    out = result[0] if need_weights else result
    assert torch.isfinite(out).all()
    assert out[0].abs().max() == 0 and out[1, :5].abs().max() == 0
    assert out[1, 5:].abs().max() > 0
    if need_weights:
        assert torch.isfinite(result[1]).all() and result[1][0].abs().max() == 0


def test_fully_masked_row_has_finite_gradients():
    mod = make(window=1)
    x = torch.randn(1, 6, 8, requires_grad=True)
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    mask[..., :3] = False                # queries 0 and 1 see no key
    for need_weights in (False, True):
        result = mod(x, mask=mask, need_weights=need_weights)
        out = result[0] if need_weights else result
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(grad).all()


# ------------------------------------------------------------------ gradients
def test_gradcheck_float64():
    for causal in (False, True):
        mod = make(d_model=4, num_heads=2, window=1, causal=causal).double()
        x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: mod(t), (x,))
        assert torch.autograd.gradcheck(lambda t: mod(t, need_weights=True)[0], (x,))


def test_every_parameter_gets_a_gradient():
    mod = make(window=2)
    mod(torch.randn(2, 7, 8)).pow(2).sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


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


def test_dropout_is_off_in_eval_and_weights_are_taken_before_dropout():
    x = torch.randn(2, 9, 8)
    drop = make(window=2, dropout=0.5)
    plain = make(window=2, dropout=0.0)
    drop.eval()
    assert torch.equal(drop(x), plain(x))
    assert torch.equal(drop(x), drop(x))
    drop.train()
    torch.manual_seed(1)
    out, weights = drop(x, need_weights=True)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 9), atol=1e-6), "weights must be pre-dropout"
    assert not torch.allclose(out, plain(x)), "dropout must be active in train()"


def test_fused_and_explicit_paths_agree():
    mod = make(window=3, causal=True).double()
    x = torch.randn(3, 14, 8, dtype=torch.float64)
    mask = torch.rand(3, 1, 1, 14) > 0.3
    assert (mod(x, mask=mask) - mod(x, mask=mask, need_weights=True)[0]).abs().max() < TOL64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_and_stays_close(dtype):
    mod = make(window=2)
    x = torch.randn(2, 9, 8)
    ref = mod(x)
    out = mod.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05


# ------------------------------------------------------------------ bad input
def test_bad_input_raises_clear_errors():
    mod = make()
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="query"):
        mod(torch.randn(5, 8))
    with pytest.raises(ValueError, match="d_model"):
        mod(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="num_heads"):
        LocalAttention(10, 3, 2)
    with pytest.raises(ValueError, match="window"):
        LocalAttention(8, 2, -1)
    with pytest.raises(ValueError, match="mask"):
        mod(x, mask=torch.ones(2, 5, dtype=torch.bool))          # (B, T): must be (B, 1, 1, T)
    with pytest.raises(ValueError, match=r"\(B, 1, 1, T\)"):
        mod(x, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        mod(x, mask=torch.ones(2, 1, 5, 5, dtype=torch.bool))    # dense masks are not blocked
    with pytest.raises(ValueError, match="mask"):
        mod(x, mask=torch.ones(3, 1, 1, 5, dtype=torch.bool))    # wrong batch
    with pytest.raises(TypeError, match="mask"):
        mod(x, mask=torch.ones(2, 1, 1, 5))
    with pytest.raises(ValueError, match="key"):
        mod(x, torch.randn(3, 5, 8))                              # batch mismatch
    with pytest.raises(ValueError, match="key"):
        mod(x, torch.randn(2, 6, 8))                              # length mismatch
