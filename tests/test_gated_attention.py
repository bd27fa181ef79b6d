"""mechanisms/gated_attention.py: the limit cases (gate = 1 is multi-head attention, gate = 0 returns b^O),
the formula written out head by head, distinctness from multi-head attention, and every argument mattering.

The generic checks (bad input, masked rows, key padding, gradcheck, dropout, state dict, bf16, the fused
and explicit paths) are in the conformance suite: tests/conformance/entries/gated_attention.py.
"""
import math

import pytest
import torch

from mechanisms.gated_attention import GatedAttention
from tests.oracles import mha_reference, output_of, random_inputs, random_mask, randomize_, torch_mha_like

FP64_TOL = 1e-10
D, H = 16, 4


def _model(gate="elementwise", d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    # non-zero biases, so that a dropped bias would be noticed
    return randomize_(GatedAttention(d_model, num_heads, gate=gate, **kwargs).double()).eval()


def _inputs(b=2, tq=4, tk=6, seed=1):
    return random_inputs(b, (tq, tk, tk), D, seed=seed)


def _fix_gate(model, logit):
    """W_g = 0 and b_g = logit: sigmoid(+1e4) is exactly 1.0 and sigmoid(-1e4) exactly 0.0 in float64."""
    with torch.no_grad():
        model.gate_proj.weight.zero_()
        model.gate_proj.bias.fill_(logit)


def _formula(model, query, key, value, allowed):
    """The page's equations written out with loops over heads and queries; `allowed` (B, Tq, Tk) bool."""
    b, tq, _ = query.shape
    dh = D // H
    q, k, v = model.q_proj(query), model.k_proj(key), model.v_proj(value)
    logits = model.gate_proj(query)
    concat = torch.zeros(b, tq, D, dtype=query.dtype)
    for n in range(b):
        for h in range(H):
            cols = slice(h * dh, (h + 1) * dh)
            for i in range(tq):
                scores = torch.stack([q[n, i, cols] @ k[n, j, cols] / math.sqrt(dh) for j in range(key.size(1))])
                scores = scores.masked_fill(~allowed[n, i], float("-inf"))
                head = torch.softmax(scores, dim=0) @ v[n, :, cols]
                gate = torch.sigmoid(logits[n, i, cols] if model.gate == "elementwise" else logits[n, i, h])
                concat[n, i, cols] = head * gate
    return model.out_proj(concat)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_gate_fixed_to_one_is_torch_multihead_attention(gate, need_weights):
    model = _model(gate)
    _fix_gate(model, 1e4)
    q, k, v = _inputs()
    assert (model.gate_scores(q) == 1.0).all()
    mask = random_mask((2, H, 4, 6))
    expected, expected_w = mha_reference(model, q, k, v, mask=mask)  # nn.MultiheadAttention, copied weights
    ours = model(q, k, v, mask=mask, need_weights=need_weights)
    assert (output_of(ours) - expected).abs().max() < FP64_TOL
    if need_weights:
        assert (ours[1] - expected_w).abs().max() < FP64_TOL


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_gate_fixed_to_zero_returns_the_output_bias(gate):
    model = _model(gate)
    _fix_gate(model, -1e4)
    q, k, v = _inputs()
    assert torch.equal(model(q, k, v), model.out_proj.bias.expand(2, 4, D))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_matches_the_formula_written_out(gate, need_weights):
    model = _model(gate)
    q, k, v = _inputs(tq=3, tk=5)
    padding = torch.tensor([[True, True, True, True, False], [True, False, True, True, True]])
    causal = torch.tensor([[j <= i + 5 - 3 for j in range(5)] for i in range(3)])  # bottom-right aligned
    expected = _formula(model, q, k, v, causal & padding[:, None, :])
    ours = output_of(model(q, k, v, key_padding_mask=padding, is_causal=True, need_weights=need_weights))
    assert (ours - expected).abs().max() < FP64_TOL


def test_distinct_from_multi_head_attention():
    # The same query, key, value and output weights; the learned gate is what differs.
    for gate in ("elementwise", "headwise"):
        model = _model(gate)
        q, k, v = _inputs()
        expected, _ = torch_mha_like(model)(q, k, v)
        assert (model(q, k, v) - expected).abs().max() > 1e-2, gate


def test_the_gate_reads_the_query_not_the_keys():
    model = _model()
    q, k, v = _inputs()
    _, k2, v2 = _inputs(seed=7)
    assert model.gate_scores(q).shape == (2, H, 4, D // H)
    assert _model("headwise").gate_scores(q).shape == (2, H, 4, 1)
    # Changing keys and values changes the output but not the gate; changing the query changes the gate.
    assert not torch.allclose(model(q, k, v), model(q, k2, v2))
    assert not torch.allclose(model.gate_scores(q), model.gate_scores(q + 1.0))


def test_the_gate_makes_a_constant_value_query_dependent():
    # Qiu et al.'s point: softmax weights sum to 1, so when every value is the same vector, multi-head attention
    # returns that vector for every query whatever the scores. The gate scales it per query, down to zero.
    model = _model()
    with torch.no_grad():
        model.v_proj.weight.zero_()  # every value = b^V
    q, k, v = _inputs()
    plain = torch_mha_like(model)(q, k, v)[0]
    assert (plain - plain[:, :1]).abs().max() < FP64_TOL  # the same output for every query
    gated = model(q, k, v)
    assert (gated - gated[:, :1]).abs().max() > 1e-2  # query-dependent
    with torch.no_grad():
        model.gate_proj.bias[: D // H] = -1e4  # switch head 0 off for every query
        model.gate_proj.weight[: D // H] = 0.0
    heads = model.v_proj.bias.clone()
    heads[: D // H] = 0.0
    gates = torch.sigmoid(model.gate_proj(q))
    expected = model.out_proj(heads * gates)
    assert (model(q, k, v) - expected).abs().max() < FP64_TOL


def test_every_constructor_argument_changes_the_output():
    base = _model()
    q, k, v = _inputs()
    out = base(q, k, v)
    # gate: headwise with the same q/k/v/out weights and, per head, the first row of that head's gate rows.
    headwise = _model("headwise")
    state = {n: p for n, p in base.state_dict().items() if not n.startswith("gate_proj")}
    state["gate_proj.weight"] = base.gate_proj.weight[:: D // H].clone()
    state["gate_proj.bias"] = base.gate_proj.bias[:: D // H].clone()
    headwise.load_state_dict(state)
    assert (headwise(q, k, v) - out).abs().max() > 1e-3, "gate"
    # num_heads: the elementwise model's weights have the same shapes for 2 heads; they are cut differently.
    two = _model(num_heads=2)
    two.load_state_dict(base.state_dict())
    assert (two(q, k, v) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if n.endswith("weight")})
    assert (no_bias(q, k, v) - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5).train()
    dropped.load_state_dict(base.state_dict())
    torch.manual_seed(0)
    assert (dropped(q, k, v) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=8, num_heads=2)(q[..., :8]).shape == (2, 4, 8), "d_model"
    with pytest.raises(ValueError, match="gate"):
        GatedAttention(D, H, gate="sigmoid")
