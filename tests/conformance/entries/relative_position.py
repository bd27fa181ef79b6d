"""Conformance entries for mechanisms/relative_position.py (Shaw et al. 2018 and T5's bucketed bias)."""
from mechanisms.relative_position import ShawRelativeAttention, T5RelativeAttention
from tests.conformance.registry import Entry, bias_row

# a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
KEY_BIAS = ("k_proj.bias",)

ENTRIES = [
    Entry(name="relative_position.ShawRelativeAttention",
          build=lambda **kw: ShawRelativeAttention(d_model=8, num_heads=2, max_relative_position=2, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), zero_grad=KEY_BIAS),
    Entry(name="relative_position.T5RelativeAttention",
          build=lambda **kw: T5RelativeAttention(d_model=8, num_heads=2, num_buckets=8, max_distance=16, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), zero_grad=KEY_BIAS),
]
NOT_ENTRIES = {
    "t5_relative_position_bucket": "maps integer distances to buckets, no attention; "
                                   "tests/test_relative_position.py::test_t5_buckets_match_hand_derived_values",
}
