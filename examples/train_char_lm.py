#!/usr/bin/env python
"""Train a tiny character-level GPT on a corpus every Python install has, then sample from it.

    python examples/train_char_lm.py                        # default preset
    python examples/train_char_lm.py --preset nanogpt-cpu   # nanoGPT's CPU recipe, for comparison
    python examples/train_char_lm.py --data my_text.txt     # any text file of your own
    python examples/train_char_lm.py --resume               # continue from <out>/ckpt.pt
    torchrun --nproc_per_node=2 examples/train_char_lm.py   # DistributedDataParallel

The default corpus is built from the running interpreter's own standard library: every ``.py`` file
under ``sysconfig.get_paths()["stdlib"]``, sorted by its path relative to that folder, skipping every
file that has a folder named ``test``, ``tests``, ``idlelib`` or ``site-packages`` on its relative path,
keeping only printable ASCII (space to ``~``) and newline, concatenated, cut to the first 1,100,000
characters; the first 90% is the training split and the last 10% the validation split.
``--save-corpus PATH`` writes that exact text; its sha256 goes into ``results.json``.

Outputs under ``--out`` (default ``runs/char_lm``): ``ckpt.pt`` (written atomically at every evaluation,
at the end and on Ctrl-C or SIGTERM), ``results.json`` (with the machine, the load average and the wall
time the run took) and ``loss_curve.png``. The checkpoint is the core's format, written by
``Transformer.save``, so ``Transformer.load("runs/char_lm/ckpt.pt")`` opens it; this script's own training
state (optimizer, step, random states, vocabulary, history) is its ``extra``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import re
import signal
import sys
import sysconfig
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the core file lives at the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/plotting.py, examples/cli.py

import cli  # noqa: E402  (standard library only: the command line is checked before torch loads)

CORPUS_CHARS = 1_100_000
SKIPPED_FOLDERS = ("test", "tests", "idlelib", "site-packages")
# v2: the core's Transformer.save format, this script's state in "extra" (v1 was a dict of its own).
CHECKPOINT_FORMAT = "char-lm-checkpoint-v2"
# The core's options (transformer_implementation.Transformer; tests/test_char_lm.py checks that they agree).
POSITIONS = ("learned", "rotary", "sinusoidal")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
FEED_FORWARDS = ("dense", "moe")
VOCAB_ESTIMATE = 256  # the memory estimate's vocabulary before the text is read (96 for the default corpus)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64          # context length in characters
    dropout: float = 0.0
    bias: bool = False
    position: str = "learned"
    norm: str = "layernorm"
    activation: str = "gelu"
    ff: str = "dense"             # "moe": a mixture of experts, each 4 * n_embd / top_k wide (equal work per token)
    num_experts: int = 4
    top_k: int = 2
    # optimisation
    batch_size: int = 12          # sequences per micro-batch, per process
    grad_accum: int = 1           # micro-batches per optimiser step: one step sees grad_accum * batch_size
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000    # cosine decay from lr to min_lr ends here; min_lr afterwards
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1     # on matrices (incl. the tied embedding), not on norm gains or biases
    grad_clip: float = 1.0
    # evaluation
    eval_interval: int = 250
    eval_iters: int = 20          # batches per split per evaluation


PRESETS = {
    # nanoGPT's CPU recipe for shakespeare_char, exactly: n_layer 4, n_head 4, n_embd 128, context 64,
    # batch 12, 2000 iterations (lr_decay_iters 2000), dropout 0, lr 1e-3 warm-up 100 then cosine to 1e-4,
    # AdamW beta2 0.99, weight decay 0.1, grad clip 1.0, eval every 250 steps on 20 batches;
    # its model: learned positions, pre-LayerNorm, GELU, no biases, tied embeddings.
    "nanogpt-cpu": TrainConfig(),
    # Our default, tuned on a 2-core CPU for a short run: nanoGPT's model size and batch, but rotary
    # positions (relative offsets from step one, where a learned position table starts as noise), a 6x
    # higher learning rate and a schedule ~3x shorter. It reaches nanoGPT's val loss on about 40% of
    # the tokens; docs/examples/char_lm.md has the search and the comparison.
    "default": TrainConfig(
        n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False,
        position="rotary", norm="layernorm", activation="gelu",
        batch_size=12, max_iters=700, lr=6e-3, min_lr=6e-4, warmup_iters=50, lr_decay_iters=700,
        beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=100, eval_iters=20,
    ),
}

MAX_STEPS = 10 ** 9  # a sane ceiling for step counts and intervals
# Command-line flags that override a preset's field: field -> (argparse type or choices, help).
# Every one defaults to None, "keep the preset's". Size flags have an upper bound: the model must fit
# (estimate_training_bytes below, checked against the RAM).
OVERRIDES = {
    "n_layer": (cli.int_range(1, 1024), "transformer blocks"),
    "n_head": (cli.int_range(1, 1024), "attention heads per block; must divide --n-embd"),
    "n_embd": (cli.int_range(1, 65536), "model width (embedding size)"),
    "block_size": (cli.int_range(1, 1_048_576), "context length in characters; refused when the run's "
                   "estimated memory (which grows with its square) exceeds half the RAM"),
    "dropout": (cli.float_range(0, 1, high_open=True), "dropout probability, in [0, 1)"),
    "batch_size": (cli.int_range(1, 1_048_576), "sequences per optimiser step, per process"),
    "max_iters": (cli.int_range(0, MAX_STEPS), "optimiser steps in all (also sets --lr-decay-iters, "
                  "except for the nanogpt-cpu preset)"),
    "lr": (cli.float_range(0, 10, low_open=True), "peak learning rate, > 0"),
    "min_lr": (cli.float_range(0, 10), "learning rate at the end of the cosine decay, <= the peak"),
    "warmup_iters": (cli.int_range(0, MAX_STEPS), "steps of linear warm-up"),
    "lr_decay_iters": (cli.int_range(1, MAX_STEPS), "step at which the cosine decay reaches the minimum"),
    "weight_decay": (cli.float_range(0, 10), "AdamW weight decay on matrices"),
    "eval_interval": (cli.int_range(1, MAX_STEPS), "steps between evaluations (each writes the checkpoint)"),
    "eval_iters": (cli.int_range(1, 100_000), "batches per split per evaluation"),
    "position": (POSITIONS, "positional encoding"),
    "norm": (NORMS, "normalisation layer"),
    "activation": (ACTIVATIONS, "feed-forward activation"),
    "ff": (FEED_FORWARDS, "feed-forward layer: dense, or a mixture of experts (each expert 4 * n-embd / top-k "
                          "wide, so the work per token equals the dense layer's)"),
    "num_experts": (cli.int_range(1, 1024), "experts per layer with --ff moe"),
    "top_k": (cli.int_range(1, 1024), "experts each token is sent to with --ff moe"),
    "grad_accum": (cli.int_range(1, 1_048_576), "micro-batches of --batch-size per optimiser step (gradient "
                   "accumulation): the update equals that of one batch grad-accum times larger"),
}
# Fields a --resume run may still change: how long to train and how often to evaluate.
RESUME_OVERRIDABLE = {"max_iters", "eval_interval", "eval_iters"}


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        description="Train a character-level GPT (transformer_implementation.Transformer) on the Python "
                    "standard library's sources or on your own text file.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="model and optimiser settings; the flags under 'overrides' change single fields")
    p.add_argument("--data", type=Path, default=None,
                   help="a UTF-8 text file to train on instead of the standard-library corpus")
    p.add_argument("--save-corpus", type=Path, default=None, metavar="PATH",
                   help="write the exact training text (both splits) to PATH and continue")
    p.add_argument("--out", type=Path, default=Path("runs/char_lm"),
                   help="folder for checkpoint and results (created if missing)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks CUDA, then MPS, then CPU")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="bfloat16 runs the forward pass under torch.autocast; auto = bfloat16 on CUDA "
                        "that supports it, float32 elsewhere")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass instead of keeping them: "
                        "less memory, about a third more compute, the same gradients")
    p.add_argument("--seed", type=cli.int_range(0, 2 ** 32 - 1), default=1337,
                   help="seed of initialisation, batches and dropout")
    p.add_argument("--threads", type=cli.int_range(1, 1024), default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--log-interval", type=cli.int_range(1, MAX_STEPS), default=None,
                   help="steps between progress lines (default: about 40 lines in all)")
    p.add_argument("--target-loss", type=cli.float_range(0, low_open=True), default=None,
                   help="record the training time at which val loss first reaches this value")
    p.add_argument("--stop-at-target", action="store_true", help="stop as soon as --target-loss is reached")
    p.add_argument("--sample-chars", type=cli.int_range(0, 1_000_000), default=400,
                   help="characters to generate at the end (0: none)")
    p.add_argument("--no-checkpoint", action="store_true", help="write no checkpoint (benchmarks)")
    p.add_argument("--write-rank-digests", action="store_true",
                   help="every process writes <out>/weights_rank<R>.sha256, a hash of its final weights "
                        "(to check that DDP ranks agree)")
    g = p.add_argument_group("overrides of the preset (default: the preset's value)")
    for field, (kind, text) in OVERRIDES.items():
        flag = "--" + field.replace("_", "-")
        if isinstance(kind, tuple):
            g.add_argument(flag, choices=kind, default=None, dest=field, help=text)
        else:
            g.add_argument(flag, type=kind, default=None, dest=field, help=text)
    return p


def resolve_config(args) -> TrainConfig:
    """The preset with the command line's overrides applied (the arguments are already checked)."""
    cfg = dataclasses.replace(PRESETS[args.preset])
    given = {f: getattr(args, f) for f in OVERRIDES if getattr(args, f) is not None}
    if "max_iters" in given and "lr_decay_iters" not in given and args.preset != "nanogpt-cpu":
        given["lr_decay_iters"] = given["max_iters"]  # a shorter run still decays fully
    return dataclasses.replace(cfg, **given)


