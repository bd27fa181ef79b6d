"""Conformance entry for mechanisms/alibi.py.

ALiBiAttention is causal by default (is_causal=True, as in the paper); the adapter passes is_causal=False
unless the suite asks for causality, so the generic checks see both the symmetric and the causal bias.
"""
from mechanisms.alibi import ALiBiAttention
from tests.conformance.registry import Entry, bias_row


def _call(module, query, key=None, value=None, is_causal=False, **options):
    return module(query, key, value, is_causal=is_causal, **options)


ENTRIES = [
    Entry(name="alibi.ALiBiAttention",
          build=lambda **kw: ALiBiAttention(d_model=8, num_heads=2, **kw),
          d_model=8, num_heads=2, call=_call, empty_row=bias_row("out_proj"),
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {
    "alibi_slopes": "the fixed head slopes, a pure function of num_heads; "
                    "tests/test_alibi.py::test_slopes_follow_the_paper",
    "alibi_bias": "the bias matrix of eq. (3), no attention; "
                  "tests/test_alibi.py::test_bias_values_and_shift_invariance_along_diagonals",
}
