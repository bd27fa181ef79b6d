"""Conformance entry for mechanisms/multi_head_latent_attention.py.

Multi-head latent attention builds keys AND values from one input through the shared latent c_KV, so its
forward takes `key` and refuses a separate `value` (it must be None or `key` itself). The adapter passes the
suite's key only; `arg_names={"value": ""}` tells the suite there is no separate value argument.
"""
from mechanisms.multi_head_latent_attention import MultiHeadLatentAttention
from tests.conformance.registry import Entry, bias_row


def _call(module, query, key=None, value=None, **options):
    return module(query, key, **options)


ENTRIES = [
    Entry(name="multi_head_latent_attention.MultiHeadLatentAttention",
          build=lambda **kw: MultiHeadLatentAttention(d_model=8, num_heads=2, kv_latent_dim=4, q_latent_dim=6,
                                                      rope_dim=2, **kw),
          call=_call, d_model=8, num_heads=2, empty_row=bias_row("out_proj"), arg_names={"value": ""}),
]
NOT_ENTRIES = {
    "cache_elements_per_token": "a pure formula (eq. (10)); tested in "
                                "tests/test_multi_head_latent_attention.py::test_cache_table_follows_the_formula_and_the_page_shows_it",
    "cache_table": "a table of eq. (10) for DeepSeek-V2's shape; tested in "
                   "tests/test_multi_head_latent_attention.py::test_cache_table_follows_the_formula_and_the_page_shows_it",
}
