"""Conformance entry for mechanisms/additive_attention.py.

Bahdanau attention has no output projection (a row with no visible key returns exactly zero) and no
causal form (it is the decoder-to-encoder attention of a translation model, not a self-attention).
"""
from mechanisms.additive_attention import AdditiveAttention
from tests.conformance.registry import Entry, zero_row

ENTRIES = [
    Entry(name="additive_attention.AdditiveAttention",
          build=lambda **kw: AdditiveAttention(query_dim=8, key_dim=6, hidden_dim=5, **kw),
          d_model=8, d_kv=6, d_out=6, num_heads=1, masks=frozenset({"mask", "key_padding_mask"}),
          empty_row=zero_row),
]
NOT_ENTRIES = {}
