"""Smoke and correctness tests of the character-LM example and its benchmarks (tiny models, few steps).

The scripts are run the way a user runs them where that is what is being tested (a subprocess from
another directory: no traceback on bad input, Ctrl-C, torchrun), and called in-process elsewhere, which
is several times faster.
"""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_char_lm as lm  # noqa: E402
import visualize_attention as va  # noqa: E402
from transformer_implementation import Transformer  # noqa: E402

# A tiny model: 2 layers of width 32, context 16, batches of 4.
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--sample-chars", "0", "--warmup-iters", "2"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """A small, deterministic corpus: 12,000 characters of varied Python-like text."""
    words = ["def", "self", "return", "import", "class", "for", "in", "if", "else", "None", "x", "y", "(", ")", ":"]
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(len(words), (3000,), generator=gen).tolist()
    text = " ".join(words[i] + ("\n" if i % 5 == 0 else "") for i in picks)[:12000]
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(text)
    return path


def run_script(args, cwd, timeout=120, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def state_dict_of(ckpt_path: Path) -> dict:
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]


# ------------------------------------------------------------------------------------------------
# The default corpus
# ------------------------------------------------------------------------------------------------

def test_default_corpus_follows_the_documented_rule():
    text = lm.build_stdlib_corpus()
    # Independent restatement of the rule: sorted relative paths, skipped folders, printable ASCII + \n.
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p.relative_to(root) for p in root.rglob("*.py")
                    if not {"test", "tests", "idlelib", "site-packages"} & set(p.relative_to(root).parts[:-1])),
                   key=lambda r: r.as_posix())
    first = "".join(c for c in (root / files[0]).read_text(encoding="utf-8", errors="replace")
                    if c == "\n" or " " <= c <= "~")
    assert len(text) == 1_100_000
    assert set(text) <= set(chr(c) for c in range(32, 127)) | {"\n"}
    assert text.startswith(first[:1000])
    # Nothing from a test folder: the stdlib's own test package starts with this unmistakable docstring.
    assert "test.support" not in text.split("\n", 2000)[0]
    assert text == lm.build_stdlib_corpus()  # deterministic


# ------------------------------------------------------------------------------------------------
# End to end, resume, Ctrl-C
# ------------------------------------------------------------------------------------------------

def test_few_step_run_writes_results_figure_checkpoint(tmp_path):
    out = tmp_path / "run"
    res = run_script([EXAMPLES / "train_char_lm.py", "--max-iters", "4", "--eval-interval", "2",
                      "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
                      "--batch-size", "2", "--eval-iters", "1", "--sample-chars", "20",
                      "--save-corpus", tmp_path / "corpus.txt", "--out", out], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert re.search(r"step +4/4 \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d,]+ tok/s \| ETA", res.stdout)
    results = json.loads((out / "results.json").read_text())
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "ckpt.pt").is_file() and not list(out.glob("*.tmp"))
    assert len(results["train_loss"]) == 4 and all(math.isfinite(v) for v in results["train_loss"])
    assert [e["step"] for e in results["evals"]] == [0, 2, 4]
    assert results["sample"].startswith("def ") and len(results["sample"]) == 4 + 20
    # The recorded hash is the hash of the text written by --save-corpus (the default stdlib corpus).
    import hashlib
    saved = (tmp_path / "corpus.txt").read_bytes()
    assert len(saved) == 1_100_000
    assert results["corpus"]["sha256"] == hashlib.sha256(saved).hexdigest()


def test_resume_gives_the_same_losses_as_a_straight_run(tmp_path, text_file):
    common = TINY + ["--data", str(text_file), "--eval-interval", "5", "--lr-decay-iters", "20", "--dropout", "0.1"]
    straight = lm.main(common + ["--max-iters", "20", "--out", str(tmp_path / "a")])
    lm.main(common + ["--max-iters", "10", "--out", str(tmp_path / "b")])
    resumed = lm.main(["--resume", "--max-iters", "20", "--out", str(tmp_path / "b"), "--data", str(text_file),
                       "--sample-chars", "0"])
    assert len(straight["train_loss"]) == 20
    assert resumed["train_loss"] == straight["train_loss"]  # exactly, step by step
    assert [e["val"] for e in resumed["evals"]] == [e["val"] for e in straight["evals"]]
    a, b = state_dict_of(tmp_path / "a" / "ckpt.pt"), state_dict_of(tmp_path / "b" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # And the run did learn something: the loss went down from ln(vocab).
    assert straight["train_loss"][-1] < straight["train_loss"][0]


def test_the_checkpoint_opens_with_the_cores_transformer_load(tmp_path, text_file):
    res = lm.main(TINY + ["--data", str(text_file), "--max-iters", "2", "--out", str(tmp_path / "run")])
    model, extra = Transformer.load(tmp_path / "run" / "ckpt.pt", return_extra=True)
    assert not model.training  # load returns the model in eval mode
    assert model.config == res["model"]["config"]
    assert extra["format"] == lm.CHECKPOINT_FORMAT and extra["step"] == 2
    assert extra["vocab"] == "".join(sorted(set(text_file.read_text())))
    assert extra["config"] == res["config"]
    for name, tensor in model.state_dict().items():  # the same weights as the raw file holds
        assert torch.equal(tensor, state_dict_of(tmp_path / "run" / "ckpt.pt")[name])


def test_an_old_format_checkpoint_is_a_one_line_error(tmp_path, text_file):
    # What train_char_lm.py wrote before it saved through Transformer.save (format v1).
    model = Transformer(10, 16, 2, 1, 32, 8)
    out = tmp_path / "old"
    out.mkdir()
    torch.save({"format": "char-lm-checkpoint-v1", "step": 3, "config": {}, "model_config": model.config,
                "model": model.state_dict(), "vocab": "abcdefghij"}, out / "ckpt.pt")
    with pytest.raises(SystemExit) as exc:
        va.load_checkpoint(out / "ckpt.pt")
    message = str(exc.value.code)
    assert message.startswith("error: --checkpoint") and "\n" not in message and "another format" in message
    with pytest.raises(SystemExit) as exc:
        lm.main(["--resume", "--out", str(out), "--data", str(text_file)])
    message = str(exc.value.code)
    assert message.startswith("error: --resume") and "\n" not in message and "char-lm-checkpoint-v1" in message


def test_the_command_lines_choices_are_the_cores():
    for position in lm.POSITIONS:
        Transformer(10, 8, 2, 1, 16, 4, position=position)
    for norm in lm.NORMS:
        Transformer(10, 8, 2, 1, 16, 4, norm=norm)
    for activation in lm.ACTIVATIONS:
        Transformer(10, 8, 2, 1, 16, 4, activation=activation)
    for option, bad in (("position", "alibi"), ("norm", "batchnorm"), ("activation", "tanh")):
        with pytest.raises(ValueError, match=option):
            Transformer(10, 8, 2, 1, 16, 4, **{option: bad})


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_write_a_checkpoint_that_resumes(tmp_path, text_file, sig, status):
    out = tmp_path / "run"
    cmd = [sys.executable, str(EXAMPLES / "train_char_lm.py"), *TINY, "--data", str(text_file),
           "--max-iters", "100000", "--eval-interval", "100000", "--log-interval", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    try:
        for line in proc.stdout:  # wait until training is under way
            if line.startswith("step"):
                break
        proc.send_signal(sig)
        sent = time.perf_counter()
        stdout, stderr = proc.communicate(timeout=60)
        took = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, stderr
    # Checkpoint, results.json and the loss figure: a few seconds on a quiet machine; generous here for a
    # busy CI machine (the bound that matters, within one step, is tested in-process below).
    assert took < 30, f"took {took:.1f} s to stop"
    assert "Traceback" not in stderr
    model, extra = Transformer.load(out / "ckpt.pt", return_extra=True)
    assert 1 <= extra["step"] < 100000
    resumed = lm.main(["--resume", "--max-iters", str(extra["step"] + 2), "--out", str(out),
                       "--data", str(text_file), "--sample-chars", "0"])
    assert resumed["steps"] == extra["step"] + 2


def test_a_step_interrupted_half_way_is_undone_and_resume_stays_exact(tmp_path, text_file, monkeypatch):
    # A stop request that arrives during the forward pass of step 6 abandons that step: the checkpoint
    # holds step 5 with the random state from before step 6, so resuming repeats it exactly.
    common = TINY + ["--data", str(text_file), "--eval-interval", "100", "--lr-decay-iters", "10", "--dropout", "0.1"]
    straight = lm.main(common + ["--max-iters", "10", "--out", str(tmp_path / "a")])
    calls = {"n": 0}
    forward = Transformer.forward

    def forward_then_signal(self, *args, **kwargs):
        result = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the script's StopFlag
        return result

    monkeypatch.setattr(Transformer, "forward", forward_then_signal)
    with pytest.raises(SystemExit) as exc:
        lm.main(common + ["--max-iters", "10", "--out", str(tmp_path / "b")])
    assert exc.value.code == 143
    monkeypatch.setattr(Transformer, "forward", forward)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["extra"]["step"] == 5
    resumed = lm.main(["--resume", "--max-iters", "10", "--out", str(tmp_path / "b"), "--data", str(text_file),
                       "--sample-chars", "0"])
    assert resumed["train_loss"] == straight["train_loss"]


# ------------------------------------------------------------------------------------------------
# Distributed
# ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_end_with_identical_weights(tmp_path, text_file):
    args = TINY + ["--data", str(text_file), "--max-iters", "3", "--eval-interval", "3", "--lr", "1e-2",
                   "--warmup-iters", "0", "--write-rank-digests"]
    res = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                      f"--master_port={free_port()}", EXAMPLES / "train_char_lm.py", *args,
                      "--out", tmp_path / "ddp"], cwd=tmp_path, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    digests = [(tmp_path / "ddp" / f"weights_rank{r}.sha256").read_text() for r in range(2)]
    assert digests[0] == digests[1]
    assert res.stdout.count("done:") == 1  # only rank 0 logs
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["world_size"] == 2
    # Two ranks x 4 sequences draw the same windows as one process with 8 sequences, and DDP averages
    # the two halves' gradients: the weights must match a single-process run with the doubled batch.
    single_args = [a if a != "4" or args[i - 1] != "--batch-size" else "8" for i, a in enumerate(args)]
    lm.main(single_args + ["--out", str(tmp_path / "single")])
    ddp, single = state_dict_of(tmp_path / "ddp" / "ckpt.pt"), state_dict_of(tmp_path / "single" / "ckpt.pt")
    start = lm.make_model(lm.resolve_config(lm.build_parser().parse_args(args)), len(set(text_file.read_text())))
    moved = max((single[k] - v).abs().max().item() for k, v in start.state_dict().items() if k in single)
    assert moved > 1e-3  # training changed the weights by far more than the tolerance below
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------
# Bad input: one line, no traceback
# ------------------------------------------------------------------------------------------------

def test_missing_data_path_is_a_one_line_error(tmp_path):
    res = run_script([EXAMPLES / "train_char_lm.py", "--data", tmp_path / "nope.txt"], cwd=tmp_path)
    assert res.returncode == 2  # refused by the argument check, before torch is even imported
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("train_char_lm.py: error: --data")
    assert "no such file" in res.stderr


@pytest.mark.parametrize("content, words", [("", "empty"), ("x" * 100, "too short")])
def test_empty_or_short_data_is_a_one_line_error(tmp_path, content, words):
    path = tmp_path / "data.txt"
    path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        lm.main(["--data", str(path), "--block-size", "64", "--out", str(tmp_path / "o")])
    message = str(exc.value.code)
    assert message.startswith("error: --data") and "\n" not in message and words in message


def test_a_corpus_exactly_long_enough_trains(tmp_path):
    # The validation split (the last 10%) must hold block_size + 1 = 17 characters (block 16):
    # 161 characters split 144 + 17, the least that works; 160 split 144 + 16, one short.
    path = tmp_path / "data.txt"
    path.write_text(("abcdefghij" * 17)[:161])
    res = lm.main(TINY + ["--data", str(path), "--max-iters", "1", "--out", str(tmp_path / "o")])
    assert res["steps"] == 1
    path.write_text(("abcdefghij" * 17)[:160])
    with pytest.raises(SystemExit, match="at least 161 characters"):
        lm.main(TINY + ["--data", str(path), "--max-iters", "1", "--out", str(tmp_path / "o")])


# ------------------------------------------------------------------------------------------------
# Learning-rate schedule, sampler
# ------------------------------------------------------------------------------------------------

def test_learning_rate_schedule_matches_nanogpt_recipe():
    cfg = lm.PRESETS["nanogpt-cpu"]
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size, cfg.max_iters) == (4, 4, 128, 64, 12, 2000)
    assert (cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.beta2, cfg.weight_decay, cfg.grad_clip, cfg.dropout) == \
        (1e-3, 1e-4, 100, 0.99, 0.1, 1.0, 0.0)
    assert lm.learning_rate(0, cfg) == pytest.approx(1e-3 / 101)
    assert lm.learning_rate(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert lm.learning_rate(100, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lm.learning_rate(1050, cfg) == pytest.approx(0.5 * (1e-3 + 1e-4))  # half-way: the mean
    assert lm.learning_rate(2000, cfg) == pytest.approx(1e-4)
    assert lm.learning_rate(5000, cfg) == pytest.approx(1e-4)


def test_memory_estimate_admits_the_presets_and_refuses_a_huge_context():
    import dataclasses
    for cfg in lm.PRESETS.values():
        assert lm.estimate_training_bytes(cfg) < 100 * 2 ** 20  # well under 100 MiB
    # The attention matrices alone: 4 layers x batch 12 x 4 heads x 100,000^2 x 4 bytes = 7.68e12 bytes.
    huge = dataclasses.replace(lm.PRESETS["default"], block_size=100_000)
    assert lm.estimate_training_bytes(huge) > 4 * 12 * 4 * 100_000 ** 2 * 4


def test_ranks_slice_one_global_batch():
    data = lm.CharData("".join(chr(97 + i % 26) for i in range(1000)))
    whole = data.batch("train", 6, 8, torch.Generator().manual_seed(3))
    parts = [data.batch("train", 3, 8, torch.Generator().manual_seed(3), rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    x, y = whole
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


# ------------------------------------------------------------------------------------------------
# Visualiser and benchmarks
# ------------------------------------------------------------------------------------------------

def test_attention_rollout_by_hand():
    # Two tokens, one layer, one head: A = [[1, 0], [0.2, 0.8]]. With the residual: (A + I) / 2.
    a = torch.tensor([[[1.0, 0.0], [0.2, 0.8]]])
    r = va.attention_rollout([a])[-1]
    torch.testing.assert_close(r, torch.tensor([[1.0, 0.0], [0.1, 0.9]], dtype=torch.float64))
    # Two layers compose with the later layer on the left: R = Â2 Â1.
    b = torch.tensor([[[1.0, 0.0], [0.6, 0.4]]])  # Â2 = [[1, 0], [0.3, 0.7]]
    r2 = va.attention_rollout([a, b])[-1]
    expected = torch.tensor([[1.0, 0.0], [0.3 * 1.0 + 0.7 * 0.1, 0.7 * 0.9]], dtype=torch.float64)
    torch.testing.assert_close(r2, expected)
    # Heads are averaged first.
    two_heads = torch.stack([a[0], b[0]])  # (2, 2, 2)
    torch.testing.assert_close(va.attention_rollout([two_heads])[-1],
                               va.attention_rollout([(a[0] + b[0]) / 2])[-1])


def test_visualizer_writes_its_figures(tmp_path, text_file):
    lm.main(TINY + ["--data", str(text_file), "--max-iters", "2", "--out", str(tmp_path / "run")])
    prompt = "def x(self):"
    res = va.main(["--checkpoint", str(tmp_path / "run" / "ckpt.pt"), "--prompt", prompt,
                   "--out", str(tmp_path / "vis")])
    for name in ("attention_heads.png", "attention_rollout.png", "attention_layers.png"):
        assert (tmp_path / "vis" / name).stat().st_size > 1000
    assert len(res["rollout_last_position"]) == len(prompt)
    assert sum(res["rollout_last_position"]) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(SystemExit, match="never saw"):
        va.main(["--checkpoint", str(tmp_path / "run" / "ckpt.pt"), "--prompt", "\u00e9", "--out", str(tmp_path)])


def test_benchmark_generation_cache_and_no_cache_agree(tmp_path):
    import benchmark_generation as bg
    res = bg.main(["--new-tokens", "40", "--context", "32", "--repeats", "1", "--prompt", "def f",
                   "--out", str(tmp_path / "gen")])
    # Context 32 < prompt + 40: the model is widened to 45 so that neither path crops.
    assert res["identical_tokens"] and res["model"]["config"]["max_seq_length"] == 45
    assert json.loads((tmp_path / "gen" / "results.json").read_text())["new_tokens"] == 40


def test_benchmark_generation_reads_a_char_lm_checkpoint(tmp_path, text_file):
    import benchmark_generation as bg
    lm.main(TINY + ["--data", str(text_file), "--max-iters", "1", "--out", str(tmp_path / "run"),
                    "--position", "learned"])
    res = bg.main(["--checkpoint", str(tmp_path / "run" / "ckpt.pt"), "--new-tokens", "20", "--repeats", "1",
                   "--prompt", "def f", "--out", str(tmp_path / "gen")])
    # Trained with context 16; widened to 5 + 20 = 25, the learned position table growing with it.
    assert res["identical_tokens"] and res["model"]["config"]["max_seq_length"] == 25


def test_benchmark_training_throughput_part_runs(tmp_path):
    import benchmark_training as bt
    res = bt.main(["--parts", "throughput", "--steps", "1", "--rounds", "1", "--warmup", "1",
                   "--peak-sizes", "256", "--out", str(tmp_path / "bt")])
    tp = res["throughput"]
    # FLOPs per token for 4 layers of width 128, vocab 96 (tied), context 64, computed by hand:
    # per layer 4E^2 (attention) + 8E^2 (MLP) = 12 x 128^2 = 196,608 matmul weights, x 4 layers;
    # plus the output layer 96 x 128; norms (LayerNorm without bias) 2 x 128 per layer + 128 final.
    n = 4 * 12 * 128 ** 2 + 96 * 128 + 4 * 2 * 128 + 128
    assert tp["n_matmul_params"] == n
    assert tp["flops_per_token"] == 6 * n + 12 * 4 * 128 * 64
    for path in ("fused", "explicit"):
        assert 0 < tp["paths"][path]["mfu"] < 1.5
    assert json.loads((tmp_path / "bt" / "results.json").read_text())["throughput"]["tokens_per_step"] == 768
