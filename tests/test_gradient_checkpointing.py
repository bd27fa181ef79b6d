"""Gradient checkpointing in the models (``model.gradient_checkpointing = True``; docs/transformer.md).

* The gradients are those of the plain run, bit for bit, for all three models, dense and MoE, with
  dropout on (the recomputation must draw the same dropout masks).
* Checkpointing is really engaged: ``torch.utils.checkpoint.checkpoint`` runs once per block while
  training, never in eval mode, under ``no_grad`` or with a cache; and the tensors autograd keeps for the
  backward pass outside the checkpointed blocks shrink (counted with saved-tensor hooks, not timed).
* The switch is not part of the config: a saved model loads with it off.
Measured memory and time are in examples/benchmark_training.py's char-LM measurement (docs/examples/char_lm.md).
"""
import pytest
import torch
import torch.utils.checkpoint

from transformer_implementation import EncoderDecoderTransformer, EncoderTransformer, Transformer

V, E, F_, L = 13, 16, 24, 12


def ids(shape, seed):
    return torch.randint(1, V, shape, generator=torch.Generator().manual_seed(seed))


MODELS = {
    "decoder_only": (lambda: Transformer(V, E, 2, 3, F_, L, dropout=0.2),
                     lambda m, x: m(x, x)[1]),
    "decoder_only_moe": (lambda: Transformer(V, E, 2, 3, F_, L, dropout=0.2, ff="moe", num_experts=3, top_k=2),
                         lambda m, x: m(x, x)[1]),
    "encoder": (lambda: EncoderTransformer(V, E, 2, 2, F_, L, dropout=0.2),
                lambda m, x: m(x, targets=x)[1]),
    "encoder_decoder_moe": (lambda: EncoderDecoderTransformer(V, V, E, 2, 2, 2, F_, L, dropout=0.2, ff="moe",
                                                              num_experts=2, top_k=1),
                            lambda m, x: m(x, x, targets=x)[1]),
}


def gradients(model, run, x, checkpointing):
    model.gradient_checkpointing = checkpointing
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks for both runs
    loss = run(model, x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_equal_the_plain_run_bit_for_bit(name):
    build, run = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = ids((2, 10), seed=1)
    plain_loss, plain = gradients(model, run, x, checkpointing=False)
    ckpt_loss, ckpt = gradients(model, run, x, checkpointing=True)
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    different = [n for n in plain if not torch.equal(plain[n], ckpt[n])]
    assert not different, f"checkpointing changed the gradients of {different[:4]}"
    # and dropout is really on: another seed gives other gradients (so equal masks were needed above)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    run(model, x).backward()
    assert any(not torch.equal(p.grad, plain[n]) for n, p in model.named_parameters() if p.grad is not None)


def test_checkpoint_runs_once_per_block_only_when_training(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    torch.manual_seed(0)
    model = Transformer(V, E, 2, 3, F_, L, dropout=0.0)
    x = ids((2, 8), seed=2)
    model(x, x)[1].backward()
    assert calls == []  # off by default
    model.gradient_checkpointing = True
    model(x, x)[1].backward()
    assert calls == [False] * 3  # one per block, the non-reentrant implementation
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    model.generate(x[:, :3], max_new_tokens=4, temperature=0.0)
    model.train()
    model(x, return_attention=True)
    assert len(calls) == 3  # no_grad, eval, generation (cache) and weights: never checkpointed


def saved_bytes(model, x, checkpointing):
    """Bytes of the tensors autograd keeps for the backward pass, outside any checkpointed region."""
    model.gradient_checkpointing = checkpointing
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, x)[1]
    loss.backward()
    return total[0]


def test_checkpointing_keeps_fewer_activations_for_the_backward_pass():
    torch.manual_seed(0)
    model = Transformer(V, 32, 2, 4, 128, 64, dropout=0.1)
    x = ids((4, 64), seed=3)
    plain, ckpt = saved_bytes(model, x, False), saved_bytes(model, x, True)
    # Plain: every block keeps its attention and its (B, T, 4E) hidden layer; checkpointed: nothing inside
    # the blocks (each block's input is kept by the checkpoint itself, not as a saved tensor).
    assert ckpt < 0.5 * plain, f"saved tensors: {ckpt} bytes with checkpointing, {plain} without"


def test_the_switch_is_not_part_of_the_config(tmp_path):
    model = Transformer(V, E, 2, 1, F_, L)
    model.gradient_checkpointing = True
    model.save(tmp_path / "m.pt")
    assert "gradient_checkpointing" not in model.config
    assert Transformer.load(tmp_path / "m.pt").gradient_checkpointing is False
