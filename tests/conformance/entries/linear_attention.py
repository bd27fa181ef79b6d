"""Conformance entry for mechanisms/linear_attention.py (the project's standard forward signature).

LinearAttention takes key_padding_mask and is_causal but refuses a general `mask` (its O(T) sums have no
(Tq, Tk) matrix to mask; the page says so), and has no dropout (no attention matrix on the linear paths).
need_weights=True is its explicit O(T^2) form, so `fused_explicit` compares the linear-time paths
(non-causal sums and causal chunkwise) with the explicit matrix.
"""
from mechanisms.linear_attention import LinearAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="linear_attention.LinearAttention",
          build=lambda **kw: LinearAttention(d_model=8, num_heads=2, chunk_size=2, **kw),
          d_model=8, num_heads=2, masks=frozenset({"key_padding_mask", "is_causal"}),
          empty_row=bias_row("out_proj"), dropout=False),
]
NOT_ENTRIES = {
    "elu_feature_map": "the feature map phi = elu + 1, a pure function; "
                       "tests/test_linear_attention.py::test_chunkwise_state_is_the_sum_over_all_tokens",
    "linear_attention_noncausal": "the module's non-causal path (its entry); against a double loop in "
                                  "tests/test_linear_attention.py::test_key_padding_in_every_form_equals_the_double_loop",
    "causal_linear_attention_chunkwise": "the module's causal path (its entry); every chunk size against a double loop "
                                         "in tests/test_linear_attention.py::test_every_form_equals_the_double_loop_for_every_chunk_size",
    "linear_attention_recurrent": "the RNN form behind LinearAttention.step; "
                                  "tests/test_linear_attention.py::test_every_form_equals_the_double_loop_for_every_chunk_size",
    "causal_linear_attention_cumsum": "the naive O(T Dh^2) oracle and benchmark baseline; "
                                      "tests/test_linear_attention.py::test_every_form_equals_the_double_loop_for_every_chunk_size",
    "linear_attention_parallel": "the module's need_weights=True path (its entry); "
                                 "tests/test_linear_attention.py::test_every_form_equals_the_double_loop_for_every_chunk_size",
}
