"""Conformance entries for mechanisms/frequency_attention.py.

Both mixers take `x` (self-mixing only) and an optional key_padding_mask; they have no `mask`, no
`is_causal`, no weights and no dropout, so the adapter passes only the padding mask.
"""
from mechanisms.frequency_attention import FNetMixing, GlobalFilter
from tests.conformance.registry import Entry, zero_row


def padding_only_call(module, query, key=None, value=None, key_padding_mask=None, **options):
    """Call a mixer that takes `x` and `key_padding_mask` only."""
    return module(query, key_padding_mask=key_padding_mask)


NO_CAUSAL = ("a Fourier transform over the whole sequence mixes every position into every output (it is a "
             "circular operation); there is no causal form")
ENTRIES = [
    Entry(name="frequency_attention.FNetMixing",
          build=lambda **kw: FNetMixing(d_model=8, **kw),
          d_model=8, call=padding_only_call, self_only=True, masks=frozenset({"key_padding_mask"}),
          empty_row=zero_row,  # all tokens padded: the transform of zeros is zero
          dropout=False, need_weights=False, arg_names={"query": "x"},
          exempt={"causal": NO_CAUSAL}),
    Entry(name="frequency_attention.GlobalFilter",
          build=lambda **kw: GlobalFilter(d_model=8, size=5, **kw),
          d_model=8, call=padding_only_call, self_only=True, masks=frozenset({"key_padding_mask"}),
          empty_row=zero_row, dropout=False, need_weights=False, arg_names={"query": "x"},
          lengths=(5, 5), max_seq_len=5,  # the filter is defined for one length
          exempt={"causal": NO_CAUSAL + "; the global filter is a circular convolution"}),
]
NOT_ENTRIES = {}
