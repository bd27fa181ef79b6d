"""Attention against recurrence: where an LSTM forgets, and what attention costs, as the distance grows.

Four models of (nearly) the same parameter count learn three tasks whose difficulty is the distance between
a cause and its effect, at several sequence lengths L (16 to 512):

* ``copy``    four symbols at the start, L - 8 blanks, then four "go" markers: write the four symbols back.
* ``recall``  four (key, value) pairs at the start, blanks, then "?" and one of the keys: answer its value
              (associative recall).
* ``count``   L - 1 tokens, between 0 and 7 of them "x" scattered over the whole span, then "?": say how
              many x there were.

Chance is 1/8 on every task (each answer is one of 8 symbols). The models, all reading the sequence left
to right except the Transformer, and all answering at the last positions only:

* ``lstm``      an LSTM;
* ``gru``       a GRU;
* ``lstm_attn`` an LSTM whose answer positions also read every earlier state through Bahdanau's additive
                attention (mechanisms/additive_attention.py): the state at the question asks which
                earlier state holds the answer;
* ``transformer`` the core's encoder blocks (transformer_implementation.EncoderBlock), sinusoidal
                positions: every position sees every other in one step.

Hidden sizes are chosen so that each model has about as many parameters as the Transformer (the counts
are printed and saved). Each (task, model, length) is trained from scratch for ``--steps`` steps and
scored on 500 fixed held-out sequences; separately, the seconds per training step are measured for every
model at every length of ``--time-lengths`` (16 to 512 by default), so the cost curve covers the whole
range even when the accuracy grid, which is what a 2-core CPU cannot afford at every length, does not.

Outputs (under ``--out``, default ``runs/attention_vs_rnn``): ``results.json``, one checkpoint per grid
cell in ``checkpoints/`` (``{"class", "config", "state_dict", "extra"}``, written atomically; a finished
cell is not trained again, an unfinished one resumes), ``attention_vs_rnn_accuracy.png`` (accuracy
against length, one panel per task) and ``attention_vs_rnn_time.png`` (seconds per step against length).
The page is docs/examples/attention_vs_rnn.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "examples"))

import cli  # noqa: E402  (standard library only: the command line is checked before torch loads)

TASKS = ("copy", "recall", "count")
MODELS = ("lstm", "gru", "lstm_attn", "transformer")
# The vocabulary: blank, 8 answer symbols, 8 keys, "?", 4 go markers, "x".
BLANK, SYMBOLS, KEYS, QUERY, GO, X = 0, range(1, 9), range(9, 17), 17, range(18, 22), 22
VOCAB = 23
N_COPY, N_PAIRS, MAX_COUNT = 4, 4, 7
MIN_LENGTH, MAX_LENGTH = 12, 4096
TEST_PER_CELL = 500
TEST_SEED = 19970815  # Hochreiter & Schmidhuber's LSTM paper; the test sets never depend on --seed
CHECKPOINT_FORMAT = "attention-vs-rnn-v1"


def int_list(low: int, high: int):
    """An argparse type: comma-separated integers in [low, high], e.g. 16,64,256."""
    one = cli.int_range(low, high)

    def parse(text: str) -> list:
        try:
            values = [one(t) for t in text.split(",") if t.strip()]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc} (in {text!r})") from None
        if not values:
            raise argparse.ArgumentTypeError(f"must list at least one integer, got {text!r}")
        return sorted(set(values))
    parse.__name__ = "list of integers"
    return parse


def name_list(choices: Sequence[str]):
    def parse(text: str) -> list:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of {', '.join(choices)}, got {text!r}")
        return [c for c in choices if c in names]
    parse.__name__ = "list"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=name_list(TASKS), default=list(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--models", type=name_list(MODELS), default=list(MODELS),
                   help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--lengths", type=int_list(MIN_LENGTH, MAX_LENGTH), default=[16, 32, 64],
                   help="sequence lengths of the accuracy grid (default: 16,32,64, what one CPU core trains in "
                        "about 4 minutes; longer lengths cost proportionally more, see the page)")
    p.add_argument("--time-lengths", type=int_list(MIN_LENGTH, MAX_LENGTH), default=[16, 32, 64, 128, 256, 512],
                   help="lengths at which seconds per training step are measured")
    p.add_argument("--steps", type=cli.int_range(1, 10_000_000), default=400, help="training steps per grid cell")
    p.add_argument("--batch-size", type=cli.int_range(1, 4096), default=32, help="sequences per step")
    p.add_argument("--lr", type=cli.float_range(0, 1, low_open=True), default=3e-3, help="peak learning rate")
    p.add_argument("--d-model", type=cli.int_range(8, 1024), default=32,
                   help="the Transformer's width (4 heads, 2 layers); the recurrent models are sized to match")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and the training stream")
    p.add_argument("--device", type=cli.device_name, default="auto",
                   help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=cli.int_range(0, 1024), default=1, help="CPU threads for torch (0 = default)")
    p.add_argument("--test-size", type=cli.int_range(8, 100_000), default=TEST_PER_CELL,
                   help="held-out sequences per grid cell")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "attention_vs_rnn", help="output folder")
    p.add_argument("--checkpoint-every", type=cli.int_range(1, 10_000_000), default=100,
                   help="steps between checkpoints of the cell being trained")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: length 16, 3 steps, timing at 16 and 32 (seconds)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--publish", action="store_true", help="also copy results.json and the figures into docs/examples/")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.time_lengths, args.steps, args.test_size = [16], [16, 32], min(args.steps, 3), 16
    if args.d_model % 4:
        p.error(f"--d-model {args.d_model} must be a multiple of 4 (the Transformer has 4 heads)")
    cli.check_output_folder(p, args.out)
    longest = max(args.lengths + args.time_lengths)
    # The Transformer keeps its 4 heads' (L, L) weights and about 16 (L, d) activations per layer (2 layers).
    need = args.batch_size * 2 * 4 * (2 * 4 * longest * longest + 16 * longest * args.d_model)
    cli.check_memory(p, need, f"a training step at length {longest} with --batch-size {args.batch_size}")
    return args


if __name__ == "__main__":
    parse_args()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import transformer_implementation as ti  # noqa: E402
from mechanisms.additive_attention import AdditiveAttention  # noqa: E402


# ----------------------------------------------------------------------------------------------
# The tasks
# ----------------------------------------------------------------------------------------------

def make_batch(task: str, length: int, batch_size: int, generator: torch.Generator) -> tuple:
    """(inputs (B, L), targets (B, K)): the answers expected at the last K positions (K = 4 for copy, else 1)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if length < MIN_LENGTH:
        raise ValueError(f"length must be at least {MIN_LENGTH}, got {length}")
    B, L, g = batch_size, length, generator
    x = torch.full((B, L), BLANK, dtype=torch.long)  # (B, L)
    if task == "copy":
        symbols = torch.randint(SYMBOLS.start, SYMBOLS.stop, (B, N_COPY), generator=g)  # (B, 4)
        x[:, :N_COPY] = symbols
        x[:, L - N_COPY:] = torch.arange(GO.start, GO.stop)  # go_1 .. go_4 say which symbol to write
        return x, symbols
    if task == "recall":
        keys = torch.rand(B, len(KEYS), generator=g).argsort(-1)[:, :N_PAIRS] + KEYS.start  # (B, 4), distinct
        values = torch.randint(SYMBOLS.start, SYMBOLS.stop, (B, N_PAIRS), generator=g)  # (B, 4)
        x[:, 0:2 * N_PAIRS:2], x[:, 1:2 * N_PAIRS:2] = keys, values
        which = torch.randint(0, N_PAIRS, (B, 1), generator=g)  # (B, 1)
        x[:, L - 2] = QUERY
        x[:, L - 1] = keys.gather(1, which).squeeze(1)
        return x, values.gather(1, which)  # (B, 1)
    counts = torch.randint(0, MAX_COUNT + 1, (B,), generator=g)  # (B,)
    order = torch.rand(B, L - 1, generator=g).argsort(-1)  # (B, L-1): a random permutation per row
    x[:, :L - 1] = torch.where(order < counts[:, None], X, BLANK)  # the first `count` of a permutation
    x[:, L - 1] = QUERY
    return x, (counts + SYMBOLS.start)[:, None]  # (B, 1): the count n is written as symbol n + 1


