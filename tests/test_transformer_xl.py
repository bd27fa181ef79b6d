"""mechanisms/transformer_xl.py: the four-term score against an explicit loop, the relative shift against a
gather, no memory with zero relative terms is causal multi-head attention, and two segments with memory equal
one pass over their concatenation.

The generic checks (bad input, masked rows, key padding, causality, gradcheck, dropout, state dict, bf16,
fused vs explicit) are in the conformance suite: tests/conformance/entries/transformer_xl.py.
"""
import math

import pytest
import torch

from mechanisms.transformer_xl import TransformerXLAttention, relative_shift, sinusoid_positions
from tests.oracles import random_inputs, randomize_, torch_mha_like

FP64_TOL = 1e-10
D, H = 16, 4


def _model(mem_len=8, d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    # every parameter random, u and v included, so each of the four terms is present
    return randomize_(TransformerXLAttention(d_model, num_heads, mem_len, **kwargs).double()).eval()


def _x(b=2, t=4, seed=1):
    return random_inputs(b, t, D, seed=seed)


def test_relative_shift_matches_an_explicit_gather():
    t, length = 4, 7
    x = torch.randn(2, 3, t, length, dtype=torch.float64)
    shifted = relative_shift(x)
    for i in range(t):
        for j in range(length - t + i + 1):  # every key the causal mask lets query i see
            # column l of x holds distance L - 1 - l; key j lies (L - T + i) - j behind query i
            distance = (length - t + i) - j
            assert torch.equal(shifted[..., i, j], x[..., i, length - 1 - distance])


def test_sinusoids_are_the_papers():
    r = sinusoid_positions(torch.tensor([0, 3, 11]), 8, torch.float64)
    for row, x in enumerate([0, 3, 11]):
        for i in range(4):
            angle = x / 10000 ** (2 * i / 8)
            assert abs(r[row, i].item() - math.sin(angle)) < 1e-12
            assert abs(r[row, 4 + i].item() - math.cos(angle)) < 1e-12


@pytest.mark.parametrize("need_weights", [False, True])
def test_four_term_score_matches_an_explicit_loop(need_weights):
    model = _model()
    memory, x = _x(t=3, seed=5), _x(t=4)
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, 1] = False  # a padded memory position
    result = model(x, memory=memory, key_padding_mask=padding, need_weights=True)
    out, new_memory, weights = result
    dh, m, t = D // H, 3, 4
    context = torch.cat([memory, x], dim=1)
    with torch.no_grad():
        q, k, v = model.q_proj(x), model.k_proj(context), model.v_proj(context)
        u, vb, w_r = model.content_bias, model.position_bias, model.pos_proj.weight
        concat = torch.zeros(2, t, D, dtype=torch.float64)
        for n in range(2):
            for h in range(H):
                cols = slice(h * dh, (h + 1) * dh)
                for i in range(t):
                    scores = torch.full((m + t,), float("-inf"), dtype=torch.float64)
                    for j in range(m + i + 1):  # causal: keys up to the query's own position M + i
                        if not padding[n, j]:
                            continue
                        x_dist = m + i - j
                        r = torch.tensor([math.sin(x_dist / 10000 ** (2 * f / D)) for f in range(D // 2)]
                                         + [math.cos(x_dist / 10000 ** (2 * f / D)) for f in range(D // 2)],
                                         dtype=torch.float64)
                        wr = (w_r @ r)[cols]
                        a = q[n, i, cols] @ k[n, j, cols]
                        b = q[n, i, cols] @ wr
                        c = u[h] @ k[n, j, cols]
                        d = vb[h] @ wr
                        scores[j] = (a + b + c + d) / math.sqrt(dh)
                    attn = torch.softmax(scores, dim=0)
                    assert (weights[n, h, i] - attn).abs().max() < FP64_TOL, (n, h, i)
                    concat[n, i, cols] = attn @ v[n, :, cols]
        expected = model.out_proj(concat)
    got = out if need_weights else model(x, memory=memory, key_padding_mask=padding)[0]
    assert (got - expected).abs().max() < FP64_TOL


@pytest.mark.parametrize("need_weights", [False, True])
def test_no_memory_and_zero_relative_terms_is_causal_torch_multihead_attention(need_weights):
    model = _model(mem_len=0)
    with torch.no_grad():
        model.pos_proj.weight.zero_()
        model.content_bias.zero_()
        model.position_bias.zero_()
    ref = torch_mha_like(model)
    x = _x(t=6)
    expected, expected_w = ref(x, x, x, attn_mask=torch.ones(6, 6, dtype=torch.bool).triu(1),
                               average_attn_weights=False)
    result = model(x, need_weights=need_weights)
    assert (result[0] - expected).abs().max() < FP64_TOL
    assert result[1].shape == (2, 0, D)  # mem_len = 0: an empty memory
    if need_weights:
        assert (result[2] - expected_w).abs().max() < FP64_TOL


def test_two_segments_with_memory_equal_one_pass_over_their_concatenation():
    model = _model(mem_len=4)
    x = _x(t=8)
    whole, _ = model(x)
    first, memory = model(x[:, :4])
    second, _ = model(x[:, 4:], memory=memory)
    assert torch.equal(memory, x[:, :4])
    assert (first - whole[:, :4]).abs().max() < FP64_TOL
    assert (second - whole[:, 4:]).abs().max() < FP64_TOL
    # With a memory shorter than the segment, every query of segment 2 sees the last 2 tokens of segment 1 and
    # segment 2 up to itself: the one-pass result with tokens 0 and 1 masked for those queries.
    short = _model(mem_len=2)
    _, memory = short(x[:, :4])
    second, _ = short(x[:, 4:], memory=memory)
    band = torch.ones(4, 8, dtype=torch.bool)
    band[:, :2] = False  # tokens 0 and 1 fell out of the memory
    one_pass = short(x, mask=torch.cat([torch.ones(4, 8, dtype=torch.bool), band]))[0]
    expected = one_pass[:, 4:]
    assert (second - expected).abs().max() < FP64_TOL


def test_the_memory_is_a_constant_no_gradient_flows_into_the_previous_segment():
    model = _model(mem_len=4)
    x = _x(t=8).requires_grad_()
    _, memory = model(x[:, :4])
    assert not memory.requires_grad
    second, new_memory = model(x[:, 4:], memory=memory)
    second.sum().backward()
    assert (x.grad[:, :4] == 0).all() and (x.grad[:, 4:] != 0).any()
    assert torch.equal(new_memory, x[:, 4:].detach())  # the last mem_len = 4 of [memory; segment]
    # Even a memory that carries a graph (here: the segment's own input tensor) gets no gradient.
    x.grad = None
    model(x[:, 4:], memory=x[:, :4])[0].sum().backward()
    assert (x.grad[:, :4] == 0).all()
    assert model(x[:, :3].detach())[1].shape == (2, 3, D)  # fewer than mem_len positions: keep them all


def test_distinct_from_causal_multi_head_attention():
    model = _model(mem_len=0)
    plain = _model(mem_len=0)
    with torch.no_grad():
        plain.pos_proj.weight.zero_()
        plain.content_bias.zero_()
        plain.position_bias.zero_()
    x = _x(t=6)
    assert (model(x)[0] - plain(x)[0]).abs().max() > 1e-2  # = causal MHA (test above) vs the relative terms
    # ...and each relative term changes it: (b) through W_r, (c) through u, (d) through v (which acts through
    # W_r r, so it is tested on top of W_r).
    def with_params(names):
        only = _model(mem_len=0)
        only.load_state_dict(plain.state_dict())
        with torch.no_grad():
            for name in names:
                only.get_parameter(name).copy_(model.get_parameter(name))
        return only(x)[0]

    assert (with_params(["pos_proj.weight"]) - plain(x)[0]).abs().max() > 1e-3, "(b)"
    assert (with_params(["content_bias"]) - plain(x)[0]).abs().max() > 1e-3, "(c)"
    assert (with_params(["pos_proj.weight", "position_bias"]) - with_params(["pos_proj.weight"])).abs().max() > 1e-3, "(d)"


def test_every_constructor_argument_changes_the_output():
    x = _x(t=8)
    base = _model(mem_len=4)
    _, memory = base(x[:, :4])
    out, _ = base(x[:, 4:], memory=memory)
    shorter = _model(mem_len=2)
    _, memory2 = shorter(x[:, :4])
    assert (shorter(x[:, 4:], memory=memory2)[0] - out).abs().max() > 1e-3, "mem_len"
    two = _model(num_heads=2, mem_len=4)
    state = dict(base.state_dict())
    state["content_bias"] = state["content_bias"].reshape(2, 8)
    state["position_bias"] = state["position_bias"].reshape(2, 8)
    two.load_state_dict(state)
    assert (two(x[:, 4:], memory=memory)[0] - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False, mem_len=4)
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if not n.endswith(".bias")})
    assert (no_bias(x[:, 4:], memory=memory)[0] - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5, mem_len=4).train()
    torch.manual_seed(0)
    assert (dropped(x[:, 4:], memory=memory)[0] - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=8, num_heads=2)(x[..., :8])[0].shape == (2, 8, 8), "d_model"
    with pytest.raises(ValueError, match="mem_len"):
        TransformerXLAttention(D, H, mem_len=-1)
    with pytest.raises(ValueError, match="memory"):
        base(x, memory=x[:1])
