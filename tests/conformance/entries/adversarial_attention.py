"""Conformance entry for mechanisms/adversarial_attention.py (the project's standard forward signature).

The suite never passes `score_perturbation`, so it checks the attention itself; the perturbation (training
only, off in eval) is checked in tests/test_adversarial_attention.py.
"""
from mechanisms.adversarial_attention import AdversarialAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="adversarial_attention.AdversarialAttention",
          build=lambda **kw: AdversarialAttention(d_model=8, num_heads=2, epsilon=0.5, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"),
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",)),
]
NOT_ENTRIES = {}