def estimate_training_bytes(cfg: TrainConfig, vocab_size: int = VOCAB_ESTIMATE) -> int:
    """A generous estimate of one training process's memory in bytes (float32), for refusing sizes that
    cannot fit: weights, gradients and AdamW's two moments (16 bytes per parameter); every layer's
    attention matrices, B*H*T*T*4 bytes, kept for the backward pass (the explicit attention path and
    evaluation with attention weights materialise them); about 16 (B, T, E) activations per layer; and the
    logits with their gradient."""
    E, L, H, T, B, V = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.block_size, cfg.batch_size, vocab_size
    parameters = L * 12 * E * E + V * E + T * E
    attention = L * B * H * T * T * 4
    activations = L * 16 * B * T * E * 4
    logits = 3 * B * T * V * 4
    return 16 * parameters + attention + activations + logits


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the whole command line with the standard library only (no torch, no corpus yet):
    every mistake the arguments alone reveal ends here with one line and exit status 2."""
    p = build_parser()
    args = p.parse_args(argv)
    cli.check_output_folder(p, args.out)
    if args.data is not None:
        cli.check_input_file(p, args.data, "--data")
    if args.save_corpus is not None:
        if args.save_corpus.is_dir():
            p.error(f"--save-corpus {args.save_corpus}: is a folder, expected a file name")
        cli.check_output_folder(p, args.save_corpus.parent, "--save-corpus")
    if args.stop_at_target and args.target_loss is None:
        p.error("--stop-at-target needs --target-loss")
    if args.resume:
        if not (args.out / "ckpt.pt").is_file():
            p.error(f"--resume: no checkpoint at {args.out / 'ckpt.pt'}")
        fixed = [f for f in OVERRIDES if getattr(args, f) is not None and f not in RESUME_OVERRIDABLE]
        if fixed:
            p.error("--resume keeps the checkpoint's configuration; only --max-iters, --eval-interval and "
                    f"--eval-iters may change, got --{fixed[0].replace('_', '-')}")
        return args
    cfg = resolve_config(args)
    if cfg.n_embd % cfg.n_head:
        p.error(f"--n-embd {cfg.n_embd} must be divisible by --n-head {cfg.n_head}")
    if cfg.ff != "moe" and (args.num_experts is not None or args.top_k is not None):
        p.error("--num-experts and --top-k need --ff moe")
    if cfg.top_k > cfg.num_experts:
        p.error(f"--top-k {cfg.top_k} must not exceed --num-experts {cfg.num_experts}")
    if cfg.min_lr > cfg.lr:
        p.error(f"--min-lr {cfg.min_lr:g} must not exceed the peak learning rate {cfg.lr:g}")
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: every process on this machine
    cli.check_memory(p, processes * estimate_training_bytes(cfg),
                     f"training (block size {cfg.block_size}, batch {cfg.batch_size}, {cfg.n_layer} layers of "
                     f"width {cfg.n_embd}, {cfg.n_head} heads, {processes} process(es))")
    return args


if __name__ == "__main__":
    parse_args()  # a bad command line is refused here, before the slow imports below

import torch  # noqa: E402

from transformer_implementation import Transformer  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def build_stdlib_corpus(max_chars: int = CORPUS_CHARS) -> str:
    """The default corpus: this interpreter's standard-library sources (the rule is in the module docstring)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIPPED_FOLDERS for part in rel.parts[:-1]):
            continue
        files.append(rel)
    files.sort(key=lambda rel: rel.as_posix())
    not_kept = re.compile(r"[^\n -~]")  # printable ASCII is space (0x20) to tilde (0x7e); plus newline
    pieces, total = [], 0
    for rel in files:
        text = not_kept.sub("", (root / rel).read_text(encoding="utf-8", errors="replace"))
        pieces.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(pieces)[:max_chars]


