"""Conformance entry for mechanisms/rotary_embedding.py.

RotarySelfAttention takes the standard forward (plus `positions`); its max_seq_len bounds the default
positions 0..Tk-1. The key-projection bias is NOT a zero-gradient parameter here: after the rotation the
bias of key j is R_{p_j} b, which differs from key to key, so the softmax does not cancel it.
"""
from mechanisms.rotary_embedding import RotarySelfAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="rotary_embedding.RotarySelfAttention",
          build=lambda **kw: RotarySelfAttention(d_model=8, num_heads=2, max_seq_len=8, **kw),
          d_model=8, num_heads=2, max_seq_len=8, empty_row=bias_row("out_proj")),
]
NOT_ENTRIES = {
    "RotaryEmbedding": "rotates (B, H, T, Dh) queries and keys, no attention; "
                       "tests/test_rotary_embedding.py::test_rotation_equals_explicit_2x2_rotation_per_pair",
    "apply_rotary": "the rotation with given cos/sin tables, no attention; "
                    "tests/test_rotary_embedding.py::test_apply_rotary_lines_per_sequence_cos_sin_up_with_the_batch",
}