def heldout_batch(task: str, length: int, size: int) -> tuple:
    g = torch.Generator().manual_seed(TEST_SEED + 1000 * TASKS.index(task) + length)
    return make_batch(task, length, size, g)


# ----------------------------------------------------------------------------------------------
# The models: (B, L) ids -> (B, K, VOCAB) logits at the last K positions
# ----------------------------------------------------------------------------------------------

class RecurrentModel(nn.Module):
    """An LSTM or GRU over the sequence; ``attention=True`` adds Bahdanau attention at the answer positions."""

    def __init__(self, cell: str, hidden: int, embed: int = 32, attention: bool = False) -> None:
        super().__init__()
        self.config = dict(cell=cell, hidden=hidden, embed=embed, attention=attention)
        self.embedding = nn.Embedding(VOCAB, embed)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](embed, hidden, batch_first=True)
        self.attention = AdditiveAttention(hidden, hidden, hidden) if attention else None
        self.out = nn.Linear(2 * hidden if attention else hidden, VOCAB)

    def forward(self, x: torch.Tensor, k: int, need_weights: bool = False):
        states, _ = self.rnn(self.embedding(x))  # (B, L, h)
        query = states[:, -k:]  # (B, K, h): the states at the answer positions
        weights = None
        if self.attention is not None:
            L = x.shape[1]
            # Causal: the answer at position t reads the states 0..t (what a left-to-right reader has seen).
            mask = torch.arange(L, device=x.device)[None, :] <= torch.arange(L - k, L, device=x.device)[:, None]  # (K, L)
            context, weights = self.attention(query, states, mask=mask, need_weights=True)  # (B, K, h), (B, 1, K, L)
            query = torch.cat([query, context], dim=-1)  # (B, K, 2h)
        logits = self.out(query)  # (B, K, V)
        return (logits, weights) if need_weights else logits


