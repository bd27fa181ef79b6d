"""Conformance entry for mechanisms/hybrid_attention.py (the project's standard forward signature)."""
from mechanisms.hybrid_attention import HybridAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="hybrid_attention.HybridAttention",
          build=lambda **kw: HybridAttention(d_model=8, num_heads=2, window=1, feature_dim=2, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"),
          # a bias added to every key shifts all window scores of a query row by the same q . b: softmax
          # ignores it (the Taylor kernel of the linear branch is not shift-invariant, so feature_k_proj.bias
          # does get a gradient)
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {
    "taylor_feature_map": "a pure feature map, no attention; "
                          "tests/test_hybrid_attention.py::test_taylor_feature_map_gives_the_second_order_taylor_kernel_exactly",
    "taylor_linear_attention_recurrent": "the token-by-token form of the module's linear branch, an oracle on "
                                         "(B, H, T, d') features; tests/test_hybrid_attention.py::"
                                         "test_chunkwise_causal_form_equals_the_recurrent_form",
}
