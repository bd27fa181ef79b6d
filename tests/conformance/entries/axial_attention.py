"""Conformance entry for mechanisms/axial_attention.py.

AxialAttention takes channels-last images x (B, H, W, C) and a pixel padding mask (B, H, W), not the
standard (query, key, value, mask) call. The adapter lays the suite's (B, T, C) sequence out as an image
of 2 rows of T / 2 pixels in raster order (1 row when T is odd), so both passes do real work: position t
is pixel (t // W, t % W). `key_padding_mask` (B, T) becomes the (B, 2, T / 2) pixel mask and `is_causal`
the module's causal mode (no pixel sees a later pixel in raster order). Inputs of the wrong rank or width
are passed through unchanged, so the errors the suite sees are the module's own. With need_weights the
adapter returns the ROW pass's weights laid out over the T raster positions, (B, heads, T, T), zero
outside each pixel's own row (the column pass's weights are checked in tests/test_axial_attention.py).
"""
from mechanisms.axial_attention import AxialAttention
from tests.conformance.registry import Entry, bias_row


def image_call(module, query, key=None, value=None, key_padding_mask=None, is_causal=False, need_weights=False):
    """The suite's (B, T, C) sequence as a (B, 2, T / 2, C) image."""
    x, pixels = query, key_padding_mask
    if query.dim() == 3:
        batch, length, channels = query.shape
        height = 2 if length % 2 == 0 else 1
        x = query.reshape(batch, height, length // height, channels)
        if pixels is not None and pixels.dim() == 2 and tuple(pixels.shape) == (batch, length):
            pixels = pixels.reshape(batch, height, length // height)
    result = module(x, key_padding_mask=pixels, is_causal=is_causal, need_weights=need_weights)
    if not need_weights:
        return result.reshape(query.shape) if query.dim() == 3 else result
    out, (row_weights, _) = result  # row_weights (B, H, heads, W, W)
    batch, height, heads, width, _ = row_weights.shape
    weights = row_weights.new_zeros(batch, heads, height * width, height * width)  # (B, heads, T, T)
    for r in range(height):
        line = slice(r * width, (r + 1) * width)
        weights[:, :, line, line] = row_weights[:, r]
    return out.reshape(query.shape), weights


ENTRIES = [
    Entry(name="axial_attention.AxialAttention",
          build=lambda **kw: AxialAttention(d_model=8, num_heads=2, **kw),
          d_model=8, num_heads=2, call=image_call, self_only=True, lengths=(6, 6),
          masks=frozenset({"key_padding_mask", "is_causal"}),
          empty_row=bias_row("col_attn.out_proj"),  # every pixel padded: the column pass returns its bias
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("row_attn.k_proj.bias", "col_attn.k_proj.bias"),
          arg_names={"query": "x"}),
]
NOT_ENTRIES = {
    "attention_score_counts": "arithmetic on image sizes, not an attention module; tested in "
                              "tests/test_axial_attention.py::test_score_counts_are_the_weights_the_module_computes",
    "score_count_table": "the page's table of attention_score_counts; tested in "
                         "tests/test_axial_attention.py::test_score_count_table_is_the_one_on_the_page",
}
