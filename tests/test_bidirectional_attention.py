"""mechanisms/bidirectional_attention.py: BERT's self-attention and corruption, XLNet's two streams.

Oracles: transformers' BertSelfAttention (skipped when requirements-test.txt is not installed) and
torch.nn.MultiheadAttention with copied weights; the 80/10/10 rule by counting 400k draws; an explicit
per-query loop over XLNet's two masks for a random factorization order.
"""
import math

import pytest
import torch

from mechanisms.bidirectional_attention import BidirectionalSelfAttention, TwoStreamAttention, bert_mlm_corruption
from tests.oracles import random_inputs, randomize_, torch_mha_like

D, H, T = 8, 2, 6
TOL = 1e-10


def _init(model, seed=0):
    torch.manual_seed(seed)
    # non-zero biases, so that a dropped bias would be noticed
    return randomize_(model.double().eval())


def _x(b=2, t=T, seed=1):
    return random_inputs(b, t, D, seed=seed)


# ----------------------------------------------------------------------------------------- BERT


@pytest.mark.parametrize("need_weights", [False, True])
def test_bidirectional_equals_transformers_bert_self_attention(need_weights):
    bert = pytest.importorskip("transformers.models.bert.modeling_bert",
                               reason="transformers is not installed (pip install -r requirements-test.txt)")
    config = bert.BertConfig(hidden_size=D, num_attention_heads=H, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    ref = bert.BertSelfAttention(config).double().eval()
    model = _init(BidirectionalSelfAttention(D, H))
    with torch.no_grad():
        for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            getattr(ref, theirs).load_state_dict(getattr(model, ours).state_dict())
    x = _x()
    real = torch.ones(2, T, dtype=torch.bool)
    real[1, 4:] = False  # BERT's attention_mask: the second sentence is padded
    additive = torch.zeros(2, 1, 1, T, dtype=torch.float64).masked_fill(~real[:, None, None, :],
                                                                         torch.finfo(torch.float64).min)
    with torch.no_grad():
        context, probs = ref(x, attention_mask=additive)[:2]
        expected = model.out_proj(context)  # BertSelfOutput's dense layer, before its residual and LayerNorm
        result = model(x, key_padding_mask=real, need_weights=need_weights)
    out = result[0] if need_weights else result
    assert (out - expected).abs().max() < TOL
    if need_weights:
        assert (result[1] - probs).abs().max() < TOL


@pytest.mark.parametrize("causal", [False, True])
def test_bidirectional_is_torch_multihead_attention_and_causal_with_is_causal(causal):
    model = _init(BidirectionalSelfAttention(D, H))
    x = _x()
    future = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None
    with torch.no_grad():
        expected = torch_mha_like(model)(x, x, x, attn_mask=future)[0]
        assert (model(x, is_causal=causal) - expected).abs().max() < TOL
        assert (model(x, is_causal=causal, need_weights=True)[0] - expected).abs().max() < TOL


def test_every_token_reads_the_tokens_after_it_unlike_causal_attention():
    model = _init(BidirectionalSelfAttention(D, H))
    x = _x().requires_grad_()
    jacobian = torch.zeros(T, T, dtype=torch.float64)  # [i, j] = |d out_i / d x_j|
    for causal in (False, True):
        for i in range(T):
            (grad,) = torch.autograd.grad(model(x, is_causal=causal)[0, i].sum(), x)
            jacobian[i] = grad[0].abs().sum(-1)
        later = jacobian.triu(1)
        if causal:
            assert later.abs().max() == 0  # decoder: nothing after i
        else:
            assert later[torch.ones(T, T, dtype=torch.bool).triu(1)].min() > 0  # encoder: every j > i reaches i


def test_every_constructor_argument_changes_the_output():
    base = _init(BidirectionalSelfAttention(D, H))
    x = _x()
    with torch.no_grad():
        out = base(x)
        four = _init(BidirectionalSelfAttention(D, 4))
        four.load_state_dict(base.state_dict())
        assert (four(x) - out).abs().max() > 1e-3, "num_heads"
        no_bias = _init(BidirectionalSelfAttention(D, H, bias=False))
        no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if n.endswith("weight")})
        assert (no_bias(x) - out).abs().max() > 1e-3, "bias"
    dropped = _init(BidirectionalSelfAttention(D, H, dropout=0.5)).train()
    dropped.load_state_dict(base.state_dict())
    assert (dropped(x) - out).abs().max() > 1e-3, "dropout"
    assert BidirectionalSelfAttention(4, 2)(torch.randn(1, 3, 4)).shape == (1, 3, 4), "d_model"


