"""mechanisms/reformer_attention.py against dense shared-QK attention: in the one-bucket limit, and for any
hashing under the union-of-rounds mask that the test rebuilds from the hash by sorting and chunking in Python.
The generic checks are the conformance suite's (tests/conformance/entries/reformer_attention.py).
"""
import math

import pytest
import torch

from mechanisms.reformer_attention import SELF_SCORE, ReformerAttention, lsh_buckets
from tests.oracles import random_inputs, randomize_

TOL = 1e-10
D, H = 8, 2


def _model(num_buckets=4, num_hashes=2, chunk_size=3, seed=0, d_model=D, num_heads=H, init_seed=0, **kwargs):
    torch.manual_seed(init_seed)
    model = ReformerAttention(d_model, num_heads, num_buckets, num_hashes, chunk_size, seed, **kwargs).double()
    return randomize_(model, biases_only=True).eval()


def _x(b=2, t=10, seed=1, d=D):
    return random_inputs(b, t, d, seed=seed)


def _heads(model, x):
    b, t, _ = x.shape
    q = (x @ model.qk_proj.weight.T + model.qk_proj.bias).view(b, t, H, D // H).transpose(1, 2)
    v = (x @ model.v_proj.weight.T + model.v_proj.bias).view(b, t, H, D // H).transpose(1, 2)
    return q, q / q.norm(dim=-1, keepdim=True), v


def _dense(model, x, allowed):
    """Shared-QK softmax attention under `allowed` (B, H, T, T) with the self-token rule; rows with no key: 0."""
    q, k, v = _heads(model, x)
    t = x.size(1)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(D // H)).masked_fill(torch.eye(t, dtype=torch.bool), SELF_SCORE)
    weights = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
    out = (weights @ v).transpose(1, 2).reshape(x.size(0), t, D)
    return out @ model.out_proj.weight.T + model.out_proj.bias, weights


def _union_mask(model, x, kpm, causal):
    """Pairs some round scores: same bucket and key chunk = query chunk or the one before, in the order sorted by
    (bucket, position), padding last; the hash written as argmax([kR; -kR]) token by token."""
    _, k, _ = _heads(model, x)
    b, t = kpm.shape
    rot = model.rotations().double()  # (Dh, R, nb/2)
    allowed = torch.zeros(b, H, t, t, dtype=torch.bool)
    for n in range(b):
        for h in range(H):
            for r in range(model.num_hashes):
                bucket = []
                for i in range(t):
                    if not kpm[n, i]:
                        bucket.append(model.num_buckets)
                    elif rot.size(-1) == 0:
                        bucket.append(0)
                    else:
                        proj = k[n, h, i] @ rot[:, r]
                        bucket.append(int(torch.cat([proj, -proj]).argmax()))
                order = sorted(range(t), key=lambda i: (bucket[i], i))
                chunk = {pos: slot // model.chunk_size for slot, pos in enumerate(order)}
                for i in range(t):
                    for j in range(t):
                        if bucket[i] == bucket[j] and chunk[i] - chunk[j] in (0, 1) and kpm[n, j]:
                            allowed[n, h, i, j] |= (j <= i or not causal)
    return allowed


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_hashes", [1, 3])
def test_one_bucket_and_one_chunk_is_full_shared_qk_attention(causal, num_hashes):
    t = 9
    model = _model(num_buckets=1, num_hashes=num_hashes, chunk_size=t)
    x = _x(t=t)
    kpm = torch.ones(2, t, dtype=torch.bool)
    kpm[1, [0, 5]] = False
    allowed = kpm[:, None, None, :].expand(2, H, t, t)
    if causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool).tril()
    expected, expected_w = _dense(model, x, allowed)
    with torch.no_grad():
        out, weights = model(x, key_padding_mask=kpm, is_causal=causal, need_weights=True)
        real = kpm[:, :, None]  # a padded token is sorted into a bucket of its own: its row is not compared
        assert ((out - expected) * real).abs().max() < TOL
        assert ((weights - expected_w) * real[:, None]).abs().max() < TOL
        assert ((model(x, key_padding_mask=kpm, is_causal=causal) - expected) * real).abs().max() < TOL


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_buckets,num_hashes,chunk_size,t", [(2, 1, 2, 7), (4, 2, 3, 10), (4, 3, 2, 9),
                                                                  (6, 2, 4, 11)])
def test_equals_dense_attention_over_the_union_of_the_rounds(causal, num_buckets, num_hashes, chunk_size, t):
    model = _model(num_buckets, num_hashes, chunk_size)
    x = _x(t=t)
    kpm = torch.ones(2, t, dtype=torch.bool)
    kpm[1, [1, t - 2]] = False
    expected, expected_w = _dense(model, x, _union_mask(model, x, kpm, causal))
    with torch.no_grad():
        out, weights = model(x, key_padding_mask=kpm, is_causal=causal, need_weights=True)
        real = kpm[:, :, None]  # padded rows: no defined value to compare (the suite checks they are finite)
        assert ((out - expected) * real).abs().max() < TOL
        assert ((weights - expected_w) * real[:, None]).abs().max() < TOL


def test_lsh_buckets_is_the_angular_hash_and_similar_vectors_collide_more():
    g = torch.Generator().manual_seed(0)
    rot = torch.randn(8, 5, 4, generator=g)
    x = torch.randn(3, 6, 8, generator=g)
    buckets = lsh_buckets(x, rot)
    assert buckets.shape == (3, 5, 6)
    for r in range(5):
        proj = x @ rot[:, r]
        assert torch.equal(buckets[:, r], torch.cat([proj, -proj], dim=-1).argmax(-1))
    # angular LSH: a small rotation of a vector keeps its bucket far more often than an unrelated vector
    base = torch.randn(2000, 8, generator=g)
    near = base + 0.1 * torch.randn(2000, 8, generator=g)
    far = torch.randn(2000, 8, generator=g)
    rot = torch.randn(8, 1, 4, generator=g)
    same = lambda a, b: (lsh_buckets(a[None], rot) == lsh_buckets(b[None], rot)).double().mean()  # noqa: E731
    assert same(base, near) > 0.8 > 0.3 > same(base, far)


def test_agreement_with_full_attention_rises_with_hash_rounds():
    t = 24
    x = _x(t=t)
    full_model = _model(num_buckets=1, num_hashes=1, chunk_size=t)
    errors = {}
    with torch.no_grad():
        full = full_model(x)
        for rounds in (1, 2, 4, 8):
            errors[rounds] = 0.0
            for seed in range(3):
                model = _model(num_buckets=6, num_hashes=rounds, chunk_size=3, seed=seed)
                errors[rounds] += (model(x) - full).abs().mean().item()
    assert errors[1] > errors[2] > errors[4] > errors[8], errors


def test_mask_and_bad_arguments_are_refused():
    model = _model()
    x = _x(t=5)
    with pytest.raises(ValueError, match="mask is not supported"):
        model(x, mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_buckets"):
        ReformerAttention(D, H, num_buckets=3)
    with pytest.raises(ValueError, match="chunk_size"):
        ReformerAttention(D, H, chunk_size=0)


def test_every_constructor_argument_changes_the_output():
    x = _x(t=12)
    base = _model(num_buckets=4, num_hashes=2, chunk_size=3, seed=0)
    out = base(x)
    state = base.state_dict()

    def same_weights(**kwargs):
        model = _model(**kwargs)
        model.load_state_dict(state)
        return model(x)

    for name, value in (("num_buckets", 2), ("num_hashes", 1), ("chunk_size", 2), ("seed", 1), ("num_heads", 4)):
        assert (same_weights(**{name: value}) - out).abs().max() > 1e-3, name
    no_bias = _model(bias=False)
    no_bias.load_state_dict({k: v for k, v in state.items() if k.endswith("weight")})
    assert (no_bias(x) - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5).train()
    dropped.load_state_dict(state)
    assert (dropped(x) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=4, num_heads=2)(x[..., :4]).shape == (2, 12, 4), "d_model"
