"""mechanisms/adversarial_attention.py: multi-head attention plus an adversarial push of its scores.

Oracles: without a perturbation (or in eval, or with epsilon = 0) torch.nn.MultiheadAttention with copied
weights; with a perturbation r, softmax(QK^T / sqrt(Dh) + r) V written out here. The paper-specific fact:
epsilon * g / ||g|| raises the loss by epsilon * ||g|| to first order, more than any other direction of the
same size (Cauchy-Schwarz), which is what makes it the adversarial direction.
"""
import math

import pytest
import torch

from mechanisms.adversarial_attention import AdversarialAttention
from tests.oracles import mha_reference, output_of, random_inputs, random_mask, randomize_, torch_mha_like

FP64_TOL = 1e-10
D, H, B, TQ, TK = 16, 2, 2, 4, 6


def _model(dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"d_model": D, "num_heads": H, "epsilon": 0.5, **kwargs}
    # non-zero biases, so that a dropped bias would be noticed
    return randomize_(AdversarialAttention(**kwargs).to(dtype).eval(), biases_only=True)


def _inputs(seed=1):
    return random_inputs(B, (TQ, TK, TK), D, seed=seed)


def _loss_fn(target):
    return lambda out: ((out - target) ** 2).mean()


def _score_grad(model, q, k, v, loss_fn, **kwargs):
    """g = dL/ds, measured as the gradient at a zero perturbation (the paper's first pass)."""
    zero = torch.zeros(B, H, q.size(1), k.size(1), dtype=torch.float64, requires_grad=True)
    loss = loss_fn(model(q, k, v, score_perturbation=zero, **kwargs))
    return loss.detach(), torch.autograd.grad(loss, zero)[0]


@pytest.mark.parametrize("need_weights", [False, True])
def test_without_perturbation_it_is_torch_multihead_attention(need_weights):
    model = _model()
    q, k, v = _inputs()
    mask = random_mask((B, H, TQ, TK), seed=3)
    expected, expected_w = mha_reference(model, q, k, v, mask=mask)  # nn.MultiheadAttention, copied weights
    r = torch.randn(B, H, TQ, TK, dtype=torch.float64)
    with torch.no_grad():
        plain = model(q, k, v, mask=mask, need_weights=need_weights)
        ignored = model(q, k, v, mask=mask, need_weights=need_weights, score_perturbation=r)  # eval: off
        zero_eps = _model(epsilon=0.0).train()  # training, but the adversarial perturbation has size 0
        adv = zero_eps(q, k, v, mask=mask, need_weights=need_weights,
                       score_perturbation=zero_eps.adversarial_perturbation(r))
    for result in (plain, ignored, adv):
        assert (output_of(result) - expected).abs().max() < FP64_TOL
        if need_weights:
            assert (result[1] - expected_w).abs().max() < FP64_TOL


