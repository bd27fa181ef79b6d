"""Conformance entry for mechanisms/scaled_dot_product_attention.py.

The function works on (B, H, T, Dh) tensors and has no parameters and no train/eval mode; the adapter
below splits the suite's (B, T, 8) inputs into 2 heads of width 4, passes dropout_p only in training,
and merges the heads again, so the generic checks run on the function itself.
"""
import torch.nn as nn

from mechanisms.scaled_dot_product_attention import _check_dropout, scaled_dot_product_attention
from tests.conformance.registry import Entry, zero_row

HEADS = 2


class _Function(nn.Module):
    """Holds the dropout probability, so that the suite's train/eval switch reaches `dropout_p`."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        _check_dropout(dropout)  # the function's own check of dropout_p, at construction
        self.dropout = dropout


def _split(t):
    """(B, T, D) -> (B, H, T, D / H); anything else is passed on unchanged for the function to refuse."""
    if t.dim() == 3 and t.size(-1) % HEADS == 0:
        return t.unflatten(-1, (HEADS, -1)).transpose(1, 2)
    return t


def _call(module, query, key=None, value=None, **options):
    key = query if key is None else key
    value = key if value is None else value
    dropout_p = module.dropout if module.training else 0.0
    result = scaled_dot_product_attention(_split(query), _split(key), _split(value), dropout_p=dropout_p,
                                          **options)
    merge = lambda t: t.transpose(1, 2).flatten(2)  # noqa: E731  (B, H, Tq, Dh) -> (B, Tq, H * Dh)
    if options.get("need_weights"):
        return merge(result[0]), result[1]
    return merge(result)


ENTRIES = [
    Entry(name="scaled_dot_product_attention.scaled_dot_product_attention",
          build=lambda **kw: _Function(**kw), call=_call, d_model=8, num_heads=HEADS, empty_row=zero_row),
]
NOT_ENTRIES = {}
