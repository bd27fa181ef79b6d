"""Conformance entry for mechanisms/nystromformer.py: self-attention on x, 6 tokens in 3 landmarks of 2.

The landmarks average whole segments (future tokens included), so there is no causal form, and a (T, T) mask
has nothing to apply to (both refused, documented on the page); padding goes through key_padding_mask. The
weights returned by need_weights are the Nystrom approximation F A^+ B, whose rows sum to 1 only as far as the
Newton-Schulz pseudo-inverse is exact (weights_sum_to_one=False). There is no dropout argument (dropping entries of F, A or B would not drop entries of F A^+ B).
There is no fused kernel: the fused and explicit paths share the computation.
"""
from mechanisms.nystromformer import NystromAttention
from tests.conformance.registry import Entry, bias_row, self_call

ENTRIES = [
    Entry(name="nystromformer.NystromAttention",
          build=lambda **kw: NystromAttention(d_model=8, num_heads=2, num_landmarks=3, **kw),
          call=self_call, self_only=True, d_model=8, num_heads=2, empty_row=bias_row("out_proj"),
          masks=frozenset({"key_padding_mask"}), dropout=False, weights_sum_to_one=False, lengths=(6, 6),
          arg_names={"query": "x"}),
]
NOT_ENTRIES = {
    "newton_schulz_pinv": "a pure function (eq. (5)-(6)); tested against torch.linalg.pinv in "
                          "tests/test_nystromformer.py::test_newton_schulz_converges_to_torch_pinv",
}
