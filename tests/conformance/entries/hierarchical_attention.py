"""Conformance entry for mechanisms/hierarchical_attention.py.

HierarchicalAttention takes documents (B, S, W, d_model) and returns one vector per document. The adapter
cuts the suite's (B, T, d_model) query into sentences of WORDS tokens (T = 6: two sentences of three words)
and its key_padding_mask (B, T) the same way; it returns the document vector repeated at every position
(so the output has the suite's (B, Tq, d_out) shape) and, with need_weights, the effective weight of each
word in the document (eq. (5), beta_i * alpha_it) as (B, 1, Tq, T). Malformed inputs are passed through
unchanged so that the module's own error is what the suite sees.
"""
from mechanisms.hierarchical_attention import HierarchicalAttention, effective_word_weights
from tests.conformance.registry import Entry, zero_row

WORDS = 3


def _as_documents(x, batch, length):
    ok = x is not None and x.dim() >= 2 and tuple(x.shape[:2]) == (batch, length) and length % WORDS == 0
    return x.unflatten(1, (length // WORDS, WORDS)) if ok else x


def han_call(module, query, key=None, value=None, key_padding_mask=None, need_weights=False):
    if query.dim() != 3:
        return module(query, key_padding_mask=key_padding_mask)  # the module refuses it, naming `documents`
    batch, length = query.shape[:2]
    result = module(_as_documents(query, batch, length),
                    key_padding_mask=_as_documents(key_padding_mask, batch, length), need_weights=need_weights)
    document, weights = result if need_weights else (result, None)
    out = document[:, None, :].expand(batch, length, document.size(-1))  # (B, T, d)
    if not need_weights:
        return out
    effective = effective_word_weights(*weights).flatten(1)  # (B, T)
    return out, effective[:, None, None, :].expand(batch, 1, length, length)


ENTRIES = [
    Entry(name="hierarchical_attention.HierarchicalAttention",
          build=lambda **kw: HierarchicalAttention(d_model=8, hidden_dim=4, **kw),
          d_model=8, call=han_call, self_only=True, masks=frozenset({"key_padding_mask"}), dropout=False,
          empty_row=zero_row,  # a document without a real word pools to the zero vector (no output projection)
          arg_names={"query": "documents"}, lengths=(6, 6),
          exempt={"causal": "HAN pools each whole sentence and the whole document into one vector; there is no "
                            "position-by-position output that a causal mask could apply to"}),
]
NOT_ENTRIES = {
    "effective_word_weights": "arithmetic on the returned weights (beta_i * alpha_it), no attention of its own; "
                              "tests/test_hierarchical_attention.py::"
                              "test_distinct_from_flat_attention_over_all_words_and_effective_weights_sum_to_one",
}
