"""mechanisms/performer.py: FAVOR+ is an unbiased estimate of softmax attention, and computed exactly as defined.

Statistical claims of the paper, checked with fixed seeds: (1) the mean of phi(x).phi(y) over many independent
draws of the features is exp(x . y) (within 4 standard errors); (2) the output error against exact softmax
attention falls like m^(-1/2) in the number of features m (fitted log-log slope); (3) orthogonal features
have a smaller mean squared error than i.i.d. ones. Exactness claims: every computational form (O(T) sums,
causal chunkwise for every chunk size, explicit) equals a double loop over the features written here.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mechanisms.performer import PerformerAttention, gaussian_projection, positive_random_features
from tests.oracles import random_inputs

FP64_TOL = 1e-10
D, H, T = 8, 2, 7


def _model(d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = PerformerAttention(d_model, num_heads, **kwargs).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


def _x(b=2, t=T, seed=1, width=D):
    return random_inputs(b, t, width, seed=seed)


def _phi(x, w):
    """exp(w . x - |x|^2 / 2) / sqrt(m), row by row, from the paper's definition."""
    m = w.size(0)
    return torch.stack([torch.exp(x @ w[i] - (x * x).sum(-1) / 2) for i in range(m)], dim=-1) / math.sqrt(m)


def _double_loop(model, query, key, value, visible):
    b, tq, tk, h, dh = query.size(0), query.size(1), key.size(1), model.num_heads, model.head_dim
    split = lambda t: t.view(t.size(0), t.size(1), h, dh)  # noqa: E731
    q, k, v = split(model.q_proj(query)) / dh ** 0.25, split(model.k_proj(key)) / dh ** 0.25, split(model.v_proj(value))
    pq, pk = _phi(q, model.projection), _phi(k, model.projection)
    heads = torch.zeros(b, tq, h, dh, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                num, den = torch.zeros(dh, dtype=torch.float64), 0.0
                for j in range(tk):
                    if visible(bi, i, j):
                        s = float(pq[bi, i, hi] @ pk[bi, j, hi])
                        num, den = num + s * v[bi, j, hi], den + s
                heads[bi, i, hi] = num / den if den > 0 else 0.0
    return model.out_proj(heads.reshape(b, tq, -1))


def _softmax_attention(model, query, key, value, is_causal=False):
    b, tq, tk = query.size(0), query.size(1), key.size(1)
    split = lambda t: t.view(t.size(0), t.size(1), model.num_heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(model.q_proj(query)), split(model.k_proj(key)), split(model.v_proj(value))
    heads = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    return model.out_proj(heads.transpose(1, 2).reshape(b, tq, -1))


@pytest.mark.parametrize("orthogonal", [True, False])
def test_the_kernel_estimate_is_unbiased(orthogonal):
    g = torch.Generator().manual_seed(0)
    dim, blocks = 4, 20000
    x = torch.tensor([0.3, -0.5, 0.2, 0.4], dtype=torch.float64)
    for y in (torch.tensor([0.1, 0.4, -0.3, 0.2], dtype=torch.float64), -x, x):
        # 20000 independent blocks of `dim` features (orthogonal within a block): one estimate per block.
        w = gaussian_projection(dim * blocks, dim, orthogonal, generator=g, dtype=torch.float64)
        products = positive_random_features(x, w) * positive_random_features(y, w) * (dim * blocks)  # per row
        per_block = products.view(blocks, dim).mean(dim=1)  # phi_block(x) . phi_block(y) for each block
        mean, stderr = per_block.mean(), per_block.std() / math.sqrt(blocks)
        exact = math.exp(float(x @ y))
        assert abs(mean - exact) < 4 * stderr + 1e-12, (float(mean), exact, float(stderr))  # y = -x: no variance
        assert stderr < 0.01 * exact  # the test is sharp enough to see a 4 % bias
        assert (positive_random_features(x, w) > 0).all()  # positive features: positive weights


@torch.no_grad()
def test_output_error_falls_like_one_over_sqrt_m():
    x = _x(b=1, t=6, seed=2) * 0.5
    counts = [8, 32, 128, 512, 2048]
    errors = []
    for m in counts:
        model = _model(num_heads=1, num_features=m)
        for layer in (model.q_proj, model.k_proj):  # moderate scores: the estimator's variance grows like exp(|q+k|^2)
            layer.weight.mul_(0.3)
            layer.bias.mul_(0.3)
        exact = _softmax_attention(model, x, x, x)
        squared = []
        for seed in range(40):
            model.redraw_features(torch.Generator().manual_seed(100 * m + seed))
            squared.append((model(x) - exact).pow(2).mean())
        errors.append(torch.stack(squared).mean().sqrt().item())
    logm, loge = torch.tensor(counts, dtype=torch.float64).log(), torch.tensor(errors).log()
    slope = ((logm - logm.mean()) * (loge - loge.mean())).sum() / ((logm - logm.mean()) ** 2).sum()
    assert -0.65 < slope < -0.35, (float(slope), errors)  # RMS error ~ m^(-1/2)
    assert errors[-1] < 0.1 * errors[0]


def test_orthogonal_features_beat_iid_features():
    g = torch.Generator().manual_seed(0)
    dim = 16
    x = torch.randn(64, dim, dtype=torch.float64, generator=g) * 0.3
    y = torch.randn(64, dim, dtype=torch.float64, generator=g) * 0.3
    exact = (x * y).sum(-1).exp()
    mse = {}
    for orthogonal in (True, False):
        errors = []
        for _ in range(150):
            w = gaussian_projection(dim, dim, orthogonal, generator=g, dtype=torch.float64)
            estimate = (positive_random_features(x, w) * positive_random_features(y, w)).sum(-1)
            errors.append((estimate - exact).pow(2).mean())
        mse[orthogonal] = torch.stack(errors).mean().item()
    assert mse[True] < 0.8 * mse[False], mse
    w = gaussian_projection(2 * dim, dim, True, generator=g, dtype=torch.float64)
    gram = w[:dim] @ w[:dim].T  # within one block the rows are orthogonal
    assert (gram - torch.diag(torch.diagonal(gram))).abs().max() < 1e-10


@torch.no_grad()
def test_every_form_equals_the_double_loop():
    model = _model(num_features=12)
    x = _x()
    padding = torch.ones(2, T, dtype=torch.bool)
    padding[1, 5:] = False
    padding[0, 1] = False
    expected = _double_loop(model, x, x, x, lambda b, i, j: bool(padding[b, j]))
    assert (model(x, key_padding_mask=padding) - expected).abs().max() < FP64_TOL, "non-causal O(T)"
    assert (model(x, key_padding_mask=padding, need_weights=True)[0] - expected).abs().max() < FP64_TOL
    expected = _double_loop(model, x, x, x, lambda b, i, j: j <= i and bool(padding[b, j]))
    assert (model(x, key_padding_mask=padding, is_causal=True, need_weights=True)[0] - expected).abs().max() < FP64_TOL
    for chunk in (1, 3, 4, 16):
        model.chunk_size = chunk
        assert (model(x, key_padding_mask=padding, is_causal=True) - expected).abs().max() < FP64_TOL, chunk
    for tq, tk in ((3, 7), (7, 3)):  # bottom-right causal cross-attention
        q, kv = _x(t=tq, seed=2), _x(t=tk, seed=3)
        expected = _double_loop(model, q, kv, kv, lambda b, i, j, tq=tq, tk=tk: j <= i + tk - tq)
        assert (model(q, kv, is_causal=True) - expected).abs().max() < FP64_TOL, (tq, tk)


@torch.no_grad()
def test_distinct_from_softmax_attention_with_few_features():
    model = _model(num_features=4)
    x = _x()
    assert (model(x) - _softmax_attention(model, x, x, x)).abs().max() > 1e-3


@torch.no_grad()
def test_every_constructor_argument_changes_the_output():
    base = _model()
    x = _x()
    out = base(x)
    assert base.num_features == round(4 * math.log(4)) == 6  # the default m = Dh ln Dh (Dh = 4)
    more = _model(num_features=64)
    assert (more(x) - out).abs().max() > 1e-3, "num_features"
    iid = _model(orthogonal=False)  # same seed, i.i.d. rows instead of orthogonal ones
    assert (iid(x) - out).abs().max() > 1e-3, "orthogonal"
    assert (iid.projection @ iid.projection.T - torch.diag(iid.projection.pow(2).sum(-1))).abs().max() > 1e-3
    state = base.state_dict()
    one = _model(num_heads=1, num_features=6)
    state_one = dict(state)
    state_one["projection"] = one.projection
    one.load_state_dict(state_one)
    assert (one(x) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({n: p for n, p in state.items() if not n.endswith("bias")})
    assert (no_bias(x) - out).abs().max() > 1e-3, "bias"
    assert _model(d_model=4, num_heads=2)(x[..., :4]).shape == (2, T, 4), "d_model"
    # chunk_size changes the work, never the result: proven for 4 sizes above.
    base.redraw_features(torch.Generator().manual_seed(5))
    assert (base(x) - out).abs().max() > 1e-3, "redraw_features draws new features"


def test_a_general_mask_is_refused():
    with pytest.raises(ValueError, match="mask.*key_padding_mask"):
        _model()(_x(), mask=torch.ones(T, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_features"):
        PerformerAttention(D, H, num_features=0)
