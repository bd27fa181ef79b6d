"""Conformance entry for mechanisms/adaptive_span.py (standard signature; always causal, so no `is_causal`)."""
from mechanisms.adaptive_span import AdaptiveSpanAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="adaptive_span.AdaptiveSpanAttention",
          # span 2.5 and ramp 4: keys 3 to 6 positions back lie on the ramp, so the span gets a gradient and the
          # mask never sits exactly on a kink of the clamp (which would upset gradcheck's finite differences)
          build=lambda **kw: AdaptiveSpanAttention(d_model=8, num_heads=2, max_span=8, ramp=4, init_span=2.5, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"),
          masks=frozenset({"mask", "key_padding_mask"}), causal_always=True,
          # a bias added to every key multiplies a whole row by exp(q . b), which the renormalisation removes
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {
    "soft_span_mask": "the mask function m_z(x), not a module on sequences; "
                      "tests/test_adaptive_span.py::test_soft_mask_is_the_papers_ramp",
}
