"""Conformance entry for mechanisms/self_attention.py: one head, self-attention only (forward takes `x`)."""
from mechanisms.self_attention import SelfAttention
from tests.conformance.registry import Entry, self_call, zero_row

ENTRIES = [
    Entry(name="self_attention.SelfAttention",
          build=lambda **kw: SelfAttention(d_model=8, **kw),
          d_model=8, num_heads=1, call=self_call, self_only=True,
          empty_row=zero_row,  # no output projection: a row with no key is exactly zero
          arg_names={"query": "x"},
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {}
