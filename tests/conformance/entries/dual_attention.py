"""Conformance entries for mechanisms/dual_attention.py.

The attention modules keep the published package's forward signatures (x, symbols, freqs_cos, freqs_sin,
attn_mask, is_causal) and return tuples, so each entry has an adapter. The relational modules need
symbols: each entry wraps its module together with a symbol retriever of the same file (positional,
position-relative or symbolic attention), so all three kinds of symbols go through the suite too, and
RoPE goes through it with RelationalAttention.
"""
import torch
import torch.nn as nn

from mechanisms.dual_attention import (Attention, DisentangledRelationalCrossAttention, DualAttention,
                                       PositionalSymbolRetriever, PositionRelativeSymbolRetriever,
                                       RelationalAttention, RelationalCrossAttention, SymbolicAttention,
                                       _rope_tables)
from tests.conformance.registry import Entry, self_call

D = 8
MAX_LEN = 16
TEST = "tests/test_dual_attention.py::"


def _attention_call(module, query, key=None, value=None, mask=None, need_weights=False, **options):
    out, weights = module(query, key, value, attn_mask=mask, need_weights=need_weights, **options)
    return (out, weights) if need_weights else out


class _WithSymbols(nn.Module):
    """A relational module and the retriever that gives it symbols; optional RoPE on its attention."""

    def __init__(self, inner: nn.Module, retriever: nn.Module, rope: bool = False) -> None:
        super().__init__()
        self.inner, self.retriever, self.rope = inner, retriever, rope

    def forward(self, query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=False,
                need_weights=False):
        symbols = self.retriever(query)  # (B, T, d) or (T, T, d)
        freqs = {}
        if self.rope:
            cos, sin = _rope_tables(self.inner.key_dim, query.size(1))
            freqs = {"freqs_cos": cos.to(query.device), "freqs_sin": sin.to(query.device)}
        if isinstance(self.inner, DualAttention):
            out, sa_weights, ra_scores = self.inner(query, symbols, attn_mask=mask, is_causal=is_causal,
                                                    key_padding_mask=key_padding_mask, need_weights=need_weights)
            if not need_weights:
                return out
            return out, torch.cat((sa_weights, ra_scores[0]), dim=1)  # (B, H_sa + H_ra, Tq, Tk)
        result = self.inner(query, symbols, attn_mask=mask, is_causal=is_causal, key_padding_mask=key_padding_mask,
                            **freqs)
        return (result[0], result[1]) if need_weights else result[0]


def _bias_of(*paths):
    """A fully masked row: zero attention, so the output is the output projections' biases, concatenated."""
    def row(module, d_out, dtype, device):
        parts = []
        for path in paths:
            layer = module.get_submodule(path)
            width = layer.weight.size(0)
            parts.append(torch.zeros(width, dtype=dtype, device=device) if layer.bias is None
                         else layer.bias.detach().to(dtype))
        return torch.cat(parts)
    return row


def _relational(**kw):
    inner = RelationalAttention(D, n_heads=2, n_relations=3, rel_proj_dim=2, n_kv_heads=1, add_bias_out=True,
                                rel_activation="tanh", **kw)
    return _WithSymbols(inner, PositionalSymbolRetriever(D, MAX_LEN), rope=True)


def _rca(**kw):
    inner = RelationalCrossAttention(D, n_heads=2, **{"dropout": 0.0, **kw}, add_bias_out=True,
                                     use_relative_positional_symbols=True)
    return _WithSymbols(inner, PositionRelativeSymbolRetriever(D, max_rel_pos=3))


def _disrca(**kw):
    inner = DisentangledRelationalCrossAttention(D, n_heads=2, **{"dropout": 0.0, **kw}, add_bias_out=True)
    return _WithSymbols(inner, SymbolicAttention(D, n_heads=2, n_symbols=5))


def _dual(**kw):
    inner = DualAttention(D, n_heads_sa=1, n_heads_ra=1, **{"dropout": 0.0, **kw}, sa_kwargs={"add_bias_out": True},
                          ra_kwargs={"add_bias_out": True, "symmetric_rels": True})
    return _WithSymbols(inner, PositionalSymbolRetriever(D, MAX_LEN))


SELF = dict(self_only=True, masks=frozenset({"mask", "key_padding_mask", "is_causal"}), arg_names={"query": "x"},
            max_seq_len=None)

ENTRIES = [
    Entry(name="dual_attention.Attention",
          build=lambda **kw: Attention(d_model=D, n_heads=2, **{"dropout": 0.0, **kw}, add_bias_out=True),
          d_model=D, num_heads=2, call=_attention_call, empty_row=_bias_of("wo")),
    Entry(name="dual_attention.RelationalAttention", build=_relational, d_model=D, num_heads=2, call=self_call,
          empty_row=_bias_of("inner.wo"), **SELF),
    Entry(name="dual_attention.RelationalCrossAttention", build=_rca, d_model=D, num_heads=2, call=self_call,
          empty_row=_bias_of("inner.wo"), **SELF),
    Entry(name="dual_attention.DisentangledRelationalCrossAttention", build=_disrca, d_model=D, num_heads=2,
          call=self_call, empty_row=_bias_of("inner.wo"), **SELF),
    Entry(name="dual_attention.DualAttention", build=_dual, d_model=D, num_heads=2, call=self_call,
          empty_row=_bias_of("inner.self_attention.wo", "inner.relational_attention.wo"), **SELF),
    Entry(name="dual_attention.SymbolicAttention",
          build=lambda **kw: SymbolicAttention(D, n_heads=2, n_symbols=5, **kw),
          d_model=D, call=self_call, self_only=True, masks=frozenset(), need_weights=False, empty_row=None,
          arg_names={"query": "x"}),
]

NOT_ENTRIES = {
    "PositionalSymbolRetriever": "a lookup table by position, no attention; runs inside the RelationalAttention and "
                                 "DualAttention entries; " + TEST + "test_symbol_retrievers_equal_the_package",
    "PositionRelativeSymbolRetriever": "a lookup table by relative position, no attention; runs inside the "
                                       "RelationalCrossAttention entry; "
                                       + TEST + "test_symbol_retrievers_equal_the_package",
    "RMSNorm": "a normalisation layer; " + TEST + "test_encoder_block_equals_the_package",
    "FeedForwardBlock": "a feed-forward layer; " + TEST + "test_encoder_block_equals_the_package",
    "DualAttnEncoderBlock": "a block around DualAttention (entry above); "
                            + TEST + "test_encoder_block_equals_the_package",
    "DualAttnDecoderBlock": "a block around DualAttention and Attention (entries above); "
                            + TEST + "test_decoder_block_equals_the_package",
    "DualAttnTransformerLM": "a model (token ids in, logits out); " + TEST + "test_language_model_equals_the_package "
                             "and " + TEST + "test_cached_generation_gives_the_same_tokens",
    "Seq2SeqDualAttnTransformer": "a model (token ids in, logits out); " + TEST + "test_seq2seq_equals_the_package",
    "VisionDualAttnTransformer": "a model (images in, logits out); " + TEST + "test_vision_model_equals_the_package",
}
