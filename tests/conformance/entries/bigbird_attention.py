"""Conformance entry for mechanisms/bigbird_attention.py: T = 8 in blocks of 3 (a partial last block), one global
block, a window of 3 blocks and one random block, so every kind of key block is exercised.

A general dense `mask` is refused by design (it would need the (T, T) matrix the block-sparse computation avoids),
hence masks = key_padding_mask and is_causal only.
"""
from mechanisms.bigbird_attention import BigBirdAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="bigbird_attention.BigBirdAttention",
          build=lambda **kw: BigBirdAttention(d_model=8, num_heads=2, block_size=3, num_window_blocks=3,
                                              num_global_blocks=1, num_random_blocks=1, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), same_length=True,
          masks=frozenset({"key_padding_mask", "is_causal"}), lengths=(8, 8),
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {
    "bigbird_block_layout": "the block layout of eq. (2), a pure function; tested in "
                            "tests/test_bigbird_attention.py::test_the_block_layout_is_window_plus_global_plus_random",
}
