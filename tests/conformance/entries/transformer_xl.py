"""Conformance entry for mechanisms/transformer_xl.py.

TransformerXLAttention is self-attention over [memory; segment], always causal, and returns the new memory
beside the output: forward(query, memory=None, mask=None, key_padding_mask=None, need_weights=False) ->
(output, new_memory) or (output, new_memory, weights). The adapter calls it without a memory (the suite's
inputs are one segment) and drops the memory; tests/test_transformer_xl.py covers the memory.
"""
from mechanisms.transformer_xl import TransformerXLAttention
from tests.conformance.registry import Entry, bias_row


def call_without_memory(module, query, key=None, value=None, **options):
    result = module(query, **options)
    return (result[0], result[2]) if options.get("need_weights") else result[0]


ENTRIES = [
    Entry(name="transformer_xl.TransformerXLAttention",
          build=lambda **kw: TransformerXLAttention(d_model=8, num_heads=2, mem_len=4, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), call=call_without_memory,
          self_only=True, causal_always=True, masks=frozenset({"mask", "key_padding_mask"}),
          # a bias added to every key shifts all scores of a query row by the same (q + u) . b: softmax ignores it
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {
    "relative_shift": "the pad-and-reshape index trick, not attention; "
                      "tests/test_transformer_xl.py::test_relative_shift_matches_an_explicit_gather",
    "sinusoid_positions": "the sinusoid table r_x; tests/test_transformer_xl.py::test_sinusoids_are_the_papers",
}
