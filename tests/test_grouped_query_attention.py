"""mechanisms/grouped_query_attention.py against three oracles and the KV-cache formula.

Oracles: (1) with num_kv_heads = num_heads, torch.nn.MultiheadAttention with copied weights; (2) PyTorch's
F.scaled_dot_product_attention(..., enable_gqa=True) on the module's own projections; (3) an explicit
repeat_interleave of each key/value head to the G query heads of its group, then plain attention.
"""
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from mechanisms.grouped_query_attention import GroupedQueryAttention, kv_cache_bytes, kv_cache_table
from tests.oracles import mha_reference, output_of, random_inputs, random_mask, randomize_

FP64_TOL = 1e-10
FP32_TOL = 1e-5
D, H, HKV = 16, 4, 2
PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "mechanisms" / "grouped_query_attention.md"


def _model(d_model=D, num_heads=H, num_kv_heads=HKV, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    # non-zero biases, so that a dropped bias would be noticed
    return randomize_(GroupedQueryAttention(d_model, num_heads, num_kv_heads, **kwargs).to(dtype))


def _inputs(b=2, tq=4, tk=6, dtype=torch.float64, seed=1):
    return random_inputs(b, (tq, tk, tk), D, seed=seed, dtype=dtype)


def _heads(model, query, key, value):
    """The module's projections, split into heads: q (B, H, Tq, Dh), k and v (B, H_kv, Tk, Dh)."""
    split = lambda t, n: t.view(t.size(0), t.size(1), n, model.head_dim).transpose(1, 2)  # noqa: E731
    return (split(model.q_proj(query), model.num_heads), split(model.k_proj(key), model.num_kv_heads),
            split(model.v_proj(value), model.num_kv_heads))


def _finish(model, heads):
    """Concatenate (B, H, Tq, Dh) heads and apply the module's output projection."""
    b, _, tq, _ = heads.shape
    return model.out_proj(heads.transpose(1, 2).reshape(b, tq, model.d_model))


def _repeat_interleave_oracle(model, query, key, value, allowed=None):
    """Copy each key/value head to its G query heads, then the textbook formula; returns (out, weights)."""
    q, k, v = _heads(model, query, key, value)
    group = model.num_heads // model.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, Tk, Dh)
    scores = q @ k.transpose(-2, -1) / math.sqrt(model.head_dim)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return _finish(model, weights @ v), weights


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
def test_with_as_many_kv_heads_as_heads_it_is_torch_multihead_attention(need_weights, dtype, tol):
    model = _model(num_kv_heads=H, dtype=dtype).eval()
    q, k, v = _inputs(dtype=dtype)
    mask = random_mask((2, H, 4, 6))  # every query keeps a key (the oracles give NaN otherwise)
    expected, expected_w = mha_reference(model, q, k, v, mask=mask)
    ours = model(q, k, v, mask=mask, need_weights=need_weights)
    assert (output_of(ours) - expected).abs().max() < tol
    if need_weights:
        assert (ours[1] - expected_w).abs().max() < tol


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_matches_torch_sdpa_with_enable_gqa(need_weights, num_kv_heads):
    model = _model(num_kv_heads=num_kv_heads).eval()
    query, key, value = _inputs()
    mask = random_mask((2, H, 4, 6))
    with torch.no_grad():
        q, k, v = _heads(model, query, key, value)
        expected = _finish(model, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
        ours = output_of(model(query, key, value, mask=mask, need_weights=need_weights))
    assert (ours - expected).abs().max() < FP64_TOL


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("tq,tk", [(5, 5), (2, 6)])
def test_matches_the_repeat_interleave_oracle_with_causal_mask(num_kv_heads, tq, tk):
    model = _model(num_kv_heads=num_kv_heads).eval()
    query, key, value = _inputs(tq=tq, tk=tk)
    allowed = torch.tensor([[j <= i + tk - tq for j in range(tk)] for i in range(tq)])  # bottom-right
    with torch.no_grad():
        expected, expected_w = _repeat_interleave_oracle(model, query, key, value, allowed)
        out, weights = model(query, key, value, is_causal=True, need_weights=True)
        fused = model(query, key, value, is_causal=True)
    assert (out - expected).abs().max() < FP64_TOL
    assert (weights - expected_w).abs().max() < FP64_TOL
    assert (fused - expected).abs().max() < FP64_TOL


def test_multi_query_attention_shares_one_key_and_value_head():
    model = _model(num_kv_heads=1)
    assert model.k_proj.weight.shape == (D // H, D) and model.v_proj.weight.shape == (D // H, D)
    # With one key/value head, two query heads with the same query weights give identical weight rows.
    with torch.no_grad():
        model.q_proj.weight[D // H:2 * D // H] = model.q_proj.weight[:D // H]
        model.q_proj.bias[D // H:2 * D // H] = model.q_proj.bias[:D // H]
    _, weights = model(_inputs()[0], need_weights=True)
    assert torch.allclose(weights[:, 0], weights[:, 1], atol=1e-12)
    assert not torch.allclose(weights[:, 0], weights[:, 2])


def test_distinct_from_the_multi_head_attention_it_was_pooled_from():
    # Ainslie et al. build a GQA checkpoint from an MHA one by mean-pooling the key and value heads of each
    # group. The pooled model is a different function: with the same query and output weights and the pooled
    # key/value weights, its output differs from the original multi-head attention.
    mha = _model(num_kv_heads=H).eval()
    gqa = _model(num_kv_heads=HKV).eval()
    dh, group = D // H, H // HKV
    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(gqa, name).load_state_dict(getattr(mha, name).state_dict())
        for name in ("k_proj", "v_proj"):
            w = getattr(mha, name).weight.view(HKV, group, dh, D).mean(dim=1).reshape(HKV * dh, D)
            b = getattr(mha, name).bias.view(HKV, group, dh).mean(dim=1).reshape(HKV * dh)
            getattr(gqa, name).weight.copy_(w)
            getattr(gqa, name).bias.copy_(b)
    q, k, v = _inputs()
    assert (gqa(q, k, v) - mha(q, k, v)).abs().max() > 1e-3
    # ...whereas copying (not pooling) each kv head to the heads of its group is exact (the MHA limit case).
    expanded = _model(num_kv_heads=H).eval()
    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(expanded, name).load_state_dict(getattr(gqa, name).state_dict())
        for name in ("k_proj", "v_proj"):
            src = getattr(gqa, name)
            getattr(expanded, name).weight.copy_(src.weight.view(HKV, dh, D).repeat_interleave(group, 0).reshape(D, D))
            getattr(expanded, name).bias.copy_(src.bias.view(HKV, dh).repeat_interleave(group, 0).reshape(D))
    assert (expanded(q, k, v) - gqa(q, k, v)).abs().max() < FP64_TOL


def test_kv_cache_ratio_is_the_measured_ratio_of_cached_tensors():
    x = _inputs()[0]
    full = _model(num_kv_heads=H)
    for num_kv_heads in (1, 2, 4):
        model = _model(num_kv_heads=num_kv_heads)
        cached = model.k_proj(x).numel() + model.v_proj(x).numel()  # what a decoder keeps per layer
        assert model.kv_cache_ratio() == num_kv_heads / H
        assert cached / (full.k_proj(x).numel() + full.v_proj(x).numel()) == model.kv_cache_ratio()


def test_kv_cache_bytes_counts_the_bytes_of_real_cached_tensors():
    num_layers, batch, seq_len = 3, 2, 5
    model = _model(num_kv_heads=2, dtype=torch.bfloat16)
    x = torch.randn(batch, seq_len, D, dtype=torch.bfloat16)
    k, v = model.k_proj(x), model.v_proj(x)
    real = num_layers * (k.numel() * k.element_size() + v.numel() * v.element_size())
    assert kv_cache_bytes(num_layers, batch, seq_len, 2, D // H, bytes_per_element=2) == real
    with pytest.raises(ValueError, match="num_kv_heads"):
        kv_cache_bytes(1, 1, 1, 0, 8)


def test_kv_cache_table_follows_the_formula_and_the_page_shows_it():
    page = PAGE.read_text(encoding="utf-8")
    for row in kv_cache_table(seq_len=4096, batch_size=1, bytes_per_element=2):
        assert row["ratio"] == row["num_kv_heads"] / row["num_heads"]
        per_token_layer = 2 * row["num_kv_heads"] * row["head_dim"] * 2  # K and V, 2 bytes each
        assert row["cache_bytes"] == row["num_layers"] * 4096 * per_token_layer
        assert row["mha_cache_bytes"] * row["ratio"] == pytest.approx(row["cache_bytes"])
        line = next((ln for ln in page.splitlines() if ln.startswith(f"| {row['name']} |")), None)
        assert line is not None, f"page table has no row for {row['name']}"
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:5] == [str(row[k]) for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim")]
        assert cells[5] == f"{row['ratio']:.3f}", cells
        assert cells[6] == f"{row['cache_bytes'] / 2**30:.3f}", cells
        assert cells[7] == f"{row['mha_cache_bytes'] / 2**30:.3f}", cells


def test_every_constructor_argument_changes_the_output():
    base = _model().eval()
    q, k, v = _inputs()
    out = base(q, k, v)
    # num_kv_heads: one kv head (the first of base's two) instead of two.
    mqa = _model(num_kv_heads=1).eval()
    state = base.state_dict()
    dh = D // H
    state.update({n: p[:dh] for n, p in state.items() if n.startswith(("k_proj", "v_proj"))})
    mqa.load_state_dict(state)
    assert (mqa(q, k, v) - out).abs().max() > 1e-3, "num_kv_heads"
    # num_heads: 2 query heads and 1 kv head of width 8 have weight matrices of exactly the shapes of base's
    # 4 query heads and 2 kv heads of width 4, so the same weights load; they are cut into heads differently.
    two = _model(num_heads=2, num_kv_heads=1).eval()
    two.load_state_dict(base.state_dict())
    assert (two(q, k, v) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False).eval()
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if n.endswith("weight")})
    assert (no_bias(q, k, v) - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5).train()
    torch.manual_seed(0)
    assert (dropped(q, k, v) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=8, num_heads=2, num_kv_heads=1)(q[..., :8]).shape == (2, 4, 8), "d_model"


@pytest.mark.parametrize("need_weights", [False, True])
def test_key_padding_mask_is_per_batch_element_even_when_batch_equals_tq(need_weights):
    # B == Tq == 2: a (B, Tk) padding mask has the shape of a (Tq, Tk) mask. As `key_padding_mask` row b
    # hides batch element b's padding; as `mask` row i is query i's pattern. Both against the oracle.
    model = _model().eval()
    query, key, value = _inputs(tq=2)
    padding = random_mask((2, 6), seed=5)
    with torch.no_grad():
        per_batch, _ = _repeat_interleave_oracle(model, query, key, value, padding[:, None, None, :])
        per_query, _ = _repeat_interleave_oracle(model, query, key, value, padding)
        ours = output_of(model(query, key, value, key_padding_mask=padding, need_weights=need_weights))
        as_mask = output_of(model(query, key, value, mask=padding, need_weights=need_weights))
    assert (ours - per_batch).abs().max() < FP64_TOL
    assert (as_mask - per_query).abs().max() < FP64_TOL
    assert (per_batch - per_query).abs().max() > 1e-3, "the two readings should differ on this input"