class TransformerModel(nn.Module):
    """Embedding + sinusoidal positions + two core EncoderBlocks (bidirectional) + a linear read-out."""

    def __init__(self, d_model: int = 32, num_heads: int = 4, num_layers: int = 2, max_len: int = MAX_LENGTH) -> None:
        super().__init__()
        self.config = dict(d_model=d_model, num_heads=num_heads, num_layers=num_layers, max_len=max_len)
        self.embedding = nn.Embedding(VOCAB, d_model)
        self.position = ti.SinusoidalPositionalEncoding(d_model, max_len)
        self.blocks = nn.ModuleList(ti.EncoderBlock(d_model, num_heads, 2 * d_model) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, VOCAB)

    def forward(self, x: torch.Tensor, k: int, need_weights: bool = False):
        h = self.position(self.embedding(x) * math.sqrt(self.embedding.embedding_dim))  # (B, L, d)
        weights = None
        for block in self.blocks:
            h = block(h, need_weights=need_weights)
            if need_weights:
                h, weights = h  # (B, L, d), (B, H, L, L): the last layer's are kept
        logits = self.out(self.norm(h[:, -k:]))  # (B, K, V)
        return (logits, weights) if need_weights else logits


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(name: str, d_model: int = 32) -> nn.Module:
    """The Transformer of width d_model; each recurrent model with the hidden size whose parameter count is
    closest to the Transformer's."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if name == "transformer":
        return TransformerModel(d_model)
    target = num_parameters(TransformerModel(d_model))
    cell, attention = ("gru", False) if name == "gru" else ("lstm", name == "lstm_attn")
    best = min(range(2, 1024, 2), key=lambda h: abs(recurrent_parameters(cell, h, 32, attention) - target))
    return RecurrentModel(cell, best, attention=attention)


def recurrent_parameters(cell: str, hidden: int, embed: int, attention: bool) -> int:
    """RecurrentModel's parameter count, by formula (a test checks it against the built model)."""
    gates = {"lstm": 4, "gru": 3}[cell]
    h, e = hidden, embed
    n = VOCAB * e + gates * (h * e + h * h + 2 * h)  # embedding; the cell's W_ih, W_hh and two biases
    if attention:
        n += (h * h + h) + h * h + h  # AdditiveAttention: W_q and b, W_k, v
    return n + (2 * h if attention else h) * VOCAB + VOCAB  # the read-out


def restore_model(config: dict) -> nn.Module:
    return TransformerModel(**config) if "d_model" in config else RecurrentModel(**config)


# ----------------------------------------------------------------------------------------------
# Training one grid cell
# ----------------------------------------------------------------------------------------------

