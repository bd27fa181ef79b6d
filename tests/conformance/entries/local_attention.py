"""Conformance entry for mechanisms/local_attention.py.

The entry is the causal sliding window (window 2 over 5 tokens, so the window is a real restriction).
Local attention takes key_padding_mask but no dense (Tq, Tk) mask (it would cost the O(T^2) memory the
blocked computation avoids; a per-key 4-D `mask` is checked in tests/test_local_attention.py), and its
causality is the constructor's `causal`, not a forward flag. Key and value must have the query's length.
"""
from mechanisms.local_attention import LocalAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="local_attention.LocalAttention",
          build=lambda **kw: LocalAttention(d_model=8, num_heads=2, window=2, causal=True, **kw),
          d_model=8, num_heads=2, same_length=True, masks=frozenset({"key_padding_mask"}), causal_always=True,
          empty_row=bias_row("out_proj"),
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {}
