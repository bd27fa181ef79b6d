"""Conformance entry for mechanisms/hard_attention.py.

The suite runs modules in eval mode, where hard attention is the deterministic argmax of eq. (5): the
output is piecewise constant in the queries and keys, so no gradient reaches W_q and W_k there (the
training-mode straight-through gradient, the sampling and the training-mode empty rows are checked in
tests/test_hard_attention.py). It has no dropout, and in training it samples (stochastic).
"""
from mechanisms.hard_attention import HardAttention
from tests.conformance.registry import Entry, bias_row

ARGMAX = ("eval mode picks the argmax key: the output does not depend smoothly on the scores, "
          "so no gradient reaches them")
BF16 = ("bf16 may swap the argmax between keys whose scores are within its rounding; the pick-aware "
        "comparison with float32 is "
        "tests/test_hard_attention.py::test_bfloat16_picks_a_best_key_of_float32_and_returns_its_value")

ENTRIES = [
    Entry(name="hard_attention.HardAttention",
          build=lambda **kw: HardAttention(d_model=8, num_heads=2, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), dropout=False, stochastic=True,
          unused={"q_proj.weight": ARGMAX, "q_proj.bias": ARGMAX, "k_proj.weight": ARGMAX, "k_proj.bias": ARGMAX},
          exempt={"bf16": BF16}),
]
NOT_ENTRIES = {
    "gumbel_noise": "draws Gumbel(0, 1) noise, no attention; "
                    "tests/test_hard_attention.py::test_sample_frequencies_follow_the_softmax",
    "straight_through_gumbel": "the sampling step on given scores, no attention; tests/test_hard_attention.py::"
                               "test_straight_through_gradient_is_the_gradient_of_the_relaxed_sample",
}