def learning_rate(step: int, total: int, peak: float) -> float:
    warmup = max(1, min(50, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_step(model, optimizer, task: str, length: int, batch_size: int, generator, device) -> float:
    x, y = make_batch(task, length, batch_size, generator)
    x, y = x.to(device), y.to(device)
    logits = model(x, y.shape[1])  # (B, K, V)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def accuracy(model, task: str, length: int, size: int, device, batch_size: int = 100) -> float:
    model.eval()
    x, y = heldout_batch(task, length, size)
    hits = 0
    for i in range(0, size, batch_size):
        logits = model(x[i:i + batch_size].to(device), y.shape[1])  # (b, K, V)
        hits += int((logits.argmax(-1).cpu() == y[i:i + batch_size]).sum())
    model.train()
    return hits / y.numel()


def run_cell(task: str, name: str, length: int, args, device, progress) -> dict:
    """Train one (task, model, length) cell from scratch, or resume it, or read its finished result."""
    path = Path(args.out) / "checkpoints" / f"{task}_{name}_{length}.pt"
    torch.manual_seed(args.seed)
    model = build_model(name, args.d_model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    settings = dict(task=task, length=length, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed, test_size=args.test_size)
    step, losses, seconds = 0, [], 0.0
    if path.exists() and not args.restart:
        try:
            ckpt = torch.load(path, map_location=device, weights_only=True)
            extra = ckpt["extra"]
            ok = extra.get("format") == CHECKPOINT_FORMAT and extra["settings"] == settings \
                and ckpt["config"] == model.config
        except Exception:  # a torn or foreign file: train again
            ok = False
        if ok:
            if extra.get("result") is not None:
                progress.skip(name, length, args.steps)
                return extra["result"]
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(extra["optimizer"])
            step, losses, seconds = extra["step"], extra["losses"], extra["seconds"]

    def save(result=None):
        extra = dict(format=CHECKPOINT_FORMAT, settings=settings, optimizer=optimizer.state_dict(), step=step,
                     losses=losses, seconds=seconds, result=result)
        atomic_save({"class": type(model).__name__, "config": model.config, "state_dict": model.state_dict(),
                     "extra": extra}, path)

    model.train()
    while step < args.steps:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # batch k depends on (seed, k) only
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        t0 = time.perf_counter()
        losses.append(train_step(model, optimizer, task, length, args.batch_size, g, device))
        seconds += time.perf_counter() - t0
        step += 1
        progress.advance(name, length, 1, time.perf_counter() - t0)
        if step % args.checkpoint_every == 0 and step < args.steps:
            save()
    result = dict(accuracy=accuracy(model, task, length, args.test_size, device),
                  final_loss=sum(losses[-20:]) / len(losses[-20:]), train_seconds=round(seconds, 2),
                  parameters=num_parameters(model))
    save(result)
    progress.report(f"[{task} L={length}] {name:<11s} accuracy {result['accuracy']:.1%}  "
                    f"loss {result['final_loss']:.3f}  {seconds:.1f}s")
    return result


class Progress:
    """A progress line with an ETA computed from the measured seconds per step of each (model, length)."""

    def __init__(self, plan: list, steps: int, seconds_per_step: dict) -> None:
        self.sps = seconds_per_step
        self.remaining = sum(steps * self.cost(m, L) for _, m, L in plan)
        self.done = 0.0  # estimated seconds of work done by the steps trained so far
        self.t0, self.last = time.perf_counter(), 0.0

    def eta(self) -> float:
        """The estimated work left, rescaled by how fast the work done so far really went (on a busy
        machine the measured step costs underestimate the wall-clock time)."""
        elapsed = time.perf_counter() - self.t0
        return self.remaining * (elapsed / self.done if self.done > 0 else 1.0)

    def cost(self, name: str, length: int) -> float:
        known = self.sps.get(name, {})
        if str(length) in known:
            return known[str(length)]
        if not known:
            return 0.01
        nearest = min(known, key=lambda k: abs(int(k) - length))
        return known[nearest] * length / int(nearest)  # at worst linear in the length: a guess

    def advance(self, name: str, length: int, n: int, seconds: float) -> None:
        self.remaining = max(0.0, self.remaining - n * self.cost(name, length))
        self.done += n * self.cost(name, length)
        now = time.perf_counter()
        if now - self.last > 10:
            self.last = now
            print(f"  ... {name} L={length}  elapsed {_fmt(now - self.t0)}  ETA {_fmt(self.eta())}", flush=True)

    def skip(self, name: str, length: int, steps: int) -> None:
        self.remaining = max(0.0, self.remaining - steps * self.cost(name, length))

    def report(self, line: str) -> None:
        print(f"{line}   (elapsed {_fmt(time.perf_counter() - self.t0)}, ETA {_fmt(self.eta())})", flush=True)


def _fmt(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s"


def time_steps(names: Sequence[str], lengths: Sequence[int], args, device, repeats: int = 3) -> dict:
    """Seconds per training step (median of `repeats`, after one warm-up step) for each model and length."""
    table = {}
    for name in names:
        table[name] = {}
        for L in lengths:
            torch.manual_seed(0)
            model = build_model(name, args.d_model).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            g = torch.Generator().manual_seed(0)
            times = []
            # On the CPU, this process's CPU time: on a shared machine the wall clock mostly measures the
            # other users. On a GPU, the wall clock after synchronising.
            clock = time.perf_counter if device.type == "cuda" else time.process_time
            for i in range(repeats + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = clock()
                train_step(model, optimizer, "recall", L, args.batch_size, g, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(clock() - t0)
            table[name][str(L)] = sorted(times[1:])[len(times[1:]) // 2]
        print(f"[time] {name:<11s} " + "  ".join(f"L={L}: {1000 * table[name][str(L)]:.0f} ms"
                                                   for L in lengths), flush=True)
    return table


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def plot_accuracy(grid: dict, tasks, names, lengths, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import plotting  # noqa: F401  (Agg backend)

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name in names:
            ax.plot(lengths, [grid[task][name][str(L)]["accuracy"] for L in lengths], marker="o", label=name)
        ax.axhline(1 / 8, color="k", linestyle=":", linewidth=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(L) for L in lengths])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("sequence length L")
        ax.set_title(task, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_time(table: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import plotting  # noqa: F401

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, row in table.items():
        lengths = sorted(int(L) for L in row)
        ax.plot(lengths, [1000 * row[str(L)] for L in lengths], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(L) for L in lengths])
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("ms per training step (CPU time on a CPU, batch 32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("what each model costs", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def machine_info(device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), device=str(device),
                load_average_1_5_15_at_start=cli.load_average())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = cli.pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = {name: num_parameters(build_model(name, args.d_model)) for name in args.models}
    print(f"device {device}; parameters: " + ", ".join(f"{n} {p:,}" for n, p in params.items()))
    command = "python examples/attention_vs_rnn.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = dict(command=command.strip(), machine=machine_info(device), steps=args.steps,
                   batch_size=args.batch_size, lr=args.lr, seed=args.seed, test_size=args.test_size,
                   lengths=args.lengths, parameters=params,
                   hidden={n: build_model(n, args.d_model).config for n in args.models}, chance=1 / 8)
    results["seconds_per_step"] = time_steps(args.models, args.time_lengths, args, device)
    plan = [(task, name, L) for task in args.tasks for L in args.lengths for name in args.models]
    progress = Progress(plan, args.steps, results["seconds_per_step"])
    grid = {task: {name: {} for name in args.models} for task in args.tasks}
    for task, name, L in plan:
        grid[task][name][str(L)] = run_cell(task, name, L, args, device, progress)
    results["accuracy"] = {t: {n: {L: c["accuracy"] for L, c in row.items()} for n, row in m.items()}
                           for t, m in grid.items()}
    results["cells"] = grid
    figures = []
    if not args.no_figures:
        figures.append(plot_accuracy(grid, args.tasks, args.models, args.lengths, out / "attention_vs_rnn_accuracy.png"))
        figures.append(plot_time(results["seconds_per_step"], out / "attention_vs_rnn_time.png"))
    results["total_seconds"] = round(time.perf_counter() - t_start, 2)
    # CPU time of this process: about what the wall time would be on an idle machine (one torch thread).
    results["cpu_seconds"] = round(time.process_time(), 2)
    results["machine"]["load_average_1_5_15_at_end"] = cli.load_average()
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    print("accuracy (rows: model, columns: length)")
    for task in args.tasks:
        print(f"  {task}: " + " | ".join(f"{n} " + " ".join(f"{grid[task][n][str(L)]['accuracy']:.2f}"
                                                            for L in args.lengths) for n in args.models))
    print(f"wrote {out / 'results.json'}; total {results['total_seconds']:.1f}s wall, "
          f"{results['cpu_seconds']:.1f}s CPU, load average {results['machine']['load_average_1_5_15_at_end']}")
    if args.publish:
        docs = REPO_ROOT / "docs" / "examples"
        (docs / "results").mkdir(parents=True, exist_ok=True)
        (docs / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "results.json", docs / "results" / "attention_vs_rnn.json")
        for path in figures:
            shutil.copyfile(path, docs / "figures" / path.name)
        print(f"copied results and {len(figures)} figures into {docs}")
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
