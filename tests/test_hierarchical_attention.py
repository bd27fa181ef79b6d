"""mechanisms/hierarchical_attention.py against HAN's equations written out as loops.

Oracles: a one-sentence document is attention pooling of its words; an explicit loop over documents,
sentences and words with padded words and padded sentences; padding has no influence on outputs or gradients.
"""
import pytest
import torch

from mechanisms.hierarchical_attention import HierarchicalAttention, effective_word_weights
from tests.oracles import randomize_

D, K, S, W = 6, 4, 3, 5
TOL = 1e-10


def _model(d_model=D, hidden_dim=K, seed=0, **kwargs):
    torch.manual_seed(seed)
    # non-zero biases, larger weights: the tanh leaves its linear range
    return randomize_(HierarchicalAttention(d_model, hidden_dim, **kwargs).double(), 0.8)


def _docs(b=2, s=S, seed=1):
    return torch.randn(b, s, W, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _real():
    real = torch.ones(2, S, W, dtype=torch.bool)
    real[0, 2] = False  # document 0: two sentences
    real[0, 1, 2:] = False  # ... the second of two words
    real[1, :, 4:] = False  # document 1: sentences of four words
    real[1, 0, 1:] = False  # ... and a one-word first sentence
    return real


def _attention_pool(items, proj, context):
    """softmax_n(tanh(W x_n + b) . u), then the weighted sum: one level of HAN, for a list of vectors."""
    scores = torch.stack([torch.tanh(proj.weight @ x + (proj.bias if proj.bias is not None else 0.0)) @ context
                          for x in items])
    weights = torch.softmax(scores, 0)
    return sum(w * x for w, x in zip(weights, items)), weights


def test_one_sentence_is_attention_pooling_of_its_words():
    model = _model()
    docs = _docs(s=1)
    with torch.no_grad():
        out, (alpha, beta) = model(docs, need_weights=True)
        for b in range(2):
            expected, weights = _attention_pool(list(docs[b, 0]), model.word_proj, model.word_context)
            assert (out[b] - expected).abs().max() < TOL
            assert (alpha[b, 0] - weights).abs().max() < TOL
    assert torch.equal(beta, torch.ones(2, 1, dtype=torch.float64))  # the only sentence has weight 1


def test_equals_the_explicit_loop_with_padded_words_and_sentences():
    model = _model()
    docs, real = _docs(), _real()
    with torch.no_grad():
        out, (alpha, beta) = model(docs, key_padding_mask=real, need_weights=True)
        for b in range(2):
            sentence_vectors, rows = [], []
            for i in range(S):
                words = [docs[b, i, t] for t in range(W) if real[b, i, t]]
                if not words:
                    continue  # a padded sentence
                vector, weights = _attention_pool(words, model.word_proj, model.word_context)  # eq. (1)-(2)
                sentence_vectors.append(vector)
                rows.append(i)
                assert (alpha[b, i][real[b, i]] - weights).abs().max() < TOL
            expected, weights = _attention_pool(sentence_vectors, model.sentence_proj, model.sentence_context)
            assert (out[b] - expected).abs().max() < TOL
            assert (beta[b, rows] - weights).abs().max() < TOL
    assert (alpha[~real] == 0).all() and beta[0, 2] == 0


def test_padded_words_and_sentences_have_no_influence():
    model = _model()
    docs, real = _docs().requires_grad_(), _real()
    out = model(docs, key_padding_mask=real)
    moved = docs.detach().clone()
    moved[~real] = torch.randn(int((~real).sum()), D, dtype=torch.float64) * 10
    assert (model(moved, key_padding_mask=real) - out).abs().max() < TOL
    out.sum().backward()
    assert (docs.grad[~real] == 0).all() and (docs.grad[real].abs().sum(-1) > 0).all()
    # a sentence given as padding: the same as the document without it
    shorter = model(docs[:1, :2].detach(), key_padding_mask=real[:1, :2])
    assert (shorter - out[:1]).abs().max() < TOL


def test_distinct_from_flat_attention_over_all_words_and_effective_weights_sum_to_one():
    # Flat attention pooling of all the words of a document, with the same word-level parameters, is what
    # HAN replaces: the sentence level re-weights the words sentence by sentence.
    model = _model()
    docs = _docs()
    with torch.no_grad():
        out, (alpha, beta) = model(docs, need_weights=True)
        for b in range(2):
            flat, _ = _attention_pool(list(docs[b].reshape(S * W, D)), model.word_proj, model.word_context)
            assert (out[b] - flat).abs().max() > 1e-3
        effective = effective_word_weights(alpha, beta)
        assert (effective.sum((1, 2)) - 1).abs().max() < TOL  # eq. (5)
        assert (out - (effective.unsqueeze(-1) * docs).sum((1, 2))).abs().max() < TOL


def test_every_constructor_argument_changes_the_output():
    docs = _docs()
    base = _model()
    with torch.no_grad():
        out = base(docs)
        no_bias = _model(bias=False)
        no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if not n.endswith("bias")})
        assert (no_bias(docs) - out).abs().max() > 1e-3, "bias"
        wider = _model(hidden_dim=K + 1)  # base's k units plus one more
        state = wider.state_dict()
        for name, p in base.state_dict().items():
            state[name][tuple(slice(0, n) for n in p.shape)] = p
        wider.load_state_dict(state)
        assert (wider(docs) - out).abs().max() > 1e-3, "hidden_dim"
    assert _model(d_model=3)(docs[..., :3]).shape == (2, 3), "d_model"
    with pytest.raises(ValueError, match="documents"):
        base(docs[0])
    with pytest.raises(ValueError, match="key_padding_mask"):
        base(docs, key_padding_mask=_real()[:, 0])
