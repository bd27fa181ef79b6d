"""Conformance entry for mechanisms/flash_attention.py: a function on (B, H, T, Dh) tensors, adapted.

The adapter splits the (B, T, d_model) inputs of the suite into heads, calls flash_attention and joins
the heads again; it has no parameters, so the checks exercise the tiled forward and the hand-written
backward (gradcheck runs through FlashAttentionFunction.backward). A tensor that does not have the
(B, T, d_model) shape is handed to flash_attention unchanged, so that flash_attention's own checks, not a
reshape, name the bad argument.
"""
import torch
import torch.nn as nn

from mechanisms.flash_attention import flash_attention
from tests.conformance.registry import Entry, zero_row

D_MODEL, HEADS = 8, 2


class FlashAttentionHeads(nn.Module):
    """(B, T, d_model) -> heads -> flash_attention -> (B, T, d_model), with tiles smaller than the test lengths."""

    def __init__(self, d_model=D_MODEL, num_heads=HEADS, block_size_q=2, block_size_k=3):
        super().__init__()
        self.d_model, self.num_heads = d_model, num_heads
        self.block_size_q, self.block_size_k = block_size_q, block_size_k

    def _split(self, x):
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.size(-1) == self.d_model:
            return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, T, Dh)
        return x  # let flash_attention name what is wrong

    def forward(self, query, key=None, value=None, key_padding_mask=None, is_causal=False):
        key = query if key is None else key
        value = key if value is None else value
        out = flash_attention(self._split(query), self._split(key), self._split(value), is_causal=is_causal,
                              block_size_q=self.block_size_q, block_size_k=self.block_size_k,
                              key_padding_mask=key_padding_mask)  # (B, H, Tq, Dh)
        return out.transpose(1, 2).flatten(2)  # (B, Tq, d_model)


ENTRIES = [
    Entry(name="flash_attention.flash_attention",
          build=lambda **kw: FlashAttentionHeads(**kw),
          d_model=D_MODEL, num_heads=HEADS, masks=frozenset({"key_padding_mask", "is_causal"}),
          empty_row=zero_row, dropout=False, need_weights=False),
]
NOT_ENTRIES = {
    "FlashAttentionFunction": "the autograd.Function behind flash_attention (its entry); forward and backward "
                              "against naive attention in tests/test_flash_attention.py::"
                              "test_gradients_equal_autograd_of_naive_attention_for_every_tile_size",
}
