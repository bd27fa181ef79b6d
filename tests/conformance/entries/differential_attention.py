"""Conformance entry for mechanisms/differential_attention.py (the project's standard forward signature).

The returned weights are the differential map softmax_1 - lambda softmax_2, whose rows sum to 1 - lambda (not 1;
tests/test_differential_attention.py::test_matches_the_formula_written_out checks that sum).
"""
from mechanisms.differential_attention import DifferentialAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="differential_attention.DifferentialAttention",
          build=lambda **kw: DifferentialAttention(d_model=8, num_heads=2, layer_index=1, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"), weights_sum_to_one=False,
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",),
          exempt={"dropout": "dropout acts on the two softmax maps, unbiased there, but the per-head RMSNorm after "
                             "them is nonlinear, so the OUTPUT's mean in train() is not the eval output (the "
                             "paper's layout, not a bug); off in eval and weights-before-dropout are checked in "
                             "tests/test_differential_attention.py::test_dropout_is_off_in_eval_and_weights_are_taken_before_it"}),
]
NOT_ENTRIES = {
    "lambda_init_schedule": "the number 0.8 - 0.6 exp(-0.3 l); "
                            "tests/test_differential_attention.py::test_lambda_init_follows_the_depth_schedule",
}
