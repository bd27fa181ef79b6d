"""Conformance entry for mechanisms/sparse_transformer_attention.py: both patterns, T = 8 with stride 3, so the
grid has a partial last row, the causal check's cut at T // 2 = 4 falls inside a block (with T = 7 it fell on a
block boundary, and a non-causal block went unnoticed), and every part of the pattern is exercised.

The patterns are causal by construction; a general dense `mask` is refused by design (it would need the (T, T)
matrix the factorised pattern avoids), hence masks = key_padding_mask and is_causal only. There is no fused
kernel for the factorised pattern, so the fused and explicit paths are the same code.
"""
from mechanisms.sparse_transformer_attention import SparseTransformerAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name=f"sparse_transformer_attention.SparseTransformerAttention[{pattern}]",
          build=lambda pattern=pattern, **kw: SparseTransformerAttention(d_model=8, num_heads=2, pattern=pattern,
                                                                          stride=3, num_summary=2, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), same_length=True, causal_always=True,
          masks=frozenset({"key_padding_mask", "is_causal"}), lengths=(8, 8),
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",))
    for pattern in ("strided", "fixed")
]
NOT_ENTRIES = {
    "sparse_transformer_masks": "the dense pictures A1, A2 of eq. (1)-(2), for the figure and the claims; tested in "
                                "tests/test_sparse_transformer_attention.py::test_the_mask_function_is_the_papers_pattern",
}
