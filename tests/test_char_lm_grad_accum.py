"""Gradient accumulation in examples/train_char_lm.py (``--grad-accum N``, ``accumulate_gradients``).

N micro-batches of B give the gradient, and after AdamW with clipping the update, of one batch of N x B,
in float64 to 1e-12: plainly, and under DistributedDataParallel with ``no_sync`` (a one-process gloo group,
in this process), where a communication hook also shows that only the last micro-batch all-reduces.
The command line refuses what it cannot do; a tiny run with --grad-accum 2 --ff moe
--gradient-checkpointing trains end to end.
"""
import copy
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
train_char_lm = importlib.import_module("train_char_lm")

N, B, T, V = 3, 2, 8, 11


def tiny_model():
    torch.manual_seed(0)
    cfg = dataclasses.replace(train_char_lm.PRESETS["default"], n_layer=2, n_head=2, n_embd=16, block_size=T)
    return train_char_lm.make_model(cfg, V).double(), cfg


def micro_batches():
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, V, (N * B, T + 1), generator=g)
    return [(data[i * B:(i + 1) * B, :-1], data[i * B:(i + 1) * B, 1:]) for i in range(N)], (data[:, :-1], data[:, 1:])


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, what, tol=1e-12):
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst < tol, f"{what}: max difference {worst:.3g}"


def one_big_batch(model, big):
    model.zero_grad(set_to_none=True)
    _, loss = model(*big)
    loss.backward()
    return loss.detach()


def test_accumulated_micro_batches_give_the_gradient_and_update_of_one_big_batch():
    model, cfg = tiny_model()
    twin = copy.deepcopy(model)
    small, big = micro_batches()
    mean_loss = train_char_lm.accumulate_gradients(model, small)
    big_loss = one_big_batch(twin, big)
    assert abs(mean_loss.item() - big_loss.item()) < 1e-12
    assert_same(grads(model), grads(twin), "gradients")
    # and the whole update, clipping and AdamW included (the script's own optimiser)
    for m in (model, twin):
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)  # small enough to clip
        opt = train_char_lm.make_optimizer(m, cfg, "cpu")
        opt.step()
    assert_same(dict(model.named_parameters()), dict(twin.named_parameters()), "parameters after the step")


@pytest.fixture
def one_process_group(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip(f"torch {torch.__version__} has no gloo backend for DistributedDataParallel")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("use_no_sync", [True, False])
def test_accumulation_under_ddp_with_and_without_no_sync(one_process_group, use_no_sync):
    from torch.nn.parallel import DistributedDataParallel

    model, _ = tiny_model()
    twin = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    reductions = []

    def counting_hook(state, bucket):
        reductions.append(bucket.index())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())  # world size 1: the all-reduced mean is the buffer itself
        return fut

    ddp.register_comm_hook(None, counting_hook)
    small, big = micro_batches()
    train_char_lm.accumulate_gradients(ddp, small, no_sync=ddp.no_sync if use_no_sync else None)
    one_big_batch(twin, big)
    assert_same(grads(model), grads(twin), f"DDP gradients (no_sync={use_no_sync})")
    buckets = len(set(reductions))
    assert len(reductions) == (buckets if use_no_sync else N * buckets)  # no_sync: only the last micro-batch


def test_stop_request_between_micro_batches_returns_none():
    model, _ = tiny_model()
    small, _ = micro_batches()
    calls = []
    assert train_char_lm.accumulate_gradients(model, small, stop_requested=lambda: calls.append(1) or len(calls) > 2) is None
    assert len(calls) == 3  # stopped after the second micro-batch's forward pass, before its backward


def test_command_line_checks_and_a_tiny_run(tmp_path):
    script = str(ROOT / "examples" / "train_char_lm.py")
    for argv, message in [(["--grad-accum", "0"], "--grad-accum"), (["--ff", "sparse"], "--ff"),
                          (["--top-k", "2"], "need --ff moe"), (["--ff", "moe", "--top-k", "5"], "must not exceed")]:
        proc = subprocess.run([sys.executable, script, *argv, "--out", str(tmp_path / "bad")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, script, "--data", str(data), "--out", str(out), "--n-layer", "2",
                           "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "2",
                           "--grad-accum", "2", "--ff", "moe", "--num-experts", "3", "--top-k", "2",
                           "--gradient-checkpointing", "--max-iters", "3", "--eval-interval", "3",
                           "--eval-iters", "1", "--sample-chars", "0", "--threads", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformer_implementation import Transformer
    model = Transformer.load(out / "ckpt.pt")
    assert model.config["ff"] == "moe" and model.config["ff_dim"] == 4 * 16 // 2
