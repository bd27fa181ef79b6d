"""The three models against a re-derivation written here from the page's equations, in float64.

The reference below never calls the model or its submodules: it reads the parameter tensors and
recomputes everything with plain tensor algebra, equation by equation (docs/transformer.md):

    x_t = s * e_{id_t} + p_t                       eq. (16), s = sqrt(E) unless scale_embeddings=False
    pre-norm:  x = x + MHA(N(x));  x = x + FFN(N(x))           eq. (15)
    ff="moe":  FFN(x) = sum over the top_k experts i of g_i FFN_i(x)   eqs. (10)-(11)
    post-norm: x = N(x + MHA(x));  x = N(x + FFN(x))
    logits = N(h) W^T, W the embedding matrix when tied       eq. (17)

with attention, positions, norms and activations spelled out from their formulas (eqs. (1)-(14)). Which
option is on is taken from the test's own arguments, never from the model's config. Every constructor
option of each model is checked against the reference, and shown to change the logits.
"""
import inspect
import math

import pytest
import torch

from transformer_implementation import EncoderDecoderTransformer, EncoderTransformer, Transformer

TOL = 1e-10  # float64
E, H, F_, V, L = 16, 4, 24, 19, 12


# ----------------------------------------------------------------------------- the re-derivation


def linear(x, layer):
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def norm(x, module, kind):
    if kind == "layernorm":  # eq. (14)
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + 1e-5) * module.weight
        return y if getattr(module, "bias", None) is None else y + module.bias
    assert kind == "rmsnorm"  # eq. (13)
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * module.weight


