"""The mixture-of-experts feed-forward layer of the core (``MoEFeedForward``, ``ff="moe"``), eqs. (10)-(12).

Each reference below is written here from the page's equations and reads only parameter tensors:

* one expert with top_k = 1 is the dense feed-forward layer with the same weights (layer and model);
* the routed computation (gather per expert, scatter-add) equals an explicit loop over tokens and their
  chosen experts, with the gates renormalised over the chosen k (eq. (11));
* the balancing loss equals X * sum_i f_i P_i computed by counting (eq. (12)); it is 1, its value for a
  balanced layer, when the router is uniform, and X when every token goes to one expert; the models add
  ``moe_loss_weight`` times it to the language-model loss;
* no capacity limit: a token's output does not depend on the other tokens of the batch;
* ``num_experts`` and ``top_k`` each change the output at equal weights.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from transformer_implementation import (EncoderDecoderTransformer, EncoderTransformer, FeedForward, MoEFeedForward,
                                        Transformer, make_feed_forward)

E, F_ = 8, 12


def randomized(module, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    module = module.double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    return module


def tokens(shape=(3, 5, E), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense(x, ff, activation):
    """eq. (8)/(9) from the weights: linear1, activation, linear2."""
    h = x @ ff.linear1.weight.T + ff.linear1.bias
    if activation == "relu":
        h = h.clamp(min=0)
    elif activation == "gelu":
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    elif activation == "gelu_tanh":
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    else:
        gate, up = h[..., : h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
        h = gate * torch.sigmoid(gate) * up
    return h @ ff.linear2.weight.T + ff.linear2.bias


def routed_by_loop(x, moe, activation):
    """eqs. (10)-(11) token by token: p = softmax(x W_r^T); K = the top_k indices; sum_{i in K} p_i / sum_K p FFN_i(x)."""
    out = torch.zeros_like(x)
    flat, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for t in range(flat.shape[0]):
        z = flat[t] @ moe.router.weight.T
        p = torch.exp(z - z.max())
        p = p / p.sum()
        chosen = sorted(range(moe.num_experts), key=lambda i: -float(p[i]))[: moe.top_k]
        norm = sum(float(p[i]) for i in chosen)
        for i in chosen:
            flat_out[t] += float(p[i]) / norm * dense(flat[t], moe.experts[i], activation)
    return out


def balancing_loss_by_counting(x, moe):
    """eq. (12): X * sum_i f_i P_i, f_i = (times i was chosen) / (N k), P_i = mean router probability of i."""
    flat = x.reshape(-1, x.shape[-1])
    N, X, k = flat.shape[0], moe.num_experts, moe.top_k
    counts, P = [0] * X, [0.0] * X
    for t in range(N):
        p = torch.softmax(flat[t] @ moe.router.weight.detach().T, dim=-1)
        for i in sorted(range(X), key=lambda i: -float(p[i]))[:k]:
            counts[i] += 1
        for i in range(X):
            P[i] += float(p[i]) / N
    return X * sum(counts[i] / (N * k) * P[i] for i in range(X))


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "swiglu"])
def test_one_expert_with_top_1_is_the_dense_feed_forward_layer(activation):
    moe = randomized(MoEFeedForward(E, F_, num_experts=1, top_k=1, activation=activation))
    ff = FeedForward(E, F_, activation=activation).double().eval()
    ff.load_state_dict(moe.experts[0].state_dict())
    x = tokens()
    with torch.no_grad():
        assert (moe(x) - ff(x)).abs().max() < 1e-12


def test_one_expert_model_equals_the_dense_model_with_the_same_weights():
    torch.manual_seed(0)
    dense_lm = randomized(Transformer(13, E, 2, 2, F_, 10, dropout=0.0))
    moe_lm = randomized(Transformer(13, E, 2, 2, F_, 10, dropout=0.0, ff="moe", num_experts=1, top_k=1), seed=5)
    state = {k.replace(".ff.", ".ff.experts.0."): v for k, v in dense_lm.state_dict().items()}
    state.update({k: v for k, v in moe_lm.state_dict().items() if "router" in k})  # a router with one output
    moe_lm.load_state_dict(state)
    ids = torch.randint(0, 13, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (moe_lm(ids) - dense_lm(ids)).abs().max() < 1e-12


@pytest.mark.parametrize("num_experts, top_k, activation", [(4, 2, "relu"), (4, 1, "gelu"), (3, 3, "swiglu"),
                                                            (5, 3, "gelu_tanh")])
def test_routed_computation_equals_the_per_token_loop_with_renormalised_gates(num_experts, top_k, activation):
    moe = randomized(MoEFeedForward(E, F_, num_experts=num_experts, top_k=top_k, activation=activation))
    x = tokens()
    with torch.no_grad():
        err = (moe(x) - routed_by_loop(x, moe, activation)).abs().max().item()
    assert err < 1e-12, f"routed MoE differs from the per-token loop by {err:.3g}"


@pytest.mark.parametrize("num_experts, top_k", [(4, 1), (4, 2), (5, 3)])
def test_balancing_loss_follows_its_formula(num_experts, top_k):
    moe = randomized(MoEFeedForward(E, F_, num_experts=num_experts, top_k=top_k))
    x = tokens((4, 6, E))
    moe(x)
    assert abs(moe.aux_loss.item() - balancing_loss_by_counting(x, moe)) < 1e-12
    moe.aux_loss.backward()  # P carries the gradient to the router
    assert moe.router.weight.grad.abs().max() > 0


@pytest.mark.parametrize("top_k", [1, 2])
def test_balancing_loss_is_one_for_a_uniform_router_and_num_experts_for_a_collapsed_one(top_k):
    X = 4
    moe = randomized(MoEFeedForward(E, F_, num_experts=X, top_k=top_k))
    x = tokens((4, 6, E))
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform router: P_i = 1/X whatever the dispatch, so X sum f_i / X = 1
        moe(x)
        assert abs(moe.aux_loss.item() - 1.0) < 1e-12
        # collapsed: every token puts all its probability on expert 0 (a huge logit for positive inputs)
        x_pos = x.abs() + 0.1
        moe.router.weight[0] = 1e3
        moe(x_pos)
    expected = X / top_k  # f_0 = 1/k (expert 0 fills one of each token's k slots), P_0 = 1, the other P_i = 0
    assert abs(moe.aux_loss.item() - expected) < 1e-6
    assert moe.aux_loss.item() > 1.5  # far above the balanced value 1


def test_models_return_the_lm_loss_plus_the_weighted_balancing_loss():
    torch.manual_seed(0)
    ids = torch.randint(0, 13, (2, 9), generator=torch.Generator().manual_seed(3))
    models = [
        (Transformer(13, E, 2, 2, F_, 10, dropout=0.0, ff="moe", num_experts=3), lambda m: m(ids, ids)),
        (EncoderTransformer(13, E, 2, 2, F_, 10, dropout=0.0, ff="moe", num_experts=3),
         lambda m: m(ids, targets=ids)),
        (EncoderDecoderTransformer(13, 13, E, 2, 1, 1, F_, 10, dropout=0.0, ff="moe", num_experts=3),
         lambda m: m(ids, ids, targets=ids)),
    ]
    for model, run in models:
        model = randomized(model)
        logits, loss = run(model)
        aux = model.moe_aux_loss()
        layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
        assert len(layers) >= 2 and abs(aux.item() - sum(m.aux_loss.item() for m in layers) / len(layers)) < 1e-12
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
        assert abs(loss.item() - (lm.item() + 0.01 * aux.item())) < 1e-12
        model.moe_loss_weight = 0.0
        assert abs(run(model)[1].item() - lm.item()) < 1e-12
    assert Transformer(13, E, 2, 1, F_, 10).moe_aux_loss() is None  # dense: no balancing loss


def test_no_capacity_limit_a_token_output_does_not_depend_on_the_rest_of_the_batch():
    moe = randomized(MoEFeedForward(E, F_, num_experts=4, top_k=2))
    x = tokens((2, 7, E))
    with torch.no_grad():
        whole = moe(x)
        one_by_one = torch.stack([torch.stack([moe(x[b:b + 1, t:t + 1])[0, 0] for t in range(7)]) for b in range(2)])
    assert (whole - one_by_one).abs().max() < 1e-12


def test_num_experts_and_top_k_each_change_the_output():
    x = tokens()
    base = randomized(MoEFeedForward(E, F_, num_experts=3, top_k=1))
    with torch.no_grad():
        out = base(x)
        more_k = MoEFeedForward(E, F_, num_experts=3, top_k=2).double().eval()
        more_k.load_state_dict(base.state_dict())
        assert (more_k(x) - out).abs().max() > 1e-3
        more_experts = randomized(MoEFeedForward(E, F_, num_experts=4, top_k=1), seed=7)
        state = more_experts.state_dict()
        state.update({k: v for k, v in base.state_dict().items() if not k.startswith("router")})
        state["router.weight"][:3] = base.router.weight  # same first three experts and router rows
        more_experts.load_state_dict(state)
        assert (more_experts(x) - out).abs().max() > 1e-3


def test_bad_options_are_refused_naming_them():
    with pytest.raises(ValueError, match="top_k=3 must not exceed num_experts=2"):
        MoEFeedForward(E, F_, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_experts"):
        Transformer(13, E, 2, 1, F_, 10, ff="moe", num_experts=0)
    with pytest.raises(ValueError, match="top_k"):
        Transformer(13, E, 2, 1, F_, 10, ff="moe", top_k=0)
    with pytest.raises(ValueError, match="ff must be 'dense' or 'moe'"):
        make_feed_forward("sparse", E, F_)


def test_moe_runs_under_bf16_autocast_and_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = Transformer(13, E, 2, 2, F_, 10, dropout=0.0, ff="moe", num_experts=3, top_k=2)
    ids = torch.randint(0, 13, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(ids, ids)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.save(tmp_path / "moe.pt")
    twin = copy.deepcopy(model)  # after a training forward: the graph-holding aux_loss is not copied
    assert twin.layers[0].ff.aux_loss is None and model.layers[0].ff.aux_loss is not None
    loaded = Transformer.load(tmp_path / "moe.pt")
    assert loaded.config["ff"] == "moe" and loaded.config["num_experts"] == 3
    with torch.no_grad():
        assert torch.equal(loaded(ids), model.eval()(ids))
