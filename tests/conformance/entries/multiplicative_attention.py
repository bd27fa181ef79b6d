"""Conformance entries for mechanisms/multiplicative_attention.py (Luong attention), one per configuration.

Every score (dot, general, concat) with both alignments (global, local-p). Luong attention has no dropout,
no output projection (a row with no visible key returns exactly zero) and no causal form (it is
decoder-to-encoder attention). "dot" needs key_dim == query_dim. With local-p the returned weights are the
window softmax times a Gaussian, so their rows sum to less than 1 (page eq. (7)).
"""
from mechanisms.multiplicative_attention import LuongAttention
from tests.conformance.registry import Entry, zero_row


def _entry(score, alignment):
    key_dim = 8 if score == "dot" else 6
    options = dict(score=score, alignment=alignment, bias=score != "dot")
    if alignment == "local-p":
        options["window"] = 2
    return Entry(name=f"multiplicative_attention.LuongAttention[{score}, {alignment}]",
                 build=lambda **kw: LuongAttention(query_dim=8, key_dim=key_dim, **options, **kw),
                 d_model=8, d_kv=key_dim, d_out=key_dim, num_heads=1, masks=frozenset({"mask", "key_padding_mask"}),
                 dropout=False, empty_row=zero_row, weights_sum_to_one=alignment == "global")


ENTRIES = [_entry(score, alignment) for score in ("dot", "general", "concat") for alignment in ("global", "local-p")]
NOT_ENTRIES = {}
