"""Conformance entries for transformer_implementation.py, the annotated core.

Two attention entries: the function ``scaled_dot_product_attention`` on (B, H, T, Dh) tensors, through
an adapter that splits the suite's (B, T, 8) inputs into 2 heads of width 4, passes ``dropout_p`` only in
training and merges the heads again; and ``MultiHeadAttention``, which has the project's standard
forward signature. Everything else the core defines is a building block or a model, covered by the
core's own tests (named below).
"""
import torch.nn as nn

from tests.conformance.registry import Entry, bias_row, zero_row
from transformer_implementation import MultiHeadAttention, _check_dropout, scaled_dot_product_attention

HEADS = 2


class _Function(nn.Module):
    """Holds the dropout probability, so that the suite's train/eval switch reaches ``dropout_p``."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        _check_dropout(dropout)  # the core's own check, the one the function applies to dropout_p
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
    result = scaled_dot_product_attention(_split(query), _split(key), _split(value), dropout_p=dropout_p, **options)
    merge = lambda t: t.transpose(1, 2).flatten(2)  # noqa: E731  (B, H, Tq, Dh) -> (B, Tq, H * Dh)
    if options.get("need_weights"):
        return merge(result[0]), result[1]
    return merge(result)


ENTRIES = [
    Entry(name="core.scaled_dot_product_attention",
          build=lambda **kw: _Function(**kw), call=_call, d_model=8, num_heads=HEADS, empty_row=zero_row,
          exempt={"param_grads": "a function has no parameters"}),
    # The key bias is the middle third of in_proj.bias, rows [d_model, 2 d_model): it shifts every score
    # of a query row by the same q . b_k, which the softmax cancels, so that slice gets an exactly zero
    # gradient; the query and value thirds of the same tensor do get gradients.
    Entry(name="core.MultiHeadAttention",
          build=lambda **kw: MultiHeadAttention(d_model=8, num_heads=2, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), zero_grad=("in_proj.bias[8:16]",)),
]

NOT_ENTRIES = {
    "KVCache": "a buffer of keys and values, not attention; tests/test_transformer_attention.py::"
               "test_mha_with_cache_equals_full_causal_attention and the models' cache tests",
    "SinusoidalPositionalEncoding": "positions, not attention; tests/test_transformer_attention.py::"
                                    "test_sinusoidal_table_matches_the_paper_formula",
    "LearnedPositionalEmbedding": "a table of positions, not attention; tests/test_transformer_oracle.py (learned variants)",
    "RotaryEmbedding": "rotates queries and keys, not attention; tests/test_transformer_attention.py::"
                       "test_rotary_matches_the_pairwise_rotation_formula",
    "FeedForward": "position-wise layer, not attention; tests/test_transformer_attention.py::"
                   "test_feedforward_activations_follow_their_formulas_and_differ",
    "MoEFeedForward": "a position-wise mixture of experts, not attention; tests/test_transformer_moe.py::"
                      "test_routed_computation_equals_the_per_token_loop_with_renormalised_gates",
    "make_feed_forward": "a factory of feed-forward layers; tests/test_transformer_moe.py::"
                         "test_bad_options_are_refused_naming_them and tests/test_transformer_oracle.py (moe variants)",
    "RMSNorm": "a normalisation; tests/test_transformer_attention.py::test_rmsnorm_matches_its_formula",
    "make_norm": "a factory of norms; tests/test_transformer_oracle.py (layernorm and rmsnorm variants)",
    "EncoderBlock": "a residual block around MultiHeadAttention (the entry above); "
                    "tests/test_transformer_models.py::test_post_norm_relu_encoder_decoder_equals_torch_transformer "
                    "and tests/test_transformer_oracle.py",
    "DecoderOnlyBlock": "a causal EncoderBlock; tests/test_transformer_oracle.py::"
                        "test_decoder_only_equals_the_re_derivation_and_each_option_changes_the_logits",
    "DecoderBlock": "a residual block around two MultiHeadAttentions; tests/test_transformer_models.py::"
                    "test_post_norm_relu_encoder_decoder_equals_torch_transformer",
    "Transformer": "a language model on token ids, not an attention module; tests/test_transformer_oracle.py, "
                   "tests/test_transformer_gpt2.py, tests/test_transformer_models.py",
    "EncoderDecoderTransformer": "a model on token ids; tests/test_transformer_oracle.py::"
                                 "test_encoder_decoder_equals_the_re_derivation and tests/test_transformer_models.py",
    "EncoderTransformer": "a model on token ids; tests/test_transformer_oracle.py::test_encoder_equals_the_re_derivation",
    "sample_next_token": "sampling from logits; tests/test_sampling.py",
}
