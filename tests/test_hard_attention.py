"""Tests for mechanisms/hard_attention.py (Xu et al. 2015; straight-through Gumbel-softmax).

Oracles: an index gather of the value at the argmax key (eval); the sampling frequencies of the
Gumbel-max trick against softmax(scores); the relaxed sample at temperature -> 0 against the
one-hot sample drawn with the same noise; plain softmax attention built inline for distinctness.
"""

import math

import pytest
import torch

from mechanisms.hard_attention import HardAttention, gumbel_noise, straight_through_gumbel


def _module(d_model=8, num_heads=2, temperature=1.0, bias=True, seed=0):
    torch.manual_seed(seed)
    attn = HardAttention(d_model, num_heads=num_heads, temperature=temperature, bias=bias).double()
    if bias:
        with torch.no_grad():
            for name, p in attn.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    return attn


def _heads(attn, x, proj):
    B, T, _ = x.shape
    return proj(x).view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, Dh)


def _scores(attn, query, key):
    q, k = _heads(attn, query, attn.q_proj), _heads(attn, key, attn.k_proj)
    return q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)  # (B, H, Tq, Tk)


def _gather_oracle(attn, query, key, index):
    """W_o applied to the concatenation over heads of v_h[index[b, h, i]], built with an explicit loop."""
    v = _heads(attn, key, attn.v_proj)
    B, H, Tq = index.shape
    picked = torch.zeros(B, Tq, H, attn.head_dim, dtype=v.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                picked[b, i, h] = v[b, h, index[b, h, i]]
    return attn.out_proj(picked.reshape(B, Tq, H * attn.head_dim))


def test_eval_output_is_the_value_at_the_argmax_key():
    attn = _module().eval()
    x, mem = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        out, w = attn(x, mem, need_weights=True)
        index = _scores(attn, x, mem).argmax(-1)  # (B, H, Tq)
        expected = _gather_oracle(attn, x, mem, index)
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)
    assert torch.equal(w.argmax(-1), index) and torch.equal(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert torch.equal(attn(x, mem), attn(x, mem)), "eval must be deterministic"


def test_training_forward_is_the_value_of_the_gumbel_max_sample():
    attn = _module().train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    noise = gumbel_noise((2, 2, 5, 5), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out, w = attn(x, noise=noise, need_weights=True)
    with torch.no_grad():
        index = (_scores(attn, x, x) + noise).argmax(-1)
        expected = _gather_oracle(attn, x, x, index)
    assert torch.allclose(out, expected, atol=1e-12, rtol=0), "forward must use the exact one-hot sample"
    assert torch.equal(w, torch.nn.functional.one_hot(index, 5).double())


def test_sample_frequencies_follow_the_softmax():
    # Gumbel-max: argmax(e + g) is distributed as softmax(e). 20000 draws; 5 binomial std. deviations.
    scores = torch.tensor([[[[1.0, 0.0, -1.0, 2.0]]]], dtype=torch.float64).expand(1, 1, 20000, 4)
    hard, _ = straight_through_gumbel(scores, 1.0, generator=torch.Generator().manual_seed(0))
    freq = hard.mean(dim=2)[0, 0]
    p = torch.softmax(scores[0, 0, 0], dim=-1)
    tol = 5 * torch.sqrt(p * (1 - p) / 20000)
    assert ((freq - p).abs() < tol).all(), f"frequencies {freq} vs softmax {p}"


def test_relaxed_sample_approaches_the_hard_one_as_temperature_goes_to_zero():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 2, 4, 6, generator=g, dtype=torch.float64)
    noise = gumbel_noise(scores.shape, generator=g, dtype=torch.float64)
    gaps = []
    for t in (1.0, 0.1, 0.01, 0.001):
        hard, soft = straight_through_gumbel(scores, t, noise=noise)
        gaps.append((soft - hard).abs().max().item())
    assert all(a > b for a, b in zip(gaps, gaps[1:])), f"gap must shrink with temperature: {gaps}"
    assert gaps[-1] < 1e-6, f"at temperature 1e-3 the relaxed sample should be one-hot, gap {gaps[-1]}"
    # and the hard sample does not depend on the temperature at all
    assert torch.equal(straight_through_gumbel(scores, 5.0, noise=noise)[0], hard)


def test_straight_through_gradient_is_the_gradient_of_the_relaxed_sample():
    # d loss / d scores through the module's weights must equal the gradient through y alone.
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(1, 1, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    noise = gumbel_noise(scores.shape, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, 5, 2, generator=g, dtype=torch.float64)
    hard, soft = straight_through_gumbel(scores, 0.5, noise=noise)
    (((hard + soft - soft.detach()) @ v) ** 2).sum().backward()
    st_grad = scores.grad.clone()
    scores.grad = None
    y = torch.softmax((scores + noise) / 0.5, dim=-1)  # the relaxed sample, written out
    ((hard.detach() @ v) * 2 * (y @ v)).sum().backward()  # d/dy of (w v)^2 at w = hard, chained through y
    assert torch.allclose(st_grad, scores.grad, atol=1e-12)


def test_gradcheck_float64():
    # The straight-through gradient is deliberately NOT the true derivative with respect to the
    # scores (that one is zero almost everywhere), so gradcheck covers what must be exact: the
    # relaxed sample with respect to the scores, and the module with respect to the values.
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(1, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    noise = gumbel_noise(scores.shape, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True]).view(1, 1, 1, 3)
    assert torch.autograd.gradcheck(lambda s: straight_through_gumbel(s, 0.7, mask, noise=noise)[1], (scores,))
    attn = _module(d_model=4, num_heads=2)
    q = torch.randn(1, 2, 4, generator=g, dtype=torch.float64)
    kv = torch.randn(1, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    noise = gumbel_noise((1, 2, 2, 3), generator=g, dtype=torch.float64)
    attn.train()
    assert torch.autograd.gradcheck(lambda v: attn(q, kv.detach(), v, mask=mask, noise=noise), (kv,))
    attn.eval()
    assert torch.autograd.gradcheck(lambda v: attn(q, kv.detach(), v, mask=mask), (kv,))


def test_masked_keys_are_never_sampled_and_their_values_do_not_matter():
    attn = _module().train()
    x = torch.randn(1, 4, 8, dtype=torch.float64).expand(500, 4, 8)  # 500 draws of the same input
    mask = torch.tensor([True, False, True, False]).view(1, 1, 1, 4)
    with torch.no_grad():
        _, w = attn(x, mask=mask, need_weights=True, generator=torch.Generator().manual_seed(0))
    assert w[..., 1].sum() == 0 and w[..., 3].sum() == 0
    assert w[..., 0].sum() > 0 and w[..., 2].sum() > 0, "both allowed keys should be drawn in 500 samples"
    y = x.clone()
    y[:, [1, 3]] = 50 * torch.randn(500, 2, 8, dtype=torch.float64)  # rewrite only the masked keys
    noise = gumbel_noise((500, 2, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for mode in (True, False):
        attn.train(mode)
        a = attn(x[:, :1], x, mask=mask, noise=noise[:, :, :1])
        b = attn(x[:, :1], y, mask=mask, noise=noise[:, :, :1])
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_two_dim_mask_equals_the_same_mask_expanded_to_four_dims(training, is_causal):
    # A (Tq, Tk) mask is shared by every batch element and head: it must act exactly like that mask
    # written out as (B, 1, Tq, Tk), in eval (argmax) and in training (the same Gumbel noise).
    attn = _module().train(training)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    query = x[:, 2:]  # Tq = 4 queries: the last 4 of the Tk = 6 key tokens
    mask = torch.tensor([[1, 0, 1, 1, 0, 1],
                         [0, 0, 0, 0, 0, 0],  # this query sees nothing
                         [1, 1, 0, 1, 1, 0],
                         [0, 1, 1, 0, 1, 1]], dtype=torch.bool)  # (Tq, Tk) = (4, 6)
    noise = gumbel_noise((2, 2, 4, 6), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(is_causal=is_causal, need_weights=True, noise=noise)
    out, w = attn(query, x, mask=mask, **kw)
    out4, w4 = attn(query, x, mask=mask.expand(2, 1, 4, 6), **kw)
    assert torch.equal(w, w4) and torch.allclose(out, out4, atol=1e-12, rtol=0)
    assert (w.masked_select(~mask.expand_as(w)) == 0).all() and (w[:, :, 1] == 0).all()
    assert (w.sum(-1)[:, :, [0, 2, 3]] == 1).all()  # every other row still picks exactly one key


@pytest.mark.parametrize("tq", [6, 2])
def test_causal_eval_picks_the_argmax_among_keys_up_to_and_including_itself(tq):
    # Query i (at position i + Tk - Tq) chooses among keys j <= i + Tk - Tq: itself included, so query 0
    # of a square sequence always picks key 0 (its only key) and no query ever has an empty row.
    attn = _module().eval()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    query = x[:, 6 - tq:]
    allowed = torch.tensor([[j <= i + 6 - tq for j in range(6)] for i in range(tq)])  # bottom-right
    with torch.no_grad():
        out, w = attn(query, x, is_causal=True, need_weights=True)
        index = _scores(attn, query, x).masked_fill(~allowed, float("-inf")).argmax(-1)  # (B, H, Tq)
        expected = _gather_oracle(attn, query, x, index)
    assert torch.equal(w.argmax(-1), index) and (w.sum(-1) == 1).all()
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)
    if tq == 6:
        assert (w[:, :, 0, 0] == 1).all(), "the first token must pick itself, its only visible key"


def test_is_causal_never_looks_ahead():
    attn = _module()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    y = x.clone()
    y[:, 4:] = torch.randn(2, 2, 8, dtype=torch.float64)  # change the future tokens 4 and 5
    noise = gumbel_noise((2, 2, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for mode in (True, False):
        attn.train(mode)
        a, w = attn(x, is_causal=True, noise=noise, need_weights=True)
        b = attn(y, is_causal=True, noise=noise)
        assert torch.allclose(a[:, :4], b[:, :4], atol=1e-12)
        assert (w.triu(diagonal=1) == 0).all()
    # Tq < Tk (a KV cache): the last query sees every key, the first sees Tk - Tq + 1 of them
    attn.eval()
    _, w = attn(x[:, 4:], x, is_causal=True, need_weights=True)
    allowed = torch.ones(2, 6, dtype=torch.bool).tril(diagonal=4)
    assert (w[:, :, ~allowed] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fully_masked_row_gives_zeros_not_nan_in_training(dtype, bias):
    # The project's rule: a query with no key gets a zero attention output BEFORE W_o, so the module
    # returns W_o(0) = W_o's bias (exactly zero with bias=False), never NaN. The conformance suite checks
    # it in eval; here the training path (the Gumbel sample and its relaxed twin).
    attn = _module(bias=bias).to(dtype).train()
    x = torch.randn(2, 3, 8, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    mask[1, 0, 2] = False
    out, w = attn(x, mask=mask, need_weights=True)
    assert not torch.isnan(out).any() and (w[1, :, 2] == 0).all()
    expected = attn.out_proj.bias if bias else torch.zeros(8, dtype=dtype)
    assert torch.equal(out[1, 2], expected)
    assert (out[1, 1] - expected).abs().max() > 0  # only the dead row collapses to the bias
    out.sum().backward()
    assert not torch.isnan(x.grad).any()


def test_distinct_from_soft_multi_head_attention():
    attn = _module().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        v = _heads(attn, x, attn.v_proj)
        soft = torch.softmax(_scores(attn, x, x), dim=-1) @ v  # plain MHA, same weights
        plain = attn.out_proj(soft.transpose(1, 2).reshape(2, 5, 8))
        assert (attn(x) - plain).abs().max() > 1e-3


def test_every_constructor_argument_changes_the_output():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    one, two = _module(num_heads=1).eval(), _module(num_heads=2).eval()
    two.load_state_dict(one.state_dict())
    assert (one(x) - two(x)).abs().max() > 1e-6, "num_heads"
    no_bias = _module(bias=False).eval()
    no_bias.load_state_dict(_module().state_dict(), strict=False)
    assert (no_bias(x) - _module().eval()(x)).abs().max() > 1e-6, "bias"
    assert _module(d_model=4)(torch.randn(1, 3, 4, dtype=torch.float64)).shape == (1, 3, 4), "d_model"
    # temperature shapes the backward pass only (the forward is the exact sample): compare gradients
    noise = gumbel_noise((2, 2, 5, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = []
    for t in (0.5, 2.0):
        m = _module(temperature=t).train()
        m(x, noise=noise).pow(2).sum().backward()
        grads.append(m.q_proj.weight.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-6, "temperature"


def _straight_through_oracle(attn, x, noise):
    """The module's training forward written out: W_o(concat_h (z + y - stopgrad(y)) v), eq. (2)-(4)."""
    q, k, v = _heads(attn, x, attn.q_proj), _heads(attn, x, attn.k_proj), _heads(attn, x, attn.v_proj)
    scores = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)  # eq. (1)
    z = torch.nn.functional.one_hot((scores + noise).argmax(-1), scores.size(-1)).to(scores.dtype)  # eq. (2)
    y = torch.softmax((scores + noise) / attn.temperature, dim=-1)  # eq. (3)
    w = z + y - y.detach()  # eq. (4)
    B, T, _ = x.shape
    return attn.out_proj((w @ v).transpose(1, 2).reshape(B, T, attn.d_model))


def test_training_gradient_is_the_straight_through_gradient_of_the_module():
    # The forward value is the one-hot sample; the gradient must be +d(relaxed sample), through the module
    # itself (a flipped sign, y.detach() - y, gives the same forward but the negated gradient).
    attn = _module(temperature=0.7).train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    noise = gumbel_noise((2, 2, 5, 5), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    target = torch.randn(2, 5, 8, dtype=torch.float64)
    grads = []
    for forward in (lambda t: attn(t, noise=noise), lambda t: _straight_through_oracle(attn, t, noise)):
        t = x.clone().requires_grad_()
        attn.zero_grad()
        ((forward(t) - target) ** 2).sum().backward()
        grads.append((t.grad, attn.q_proj.weight.grad.clone(), attn.k_proj.weight.grad.clone()))
    for ours, oracle in zip(*grads):
        assert oracle.abs().max() > 1e-3, "the straight-through gradient should not vanish here"
        assert (ours - oracle).abs().max() < 1e-10


def test_key_bias_gets_exactly_zero_gradient_in_training():
    # W_k's bias adds q_i . b / sqrt(Dh) to every score of row i; the relaxed sample softmax((e + g) / t)
    # does not change under a constant shift of a row, so its gradient is exactly zero (up to rounding),
    # while W_k's weight does get one.
    attn = _module().train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    attn(x, generator=torch.Generator().manual_seed(0)).pow(2).sum().backward()
    weight_grad = attn.k_proj.weight.grad.abs().max()
    assert weight_grad > 1e-3
    assert attn.k_proj.bias.grad.abs().max() <= 1e-12 * weight_grad


def test_eval_ignores_supplied_noise():
    # Eval is the noise-free argmax (eq. (5)); noise given for training must not leak into it.
    attn = _module().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        clean = attn(x)
        index = _scores(attn, x, x).argmax(-1)
        noise = 100.0 * torch.nn.functional.one_hot((index + 1) % 5, 5).double()  # favours another key
        assert torch.equal(attn(x, noise=noise), clean)
        assert torch.equal(attn(x, generator=torch.Generator().manual_seed(1)), clean)
        attn.train()
        assert (attn(x, noise=noise) - clean).abs().max() > 1e-3, "the same noise does act in training"


def test_bfloat16_picks_a_best_key_of_float32_and_returns_its_value():
    # bf16 rounds the scores (8 bits of mantissa), so two keys within rounding of each other may swap.
    # A pick counts as the same pick when its float32 score is within bf16 precision of the best score;
    # the output must then be float32's value of that key, to bf16 precision.
    attn = _module().float().eval()
    low = _module().to(torch.bfloat16).eval()
    x, mem = torch.randn(4, 5, 8), torch.randn(4, 7, 8)
    with torch.no_grad():
        out16, w16 = low(x.bfloat16(), mem.bfloat16(), need_weights=True)
        scores = _scores(attn, x, mem)  # float32, (B, H, Tq, Tk)
        picked = scores.gather(-1, w16.argmax(-1, keepdim=True).long()).squeeze(-1)
        best = scores.amax(-1)
        tol = 4 * 2.0 ** -8 * scores.abs().amax()  # a few bf16 roundings (inputs, weights, products)
        assert (best - picked).max() <= tol, f"bf16 picked a key {float((best - picked).max()):.3g} below the best"
        expected = _gather_oracle(attn, x, mem, w16.argmax(-1))  # float32 value of bf16's pick
    error = (out16.float() - expected).abs().max() / expected.abs().max()
    assert error <= 0.02, f"bf16 output differs from float32 by {error:.3f} of the output scale"


def test_key_padding_mask_is_per_batch_element_even_when_batch_equals_tq():
    # B == Tq == 2: a (B, Tk) padding mask has the shape of a (Tq, Tk) mask. As `key_padding_mask` row b
    # is batch element b's keys; as `mask` row i is query i's. Oracle: the argmax over the allowed keys.
    attn = _module().eval()
    x, mem = torch.randn(2, 2, 8, dtype=torch.float64), torch.randn(2, 6, 8, dtype=torch.float64)
    padding = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        scores = _scores(attn, x, mem)
        per_batch = _gather_oracle(attn, x, mem, scores.masked_fill(~padding[:, None, None, :], -math.inf).argmax(-1))
        per_query = _gather_oracle(attn, x, mem, scores.masked_fill(~padding, -math.inf).argmax(-1))
        assert torch.allclose(attn(x, mem, key_padding_mask=padding), per_batch, atol=1e-12, rtol=0)
        assert torch.allclose(attn(x, mem, mask=padding), per_query, atol=1e-12, rtol=0)
        assert (per_batch - per_query).abs().max() > 1e-3, "the two readings should differ on this input"


def test_mechanism_specific_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        HardAttention(8, temperature=0.0)
    with pytest.raises(ValueError, match="noise"):
        HardAttention(8, num_heads=2).train()(torch.randn(2, 5, 8), noise=torch.zeros(2, 2, 5, 4))
