"""Conformance entry for mechanisms/grouped_query_attention.py (the project's standard forward signature)."""
from mechanisms.grouped_query_attention import GroupedQueryAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="grouped_query_attention.GroupedQueryAttention",
          build=lambda **kw: GroupedQueryAttention(d_model=8, num_heads=4, num_kv_heads=2, **kw),
          d_model=8, num_heads=4, empty_row=bias_row("out_proj"),
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {
    "kv_cache_bytes": "arithmetic on integers, no attention; tests/test_grouped_query_attention.py::"
                      "test_kv_cache_bytes_counts_the_bytes_of_real_cached_tensors",
    "kv_cache_table": "a table of published model shapes; tests/test_grouped_query_attention.py::"
                      "test_kv_cache_table_follows_the_formula_and_the_page_shows_it",
}
