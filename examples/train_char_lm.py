#!/usr/bin/env python
"""Train a tiny character-level GPT on a corpus every Python install has, then sample from it.

    python examples/train_char_lm.py                        # default preset, a few minutes on 2 CPU cores
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
at the end and on Ctrl-C), ``results.json`` and ``loss_curve.png``.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the core file lives at the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/plotting.py

from transformer_implementation import Transformer  # noqa: E402

CORPUS_CHARS = 1_100_000
SKIPPED_FOLDERS = ("test", "tests", "idlelib", "site-packages")
CHECKPOINT_FORMAT = "char-lm-checkpoint-v1"


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
    # optimisation
    batch_size: int = 12          # sequences per step, per process
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
    # Our default, tuned for a 2-core CPU and a few minutes: nanoGPT's model size and batch, but rotary
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

# Command-line flags that override a preset's field (flag -> field); None means "keep the preset's".
OVERRIDES = {
    "n_layer": int, "n_head": int, "n_embd": int, "block_size": int, "dropout": float,
    "batch_size": int, "max_iters": int, "lr": float, "min_lr": float, "warmup_iters": int,
    "lr_decay_iters": int, "weight_decay": float, "eval_interval": int, "eval_iters": int,
    "position": str, "norm": str, "activation": str,
}
# Fields a --resume run may still change: how long to train and how often to evaluate.
RESUME_OVERRIDABLE = {"max_iters", "eval_interval", "eval_iters"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a character-level GPT (transformer_implementation.Transformer) on the Python "
                    "standard library's sources or on your own text file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="model and optimiser settings; flags below override single fields")
    p.add_argument("--data", type=Path, default=None,
                   help="a UTF-8 text file to train on instead of the standard-library corpus")
    p.add_argument("--save-corpus", type=Path, default=None, metavar="PATH",
                   help="write the exact training text (both splits) to PATH and continue")
    p.add_argument("--out", type=Path, default=Path("runs/char_lm"), help="folder for checkpoint and results")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks CUDA, then MPS, then CPU")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="bfloat16 runs the forward pass under torch.autocast; auto = bfloat16 on CUDA "
                        "that supports it, float32 elsewhere (bf16 autocast was slower on our test CPU)")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--log-interval", type=int, default=None, help="steps between progress lines (default: ~40 lines)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="record the training time at which val loss first reaches this value")
    p.add_argument("--stop-at-target", action="store_true", help="stop as soon as --target-loss is reached")
    p.add_argument("--sample-chars", type=int, default=400, help="characters to generate at the end (0: none)")
    p.add_argument("--no-checkpoint", action="store_true", help="write no checkpoint (benchmarks)")
    p.add_argument("--write-rank-digests", action="store_true",
                   help="every process writes <out>/weights_rank<R>.sha256, a hash of its final weights "
                        "(to check that DDP ranks agree)")
    g = p.add_argument_group("overrides of the preset")
    for field, typ in OVERRIDES.items():
        g.add_argument("--" + field.replace("_", "-"), type=typ, default=None, dest=field)
    return p


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
        sys.exit("error: --device cuda: CUDA is not available here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        sys.exit("error: --device mps: MPS is not available here")
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        # bf16 autocast on CPU was measured slower than fp32 for these small matrices (see the docs page).
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def make_model(cfg: TrainConfig, vocab_size: int) -> Transformer:
    return Transformer(vocab_size, cfg.n_embd, cfg.n_head, cfg.n_layer, 4 * cfg.n_embd, cfg.block_size,
                       dropout=cfg.dropout, position=cfg.position, norm=cfg.norm, norm_first=True,
                       activation=cfg.activation, tie_weights=True, bias=cfg.bias)


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
def estimate_loss(model, data: CharData, cfg: TrainConfig, device: str, autocast, seed: int) -> dict:
    """Mean loss over eval_iters batches per split. Its own generator, reseeded each time: every
    evaluation sees the same windows, and the training RNG is left untouched."""
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(seed + 1)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = data.batch(split, cfg.batch_size, cfg.block_size, gen)
            with autocast():
                _, loss = model(x.to(device), y.to(device))
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
    """First Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step and checkpoint;
    a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step, then writing a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

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

def resolve_config(args) -> TrainConfig:
    cfg = dataclasses.replace(PRESETS[args.preset])
    given = {f: getattr(args, f) for f in OVERRIDES if getattr(args, f) is not None}
    if "max_iters" in given and "lr_decay_iters" not in given and args.preset != "nanogpt-cpu":
        given["lr_decay_iters"] = given["max_iters"]  # a shorter run still decays fully
    cfg = dataclasses.replace(cfg, **given)
    if cfg.n_embd % cfg.n_head:
        sys.exit(f"error: --n-embd {cfg.n_embd} must be divisible by --n-head {cfg.n_head}")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "eval_interval", "eval_iters"):
        if getattr(cfg, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_iters < 0:
        sys.exit(f"error: --max-iters must be >= 0, got {cfg.max_iters}")
    return cfg


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)

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
    checkpoint = None
    if args.resume:
        if not ckpt_path.is_file():
            sys.exit(f"error: --resume: no checkpoint at {ckpt_path}")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            sys.exit(f"error: --resume: {ckpt_path} is not a checkpoint of this script")
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
    tokens_per_step = cfg.batch_size * cfg.block_size * world_size
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
        state = {
            "format": CHECKPOINT_FORMAT, "step": step, "config": dataclasses.asdict(cfg),
            "model_config": dict(raw_model.config), "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(), "vocab": data.chars,
            "corpus": {"source": source, "sha256": corpus_sha256, "chars": len(text)},
            "rng": {"sampler": sampler.get_state(), "python": random.getstate(), "per_rank": gathered},
            "history": history, "seed": args.seed,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(ckpt_path, lambda tmp: torch.save(state, tmp))

    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    log_interval = args.log_interval or max(1, cfg.max_iters // 40)
    evaluated_steps = {e["step"] for e in history["evals"]}
    interrupted = False
    wall_start = time.perf_counter()
    steps_this_run, time_this_run = 0, 0.0
    window_tokens, window_time = 0, 0.0
    model.train()
    with StopFlag() as stop:
        while True:
            # ---- evaluate (and checkpoint) every eval_interval steps and at the end ----
            if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and step not in evaluated_steps:
                t0 = time.perf_counter()
                losses = estimate_loss(raw_model, data, cfg, device, autocast, args.seed)
                history["eval_time_s"] += time.perf_counter() - t0
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
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = data.batch("train", cfg.batch_size, cfg.block_size, sampler, rank, world_size)
            x, y = x.to(device), y.to(device)
            with autocast():
                _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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
                save_checkpoint()
                log(f"stopped at step {step}; checkpoint written to {ckpt_path} (continue with --resume)")
                break

    # ---- results ----
    wall = time.perf_counter() - wall_start
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
        sys.exit(130)
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
    main()
