"""Conformance entry for mechanisms/linformer.py.

Linformer projects keys and values along the sequence, so each projected row mixes every position: it has no
causal form and a general (Tq, Tk) mask has nothing to apply to (both refused, documented on the page); padding
is supported through key_padding_mask (padded rows are zeroed before the projection).
"""
from mechanisms.linformer import LinformerAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="linformer.LinformerAttention",
          build=lambda **kw: LinformerAttention(d_model=8, num_heads=2, max_seq_len=8, proj_dim=3, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), masks=frozenset({"key_padding_mask"}),
          max_seq_len=None,  # the limit is on the KEY length (positions of E, F); tested in tests/test_linformer.py
          # unlike softmax over keys, the key bias matters here: it enters projected row r as (sum_j E_rj) b,
          # which differs between rows, so k_proj.bias gets a gradient (no zero_grad entry).
          exempt={"weights": "the weights are the softmax over the k projected key rows, shape (B, H, Tq, k), not "
                             "(B, H, Tq, Tk); their shape, normalisation and 'before dropout' are tested in "
                             "tests/test_linformer.py::test_weights_are_over_the_k_projected_rows_and_taken_before_dropout"}),
]
NOT_ENTRIES = {}