@pytest.mark.parametrize("need_weights", [False, True])
def test_perturbed_scores_follow_the_formula(need_weights):
    model = _model().train()
    q, k, v = _inputs()
    r = torch.randn(B, H, TQ, TK, dtype=torch.float64)
    allowed = torch.ones(TQ, TK, dtype=torch.bool).tril(TK - TQ)  # bottom-right causal
    split = lambda t, proj: proj(t).view(B, t.size(1), H, D // H).transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        scores = split(q, model.q_proj) @ split(k, model.k_proj).transpose(-2, -1) / math.sqrt(D // H) + r
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        heads = weights @ split(v, model.v_proj)
        expected = model.out_proj(heads.transpose(1, 2).reshape(B, TQ, D))
        result = model(q, k, v, is_causal=True, need_weights=need_weights, score_perturbation=r)
    assert (output_of(result) - expected).abs().max() < FP64_TOL
    if need_weights:
        assert (result[1] - weights).abs().max() < FP64_TOL


def test_adversarial_perturbation_is_epsilon_times_the_normalised_gradient():
    model = _model(epsilon=0.7).train()
    q, k, v = _inputs()
    target = torch.randn(B, TQ, D, dtype=torch.float64)
    kpm = torch.ones(B, TK, dtype=torch.bool)
    kpm[0, -2:] = False
    _, g = _score_grad(model, q, k, v, _loss_fn(target), key_padding_mask=kpm)
    r = model.adversarial_perturbation(g)
    for b in range(B):
        assert abs(r[b].norm() - 0.7) < FP64_TOL  # size epsilon, per example
        assert (r[b] - 0.7 * g[b] / g[b].norm()).abs().max() < FP64_TOL  # along the gradient
    assert (r[0, ..., -2:] == 0).all()  # padded keys have no gradient, so no perturbation
    g[1] = 0.0
    assert (model.adversarial_perturbation(g)[1] == 0).all()  # no gradient: no perturbation, not NaN


def test_the_perturbation_raises_the_loss_to_first_order():
    # L(s + eps * g / ||g||) = L(s) + eps * ||g|| + O(eps^2), and eps * ||g|| is the largest first-order rise
    # of any perturbation of size eps (Cauchy-Schwarz): random directions of the same size rise less.
    q, k, v = _inputs()
    loss_fn = _loss_fn(torch.randn(B, TQ, D, dtype=torch.float64))
    model = _model(epsilon=1e-5).train()
    clean, g = _score_grad(model, q, k, v, loss_fn)
    first_order = 1e-5 * g.flatten(1).norm(dim=1).sum()  # per example, summed: the loss is a batch mean
    with torch.no_grad():
        adversarial = loss_fn(model(q, k, v, score_perturbation=model.adversarial_perturbation(g)))
        assert abs((adversarial - clean) / first_order - 1) < 1e-3
        gen = torch.Generator().manual_seed(5)
        for _ in range(5):
            random = model.adversarial_perturbation(torch.randn(g.shape, generator=gen, dtype=torch.float64))
            assert loss_fn(model(q, k, v, score_perturbation=random)) - clean < 0.9 * (adversarial - clean)
    # ...and at a useful size (epsilon = 0.5) the adversarial loss is clearly higher than the clean one.
    big = _model(epsilon=0.5).train()
    clean, g = _score_grad(big, q, k, v, loss_fn)
    with torch.no_grad():
        assert loss_fn(big(q, k, v, score_perturbation=big.adversarial_perturbation(g))) > clean + 1e-3


def test_distinct_from_multi_head_attention_in_training():
    model = _model().train()
    q, k, v = _inputs()
    _, g = _score_grad(model, q, k, v, _loss_fn(torch.randn(B, TQ, D, dtype=torch.float64)))
    with torch.no_grad():
        perturbed = model(q, k, v, score_perturbation=model.adversarial_perturbation(g))
        assert (perturbed - torch_mha_like(model)(q, k, v)[0]).abs().max() > 1e-3


def test_every_constructor_argument_changes_the_output():
    base = _model().train()
    q, k, v = _inputs()
    _, g = _score_grad(base, q, k, v, _loss_fn(torch.randn(B, TQ, D, dtype=torch.float64)))

    def adversarial_output(model):
        with torch.no_grad():
            return model(q, k, v, score_perturbation=model.adversarial_perturbation(g))

    out = adversarial_output(base)
    other_eps = _model(epsilon=1.5).train()
    other_eps.load_state_dict(base.state_dict())
    assert (adversarial_output(other_eps) - out).abs().max() > 1e-3, "epsilon"
    one_head = _model(num_heads=1).eval()
    one_head.load_state_dict(base.state_dict())  # the same weights, one head of width 16
    assert (one_head(q, k, v) - base.eval()(q, k, v)).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if n.endswith("weight")})
    assert (no_bias(q, k, v) - base(q, k, v)).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5).train()
    dropped.load_state_dict(base.state_dict())
    torch.manual_seed(0)
    assert (dropped(q, k, v) - base(q, k, v)).abs().max() > 1e-3, "dropout"
    assert _model(d_model=8, num_heads=2)(q[..., :8]).shape == (B, TQ, 8), "d_model"


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="epsilon"):
        AdversarialAttention(D, H, epsilon=-1.0)
    model = _model().train()
    q = _inputs()[0]
    with pytest.raises(ValueError, match="score_perturbation"):
        model(q, score_perturbation=torch.zeros(B, H, TQ, TQ + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="score_grad"):
        model.adversarial_perturbation(torch.zeros(B, H + 1, TQ, TQ))


def test_adversarial_training_step_runs_with_both_losses():
    # The paper's objective L(s) + lambda * L(s + r_adv), built as in its code: its gradient reaches every
    # parameter, and the adversarial term is the larger one.
    model = _model().train()
    q, k, v = _inputs()
    loss_fn = _loss_fn(torch.randn(B, TQ, D, dtype=torch.float64))
    zero = torch.zeros(B, H, TQ, TK, dtype=torch.float64, requires_grad=True)
    clean = loss_fn(model(q, k, v, score_perturbation=zero))
    (g,) = torch.autograd.grad(clean, zero, retain_graph=True)
    adversarial = loss_fn(model(q, k, v, score_perturbation=model.adversarial_perturbation(g)))
    (clean + 1.0 * adversarial).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert adversarial > clean
