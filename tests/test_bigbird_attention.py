"""mechanisms/bigbird_attention.py against dense attention with its block mask, and full attention in the limit.

The oracle expands the module's block layout (whose properties are checked separately, against the paper's
definition) to a (T, T) token mask in the test and runs plain softmax attention. The generic checks are the
conformance suite's (tests/conformance/entries/bigbird_attention.py).
"""
import math

import pytest
import torch

from mechanisms.bigbird_attention import BigBirdAttention, bigbird_block_layout
from tests.oracles import load_matching_, mha_reference, random_inputs, randomize_

TOL = 1e-10
D, H = 8, 2


def _model(block_size=2, num_window_blocks=3, num_global_blocks=1, num_random_blocks=1, seed=0, d_model=D,
           num_heads=H, init_seed=0, **kwargs):
    torch.manual_seed(init_seed)
    model = BigBirdAttention(d_model, num_heads, block_size, num_window_blocks, num_global_blocks, num_random_blocks,
                             seed, **kwargs).double()
    return randomize_(model).eval()


def _x(b=2, t=11, seed=1):
    return random_inputs(b, t, D, seed=seed)


def _dense(model, x, allowed):
    b, t, _ = x.shape
    lin = lambda layer: (x @ layer.weight.T + layer.bias).view(b, t, H, D // H).transpose(1, 2)  # noqa: E731
    q, k, v = lin(model.q_proj), lin(model.k_proj), lin(model.v_proj)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(D // H)).masked_fill(~allowed, -math.inf)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: zero
    heads = (weights @ v).transpose(1, 2).reshape(b, t, D)
    return heads @ model.out_proj.weight.T + model.out_proj.bias, weights


def _token_mask(layout, t, block, kpm, causal):
    """M_ij = L[i // b, j // b] and real_j (and j <= i), written out per pair."""
    m = torch.zeros(kpm.size(0), 1, t, t, dtype=torch.bool)
    for n in range(kpm.size(0)):
        for i in range(t):
            for j in range(t):
                m[n, 0, i, j] = bool(layout[i // block, j // block]) and bool(kpm[n, j]) and (j <= i or not causal)
    return m


CONFIGS = [  # (block_size, num_window_blocks, num_global_blocks, num_random_blocks, T)
    (1, 3, 1, 1, 7), (2, 3, 1, 1, 11), (2, 1, 0, 2, 12), (3, 3, 2, 1, 12), (3, 5, 1, 2, 13), (2, 3, 0, 0, 9),
    (4, 1, 1, 1, 9),
]


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block,window,glob,rand,t", CONFIGS)
def test_equals_dense_attention_with_the_block_mask(need_weights, causal, block, window, glob, rand, t):
    model = _model(block, window, glob, rand)
    x = _x(t=t)
    kpm = torch.ones(2, t, dtype=torch.bool)
    kpm[1, [1, t - 1]] = False  # padded keys, in a global block and in the last block
    layout, _ = model.layout(t)
    expected, expected_w = _dense(model, x, _token_mask(layout, t, block, kpm, causal))
    with torch.no_grad():
        result = model(x, key_padding_mask=kpm, is_causal=causal, need_weights=need_weights)
    out = result[0] if need_weights else result
    assert (out - expected).abs().max() < TOL
    if need_weights:
        assert (result[1] - expected_w).abs().max() < TOL


@pytest.mark.parametrize("n,window,glob,rand", [(8, 3, 1, 2), (10, 3, 2, 3), (6, 5, 0, 1), (12, 1, 1, 1), (4, 3, 1, 5)])
def test_the_block_layout_is_window_plus_global_plus_random(n, window, glob, rand):
    layout, random = bigbird_block_layout(n, window, glob, rand, seed=3)
    w = (window - 1) // 2
    for c in range(n):
        for c2 in range(n):
            fixed = abs(c - c2) <= w or c < glob or c2 < glob
            if fixed:
                assert layout[c, c2], (c, c2)  # window and global blocks are always there
        if c < glob:
            assert layout[c].all()  # a global block attends to everything
            continue
        extra = [c2 for c2 in range(n) if layout[c, c2] and not (abs(c - c2) <= w or c2 < glob)]
        candidates = sum(1 for c2 in range(n) if not (abs(c - c2) <= w or c2 < glob))
        assert len(extra) == min(rand, candidates), (c, extra)  # exactly r random blocks, outside window/global
        assert sorted(extra) == sorted(r for r in random[c].tolist() if r >= 0)
    assert layout[:, :glob].all()  # every block attends to the global blocks
    same, _ = bigbird_block_layout(n, window, glob, rand, seed=3)
    assert torch.equal(layout, same)  # a fixed function of the seed


def test_the_seed_changes_the_random_blocks():
    layouts = {tuple(bigbird_block_layout(16, 3, 1, 2, seed=s)[0].flatten().tolist()) for s in range(4)}
    assert len(layouts) > 1


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_over_all_blocks_without_random_blocks_is_full_attention(causal):
    t, block = 9, 2  # 5 blocks: a window of 9 blocks covers them all from any block
    model = _model(block, num_window_blocks=9, num_global_blocks=0, num_random_blocks=0)
    with torch.no_grad():
        x = _x(t=t)
        expected = mha_reference(model, x, is_causal=causal)[0]  # nn.MultiheadAttention, copied weights
        assert (model(x, is_causal=causal) - expected).abs().max() < TOL
        # distinct: the default sparse layout (window 3, 1 global, 1 random block) is not full attention
        sparse = _model(block)
        assert (sparse(x, is_causal=causal) - expected).abs().max() > 1e-3


def test_a_dense_mask_is_refused_and_bad_arguments_too():
    model = _model()
    x = _x(t=6)
    with pytest.raises(ValueError, match="mask is not supported"):
        model(x, mask=torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_window_blocks"):
        BigBirdAttention(D, H, 2, num_window_blocks=2)
    with pytest.raises(ValueError, match="num_random_blocks"):
        BigBirdAttention(D, H, 2, num_random_blocks=-1)
    with pytest.raises(ValueError, match="block_size"):
        BigBirdAttention(D, H, 0)


def test_every_constructor_argument_changes_the_output():
    x = _x(t=16)
    base = _model(block_size=2, num_window_blocks=3, num_global_blocks=1, num_random_blocks=1, seed=0)
    out = base(x)
    state = base.state_dict()

    def same_weights(**kwargs):  # a model built with other arguments, holding the base's tensors
        return load_matching_(_model(**kwargs), state)(x)

    for name, value in (("block_size", 3), ("num_window_blocks", 5), ("num_global_blocks", 2),
                        ("num_random_blocks", 2), ("seed", 1), ("num_heads", 4), ("bias", False)):
        assert (same_weights(**{name: value}) - out).abs().max() > 1e-3, name
    dropped = _model(dropout=0.5).train()
    dropped.load_state_dict(state)
    assert (dropped(x) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=4, num_heads=2)(x[..., :4]).shape == (2, 16, 4), "d_model"
