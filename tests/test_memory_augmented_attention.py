"""mechanisms/memory_augmented_attention.py: persistent slots and the kNN memory against explicit formulas.

Oracles: without memory, torch.nn.MultiheadAttention with copied weights; persistent slots, the softmax of
eq. (2) over the slots concatenated in front of the keys, written out here from the module's projections;
the kNN lookup, a Python sort of all memory scores; the memory branch, a softmax over the brute-force top-k.
The gate at 1 and 0 gives each branch alone, and per head.
"""
import math

import pytest
import torch

from mechanisms.memory_augmented_attention import MemoryAugmentedAttention, knn_lookup
from tests.oracles import mha_reference, output_of, random_inputs, random_mask, randomize_

FP64_TOL = 1e-10
D, H, B, TQ, TK, M = 16, 2, 2, 4, 6, 9
DH = D // H


def _model(dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"d_model": D, "num_heads": H, **kwargs}
    # non-zero biases, so that a dropped bias would be noticed
    return randomize_(MemoryAugmentedAttention(**kwargs).to(dtype).eval(), biases_only=True)


def _inputs(seed=1, tq=TQ, tk=TK):
    return random_inputs(B, (tq, tk, tk), D, seed=seed)


def _memory(seed=2, size=M):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, size, DH, generator=g, dtype=torch.float64),
            torch.randn(B, H, size, DH, generator=g, dtype=torch.float64))


def _split(model, x, proj):
    return proj(x).view(x.size(0), x.size(1), H, DH).transpose(1, 2)  # (B, H, T, Dh)


def _finish(model, heads):
    return model.out_proj(heads.transpose(1, 2).reshape(heads.size(0), heads.size(2), D))


