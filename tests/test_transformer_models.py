"""The three models of transformer_implementation.py: the seed API, equality with nn.Transformer,
causality, padding, the KV cache, generation, training, saving, attention maps and bad input."""

import os

import pytest
import torch
import torch.nn as nn

from transformer_implementation import (
    EncoderDecoderTransformer,
    EncoderTransformer,
    Transformer,
    sample_next_token,
)

FP32_TOL = 1e-5
POSITIONS = ["sinusoidal", "learned", "rotary"]


def tiny_lm(position="sinusoidal", max_seq_length=16, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("dropout", 0.0)
    return Transformer(vocab_size=23, embed_dim=16, num_heads=4, num_layers=2, ff_dim=32,
                       max_seq_length=max_seq_length, position=position, **kw).eval()


def ids(shape, vocab=23, seed=0, low=0):
    return torch.randint(low, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_seed_quick_start_verbatim():
    model = Transformer(vocab_size=10000, embed_dim=512, num_heads=8, num_layers=6, ff_dim=2048,
                        max_seq_length=1024, dropout=0.1)
    logits = model(torch.randint(0, 10000, (1, 50)))
    assert logits.shape == torch.Size([1, 50, 10000])


# ----------------------------------------------------------------------------- nn.Transformer oracle


def copy_mha(ours, ref):
    ref.in_proj_weight.copy_(ours.in_proj.weight)
    ref.in_proj_bias.copy_(ours.in_proj.bias)
    ref.out_proj.weight.copy_(ours.out_proj.weight)
    ref.out_proj.bias.copy_(ours.out_proj.bias)


def copy_linear_or_norm(ours, ref):
    ref.weight.copy_(ours.weight)
    ref.bias.copy_(ours.bias)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # PyTorch's own fast path
def test_post_norm_relu_encoder_decoder_equals_torch_transformer():
    E, H, F_, S, T, B = 16, 4, 32, 7, 6, 3
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(30, 31, E, H, 2, 2, F_, 16, dropout=0.0, pad_id=0,
                                      norm_first=False, activation="relu", norm="layernorm").eval()
    with torch.no_grad():  # random norms and biases too, so copying every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ref = nn.Transformer(d_model=E, nhead=H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=F_,
                         dropout=0.0, batch_first=True).eval()
    with torch.no_grad():
        for ours, theirs in zip(model.encoder_layers, ref.encoder.layers):
            copy_mha(ours.self_attn, theirs.self_attn)
            copy_linear_or_norm(ours.ff.linear1, theirs.linear1)
            copy_linear_or_norm(ours.ff.linear2, theirs.linear2)
            copy_linear_or_norm(ours.norm1, theirs.norm1)
            copy_linear_or_norm(ours.norm2, theirs.norm2)
        for ours, theirs in zip(model.decoder_layers, ref.decoder.layers):
            copy_mha(ours.self_attn, theirs.self_attn)
            copy_mha(ours.cross_attn, theirs.multihead_attn)
            copy_linear_or_norm(ours.ff.linear1, theirs.linear1)
            copy_linear_or_norm(ours.ff.linear2, theirs.linear2)
            for n in ("norm1", "norm2", "norm3"):
                copy_linear_or_norm(getattr(ours, n), getattr(theirs, n))
        copy_linear_or_norm(model.encoder_norm, ref.encoder.norm)
        copy_linear_or_norm(model.decoder_norm, ref.decoder.norm)

    src = ids((B, S), vocab=30, seed=1, low=1)
    src[1, 5:] = 0  # source padding
    src[2, 3:] = 0
    tgt = ids((B, T), vocab=31, seed=2, low=1)
    tgt[2, 4:] = 0  # target padding
    with torch.no_grad():
        x_src = model._embed(src, model.src_embedding)  # embeddings are ours on both sides
        x_tgt = model._embed(tgt, model.tgt_embedding)
        out = ref(x_src, x_tgt,
                  tgt_mask=torch.ones(T, T, dtype=torch.bool).triu(1),  # PyTorch: True = may NOT attend
                  src_key_padding_mask=src == 0, tgt_key_padding_mask=tgt == 0, memory_key_padding_mask=src == 0)
        expected = model.lm_head(out)
        got = model(src, tgt)
        memory, _ = model.encode(src)
        ref_memory = ref.encoder(x_src, src_key_padding_mask=src == 0)
    assert torch.allclose(got, expected, atol=FP32_TOL), (got - expected).abs().max()
    real = src != 0  # PyTorch's fast path may leave padded memory positions at zero: compare the real ones
    assert torch.allclose(memory[real], ref_memory[real], atol=FP32_TOL)


# ----------------------------------------------------------------------------- causality and padding


@pytest.mark.parametrize("position", POSITIONS)
def test_changing_token_t_changes_no_earlier_logit(position):
    model = tiny_lm(position)
    x = ids((2, 10))
    t = 6
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % 23
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-4  # and every later logit row does change


@pytest.mark.parametrize("position", POSITIONS)
def test_padding_the_source_changes_no_output(position):
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(20, 20, 16, 4, 2, 2, 32, 12, dropout=0.0, pad_id=0, position=position).eval()
    src = ids((2, 5), vocab=20, low=1)
    tgt = ids((2, 4), vocab=20, seed=3, low=1)
    padded = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], dim=1)  # (2, 8)
    with torch.no_grad():
        plain = model(src, tgt)
        with_pad = model(padded, tgt)
        other = padded.clone()
        other[:, 6] = 0  # still padding: outputs unchanged
        changed = src.clone()
        changed[:, -1] = (changed[:, -1] % 19) + 1  # a real token: outputs change
    assert torch.allclose(with_pad, plain, atol=FP32_TOL)
    assert torch.allclose(model(other, tgt), plain, atol=FP32_TOL)
    assert not torch.allclose(model(changed, tgt), plain, atol=1e-4)


