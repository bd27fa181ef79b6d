"""Conformance entry for mechanisms/longformer_attention.py.

The adapter makes token 1 of every sequence global (global_mask), so every check also runs through the global
key columns and the global row with its own projections. A general dense `mask` is refused by design (it would
need the (T, T) matrix the banded computation avoids), hence masks = key_padding_mask and is_causal only.
"""
import torch

from mechanisms.longformer_attention import LongformerAttention
from tests.conformance.registry import Entry, bias_row


def _call(module, query, key=None, value=None, **options):
    global_mask = None
    if query.dim() == 3 and query.size(1) > 1:
        global_mask = torch.zeros(query.size(0), query.size(1), dtype=torch.bool, device=query.device)
        global_mask[:, 1] = True
    return module(query, key, value, global_mask=global_mask, **options)


ENTRIES = [
    Entry(name="longformer_attention.LongformerAttention",
          build=lambda **kw: LongformerAttention(d_model=8, num_heads=2, window=1, **kw),
          call=_call, d_model=8, num_heads=2, empty_row=bias_row("out_proj"), same_length=True,
          masks=frozenset({"key_padding_mask", "is_causal"}), lengths=(7, 7),
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias", "k_global.bias")),
]
NOT_ENTRIES = {
    "longformer_mask": "the dense pattern of eq. (2), used as the oracle's picture and the figure; tested in "
                       "tests/test_longformer_attention.py::test_longformer_mask_is_the_pattern_of_the_paper",
}
