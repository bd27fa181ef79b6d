"""Conformance entries for mechanisms/co_attention.py, one per mode.

CoAttention takes two sequences, `first` and `second`, and returns one summary vector of each. The adapter
maps the suite's query to `first`, its key to `second` (there is no separate value: each summary is a
weighted sum of its own sequence) and key_padding_mask to `second_padding_mask`; it returns
(first_summary | second_summary) of width 2 d_model, repeated at every query position so that the output
has the suite's (B, Tq, d_out) shape, and with need_weights the attention over `second` as (B, 1, Tq, Tk).
"""
import torch

from mechanisms.co_attention import CoAttention
from tests.conformance.registry import Entry


def co_attention_call(module, query, key=None, value=None, key_padding_mask=None, need_weights=False):
    result = module(query, key, second_padding_mask=key_padding_mask, need_weights=need_weights)
    summaries, weights = result if need_weights else (result, None)
    batch, tq = query.shape[:2]
    out = torch.cat(summaries, dim=-1)[:, None, :].expand(batch, tq, 2 * module.d_model)  # (B, Tq, 2 d)
    if not need_weights:
        return out
    second_weights = weights[1]  # (B, Tk)
    return out, second_weights[:, None, None, :].expand(batch, 1, tq, second_weights.size(-1))


NO_EMPTY_ROW = ("with every token of `second` padded, its summary is zero but the summary of `first` is still "
                "an input-dependent vector, so there is no single documented row value; "
                "tests/test_co_attention.py::test_an_all_padded_sequence_gives_a_zero_summary_with_finite_gradients "
                "checks the zero summary and finite gradients")
ENTRIES = [
    Entry(name=f"co_attention.CoAttention[{mode}]",
          build=(lambda mode: lambda **kw: CoAttention(d_model=8, hidden_dim=4, mode=mode, **kw))(mode),
          d_model=8, d_out=16, call=co_attention_call, masks=frozenset({"key_padding_mask"}), dropout=False,
          arg_names={"query": "first", "key": "second", "value": "", "key_padding_mask": "second_padding_mask"},
          exempt={"empty_rows": NO_EMPTY_ROW,
                  "causal": "co-attention summarises each whole sequence into one vector; there is no "
                            "position-by-position output that a causal mask could apply to"})
    for mode in ("parallel", "alternating")
]
NOT_ENTRIES = {}
