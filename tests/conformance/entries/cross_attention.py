"""Conformance entry for mechanisms/cross_attention.py.

CrossAttention.forward(x, context, ...) has no separate value: the context gives both keys and values, so
the adapter passes the suite's `key` as `context` and never uses `value`. It has no is_causal (x and the
context are different sequences, so a query has no "future" among the context's positions).
"""
from mechanisms.cross_attention import CrossAttention
from tests.conformance.registry import Entry, bias_row


def _call(module, query, key=None, value=None, **options):
    return module(query, query if key is None else key, **options)


ENTRIES = [
    Entry(name="cross_attention.CrossAttention",
          build=lambda **kw: CrossAttention(d_model=8, context_dim=6, num_heads=2, **kw),
          d_model=8, d_kv=6, num_heads=2, call=_call, masks=frozenset({"mask", "key_padding_mask"}),
          empty_row=bias_row("out_proj"), arg_names={"query": "x", "key": "context", "value": ""},
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {}
