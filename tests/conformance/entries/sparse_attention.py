"""Conformance entries for mechanisms/sparse_attention.py (the project's standard forward signature)."""
from mechanisms.sparse_attention import SparseAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="sparse_attention.SparseAttention",
          build=lambda **kw: SparseAttention(d_model=8, num_heads=2, method="entmax15", **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"),
          # a bias added to every key shifts all scores of a query row by the same q . b; all three maps
          # (top-k, sparsemax, entmax) are invariant to such a shift, as softmax is
          zero_grad=("k_proj.bias",)),
    Entry(name="sparse_attention.SparseAttention[sparsemax]",
          build=lambda **kw: SparseAttention(d_model=8, num_heads=2, method="sparsemax", **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), zero_grad=("k_proj.bias",)),
    Entry(name="sparse_attention.SparseAttention[topk]",
          build=lambda **kw: SparseAttention(d_model=8, num_heads=2, method="topk", top_k=3, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {
    "sparsemax": "a map from scores to weights, not a module on sequences; "
                 "tests/test_sparse_attention.py::test_sparsemax_is_the_euclidean_projection_onto_the_simplex "
                 "and ::test_sparsemax_backward_is_the_closed_form_jacobian (with gradcheck)",
    "entmax15": "a map from scores to weights; "
                "tests/test_sparse_attention.py::test_entmax15_matches_bisection_and_its_closed_form_jacobian",
    "topk_softmax": "a map from scores to weights; "
                    "tests/test_sparse_attention.py::test_topk_keeps_exactly_k_keys_and_softmaxes_them",
}