def load_text(data: Path | None, block_size: int) -> tuple[str, str]:
    """Return (text, source description). Problems end the program with a one-line message."""
    if data is None:
        text, source = build_stdlib_corpus(), f"stdlib:{sysconfig.get_paths()['stdlib']}"
    else:
        if not data.exists():
            sys.exit(f"error: --data {data}: no such file")
        if not data.is_file():
            sys.exit(f"error: --data {data}: not a regular file")
        try:
            text = data.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            sys.exit(f"error: --data {data}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        except OSError as exc:
            sys.exit(f"error: --data {data}: cannot read ({exc.strerror})")
        if not text:
            sys.exit(f"error: --data {data}: the file is empty")
        source = str(data)
    # Each split must hold at least one window of block_size inputs plus the next-character target.
    need = block_size + 1
    n_val = len(text) - int(0.9 * len(text))
    if n_val < need:
        shortest = next(n for n in range(need, 20 * need) if n - int(0.9 * n) >= need)
        sys.exit(f"error: --data {data}: {len(text)} characters is too short: the 10% validation split "
                 f"({n_val}) must hold one context window + 1 = {need} characters, so the file needs at "
                 f"least {shortest} characters (or a smaller --block-size)")
    return text, source


class CharData:
    """Character vocabulary, the two splits as id tensors, and a sampler of random windows."""

    def __init__(self, text: str):
        self.chars = "".join(sorted(set(text)))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)  # (N,)
        n_train = int(0.9 * len(ids))
        self.splits = {"train": ids[:n_train], "val": ids[n_train:]}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> list[int]:
        return [self.stoi[c] for c in s if c in self.stoi]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
              rank: int = 0, world_size: int = 1):
        """Random windows. Every rank draws the same world_size * batch_size offsets from the same
        generator and keeps its own slice, so the sampler state is identical on every rank."""
        data = self.splits[split]
        offsets = torch.randint(len(data) - block_size, (world_size * batch_size,), generator=generator)
        offsets = offsets[rank * batch_size:(rank + 1) * batch_size]  # (B,)
        window = offsets[:, None] + torch.arange(block_size + 1)  # (B, T+1)
        chunk = data[window]  # (B, T+1)
        return chunk[:, :-1], chunk[:, 1:]  # inputs (B, T), next-character targets (B, T)