def activate(h, kind):
    if kind == "relu":
        return torch.clamp(h, min=0)
    if kind == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if kind == "gelu_tanh":
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    assert kind == "swiglu"  # eq. (9): first half gate, second half up
    gate, up = h[..., : h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
    return gate * torch.sigmoid(gate) * up


def ffn(x, ff, kind):
    return linear(activate(linear(x, ff.linear1), kind), ff.linear2)  # eq. (8)


def moe(x, layer, opt):
    """eqs. (10)-(11), one token at a time: softmax router, the top_k experts, gates renormalised over them."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            z = x[b, t] @ layer.router.weight.T  # (X,)
            p = torch.exp(z - z.max())
            p = p / p.sum()
            chosen = sorted(range(len(p)), key=lambda i: -float(p[i]))[: opt["top_k"]]
            total = sum(p[i] for i in chosen)
            for i in chosen:
                out[b, t] += p[i] / total * ffn(x[b, t], layer.experts[i], opt["activation"])
    return out


def feed_forward(x, layer, opt):
    return moe(x, layer, opt) if opt["ff"] == "moe" else ffn(x, layer, opt["activation"])


def f32(value):
    """Round to float32: the model stores its position tables in float32 (computed in float64)."""
    return float(torch.tensor(value, dtype=torch.float32))


def sinusoid(T, width):  # eq. (5)
    pe = torch.zeros(T, width, dtype=torch.float64)
    for p in range(T):
        for i in range(width // 2):
            pe[p, 2 * i] = f32(math.sin(p / 10000 ** (2 * i / width)))
            pe[p, 2 * i + 1] = f32(math.cos(p / 10000 ** (2 * i / width)))
    return pe


def rope(x, base=10000.0):  # eq. (6): channel c paired with c + Dh/2, position = row index
    T, Dh = x.shape[-2], x.shape[-1]
    half = Dh // 2
    out = torch.empty_like(x)
    for m in range(T):
        for c in range(half):
            theta = m * base ** (-2 * c / Dh)
            cos, sin = f32(math.cos(theta)), f32(math.sin(theta))
            a, b = x[..., m, c], x[..., m, c + half]
            out[..., m, c] = a * cos - b * sin
            out[..., m, c + half] = b * cos + a * sin
    return out


def attention(xq, xkv, mha, allowed, rotary=False):
    """eqs. (1)-(4) with weights from mha.in_proj (rows: query, key, value) and mha.out_proj.

    allowed: (B, Tq, Tk) bool, True = may attend. A query row with no allowed key gets zero attention.
    """
    B, Tq, _ = xq.shape
    Tk = xkv.shape[1]
    W, b = mha.in_proj.weight, mha.in_proj.bias
    Dh = E // mha.num_heads
    heads = []
    for h in range(mha.num_heads):
        rows = [slice(part * E + h * Dh, part * E + (h + 1) * Dh) for part in range(3)]
        q, k, v = (x @ W[r].T + (0 if b is None else b[r]) for x, r in zip((xq, xkv, xkv), rows))
        if rotary:
            q, k = rope(q), rope(k)
        scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)  # (B, Tq, Tk)
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        weights = torch.where(allowed.any(-1, keepdim=True), weights, torch.zeros_like(weights))
        heads.append(weights @ v)
    return linear(torch.cat(heads, dim=-1), mha.out_proj)


def residual(x, sublayer, norm_module, opt):
    if opt["norm_first"]:
        return x + sublayer(norm(x, norm_module, opt["norm"]))
    return norm(x + sublayer(x), norm_module, opt["norm"])


def embed(ids, table, pos_module, opt):
    x = table.weight[ids] * (math.sqrt(E) if opt["scale_embeddings"] else 1.0)  # eq. (16)
    T = ids.shape[1]
    if opt["position"] == "sinusoidal":
        x = x + sinusoid(T, E)
    elif opt["position"] == "learned":
        x = x + pos_module.weight[:T]
    return x


def encoder_layer(x, layer, allowed, opt):
    rot = opt["position"] == "rotary"
    x = residual(x, lambda h: attention(h, h, layer.self_attn, allowed, rot), layer.norm1, opt)
    return residual(x, lambda h: feed_forward(h, layer.ff, opt), layer.norm2, opt)


def causal(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


def ref_decoder_only(model, ids, opt):
    B, T = ids.shape
    x = embed(ids, model.token_embedding, model.pos, opt)
    for layer in model.layers:
        x = encoder_layer(x, layer, causal(T).expand(B, T, T), opt)
    head = model.token_embedding.weight if opt["tie_weights"] else model.lm_head.weight  # eq. (17)
    return norm(x, model.norm, opt["norm"]) @ head.T


def ref_encoder_decoder(model, src, tgt, opt, pad=0):
    B, S = src.shape
    T = tgt.shape[1]
    src_keys = (src != pad)[:, None, :]  # (B, 1, S)
    x = embed(src, model.src_embedding, model.pos, opt)
    for layer in model.encoder_layers:
        x = encoder_layer(x, layer, src_keys.expand(B, S, S), opt)
    memory = norm(x, model.encoder_norm, opt["norm"])
    y = embed(tgt, model.tgt_embedding, model.pos, opt)
    self_allowed = causal(T) & (tgt != pad)[:, None, :]  # (B, T, T)
    rot = opt["position"] == "rotary"  # rotary positions act in self-attention only
    for layer in model.decoder_layers:
        y = residual(y, lambda h: attention(h, h, layer.self_attn, self_allowed, rot), layer.norm1, opt)
        y = residual(y, lambda h: attention(h, memory, layer.cross_attn, src_keys.expand(B, T, S)), layer.norm2, opt)
        y = residual(y, lambda h: feed_forward(h, layer.ff, opt), layer.norm3, opt)
    head = model.tgt_embedding.weight if opt["tie_weights"] else model.lm_head.weight
    return norm(y, model.decoder_norm, opt["norm"]) @ head.T


def ref_encoder(model, ids, opt, pad=0):
    B, T = ids.shape
    x = embed(ids, model.token_embedding, model.pos, opt)
    for layer in model.layers:
        x = encoder_layer(x, layer, (ids != pad)[:, None, :].expand(B, T, T), opt)
    hidden = norm(x, model.norm, opt["norm"])
    dense, _, head_norm, out = model.lm_head  # BERT's MLM head: dense, exact GELU, norm, tied output layer
    h = norm(activate(linear(hidden, dense), "gelu"), head_norm, opt["norm"])
    head = model.token_embedding.weight if opt["tie_weights"] else out.weight
    return hidden, h @ head.T


# ----------------------------------------------------------------------------- helpers


def randomized(model, seed=0):
    """float64, eval, every parameter (norm gains and biases too) moved well off its initial value."""
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.4)
    return model


def ids(shape, vocab=V, seed=0, low=0):
    return torch.randint(low, vocab, shape, generator=torch.Generator().manual_seed(seed))


def keyword_options(cls):
    return {n for n, p in inspect.signature(cls).parameters.items() if p.kind is p.KEYWORD_ONLY}


def share_weights(src, dst):
    """Copy every parameter of src whose name and shape dst also has (so an option is compared at equal weights)."""
    theirs = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in theirs and theirs[k].shape == v.shape},
                        strict=False)
    return dst


def assert_close(got, expected, what):
    err = (got - expected).abs().max().item()
    assert err < TOL, f"{what}: max |model - re-derivation| = {err:.3g}"


# ----------------------------------------------------------------------------- decoder-only


LM_DEFAULTS = dict(position="sinusoidal", norm="layernorm", norm_first=True, activation="gelu", tie_weights=True,
                   bias=True, scale_embeddings=True, ff="dense", num_experts=4, top_k=2)
LM_VARIANTS = {
    "default": {},
    "learned": dict(position="learned"),
    "rotary": dict(position="rotary"),
    "rmsnorm": dict(norm="rmsnorm"),
    "post_norm": dict(norm_first=False),
    "relu": dict(activation="relu"),
    "gelu_tanh": dict(activation="gelu_tanh"),
    "swiglu": dict(activation="swiglu"),
    "untied": dict(tie_weights=False),
    "no_bias": dict(bias=False),
    "unscaled": dict(scale_embeddings=False),
    "gpt2": dict(position="learned", activation="gelu_tanh", scale_embeddings=False),
    "moe": dict(ff="moe", num_experts=3, top_k=2),
    "moe_top1_swiglu": dict(ff="moe", num_experts=4, top_k=1, activation="swiglu"),
}


def build_lm(num_heads=H, dropout=0.0, seed=0, **options):
    torch.manual_seed(seed)
    return randomized(Transformer(V, E, num_heads, 2, F_, L, dropout=dropout, **options), seed)


def test_every_keyword_option_of_the_models_is_covered():
    assert keyword_options(Transformer) == set(LM_DEFAULTS)
    assert keyword_options(EncoderDecoderTransformer) == set(LM_DEFAULTS) | {"pad_id"}
    assert keyword_options(EncoderTransformer) == set(LM_DEFAULTS) | {"pad_id"}
    assert set().union(*LM_VARIANTS.values()) == set(LM_DEFAULTS)


@pytest.mark.parametrize("variant", list(LM_VARIANTS))
def test_decoder_only_equals_the_re_derivation_and_each_option_changes_the_logits(variant):
    options = LM_VARIANTS[variant]
    model = build_lm(**options)
    x = ids((2, 9))
    with torch.no_grad():
        got = model(x)
        assert_close(got, ref_decoder_only(model, x, dict(LM_DEFAULTS, **options)), variant)
        if options:  # the option matters: the default model with the same weights gives other logits
            default = share_weights(model, build_lm(seed=1))
            assert (default(x) - got).abs().max() > 1e-3, f"{variant} does not change the logits"


def test_decoder_only_heads_and_dropout_in_eval():
    x = ids((2, 9))
    two_heads = build_lm(num_heads=2)
    with torch.no_grad():
        assert_close(two_heads(x), ref_decoder_only(two_heads, x, LM_DEFAULTS), "num_heads=2")
        # same weights, other head split: other logits (num_heads is more than a shape)
        assert (share_weights(two_heads, build_lm(seed=1))(x) - two_heads(x)).abs().max() > 1e-3
        dropped = build_lm(dropout=0.5)  # in eval mode dropout is the identity
        assert_close(dropped(x), ref_decoder_only(dropped, x, LM_DEFAULTS), "dropout=0.5 in eval")
        dropped.train()
        assert (dropped(x) - ref_decoder_only(dropped, x, LM_DEFAULTS)).abs().max() > 1e-3  # and active in train


# ----------------------------------------------------------------------------- encoder-decoder


ED_DEFAULTS = dict(LM_DEFAULTS, norm_first=False, activation="relu")
ED_VARIANTS = {
    "default": {},
    "untied": dict(tie_weights=False),
    "unscaled": dict(scale_embeddings=False),
    "pre_norm_gelu_rmsnorm": dict(norm_first=True, activation="gelu", norm="rmsnorm"),
    "rotary_no_bias": dict(position="rotary", bias=False),
    "learned_swiglu": dict(position="learned", activation="swiglu"),
    "moe": dict(ff="moe", num_experts=3, top_k=2),
}


def build_ed(seed=0, **options):
    torch.manual_seed(seed)
    return randomized(EncoderDecoderTransformer(V, V + 2, E, H, 2, 2, F_, L, dropout=0.0, **options), seed)


@pytest.mark.parametrize("variant", list(ED_VARIANTS))
def test_encoder_decoder_equals_the_re_derivation(variant):
    options = ED_VARIANTS[variant]
    model = build_ed(**options)
    src, tgt = ids((3, 8), low=1, seed=1), ids((3, 6), vocab=V + 2, low=1, seed=2)
    src[1, 5:] = 0  # source padding
    tgt[2, 4:] = 0  # target padding
    with torch.no_grad():
        got = model(src, tgt)
        assert_close(got, ref_encoder_decoder(model, src, tgt, dict(ED_DEFAULTS, **options)), variant)
        if options:
            default = share_weights(model, build_ed(seed=1))
            assert (default(src, tgt) - got).abs().max() > 1e-3, f"{variant} does not change the logits"


# ----------------------------------------------------------------------------- encoder-only


EN_DEFAULTS = dict(LM_DEFAULTS, position="learned", norm_first=False)
EN_VARIANTS = {
    "default": {},
    "untied": dict(tie_weights=False),
    "unscaled": dict(scale_embeddings=False),
    "pre_norm_sinusoidal_relu": dict(norm_first=True, position="sinusoidal", activation="relu"),
    "moe_top1": dict(ff="moe", num_experts=2, top_k=1),
}


def build_en(seed=0, **options):
    torch.manual_seed(seed)
    return randomized(EncoderTransformer(V, E, H, 2, F_, L, dropout=0.0, **options), seed)


@pytest.mark.parametrize("variant", list(EN_VARIANTS))
def test_encoder_equals_the_re_derivation(variant):
    options = EN_VARIANTS[variant]
    model = build_en(**options)
    x = ids((2, 8), low=1)
    x[0, 6:] = 0
    with torch.no_grad():
        hidden, logits = model(x), model(x, return_logits=True)
        ref_hidden, ref_logits = ref_encoder(model, x, dict(EN_DEFAULTS, **options))
        assert_close(hidden, ref_hidden, variant + " hidden")
        assert_close(logits, ref_logits, variant + " logits")
        if options:
            default = share_weights(model, build_en(seed=1))
            assert (default(x, return_logits=True) - logits).abs().max() > 1e-3, f"{variant} does not change the logits"
