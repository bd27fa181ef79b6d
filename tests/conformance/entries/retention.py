"""Conformance entry for mechanisms/retention.py: causal self-attention over `x` (self_call adapter).

MultiScaleRetention is causal by construction (the decay matrix is zero above the diagonal), takes only
key_padding_mask (a general mask is refused: its recurrent forms have no (T, T) matrix), has no dropout, and
its need_weights scores Q K^T * D are not a distribution (no softmax). It is entered twice: the parallel
form (the default) and the chunkwise form with chunks smaller than the test length.
"""
from mechanisms.retention import MultiScaleRetention
from tests.conformance.registry import Entry, bias_row, self_call

COMMON = dict(d_model=8, num_heads=2, call=self_call, self_only=True, masks=frozenset({"key_padding_mask"}),
              causal_always=True, empty_row=bias_row("out_proj"), dropout=False, weights_sum_to_one=False,
              arg_names={"query": "x"})

ENTRIES = [
    Entry(name="retention.MultiScaleRetention",
          build=lambda **kw: MultiScaleRetention(d_model=8, num_heads=2, **kw), **COMMON),
    Entry(name="retention.MultiScaleRetention[chunk_size=2]",
          build=lambda **kw: MultiScaleRetention(d_model=8, num_heads=2, chunk_size=2, **kw), **COMMON),
]
NOT_ENTRIES = {
    "retention_decays": "gamma_h = 1 - 2^(-5-h), numbers; tests/test_retention.py::"
                        "test_decays_follow_the_paper_and_the_decay_matrix_is_causal",
    "decay_matrix": "the (H, T, T) decay mask D; tests/test_retention.py::"
                    "test_decays_follow_the_paper_and_the_decay_matrix_is_causal",
    "retention_parallel": "the module's default path (its entry); tests/test_retention.py::"
                          "test_the_three_functions_agree_and_carry_their_state",
    "retention_recurrent": "the path behind MultiScaleRetention.step; tests/test_retention.py::"
                           "test_parallel_recurrent_and_chunkwise_forms_equal_the_double_loop",
    "retention_chunkwise": "the module's chunk_size path (its second entry); tests/test_retention.py::"
                           "test_the_three_functions_agree_and_carry_their_state",
}
