"""Conformance entry for mechanisms/reformer_attention.py: self-attention on x (keys are the queries), 8 tokens,
4 buckets, 2 hash rounds, chunks of 3, so sorting, chunk look-back and the combination of rounds all run.

The pairs it scores are chosen by the hash, so a general (T, T) mask is refused (documented on the page);
padding and causality are supported. There is no fused kernel: fused and explicit paths share the computation.
"""
from mechanisms.reformer_attention import ReformerAttention
from tests.conformance.registry import Entry, bias_row, self_call

ENTRIES = [
    Entry(name="reformer_attention.ReformerAttention",
          build=lambda **kw: ReformerAttention(d_model=8, num_heads=2, num_buckets=4, num_hashes=2, chunk_size=3,
                                               **kw),
          call=self_call, self_only=True, d_model=8, num_heads=2, empty_row=bias_row("out_proj"),
          masks=frozenset({"key_padding_mask", "is_causal"}), lengths=(8, 8), arg_names={"query": "x"},
          # A padded token is sorted into a bucket of its own, after every real token (so that its values can
          # never change which real tokens share a chunk); as a QUERY it therefore sees no key and its weight row
          # is zero, as the project's empty-row rule asks, so not every row sums to 1. The rows of real tokens
          # equal dense softmax weights exactly: tests/test_reformer_attention.py::
          # test_equals_dense_attention_over_the_union_of_the_rounds.
          weights_sum_to_one=False),
]
NOT_ENTRIES = {
    "lsh_buckets": "the angular hash of eq. (2), a pure function; tested in "
                   "tests/test_reformer_attention.py::test_lsh_buckets_is_the_angular_hash_and_similar_vectors_collide_more",
}