def _softmax_attention(q, k, v, allowed=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(DH)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights


def _local_heads(model, query, key, value, allowed=None):
    """Eq. (2) written out: softmax over the persistent slots, then the keys (mask True on the slots)."""
    q, k, v = _split(model, query, model.q_proj), _split(model, key, model.k_proj), _split(model, value, model.v_proj)
    if model.num_persistent:
        k = torch.cat([model.persistent_key.expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([model.persistent_value.expand(B, -1, -1, -1), v], dim=2)
        if allowed is not None:
            allowed = torch.cat([torch.ones(*allowed.shape[:-1], model.num_persistent, dtype=torch.bool),
                                 allowed], dim=-1)
    return _softmax_attention(q, k, v, allowed)


def _memory_heads(model, query, memory, top_k):
    """The kNN branch written out: brute-force top-k by sorting, then a softmax over those k."""
    q = _split(model, query, model.q_proj)
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(q.size(2)):
                scores = [(float(q[b, h, i] @ memory[0][b, h, j]) / math.sqrt(DH), j) for j in range(memory[0].size(2))]
                best = sorted(scores, reverse=True)[:top_k]
                w = torch.softmax(torch.tensor([s for s, _ in best], dtype=torch.float64), dim=0)
                out[b, h, i] = sum(wj * memory[1][b, h, j] for wj, (_, j) in zip(w, best))
    return out


@pytest.mark.parametrize("need_weights", [False, True])
def test_without_memory_it_is_torch_multihead_attention(need_weights):
    model = _model(num_persistent=0)
    q, k, v = _inputs()
    mask = random_mask((B, H, TQ, TK), seed=3)
    expected, expected_w = mha_reference(model, q, k, v, mask=mask)  # nn.MultiheadAttention, copied weights
    with torch.no_grad():
        ours = model(q, k, v, mask=mask, need_weights=need_weights)
    assert (output_of(ours) - expected).abs().max() < FP64_TOL
    if need_weights:
        assert (ours[1] - expected_w).abs().max() < FP64_TOL


@pytest.mark.parametrize("need_weights", [False, True])
def test_persistent_slots_are_softmax_over_learned_keys_in_front_of_the_context(need_weights):
    model = _model(num_persistent=3)
    q, k, v = _inputs()
    allowed = torch.ones(TQ, TK, dtype=torch.bool).tril(TK - TQ)  # bottom-right causal
    kpm = torch.ones(B, TK, dtype=torch.bool)
    kpm[1, 0] = False
    allowed = allowed & kpm[:, None, None, :]
    with torch.no_grad():
        heads, weights = _local_heads(model, q, k, v, allowed)
        expected = _finish(model, heads)
        ours = model(q, k, v, key_padding_mask=kpm, is_causal=True, need_weights=need_weights)
    out = ours[0] if need_weights else ours
    assert (out - expected).abs().max() < FP64_TOL
    if need_weights:
        assert ours[1].shape == (B, H, TQ, 3 + TK)
        assert (ours[1] - weights).abs().max() < FP64_TOL
        assert (ours[1][..., :3] > 0).all()  # every query sees every slot


def test_persistent_slots_are_seen_even_when_every_key_is_masked():
    model = _model(num_persistent=3)
    q, k, v = _inputs()
    kpm = torch.zeros(B, TK, dtype=torch.bool)  # no real key at all
    with torch.no_grad():
        out = model(q, k, v, key_padding_mask=kpm)
        slots_only, _ = _softmax_attention(_split(model, q, model.q_proj), model.persistent_key.expand(B, -1, -1, -1),
                                           model.persistent_value.expand(B, -1, -1, -1))
    assert torch.isfinite(out).all()
    assert (out - _finish(model, slots_only)).abs().max() < FP64_TOL


def test_knn_lookup_equals_brute_force_top_k():
    mem_k, mem_v = _memory()
    q = torch.randn(B, H, TQ, DH, dtype=torch.float64)
    scores, values, indices = knn_lookup(q, mem_k, mem_v, top_k=4)
    assert scores.shape == (B, H, TQ, 4) and values.shape == (B, H, TQ, 4, DH)
    for b in range(B):
        for h in range(H):
            for i in range(TQ):
                ranked = sorted(range(M), key=lambda j: -float(q[b, h, i] @ mem_k[b, h, j]))[:4]
                assert indices[b, h, i].tolist() == ranked
                for slot, j in enumerate(ranked):
                    assert abs(scores[b, h, i, slot] - q[b, h, i] @ mem_k[b, h, j] / math.sqrt(DH)) < FP64_TOL
                    assert torch.equal(values[b, h, i, slot], mem_v[b, h, j])
    assert knn_lookup(q, mem_k, mem_v, top_k=100)[0].shape[-1] == M  # k is capped at the memory size


@pytest.mark.parametrize("top_k", [3, M])
def test_gate_at_one_and_zero_gives_each_branch_alone(top_k):
    model = _model(num_persistent=2, top_k=top_k)
    q, k, v = _inputs()
    memory = _memory()
    with torch.no_grad():
        local_only = model(q, k, v)  # no memory: the local branch
        memory_only = _finish(model, _memory_heads(model, q, memory, top_k))
        if top_k == M:  # retrieving everything is plain attention over the whole memory
            full, _ = _softmax_attention(_split(model, q, model.q_proj), *memory)
            assert (memory_only - _finish(model, full)).abs().max() < FP64_TOL
        model.gate.fill_(float("inf"))  # sigmoid = 1: memory only
        assert (model(q, k, v, memory=memory) - memory_only).abs().max() < FP64_TOL
        model.gate.fill_(float("-inf"))  # sigmoid = 0: local only, the memory has no influence
        assert (model(q, k, v, memory=memory) - local_only).abs().max() < FP64_TOL
        model.gate.copy_(torch.tensor([0.3, -1.2], dtype=torch.float64))  # in between, per head, eq. (5)
        g = torch.sigmoid(model.gate).view(1, H, 1, 1)
        mixed = g * _memory_heads(model, q, memory, top_k) + (1 - g) * _local_heads(model, q, k, v)[0]
        assert (model(q, k, v, memory=memory) - _finish(model, mixed)).abs().max() < FP64_TOL


def test_memory_entries_let_a_segment_read_the_previous_one():
    # Segment 1's keys and values, stored by memory_entries, are what segment 2 retrieves from: with the
    # gate at 1 and top_k >= M, segment 2 attends over segment 1 exactly as cross-attention would.
    model = _model(top_k=TK)
    seg1, seg2, _ = _inputs(tq=TQ, tk=TK)
    memory = model.memory_entries(seg2)
    assert all(t.shape == (B, H, TK, DH) and not t.requires_grad for t in memory)
    with torch.no_grad():
        model.gate.fill_(float("inf"))
        out = model(seg1, memory=memory)
        cross, _ = _softmax_attention(_split(model, seg1, model.q_proj), _split(model, seg2, model.k_proj),
                                      _split(model, seg2, model.v_proj))
    assert (out - _finish(model, cross)).abs().max() < FP64_TOL


def test_distinct_from_multi_head_attention():
    plain, slots = _model(num_persistent=0), _model(num_persistent=3)
    q, k, v = _inputs()
    slots.load_state_dict({**plain.state_dict(), "persistent_key": slots.persistent_key,
                           "persistent_value": slots.persistent_value})
    with torch.no_grad():
        assert (slots(q, k, v) - plain(q, k, v)).abs().max() > 1e-3
        assert (plain(q, k, v, memory=_memory()) - plain(q, k, v)).abs().max() > 1e-3


def test_every_constructor_argument_changes_the_output():
    base = _model(num_persistent=2, top_k=3)
    q, k, v = _inputs()
    memory = _memory()
    with torch.no_grad():
        out = base(q, k, v, memory=memory)

        def variant(**kwargs):
            model = _model(**{"num_persistent": 2, "top_k": 3, **kwargs})
            model.load_state_dict(base.state_dict(), strict=False)
            return model(q, k, v, memory=memory)

        assert (variant(top_k=5) - out).abs().max() > 1e-3, "top_k"
        assert (variant(num_persistent=0) - out).abs().max() > 1e-3, "num_persistent"
        no_bias = _model(num_persistent=2, top_k=3, bias=False)
        no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if not n.endswith("bias")})
        assert (no_bias(q, k, v, memory=memory) - out).abs().max() > 1e-3, "bias"
        one_head = _model(num_heads=1, num_persistent=2, top_k=3)
        state = {n: p for n, p in base.state_dict().items() if not n.startswith(("persistent", "gate"))}
        one_head.load_state_dict(state, strict=False)  # same projections, cut into one head of width 16
        assert (one_head(q, k, v) - base(q, k, v)).abs().max() > 1e-3, "num_heads"
        assert _model(d_model=8, num_heads=2)(q[..., :8]).shape == (B, TQ, 8), "d_model"
    dropped = _model(num_persistent=2, top_k=3, dropout=0.5)
    dropped.load_state_dict(base.state_dict())
    torch.manual_seed(0)
    assert (dropped.train()(q, k, v, memory=memory) - out).abs().max() > 1e-3, "dropout"


def test_bad_memory_and_constructor_arguments_name_the_argument():
    model = _model()
    q = _inputs()[0]
    with pytest.raises(ValueError, match="memory"):
        model(q, memory=(torch.zeros(B, H, 3, DH + 1), torch.zeros(B, H, 3, DH + 1)))
    with pytest.raises(ValueError, match="memory"):
        model(q, memory=(torch.zeros(B, H, 3, DH), torch.zeros(B, H, 4, DH)))
    with pytest.raises(ValueError, match="num_persistent"):
        MemoryAugmentedAttention(D, H, num_persistent=-1)
    with pytest.raises(ValueError, match="top_k"):
        MemoryAugmentedAttention(D, H, top_k=0)
