"""Conformance entry for mechanisms/multiplicative_attention.py (Luong attention).

The entry is the "general" score with global alignment: it has parameters (W_a and its bias), a fused
path (PyTorch's kernel with scale 1) and an explicit one. Luong attention has no dropout, no output
projection (a row with no visible key returns exactly zero) and no causal form (it is decoder-to-encoder
attention). The other scores and local-p alignment are checked against explicit loops in
tests/test_multiplicative_attention.py, which also keeps their fused/explicit and gradient checks.
"""
from mechanisms.multiplicative_attention import LuongAttention
from tests.conformance.registry import Entry, zero_row

ENTRIES = [
    Entry(name="multiplicative_attention.LuongAttention",
          build=lambda **kw: LuongAttention(query_dim=8, key_dim=6, score="general", bias=True, **kw),
          d_model=8, d_kv=6, d_out=6, num_heads=1, masks=frozenset({"mask", "key_padding_mask"}),
          dropout=False, empty_row=zero_row),
]
NOT_ENTRIES = {}
