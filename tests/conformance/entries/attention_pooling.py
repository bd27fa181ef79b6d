"""Conformance entry for mechanisms/attention_pooling.py.

AttentionPooling.forward(x, mask=None, key_padding_mask=None, need_weights=False) reads only x: its
queries are learned parameters. The entry builds it with as many queries as the suite's sequence has
tokens (5), so its (B, Q, d_model) output has the (B, Tq, d_model) shape the self-attention checks
expect; there is no causal form (a pooling query has no position).
"""
from mechanisms.attention_pooling import AttentionPooling
from tests.conformance.registry import Entry, bias_row, self_call

ENTRIES = [
    Entry(name="attention_pooling.AttentionPooling",
          build=lambda **kw: AttentionPooling(d_model=8, num_queries=5, num_heads=2, **kw),
          d_model=8, num_heads=2, call=self_call, self_only=True, lengths=(5, 5),
          masks=frozenset({"mask", "key_padding_mask"}), empty_row=bias_row("out_proj"),
          arg_names={"query": "x"},
          # a bias added to every key shifts all scores of a query row by the same p . b: softmax ignores it
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {
    "nadaraya_watson": "kernel regression on points, no module; "
                       "tests/test_attention_pooling.py::test_nadaraya_watson_matches_explicit_loop",
}
