"""Conformance entry for mechanisms/gated_attention.py (the project's standard forward signature)."""
from mechanisms.gated_attention import GatedAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="gated_attention.GatedAttention",
          build=lambda **kw: GatedAttention(d_model=8, num_heads=2, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"),
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",)),
    Entry(name="gated_attention.GatedAttention[headwise]",
          build=lambda **kw: GatedAttention(d_model=8, num_heads=2, gate="headwise", **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {}