# ----------------------------------------------------------------------------------------- corruption


def test_corruption_frequencies_are_80_10_10_within_standard_error():
    vocab, mask_id = 1000, 3
    ids = torch.randint(10, vocab, (400, 1000), generator=torch.Generator().manual_seed(0))
    corrupted, labels = bert_mlm_corruption(ids, vocab, mask_id, generator=torch.Generator().manual_seed(1))
    selected = labels != -100
    n, n_sel = ids.numel(), selected.sum().item()

    def within(count, total, p):  # |observed - expected| below 5 binomial standard errors
        return abs(count / total - p) < 5 * math.sqrt(p * (1 - p) / total)

    assert within(n_sel, n, 0.15)
    masked = corrupted[selected] == mask_id
    unchanged = corrupted[selected] == ids[selected]
    replaced = ~masked & ~unchanged
    # a random draw hits the original token with probability 1 / vocab: it counts as "unchanged"
    assert within(masked.sum().item(), n_sel, 0.8)
    assert within(replaced.sum().item(), n_sel, 0.1 * (1 - 1 / vocab))
    assert within(unchanged.sum().item(), n_sel, 0.1 + 0.1 / vocab)
    # the random replacements are uniform over the vocabulary: mean id (vocab - 1) / 2, std vocab / sqrt(12)
    random_ids = corrupted[selected][replaced].double()
    assert abs(random_ids.mean() - (vocab - 1) / 2) < 5 * vocab / math.sqrt(12 * random_ids.numel())
    # labels: the original id where selected, -100 elsewhere; unselected tokens are untouched
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(corrupted[~selected], ids[~selected])


def test_corruption_arguments_matter_and_special_tokens_are_never_selected():
    ids = torch.randint(10, 50, (50, 200), generator=torch.Generator().manual_seed(0))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -5:] = True  # [CLS] and padding
    corrupted, labels = bert_mlm_corruption(ids, 50, 3, mask_prob=0.5, special_tokens_mask=special,
                                            generator=torch.Generator().manual_seed(1))
    assert (labels[special] == -100).all() and torch.equal(corrupted[special], ids[special])
    assert abs((labels[~special] != -100).double().mean() - 0.5) < 0.02, "mask_prob"
    corrupted2, _ = bert_mlm_corruption(ids, 50, 7, mask_prob=0.5, special_tokens_mask=special,
                                        generator=torch.Generator().manual_seed(1))
    differ = corrupted2 != corrupted  # the same draws: only the [MASK] id differs
    assert differ.sum() > 1000 and (corrupted2[differ] == 7).all() and (corrupted[differ] == 3).all(), "mask_token_id"
    small, _ = bert_mlm_corruption(ids, 11, 3, mask_prob=1.0, generator=torch.Generator().manual_seed(2))
    assert small.max() < 50 and small[small != ids].max() <= 10, "vocab_size bounds the random tokens"
    with pytest.raises(ValueError, match="mask_token_id"):
        bert_mlm_corruption(ids, 50, 50)
    with pytest.raises(ValueError, match="mask_prob"):
        bert_mlm_corruption(ids, 50, 3, mask_prob=1.5)
    with pytest.raises(TypeError, match="input_ids"):
        bert_mlm_corruption(ids.float(), 50, 3)


# ----------------------------------------------------------------------------------------- XLNet


