"""Conformance entries for mechanisms/bidirectional_attention.py.

BidirectionalSelfAttention takes `x` only (self-attention). TwoStreamAttention returns two streams; the
adapter runs it in the left-to-right order (the default, where both streams are causal) with the query
stream started from `mask_emb`, and concatenates (content, query) outputs along the width.
"""
import torch

from mechanisms.bidirectional_attention import BidirectionalSelfAttention, TwoStreamAttention
from tests.conformance.registry import Entry, bias_row, self_call


def two_stream_call(module, query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=False,
                    need_weights=False):
    """(content_out | query_out) of width 2 d_model; with need_weights, the content stream's weights."""
    result = module(query, mask=mask, key_padding_mask=key_padding_mask, need_weights=need_weights)
    if need_weights:
        (content, query_stream), (content_weights, _) = result
        return torch.cat([content, query_stream], dim=-1), content_weights
    return torch.cat(result, dim=-1)


def two_biases(module, d_out, dtype, device):
    """A row with no visible key is zero before out_proj in both streams: out_proj's bias, twice."""
    bias = bias_row("out_proj")(module, d_out // 2, dtype, device)
    return torch.cat([bias, bias])


ENTRIES = [
    Entry(name="bidirectional_attention.BidirectionalSelfAttention",
          build=lambda **kw: BidirectionalSelfAttention(d_model=8, num_heads=2, **kw),
          d_model=8, num_heads=2, call=self_call, self_only=True, empty_row=bias_row("out_proj"),
          arg_names={"query": "x"},
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",)),
    Entry(name="bidirectional_attention.TwoStreamAttention",
          build=lambda **kw: TwoStreamAttention(d_model=8, num_heads=2, **kw),
          d_model=8, d_out=16, num_heads=2, call=two_stream_call, self_only=True,
          masks=frozenset({"mask", "key_padding_mask"}), causal_always=True,  # the default order is left to right
          empty_row=two_biases, arg_names={"query": "content"},
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {
    "bert_mlm_corruption": "a data corruption function on token ids, no attention; tests/test_bidirectional_attention.py::"
                           "test_corruption_frequencies_are_80_10_10_within_standard_error",
}