def test_encoder_only_padding_changes_no_real_position():
    torch.manual_seed(0)
    model = EncoderTransformer(20, 16, 4, 2, 32, 12, dropout=0.0, pad_id=0).eval()
    x = ids((2, 5), vocab=20, low=1)
    padded = torch.cat([x, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        h, hp = model(x), model(padded)
        _, attn = model(padded, return_attention=True)
    assert h.shape == (2, 5, 16)
    assert torch.allclose(hp[:, :5], h, atol=FP32_TOL)
    assert all(torch.all(w[..., 5:] == 0) for w in attn)  # padded keys get zero weight
    logits, loss = model(padded, targets=torch.where(padded > 0, padded, -100))
    assert logits.shape == (2, 9, 20) and torch.isfinite(loss)
    assert torch.allclose(model.lm_head(hp), model(padded, return_logits=True), atol=FP32_TOL)


# ----------------------------------------------------------------------------- KV cache and generation


@pytest.mark.parametrize("position", POSITIONS)
def test_cached_logits_equal_full_recompute(position):
    model = tiny_lm(position)
    x = ids((2, 11))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        parts = [model(x[:, :4], cache=cache)]
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(4, 11)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=FP32_TOL), (torch.cat(parts, 1) - full).abs().max()


def greedy_oracle(model, prompt, n, L):
    """Generation written out the slow way: the last L tokens, full forward, argmax."""
    x = prompt
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x[:, -L:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x


@pytest.mark.parametrize("position", POSITIONS)
def test_greedy_generation_with_and_without_cache_through_the_crop_point(position):
    L = 8
    # Untied: an untrained tied model mostly repeats its last input token, which would hide context bugs.
    model = tiny_lm(position, max_seq_length=L, tie_weights=False)
    prompt = ids((3, 5))
    expected = greedy_oracle(model, prompt, 9, L)  # 5 + 9 = 14 > 8: crops several times
    cached = model.generate(prompt, 9, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, 9, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 14)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)
    assert torch.equal(cached[:, :5], prompt)


def test_generate_batch_rows_are_independent_and_top_k_1_is_greedy():
    model = tiny_lm("rotary", tie_weights=False)
    prompt = ids((3, 4))
    batch = model.generate(prompt, 6, temperature=0.0)
    for row in range(3):
        assert torch.equal(model.generate(prompt[row:row + 1], 6, temperature=0.0)[0], batch[row])
    torch.manual_seed(123)
    assert torch.equal(model.generate(prompt, 6, temperature=1.0, top_k=1), batch)
    assert torch.equal(model.generate(prompt, 6, temperature=0.7, top_p=1e-6), batch)
    long_prompt = ids((2, 40))  # longer than max_seq_length: cropped, not an error
    assert model.generate(long_prompt, 3).shape == (2, 43)
    assert model.training is False
    model.train()
    model.generate(prompt, 1)
    assert model.training is True  # generate restores the mode it found


def test_generated_ids_can_be_trained_on():
    # generate() runs under inference_mode for speed; what it returns must still be an ordinary tensor
    # that a training step can use (an inference tensor cannot be saved for backward).
    model = tiny_lm()
    out = model.generate(ids((2, 3)), max_new_tokens=4, temperature=0)
    assert not out.is_inference()
    _, loss = model(out, targets=out)
    loss.backward()
    assert model.token_embedding.weight.grad is not None


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().repeat(4000, 1)
    torch.manual_seed(0)
    picks = sample_next_token(logits, temperature=1.0, top_p=0.7).flatten()
    counts = torch.bincount(picks, minlength=4).float() / picks.numel()
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    assert abs(counts[0] - 0.5 / 0.8) < 0.03  # renormalised within the nucleus
    picks = sample_next_token(logits, temperature=1.0, top_k=3).flatten()
    assert torch.bincount(picks, minlength=4)[3] == 0 and torch.bincount(picks, minlength=4)[2] > 0


@pytest.mark.parametrize("seed", [1, 2])
def test_encoder_decoder_greedy_decode_matches_the_slow_loop_and_pads_finished_rows(seed):
    # Untied, tiny vocabulary: an untrained model then emits eos (and even pad) at varied steps.
    torch.manual_seed(seed)
    model = EncoderDecoderTransformer(5, 5, 16, 4, 2, 2, 32, 16, dropout=0.0, pad_id=0, tie_weights=False).eval()
    src = ids((4, 6), vocab=5, seed=seed, low=3)
    bos, eos, pad = 1, 2, 0
    out = model.greedy_decode(src, bos, eos, max_new_tokens=8)
    # the slow oracle: whole-prefix forward passes (no cache), argmax, pad after eos, stop when all done
    x = torch.full((4, 1), bos)
    done = torch.zeros(4, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(8):
            nxt = model(src, x)[:, -1].argmax(-1)
            nxt[done] = pad
            x = torch.cat([x, nxt[:, None]], 1)
            done |= nxt == eos
            if done.all():
                break
    assert torch.equal(out, x)
    assert torch.all(out[:, 0] == bos)
    for row in out.tolist():
        if eos in row[1:]:
            assert all(t == pad for t in row[row.index(eos, 1) + 1:])


def test_greedy_decode_stops_once_every_row_has_finished():
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(6, 6, 16, 4, 1, 1, 32, 16, dropout=0.0, tie_weights=False).eval()
    eos = 2
    with torch.no_grad():  # a decoder whose output always says eos
        model.decoder_norm.weight.zero_()
        model.decoder_norm.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos] = 1.0
    out = model.greedy_decode(ids((3, 5), vocab=6, low=3), bos_id=1, eos_id=eos, max_new_tokens=8)
    assert out.tolist() == [[1, eos]] * 3


# ----------------------------------------------------------------------------- training and saving


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = Transformer(vocab_size=20, embed_dim=32, num_heads=2, num_layers=2, ff_dim=64, max_seq_length=16,
                        dropout=0.0)
    x = ids((4, 13), vocab=20, seed=5)
    inputs, targets = x[:, :-1], x[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        _, loss = model(inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05


@pytest.mark.parametrize("kind", ["decoder_only", "encoder_decoder", "encoder"])
def test_save_load_round_trip(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "decoder_only":
        model = Transformer(23, 16, 4, 2, 32, 16, dropout=0.0, position="rotary", activation="swiglu",
                            norm="rmsnorm").eval()
        run = lambda m: m(ids((2, 7)))  # noqa: E731
    elif kind == "encoder_decoder":
        model = EncoderDecoderTransformer(23, 19, 16, 4, 1, 2, 32, 16, dropout=0.0, position="learned").eval()
        run = lambda m: m(ids((2, 7), low=1), ids((2, 5), vocab=19, low=1))  # noqa: E731
    else:
        model = EncoderTransformer(23, 16, 4, 2, 32, 16, dropout=0.0).eval()
        run = lambda m: m(ids((2, 7)), return_logits=True)  # noqa: E731
    with torch.no_grad():
        for p in model.parameters():  # move off the initial values so a load that silently fails is caught
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "model.pt"
    model.save(path)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # the temporary file was renamed, not left behind
    payload = torch.load(path, weights_only=True)
    assert payload["config"] == model.config
    loaded = type(model).load(path).eval()
    with torch.no_grad():
        assert torch.equal(run(loaded), run(model))
    assert loaded.num_parameters() == model.num_parameters()
    if kind == "decoder_only":
        assert loaded.lm_head.weight is loaded.token_embedding.weight  # tying survives the round trip
        with pytest.raises(ValueError, match="Transformer"):
            EncoderTransformer.load(path)


def test_load_returns_eval_mode_and_keeps_extra_training_state(tmp_path):
    model = tiny_lm(dropout=0.3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, loss = model(ids((2, 6)), targets=ids((2, 6), seed=1))
    loss.backward()
    opt.step()
    extra = {"optimizer": opt.state_dict(), "step": 7, "args": {"lr": 1e-3, "out": "runs/x"}}
    path = tmp_path / "ckpt.pt"
    model.save(path, extra=extra)
    loaded = Transformer.load(path)
    assert loaded.training is False  # eval mode: dropout off, so it reproduces the saved model at once
    x = ids((2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    loaded, got = Transformer.load(path, return_extra=True)
    assert got["step"] == 7 and got["args"] == extra["args"]
    resumed = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    resumed.load_state_dict(got["optimizer"])  # the optimizer state comes back usable
    assert torch.equal(resumed.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    model.save(path)
    assert Transformer.load(path, return_extra=True)[1] is None


def test_load_refuses_other_formats_with_a_clear_error(tmp_path):
    model = tiny_lm()
    old = tmp_path / "old_example.pt"  # what the examples wrote before they saved through the core
    torch.save({"model": model.state_dict(), "optimizer": {}, "step": 3}, old)
    with pytest.raises(ValueError, match=r"old_example\.pt.*another format.*'model', 'optimizer', 'step'"):
        Transformer.load(old)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(ValueError, match="bare state dict.*load_state_dict"):
        Transformer.load(bare)


def test_num_parameters_counts_tied_weights_once():
    tied = Transformer(100, 16, 2, 1, 32, 8, tie_weights=True)
    untied = Transformer(100, 16, 2, 1, 32, 8, tie_weights=False)
    assert untied.num_parameters() - tied.num_parameters() == 100 * 16
    E, F_, V, L = 16, 32, 100, 8
    block = 4 * E * E + 4 * E + 2 * E * F_ + F_ + E + 4 * E  # attention, FFN, two LayerNorms
    assert tied.num_parameters() == V * E + block + 2 * E  # + the final norm; sinusoidal has no parameters
    tied.token_embedding.weight.requires_grad_(False)
    assert tied.num_parameters(trainable_only=True) == block + 2 * E


# ----------------------------------------------------------------------------- attention maps


@pytest.mark.parametrize("position", POSITIONS)
def test_return_attention_shapes_rows_and_causal_zeros(position):
    model = tiny_lm(position)
    x = ids((2, 9))
    with torch.no_grad():
        logits, loss, attn = model(x, targets=x, return_attention=True)
        plain = model(x)
    assert torch.allclose(logits, plain, atol=FP32_TOL)  # explicit path (with weights) == fused path
    assert torch.isfinite(loss)
    assert len(attn) == 2
    for w in attn:
        assert w.shape == (2, 4, 9, 9)
        assert torch.allclose(w.sum(-1), torch.ones(2, 4, 9), atol=1e-5)
        assert torch.all(w.triu(1) == 0)


def test_encoder_decoder_return_attention():
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(20, 21, 16, 4, 2, 3, 32, 12, dropout=0.0).eval()
    src = ids((2, 7), vocab=20, low=1)
    src[1, 4:] = 0
    tgt = ids((2, 5), vocab=21, low=1)
    with torch.no_grad():
        logits, maps = model(src, tgt, return_attention=True)
        assert torch.allclose(logits, model(src, tgt), atol=FP32_TOL)
    assert [len(maps[k]) for k in ("encoder", "decoder_self", "cross")] == [2, 3, 3]
    assert all(w.shape == (2, 4, 7, 7) for w in maps["encoder"])
    assert all(w.shape == (2, 4, 5, 5) and torch.all(w.triu(1) == 0) for w in maps["decoder_self"])
    assert all(w.shape == (2, 4, 5, 7) and torch.all(w[1, ..., 4:] == 0) for w in maps["cross"])
    _, loss = model(src, tgt, targets=tgt)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- options and bad input


def test_options_change_the_model():
    x = ids((2, 6))
    outs = {}
    for act in ("relu", "gelu", "swiglu"):
        with torch.no_grad():
            outs[act] = tiny_lm(activation=act)(x)
    assert not torch.allclose(outs["relu"], outs["gelu"], atol=1e-4)
    assert not torch.allclose(outs["gelu"], outs["swiglu"], atol=1e-4)
    for kw in (dict(norm="rmsnorm"), dict(norm_first=False), dict(bias=False), dict(tie_weights=False)):
        with torch.no_grad():
            assert tiny_lm(**kw)(x).shape == (2, 6, 23)


def test_bad_input_raises_naming_the_argument():
    with pytest.raises(ValueError, match="embed_dim"):
        Transformer(vocab_size=10, embed_dim=30, num_heads=4, num_layers=1, ff_dim=8, max_seq_length=8)
    with pytest.raises(ValueError, match="position"):
        Transformer(10, 16, 4, 1, 8, 8, position="alibi")
    with pytest.raises(ValueError, match="norm"):
        Transformer(10, 16, 4, 1, 8, 8, norm="batchnorm")
    model = tiny_lm(max_seq_length=8)
    with pytest.raises(ValueError, match=r"input_ids.*length 9.*max_seq_length=8"):
        model(ids((1, 9)))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids((9,)))  # wrong rank
    with pytest.raises(ValueError, match=r"input_ids.*vocab_size=23"):
        model(torch.tensor([[1, 23]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="targets"):
        model(ids((2, 5)), targets=ids((2, 4)))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids((1, 3)), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids((1, 3)), 2, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(ids((1, 3)), 2, top_k=0)
    encdec = EncoderDecoderTransformer(10, 10, 16, 4, 1, 1, 32, 8)
    with pytest.raises(ValueError, match="src_ids"):
        encdec(ids((2, 4), vocab=10), ids((3, 4), vocab=10))
    with pytest.raises(ValueError, match="src_ids"):
        encdec(ids((2, 9), vocab=10), ids((2, 4), vocab=10))
    with pytest.raises(ValueError, match="tgt_ids"):
        encdec(ids((2, 4), vocab=10), torch.tensor([[1, 10]] * 2))


@pytest.mark.parametrize("position", POSITIONS)
def test_bf16_autocast_forward_and_generate(position):
    model = tiny_lm(position, max_seq_length=8, tie_weights=False)
    x = ids((2, 8))
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
            _, attn = model(x, return_attention=True)
            out = model.generate(x[:, :4], 6, temperature=0.0)
    assert torch.isfinite(low).all() and low.shape == full.shape
    assert (low.float() - full).abs().max() < 0.1  # bf16 keeps ~3 significant digits
    assert out.shape == (2, 10) and all(torch.isfinite(w).all() for w in attn)
