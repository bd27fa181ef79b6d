"""``sample_next_token``: empirical frequencies against the distributions of eqs. (16)-(17), worked out here.

For each setting, N = 4000 draws from fixed logits over a vocabulary of 6 with a fixed generator. A
token the rule keeps must be drawn with frequency within 5 standard errors, 5 * sqrt(p (1 - p) / N), of
its probability p (a chance failure at 5 sigma has probability below 1e-6 per token, and the generator
is seeded, so the test is deterministic); a token the rule drops must never be drawn.
"""
import math

import pytest
import torch

from transformer_implementation import sample_next_token

LOGITS = [2.0, 1.2, 0.9, 0.0, -0.5, -2.0]
N = 4000
SIGMAS = 5


def expected_distribution(temperature, top_k=None, top_p=None):
    """eq. (19): softmax(l / T); top_k: the k largest; eq. (20): rank r kept iff the mass above it < top_p."""
    weights = [math.exp(l / temperature) for l in LOGITS]
    probs = [w / sum(weights) for w in weights]
    order = sorted(range(len(probs)), key=lambda v: -probs[v])
    keep = set(order[:top_k] if top_k is not None else order)
    if top_p is not None:
        above, nucleus = 0.0, set()
        for v in order:
            if above < top_p:
                nucleus.add(v)
            above += probs[v]
        keep &= nucleus
    kept = sum(probs[v] for v in keep)
    return [probs[v] / kept if v in keep else 0.0 for v in range(len(probs))]


CASES = {
    "temperature_0.5": dict(temperature=0.5),
    "temperature_2": dict(temperature=2.0),
    "top_k_3": dict(temperature=1.0, top_k=3),
    "top_p_0.7": dict(temperature=1.0, top_p=0.7),  # probabilities 0.496, 0.223, ...: the nucleus is {0, 1}
    "top_p_0.9_at_temperature_2": dict(temperature=2.0, top_p=0.9),  # temperature first, then the nucleus
    "top_k_4_and_top_p_0.8": dict(temperature=1.0, top_k=4, top_p=0.8),  # nucleus {0, 1, 2} inside the top 4
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampling_frequencies_match_the_analytic_distribution(case):
    options = CASES[case]
    expected = expected_distribution(**options)
    logits = torch.tensor([LOGITS]).repeat(N, 1)  # (N, V): N independent draws in one call
    picks = sample_next_token(logits, generator=torch.Generator().manual_seed(0), **options)
    assert picks.shape == (N, 1) and picks.dtype == torch.long
    freq = torch.bincount(picks.flatten(), minlength=len(LOGITS)).double() / N
    for v, p in enumerate(expected):
        if p == 0.0:
            assert freq[v] == 0, f"{case}: token {v} is outside the kept set but was drawn ({freq[v]:.4f})"
        else:
            bound = SIGMAS * math.sqrt(p * (1 - p) / N)
            assert abs(freq[v] - p) <= bound, f"{case}: token {v} drawn {freq[v]:.4f}, expected {p:.4f} +- {bound:.4f}"


def test_the_cases_are_distinguishable():
    # The expected distributions differ by far more than the tolerance, so a slip that swaps one rule for
    # another (multiplying by the temperature, top-p before the temperature, ...) cannot pass.
    a, b = expected_distribution(0.5), expected_distribution(2.0)
    assert max(abs(x - y) for x, y in zip(a, b)) > 0.2
    nucleus_first = expected_distribution(1.0, top_p=0.9)  # the nucleus of the untempered distribution
    assert sum(p > 0 for p in nucleus_first) != sum(p > 0 for p in expected_distribution(2.0, top_p=0.9))


def test_temperature_zero_is_argmax_and_the_generator_makes_draws_reproducible():
    logits = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_next_token(logits, temperature=0.0), logits.argmax(-1, keepdim=True))
    draw = lambda: sample_next_token(logits, generator=torch.Generator().manual_seed(5))  # noqa: E731
    assert torch.equal(draw(), draw())
