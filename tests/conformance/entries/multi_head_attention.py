"""Conformance entry for mechanisms/multi_head_attention.py (the project's standard forward signature)."""
from mechanisms.multi_head_attention import MultiHeadAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="multi_head_attention.MultiHeadAttention",
          build=lambda **kw: MultiHeadAttention(d_model=8, num_heads=2, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"),
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {}
