"""Conformance entry for mechanisms/performer.py (the project's standard forward signature).

PerformerAttention takes key_padding_mask and is_causal but refuses a general `mask` (its O(T) sums have no
(Tq, Tk) matrix; the page says so), and has no dropout. Its random projection is a buffer drawn from torch's
generator at construction, so a build after torch.manual_seed is deterministic and the state dict carries it.
need_weights=True is the explicit O(T^2) form of the same estimate (rows sum to 1), so `fused_explicit` compares
the linear-time paths with it.
"""
from mechanisms.performer import PerformerAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="performer.PerformerAttention",
          build=lambda **kw: PerformerAttention(d_model=8, num_heads=2, num_features=6, chunk_size=2, **kw),
          d_model=8, num_heads=2, masks=frozenset({"key_padding_mask", "is_causal"}),
          empty_row=bias_row("out_proj"), dropout=False),
]
NOT_ENTRIES = {
    "gaussian_projection": "draws the random features W; unbiasedness and orthogonality in "
                           "tests/test_performer.py::test_the_kernel_estimate_is_unbiased and "
                           "::test_orthogonal_features_beat_iid_features",
    "positive_random_features": "the feature map phi of FAVOR+; "
                                "tests/test_performer.py::test_the_kernel_estimate_is_unbiased",
}