# --------------------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------------------

def pick_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        sys.exit(f"error: --device cuda: CUDA is not available here ({build})")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        sys.exit("error: --device mps: MPS is not available here")
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        # bf16 autocast on CPU was measured slower than fp32 for these small matrices (see the docs page).
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def make_model(cfg: TrainConfig, vocab_size: int) -> Transformer:
    # With --ff moe each token passes through top_k experts of width 4E / top_k: the same work per token,
    # and the same active parameters, as the dense layer of width 4E (plus the small router).
    ff_dim = 4 * cfg.n_embd // cfg.top_k if cfg.ff == "moe" else 4 * cfg.n_embd
    return Transformer(vocab_size, cfg.n_embd, cfg.n_head, cfg.n_layer, ff_dim, cfg.block_size,
                       dropout=cfg.dropout, position=cfg.position, norm=cfg.norm, norm_first=True,
                       activation=cfg.activation, tie_weights=True, bias=cfg.bias, ff=cfg.ff,
                       num_experts=cfg.num_experts, top_k=cfg.top_k)


def accumulate_gradients(model, batches, autocast=nullcontext, no_sync=None, stop_requested=lambda: False):
    """Forward and backward over the micro-batches ``[(x, y), ...]``, each loss divided by their number N.

    The gradients add up, so the result is the gradient of the mean of the N losses: for equal-sized
    micro-batches and a mean loss, exactly the gradient of one batch N times larger (to float rounding),
    for 1/N of its activation memory. (With ``--ff moe`` the balancing loss, docs/transformer.md eq. (12),
    is computed per micro-batch, so that one term is not the big batch's.) Under DistributedDataParallel pass
    ``no_sync=model.no_sync``: the gradient all-reduce is skipped for all but the last micro-batch, one
    all-reduce per step as without accumulation. Returns the mean loss (a 0-d tensor), or None as soon as
    ``stop_requested()`` turns true (checked between every forward and backward pass).
    """
    n = len(batches)
    total = None
    for i, (x, y) in enumerate(batches):
        sync = no_sync is None or i == n - 1
        with nullcontext() if sync else no_sync():
            with autocast():
                _, loss = model(x, y)
            if stop_requested():
                return None
            (loss / n).backward()
        total = loss.detach() / n if total is None else total + loss.detach() / n
        if stop_requested():
            return None
    return total


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: str) -> torch.optim.AdamW:
    # Weight decay on matrices (attention, MLP, the tied embedding) only; biases and norm gains stay free.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every tensor in one pass: on one CPU core it takes ~2 ms per step for this
    # model where the foreach implementation takes ~8 ms (about 10% of a nanogpt-cpu training step).
    fused = device.split(":")[0] in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             **({"fused": True} if fused else {"foreach": True}))


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, cosine decay to min_lr at lr_decay_iters, then min_lr (as nanoGPT)."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model, data: CharData, cfg: TrainConfig, device: str, autocast, seed: int,
                  stop_requested=lambda: False) -> dict | None:
    """Mean loss over eval_iters batches per split. Its own generator, reseeded each time: every
    evaluation sees the same windows, and the training RNG is left untouched. Returns None when
    ``stop_requested()`` turns true between two batches (Ctrl-C or SIGTERM)."""
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(seed + 1)
        losses = []
        for _ in range(cfg.eval_iters):
            if stop_requested():
                model.train(was_training)
                return None
            x, y = data.batch(split, cfg.batch_size, cfg.block_size, gen)
            with autocast():
                logits = model(x.to(device))  # (B, T, V)
                # The language-model loss alone (an MoE model's returned loss also holds the balancing term).
                loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.to(device).reshape(-1))
            losses.append(loss.item())
        out[split] = sum(losses) / len(losses)
    model.train(was_training)
    return out


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class StopFlag:
    """First Ctrl-C (SIGINT) or SIGTERM asks the run to stop and checkpoint; a second Ctrl-C stops at once.

    The handler only sets a flag (Python runs it between two bytecodes, never inside a torch kernel);
    the training loop reads it at every step, between the forward and the backward pass, and between the
    batches of an evaluation, so a request is honoured within about one forward or backward pass, which
    the memory bound on the sizes keeps short. ``exit_status`` is 128 + the signal number, the shell's
    convention: 130 for Ctrl-C, 143 for SIGTERM."""

    def __init__(self):
        self.requested = False
        self.signum = None
        self._previous = {}

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            print("\ninterrupt: stopping at once, no checkpoint written", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.requested = True
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping, writing a checkpoint (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def read_checkpoint(path: Path) -> dict:
    """This script's checkpoint: the core's ``Transformer.save`` layout, with ``extra`` holding the training
    state. Anything else (an older version's checkpoint included) ends the program with one line."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file
        sys.exit(f"error: --resume: {path} cannot be read as a checkpoint ({type(exc).__name__})")
    if isinstance(payload, dict) and payload.get("format") == "char-lm-checkpoint-v1":
        sys.exit(f"error: --resume: {path} was written by an older train_char_lm.py (format "
                 "char-lm-checkpoint-v1), which this version cannot resume; start a new run with another --out")
    extra = payload.get("extra") if isinstance(payload, dict) else None
    if (not isinstance(extra, dict) or extra.get("format") != CHECKPOINT_FORMAT
            or payload.get("class") != "Transformer"):
        sys.exit(f"error: --resume: {path} is not a checkpoint of this script")
    return payload


def main(argv=None) -> dict:
    wall_start = time.perf_counter()
    load_at_start = cli.load_average()
    args = parse_args(argv)

    # ---- processes: plain, or one of N under torchrun ----
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, local_rank, world_size = 0, 0, 1
    device = pick_device(args.device)
    if distributed:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device == "cuda":
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    log = (lambda *a, **k: print(*a, **{"flush": True, **k})) if master else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)

    out_dir = args.out
    ckpt_path = out_dir / "ckpt.pt"
    checkpoint = None  # the training state of a resumed run: the checkpoint's "extra"
    if args.resume:
        payload = read_checkpoint(ckpt_path)
        checkpoint = payload["extra"]
        checkpoint["model"] = payload["state_dict"]
        cfg = TrainConfig(**checkpoint["config"])
        for field in RESUME_OVERRIDABLE:
            if getattr(args, field) is not None:
                setattr(cfg, field, getattr(args, field))
    else:
        cfg = resolve_config(args)

    # ---- data ----
    text, source = load_text(args.data, cfg.block_size)
    corpus_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if args.save_corpus and master:
        args.save_corpus.parent.mkdir(parents=True, exist_ok=True)
        args.save_corpus.write_text(text, encoding="utf-8")
        log(f"wrote the corpus ({len(text):,} characters) to {args.save_corpus}")
    if checkpoint is not None and checkpoint["corpus"]["sha256"] != corpus_sha256:
        sys.exit(f"error: --resume: the checkpoint was trained on corpus {checkpoint['corpus']['sha256'][:12]}..., "
                 f"this run reads {corpus_sha256[:12]}... (pass the same --data)")
    data = CharData(text)

    # ---- model, optimiser, RNG ----
    dtype = pick_dtype(args.dtype, device)
    device_type = device.split(":")[0]
    autocast = ((lambda: torch.autocast(device_type=device_type, dtype=dtype)) if dtype != torch.float32
                else nullcontext)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = make_model(cfg, data.vocab_size).to(device)
    optimizer = make_optimizer(model, cfg, device)
    sampler = torch.Generator().manual_seed(args.seed)
    # After identical initialisation on every rank, give each rank its own dropout stream.
    torch.manual_seed(args.seed + 1000 * rank + 1)
    history = {"train_loss": [], "evals": [], "train_time_s": 0.0, "eval_time_s": 0.0, "target": None}
    step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        history = checkpoint["history"]
        sampler.set_state(checkpoint["rng"]["sampler"])
        random.setstate(checkpoint["rng"]["python"])
        per_rank = checkpoint["rng"]["per_rank"]
        if len(per_rank) == world_size:
            torch.set_rng_state(per_rank[rank]["cpu"])
            if device.startswith("cuda") and per_rank[rank].get("cuda") is not None:
                torch.cuda.set_rng_state(per_rank[rank]["cuda"])
        else:
            torch.manual_seed(args.seed + 1000 * rank + 1 + step)
        log(f"resumed from {ckpt_path} at step {step}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if distributed:
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.startswith("cuda") else None)

    n_params = raw_model.num_parameters()
    tokens_per_step = cfg.batch_size * cfg.block_size * world_size * cfg.grad_accum
    raw_model.gradient_checkpointing = args.gradient_checkpointing
    log(f"corpus: {source} | {len(text):,} chars | vocab {data.vocab_size} | sha256 {corpus_sha256[:16]}...")
    log(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} dims, context {cfg.block_size} | "
        f"{n_params / 1e6:.2f}M parameters | device {device} {str(dtype).replace('torch.', '')} | "
        f"{world_size} process(es) x {torch.get_num_threads()} threads")
    log(f"training: preset {args.preset}, {cfg.max_iters} steps of {tokens_per_step:,} tokens, lr {cfg.lr:g}")

    def save_checkpoint():
        per_rank_state = {"cpu": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state() if device.startswith("cuda") else None}
        if distributed:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, per_rank_state)
        else:
            gathered = [per_rank_state]
        if args.no_checkpoint or not master:
            return
        # The core's format (class, config, weights), so Transformer.load opens it; the rest of the
        # training state rides along as "extra". Transformer.save writes atomically (temporary file, rename).
        state = {
            "format": CHECKPOINT_FORMAT, "step": step, "config": dataclasses.asdict(cfg),
            "optimizer": optimizer.state_dict(), "vocab": data.chars,
            "corpus": {"source": source, "sha256": corpus_sha256, "chars": len(text)},
            "rng": {"sampler": sampler.get_state(), "python": random.getstate(), "per_rank": gathered},
            "history": history, "seed": args.seed,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        raw_model.save(ckpt_path, extra=state)

    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    log_interval = args.log_interval or max(1, cfg.max_iters // 40)
    evaluated_steps = {e["step"] for e in history["evals"]}
    interrupted, exit_status = False, 0
    loop_start = time.perf_counter()
    steps_this_run, time_this_run = 0, 0.0
    window_tokens, window_time = 0, 0.0
    model.train()
    with StopFlag() as stop:
        # One process reacts to Ctrl-C or SIGTERM inside a step or an evaluation; under torchrun every rank
        # must take part in the same collective calls, so the ranks agree on stopping once per step (below).
        stop_now = (lambda: False) if distributed else (lambda: stop.requested)

        def stop_and_save(where: str):
            save_checkpoint()
            log(f"stopped {where}; checkpoint of step {step} written to {ckpt_path} (continue with --resume)")

        while True:
            # ---- evaluate (and checkpoint) every eval_interval steps and at the end ----
            if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and step not in evaluated_steps:
                t0 = time.perf_counter()
                losses = estimate_loss(raw_model, data, cfg, device, autocast, args.seed, stop_now)
                history["eval_time_s"] += time.perf_counter() - t0
                if losses is None:  # interrupted: the evaluation is redone on --resume
                    interrupted = True
                    stop_and_save(f"during the evaluation at step {step}")
                    break
                history["evals"].append({"step": step, "train_time_s": history["train_time_s"],
                                         "train": losses["train"], "val": losses["val"]})
                evaluated_steps.add(step)
                log(f"eval  step {step:5d} | train {losses['train']:.4f} | val {losses['val']:.4f} | "
                    f"training time {format_seconds(history['train_time_s'])}")
                if (args.target_loss is not None and history["target"] is None
                        and losses["val"] <= args.target_loss):
                    history["target"] = {"loss": args.target_loss, "step": step,
                                         "train_time_s": history["train_time_s"]}
                    log(f"reached val loss {args.target_loss} at step {step} after "
                        f"{history['train_time_s']:.1f} s of training")
                if step > 0:
                    save_checkpoint()
                if args.stop_at_target and history["target"] is not None:
                    break
            if step >= cfg.max_iters:
                break

            # ---- one optimiser step ----
            t0 = time.perf_counter()
            # The random state before the step: a step abandoned half-way (Ctrl-C, SIGTERM) is undone, so
            # that --resume draws the same batch and dropout again and stays exact.
            rng_before = (sampler.get_state(), torch.get_rng_state(),
                          torch.cuda.get_rng_state() if device.startswith("cuda") else None)
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = []
            for _ in range(cfg.grad_accum):
                x, y = data.batch("train", cfg.batch_size, cfg.block_size, sampler, rank, world_size)
                batches.append((x.to(device), y.to(device)))
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(model, batches, autocast, model.no_sync if distributed else None, stop_now)
            if loss is None or stop_now():  # after a forward or backward pass: do not wait for the rest of the step
                optimizer.zero_grad(set_to_none=True)
                sampler.set_state(rng_before[0])
                torch.set_rng_state(rng_before[1])
                if rng_before[2] is not None:
                    torch.cuda.set_rng_state(rng_before[2])
                interrupted = True
                stop_and_save(f"during step {step + 1} (abandoned)")
                break
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            loss_value = loss.item()  # also waits for the device, so the timing below is honest
            dt = time.perf_counter() - t0
            step += 1
            history["train_time_s"] += dt
            history["train_loss"].append(loss_value)
            steps_this_run += 1
            time_this_run += dt
            window_tokens += tokens_per_step
            window_time += dt

            if step % log_interval == 0 or step == cfg.max_iters:
                eta = (cfg.max_iters - step) * time_this_run / steps_this_run
                log(f"step {step:5d}/{cfg.max_iters} | loss {loss_value:.4f} | lr {lr:.2e} | "
                    f"{window_tokens / window_time:,.0f} tok/s | ETA {format_seconds(eta)}", flush=True)
                window_tokens, window_time = 0, 0.0

            # ---- Ctrl-C: every rank must agree to stop, or the others would wait forever ----
            requested = stop.requested
            if distributed:
                flag = torch.tensor([1.0 if requested else 0.0], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                requested = bool(flag.item())
            if requested:
                interrupted = True
                stop_and_save(f"after step {step}")
                break
    if interrupted:
        exit_status = stop.exit_status if stop.requested else 130  # 130 Ctrl-C, 143 SIGTERM

    # ---- results ----
    wall = time.perf_counter() - loop_start
    sample = ""
    if master and args.sample_chars > 0 and not interrupted:
        prompt = "def "
        with torch.random.fork_rng(devices=[]):  # sampling must not move the training RNG
            torch.manual_seed(args.seed)
            ids = torch.tensor([data.encode(prompt)], dtype=torch.long, device=device)
            raw_model.eval()
            with torch.no_grad(), autocast():
                gen = raw_model.generate(ids, args.sample_chars, temperature=0.8, top_k=None)
            raw_model.train()
        sample = data.decode(gen[0].tolist())
        log("---- sample (temperature 0.8) ----\n" + sample + "\n----------------------------------")
    results = {
        "preset": args.preset, "config": dataclasses.asdict(cfg), "seed": args.seed,
        "corpus": {"source": source, "chars": len(text), "sha256": corpus_sha256, "vocab_size": data.vocab_size},
        "model": {"parameters": n_params, "config": dict(raw_model.config)},
        "device": device, "dtype": str(dtype).replace("torch.", ""), "world_size": world_size,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "compile": args.compile,
        "steps": step, "interrupted": interrupted, "train_loss": history["train_loss"],
        "evals": history["evals"], "final_val_loss": history["evals"][-1]["val"] if history["evals"] else None,
        "target": history["target"], "train_time_s": history["train_time_s"],
        "eval_time_s": history["eval_time_s"], "wall_time_this_run_s": wall,
        "tokens_per_s": (steps_this_run * tokens_per_step / time_this_run) if time_this_run else None,
        "sample": sample,
        # What a timing needs beside it: the whole run's wall time (from the start of main: building the
        # corpus and the model, training, evaluations, checkpoints and the sample; not the Python and torch
        # start-up before it), the machine, and the load it ran under.
        "wall_time_s": time.perf_counter() - wall_start,
        "command": "python examples/train_char_lm.py " + " ".join(sys.argv[1:] if argv is None else map(str, argv)),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1_5_15_at_start": load_at_start,
                    "load_average_1_5_15_at_end": cli.load_average()},
    }
    if master:
        save_json(out_dir / "results.json", results)
        if history["train_loss"]:
            from plotting import plot_loss_curves
            curves = {"train (per step)": (list(range(1, len(history["train_loss"]) + 1)), history["train_loss"])}
            if history["evals"]:
                curves["val"] = ([e["step"] for e in history["evals"]], [e["val"] for e in history["evals"]])
            plot_loss_curves(curves, out_dir / "loss_curve.png",
                             title=f"char LM, preset {args.preset} ({cfg.n_layer}x{cfg.n_embd}, ctx {cfg.block_size})")
        log(f"done: {step} steps, {wall:.1f} s this run; wrote {out_dir / 'results.json'}, "
            f"{out_dir / 'loss_curve.png'}" + ("" if args.no_checkpoint else f", {ckpt_path}"))
    if args.write_rank_digests:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"weights_rank{rank}.sha256").write_text(weights_digest(raw_model) + "\n")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if interrupted:
        sys.exit(exit_status)
    return results


def cpu_name() -> str:
    """The CPU's model name, for the benchmarks' records (Linux /proc/cpuinfo, else platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in state_dict order: equal digests = identical weights."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (building the corpus, sampling)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