def _two_stream_loop(model, h, g, order):
    """Eq. (4)-(5) one (batch, head, position) at a time, with the ranks read off the order."""
    b, t, _ = h.shape
    dh, heads = model.head_dim, model.num_heads
    split = lambda y: y.view(b, t, heads, dh)  # noqa: E731
    qh, qg, k, v = split(model.q_proj(h)), split(model.q_proj(g)), split(model.k_proj(h)), split(model.v_proj(h))
    outs = []
    for q, strict in ((qh, False), (qg, True)):
        out = torch.zeros(b, t, heads, dh, dtype=h.dtype)
        for n in range(b):
            rank = {order[n, r].item(): r for r in range(t)}
            for i in range(t):
                keys = [j for j in range(t) if (rank[j] < rank[i] if strict else rank[j] <= rank[i])]
                if not keys:
                    continue
                for hd in range(heads):
                    s = torch.stack([q[n, i, hd] @ k[n, j, hd] for j in keys]) / math.sqrt(dh)
                    w = torch.softmax(s, 0)
                    out[n, i, hd] = sum(w[r] * v[n, j, hd] for r, j in enumerate(keys))
        outs.append(model.out_proj(out.reshape(b, t, heads * dh)))
    return outs


def test_two_stream_equals_the_explicit_loop_for_random_orders():
    model = _init(TwoStreamAttention(D, H))
    h, g = _x(), _x(seed=2)
    order = torch.stack([torch.randperm(T, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    with torch.no_grad():
        expected_h, expected_g = _two_stream_loop(model, h, g, order)
        for need_weights in (False, True):
            result = model(h, g, order=order, need_weights=need_weights)
            out_h, out_g = result[0] if need_weights else result
            assert (out_h - expected_h).abs().max() < TOL and (out_g - expected_g).abs().max() < TOL


def test_left_to_right_content_stream_is_causal_multihead_attention():
    model = _init(TwoStreamAttention(D, H))
    x = _x()
    with torch.no_grad():
        expected = torch_mha_like(model)(x, x, x, attn_mask=torch.ones(T, T, dtype=torch.bool).triu(1))[0]
        content, query = model(x)
    assert (content - expected).abs().max() < TOL
    assert (query - expected).abs().max() > 1e-2  # distinct: the query stream reads no content of its own


def test_query_stream_never_sees_its_own_content_and_sees_every_earlier_token():
    model = _init(TwoStreamAttention(D, H))
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    h = _x(b=1).requires_grad_()
    for step in range(T):
        target = order[step].item()
        (grad_h,) = torch.autograd.grad(model(h, order=order)[1][0, target].sum(), h)
        reach = grad_h[0].abs().sum(-1) > 0  # which content tokens the prediction of z_step depends on
        assert reach.tolist() == [j in order[:step].tolist() for j in range(T)], step
        # the content stream at the same position does see its own token
        (grad_c,) = torch.autograd.grad(model(h, order=order)[0][0, target].sum(), h)
        assert grad_c[0, target].abs().sum() > 0


def test_the_order_is_only_a_mask_permuting_tokens_permutes_outputs():
    # Without positional encodings in the layer, factorising in order z equals factorising left to right
    # over the permuted sequence: the order changes what each token may see, not the arithmetic.
    model = _init(TwoStreamAttention(D, H))
    h, g = _x(b=1), _x(b=1, seed=2)
    order = torch.tensor([2, 5, 0, 4, 1, 3])
    with torch.no_grad():
        out_h, out_g = model(h, g, order=order)
        perm_h, perm_g = model(h[:, order], g[:, order])
    assert (out_h[:, order] - perm_h).abs().max() < TOL and (out_g[:, order] - perm_g).abs().max() < TOL


def test_two_stream_constructor_arguments_and_mask_emb_matter():
    base = _init(TwoStreamAttention(D, H))
    x = _x()
    with torch.no_grad():
        h, g = base(x)
        four = _init(TwoStreamAttention(D, 4))
        four.load_state_dict(base.state_dict())
        assert (four(x)[0] - h).abs().max() > 1e-3, "num_heads"
        no_bias = _init(TwoStreamAttention(D, H, bias=False))
        no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if not n.endswith("bias")})
        assert (no_bias(x)[0] - h).abs().max() > 1e-3, "bias"
        base.mask_emb.add_(1.0)
        assert (base(x)[1] - g)[:, 1:].abs().max() > 1e-3, "mask_emb feeds the query stream"
    dropped = _init(TwoStreamAttention(D, H, dropout=0.5)).train()
    dropped.load_state_dict(base.state_dict())
    assert (dropped(x)[0] - base(x)[0]).abs().max() > 1e-3, "dropout"
    with pytest.raises(ValueError, match="order"):
        base(x, order=torch.tensor([0, 0, 1, 2, 3, 4]))
