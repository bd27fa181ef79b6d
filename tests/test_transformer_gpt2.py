"""``Transformer.from_gpt2`` against Hugging Face's ``GPT2LMHeadModel``: code this repository did not write.

The GPT-2 is tiny and random (2 layers, 2 heads, width 16, vocabulary 50, 32 positions), built from a
config in the test: nothing is ever downloaded. Its weights are moved well off their small initial
values, so that logits are of order one and a wrong transpose, a missing scale or an untied head
shows up far above the 1e-5 tolerance. Needs ``transformers`` (and ``safetensors`` for
``save_pretrained``) from requirements-test.txt; skipped with that reason when they are absent.
"""
import json

import pytest
import torch

from transformer_implementation import Transformer

transformers = pytest.importorskip("transformers", reason="needs transformers from requirements-test.txt")

FP32_TOL = 1e-5
VOCAB, POSITIONS = 50, 32


def tiny_gpt2(seed=0, **overrides):
    """A random GPT2LMHeadModel in eval mode, every parameter (norms and biases too) perturbed."""
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=POSITIONS,
                                     bos_token_id=0, eos_token_id=0, **overrides)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def ids(shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, x):
    with torch.no_grad():
        return hf(x).logits


@pytest.mark.parametrize("tied", [True, False])
def test_from_gpt2_state_dict_gives_hugging_face_logits_with_and_without_cache(tied):
    hf = tiny_gpt2(tie_word_embeddings=tied)
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tied
    ours = Transformer.from_gpt2(hf.state_dict(), hf.config)
    assert not ours.training  # returned in eval mode
    assert (ours.lm_head.weight is ours.token_embedding.weight) == tied
    x = ids((3, 12))
    expected = hf_logits(hf, x)
    assert expected.abs().max() > 1.0  # logits of order one: the tolerance below is a real test
    with torch.no_grad():
        got = ours(x)
        cache = ours.new_cache()
        parts = [ours(x[:, :5], cache=cache)]  # prefill, then one token at a time
        parts += [ours(x[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert torch.allclose(got, expected, atol=FP32_TOL), (got - expected).abs().max()
    cached = torch.cat(parts, dim=1)
    assert torch.allclose(cached, expected, atol=FP32_TOL), (cached - expected).abs().max()


def test_from_gpt2_folder_safetensors_and_pytorch_bin(tmp_path):
    pytest.importorskip("safetensors", reason="needs safetensors from requirements-test.txt")
    hf = tiny_gpt2(seed=1)
    x = ids((2, 9), seed=1)
    expected = hf_logits(hf, x)
    hf.save_pretrained(tmp_path / "st")  # config.json + model.safetensors (the tied head is not stored)
    assert (tmp_path / "st" / "model.safetensors").exists()
    # The older layout: pytorch_model.bin holding the state dict with the tied head stored again.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for folder in ("st", "bin"):
        ours = Transformer.from_gpt2(tmp_path / folder)
        assert not ours.training
        with torch.no_grad():
            got = ours(x)
        assert torch.allclose(got, expected, atol=FP32_TOL), (folder, (got - expected).abs().max())


def test_greedy_generation_equals_an_argmax_loop_over_hugging_face_logits():
    hf = tiny_gpt2(seed=2)
    ours = Transformer.from_gpt2(hf.state_dict(), hf.config)
    x = ids((2, 4), seed=2)
    for _ in range(6):  # the oracle: full Hugging Face forward passes, argmax of the last position
        x = torch.cat([x, hf_logits(hf, x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours.generate(x[:, :4], 6, temperature=0.0, use_cache=True), x)


def test_from_gpt2_maps_the_options_and_dropout():
    hf = tiny_gpt2(resid_pdrop=0.25)
    ours = Transformer.from_gpt2(hf.state_dict(), hf.config.to_dict())  # a plain dict config works too
    cfg = ours.config
    assert (cfg["position"], cfg["norm_first"], cfg["activation"], cfg["scale_embeddings"]) == \
        ("learned", True, "gelu_tanh", False)
    assert (cfg["ff_dim"], cfg["max_seq_length"], cfg["dropout"]) == (64, POSITIONS, 0.25)
    assert Transformer.from_gpt2(hf.state_dict(), hf.config, dropout=0.0).config["dropout"] == 0.0


def test_from_gpt2_refuses_tensors_that_do_not_fit_naming_them(tmp_path):
    hf = tiny_gpt2()
    state = dict(hf.state_dict())
    bad = dict(state)
    bad["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(16, 63)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight.*\(16, 63\).*\(16, 64\)"):
        Transformer.from_gpt2(bad, hf.config)
    missing = {k: v for k, v in state.items() if k != "transformer.h.0.ln_2.bias"}
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.ln_2\.bias"):
        Transformer.from_gpt2(missing, hf.config)
    extra = dict(state, **{"transformer.h.2.ln_1.weight": torch.ones(16)})  # a third layer the config lacks
    with pytest.raises(ValueError, match=r"transformer\.h\.2\.ln_1\.weight"):
        Transformer.from_gpt2(extra, hf.config)
    untied = dict(state, **{"lm_head.weight": state["lm_head.weight"] + 1.0})
    with pytest.raises(ValueError, match="lm_head.weight"):
        Transformer.from_gpt2(untied, hf.config)
    with pytest.raises(ValueError, match="activation_function"):
        Transformer.from_gpt2(state, dict(hf.config.to_dict(), activation_function="silu"))
    with pytest.raises(ValueError, match="config"):
        Transformer.from_gpt2(state)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        Transformer.from_gpt2("gpt2")  # a hub name is not a folder: refused, not fetched
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_gpt2(tmp_path)
