"""Conformance entry for mechanisms/sigmoid_attention.py (the project's standard forward signature).

Its weights are independent sigmoids, not a distribution (rows do not sum to 1; the page and
tests/test_sigmoid_attention.py::test_rows_are_not_normalised say so); a fully masked row has all weights 0
and returns out_proj's bias with no special case.
"""
from mechanisms.sigmoid_attention import SigmoidAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="sigmoid_attention.SigmoidAttention",
          build=lambda **kw: SigmoidAttention(d_model=8, num_heads=2, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), weights_sum_to_one=False),
]
NOT_ENTRIES = {}
