"""Visual question answering on drawn scenes: question words cross-attend to image patches.

Each example is a 32x32 picture of three coloured shapes on a 4x4 grid of cells (one shape per cell, each
in its own column) and a question about it, both generated on the fly, so nothing is downloaded and the
right answer, and the image patch a question word should look at, are known in advance::

    what colour is the square ?            -> red | green | blue | yellow
    what shape is the blue object ?        -> square | circle | triangle | cross
    is there a green circle ?              -> yes | no
    is the circle left of the triangle ?   -> yes | no

Three models see the same data for the same number of steps and are scored on the same 2,000 held-out
examples (500 per question type, fixed whatever ``--seed``):

* ``cross``          the question (one core EncoderBlock) reads the 16 image patches (one core EncoderBlock)
                     through two layers of multi-head cross-attention (mechanisms/cross_attention.py):
                     every question word is a query, every patch a key and a value.
* ``coattention``    the same encoders joined by alternating co-attention (mechanisms/co_attention.py,
                     Lu et al. 2016): summarise the question, attend to the image with the summary, attend
                     to the question again with the attended image.
* ``question_only``  the same question encoder and no image at all: the baseline that shows how much of the
                     accuracy needs the picture (a model that never looks gets 25% on colour and shape
                     questions and 50% on yes/no ones).

What is measured: accuracy per question type for each model; for ``cross``, the attention mass that the
question word naming an object (``square`` in "what colour is the square ?", ``blue`` in "what shape is the
blue object ?", both shapes of a left-of question) puts on the patch where that object is drawn, against
1/16 for attention spread evenly; the same for ``coattention``'s image attention.

Outputs (under ``--out``, default ``runs/multimodal_attention``): ``results.json`` (with the machine and
its load average), ``checkpoints/<model>.pt`` (``{"class", "config", "state_dict", "extra"}``, written
atomically every ``--checkpoint-every`` steps; a rerun resumes), ``multimodal_accuracy.png`` and
``multimodal_attention_<model>.png`` (the patches each question word attends to). ``--publish`` copies
them into ``docs/examples/``. The page is docs/examples/multimodal_attention.md.
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
sys.path.insert(0, str(REPO_ROOT))  # so the imports below work from any directory
sys.path.insert(0, str(REPO_ROOT / "examples"))  # examples/cli.py, examples/plotting.py

import cli  # noqa: E402  (standard library only: the command line is checked before torch loads)

MODELS = ("cross", "coattention", "question_only")
QUESTION_TYPES = ("colour", "shape", "exists", "left_of")
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("square", "circle", "triangle", "cross")
ANSWERS = tuple(COLOURS) + SHAPES + ("yes", "no")
WORDS = ("<pad>", "what", "colour", "is", "the", "shape", "object", "there", "a", "left", "of", "?") \
    + tuple(COLOURS) + SHAPES
GRID, CELL = 4, 8  # a 4x4 grid of 8x8-pixel cells: a 32x32 image, 16 patches
IMAGE = GRID * CELL
NUM_OBJECTS = 3
MAX_QUESTION = 8  # "is the circle left of the triangle ?"
TEST_SIZE = 2000
TEST_SEED = 20161606  # the test set never depends on --seed
CHECKPOINT_FORMAT = "multimodal-attention-v1"


# ----------------------------------------------------------------------------------------------
# The data: scenes and questions whose answers (and the patches that decide them) are known
# ----------------------------------------------------------------------------------------------

def shape_mask(shape: str) -> list:
    """An 8x8 list of 0/1 rows drawing `shape` inside one cell (a one-pixel margin)."""
    rows = []
    for y in range(CELL):
        row = []
        for x in range(CELL):
            inside = 1 <= x <= 6 and 1 <= y <= 6
            if shape == "square":
                on = inside
            elif shape == "circle":
                on = (x - 3.5) ** 2 + (y - 3.5) ** 2 <= 3.2 ** 2 and inside
            elif shape == "triangle":  # apex up: row y covers the middle (y + 1) pixels around the centre
                on = inside and abs(x - 3.5) <= (y - 0.5) / 2 + 0.01
            elif shape == "cross":
                on = inside and (x in (3, 4) or y in (3, 4))
            else:
                raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
            row.append(1 if on else 0)
        rows.append(row)
    return rows


def make_scene(rng: random.Random) -> list:
    """Three objects: distinct shapes, distinct colours, distinct cells in distinct columns.
    Each object is a dict (shape, colour, row, col)."""
    shapes = rng.sample(SHAPES, NUM_OBJECTS)
    colours = rng.sample(list(COLOURS), NUM_OBJECTS)
    cols = rng.sample(range(GRID), NUM_OBJECTS)
    return [dict(shape=s, colour=c, row=rng.randrange(GRID), col=x) for s, c, x in zip(shapes, colours, cols)]


def make_question(rng: random.Random, scene: list, qtype: str) -> tuple:
    """(words, answer, refs): refs lists (word index, patch index) pairs, the patch each naming word
    should look at."""
    def patch(obj):
        return obj["row"] * GRID + obj["col"]

    if qtype == "colour":
        obj = rng.choice(scene)
        return ["what", "colour", "is", "the", obj["shape"], "?"], obj["colour"], [(4, patch(obj))]
    if qtype == "shape":
        obj = rng.choice(scene)
        return ["what", "shape", "is", "the", obj["colour"], "object", "?"], obj["shape"], [(4, patch(obj))]
    if qtype == "exists":
        if rng.random() < 0.5:
            obj = rng.choice(scene)
            return ["is", "there", "a", obj["colour"], obj["shape"], "?"], "yes", [(4, patch(obj))]
        present = {(o["colour"], o["shape"]) for o in scene}
        # A "no" pair is drawn like a "yes" pair (a colour and a shape each seen in the scene half the
        # time), so the words alone do not give the answer away.
        while True:
            colour = rng.choice([o["colour"] for o in scene]) if rng.random() < 0.75 else rng.choice(list(COLOURS))
            shape = rng.choice([o["shape"] for o in scene]) if rng.random() < 0.75 else rng.choice(SHAPES)
            if (colour, shape) not in present:
                return ["is", "there", "a", colour, shape, "?"], "no", []
    if qtype == "left_of":
        a, b = rng.sample(scene, 2)
        answer = "yes" if a["col"] < b["col"] else "no"
        return (["is", "the", a["shape"], "left", "of", "the", b["shape"], "?"], answer,
                [(2, patch(a)), (6, patch(b))])
    raise ValueError(f"qtype must be one of {QUESTION_TYPES}, got {qtype!r}")


def make_examples(rng: random.Random, n: int, qtypes: Optional[Sequence[str]] = None) -> list:
    """`n` (scene, words, answer, refs, qtype) tuples; question types cycle when `qtypes` is None."""
    out = []
    for i in range(n):
        qtype = qtypes[i] if qtypes is not None else rng.choice(QUESTION_TYPES)
        scene = make_scene(rng)
        words, answer, refs = make_question(rng, scene, qtype)
        out.append((scene, words, answer, refs, qtype))
    return out


def make_test_set(size: int = TEST_SIZE) -> list:
    """`size` held-out examples, the question types equally often; fixed for every run."""
    rng = random.Random(TEST_SEED)
    return make_examples(rng, size, [QUESTION_TYPES[i % len(QUESTION_TYPES)] for i in range(size)])


# ----------------------------------------------------------------------------------------------
# The command line, checked before torch is imported
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS + ("all",), default="all", help="which model(s) to train")
    p.add_argument("--steps", type=cli.int_range(1, 10_000_000), default=1500, help="training steps per model")
    p.add_argument("--batch-size", type=cli.int_range(1, 4096), default=64, help="examples per step")
    p.add_argument("--lr", type=cli.float_range(0, 1, low_open=True), default=2e-3, help="peak learning rate")
    p.add_argument("--d-model", type=cli.int_range(8, 1024), default=48,
                   help="width of every model (a multiple of --heads)")
    p.add_argument("--heads", type=cli.int_range(1, 64), default=4, help="attention heads")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and the training stream")
    p.add_argument("--device", type=cli.device_name, default="auto",
                   help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=cli.int_range(0, 1024), default=1,
                   help="CPU threads for torch (0 = torch's default); tiny models gain little from more")
    p.add_argument("--test-size", type=cli.int_range(4, 100_000), default=TEST_SIZE,
                   help="held-out examples to score on (the four question types equally often)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "multimodal_attention",
                   help="output folder (created if missing)")
    p.add_argument("--log-every", type=cli.int_range(1, 10_000_000), default=100,
                   help="steps between progress lines / curve points")
    p.add_argument("--checkpoint-every", type=cli.int_range(1, 10_000_000), default=400,
                   help="steps between checkpoints")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints and train from scratch")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 20 steps, 40 test examples, width 16 (seconds; the numbers mean nothing)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--publish", action="store_true",
                   help="also copy results.json and the figures into docs/examples/ (for the docs page)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.test_size, args.d_model, args.log_every = min(args.steps, 20), 40, 16, 5
        args.checkpoint_every = min(args.checkpoint_every, 10)
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    cli.check_output_folder(p, args.out)
    # A step keeps about 40 (16 + 8, d_model) activations per layer and the (H, 8, 16) weights: tiny.
    cli.check_memory(p, args.batch_size * 4 * 40 * 24 * args.d_model * 6, f"--batch-size {args.batch_size}")
    return args


if __name__ == "__main__":
    parse_args()  # a bad command line is refused here, before the slow imports below

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import transformer_implementation as ti  # noqa: E402
from mechanisms.co_attention import CoAttention  # noqa: E402
from mechanisms.cross_attention import CrossAttention  # noqa: E402

_MASKS = {s: torch.tensor(shape_mask(s), dtype=torch.bool) for s in SHAPES}
WORD_ID = {w: i for i, w in enumerate(WORDS)}
ANSWER_ID = {a: i for i, a in enumerate(ANSWERS)}


def render(scene: list, rng: Optional[random.Random] = None) -> torch.Tensor:
    """The scene as a (3, 32, 32) image in [0, 1]: dark grey background with faint noise, then the shapes."""
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31) if rng is not None else 0)
    image = 0.15 + 0.05 * torch.rand(3, IMAGE, IMAGE, generator=g)  # (3, 32, 32)
    for obj in scene:
        y, x = obj["row"] * CELL, obj["col"] * CELL
        cell = image[:, y:y + CELL, x:x + CELL]  # (3, 8, 8), a view
        colour = torch.tensor(COLOURS[obj["colour"]]).view(3, 1)
        cell[:, _MASKS[obj["shape"]]] = colour  # (3, n_on)
    return image


def patches(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) -> (B, 16, 192): the 8x8 cells in row-major order, each flattened."""
    B = images.shape[0]
    x = images.view(B, 3, GRID, CELL, GRID, CELL).permute(0, 2, 4, 1, 3, 5)  # (B, 4, 4, 3, 8, 8)
    return x.reshape(B, GRID * GRID, 3 * CELL * CELL)  # (B, 16, 192)


def encode_batch(examples: Sequence[tuple], device, rng: Optional[random.Random] = None) -> dict:
    """images (B, 3, 32, 32), question ids (B, 8) padded with 0, padding mask (B, 8) True = a word,
    answers (B,)."""
    rng = rng or random.Random(0)
    images = torch.stack([render(scene, rng) for scene, *_ in examples])  # (B, 3, 32, 32)
    ids = torch.zeros(len(examples), MAX_QUESTION, dtype=torch.long)  # (B, 8)
    for i, (_, words, *_rest) in enumerate(examples):
        ids[i, :len(words)] = torch.tensor([WORD_ID[w] for w in words])
    answers = torch.tensor([ANSWER_ID[a] for _, _, a, _, _ in examples])  # (B,)
    return dict(images=images.to(device), ids=ids.to(device), words=(ids != 0).to(device),
                answers=answers.to(device))


# ----------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------

class VQAModel(nn.Module):
    """Question encoder (+ image encoder) (+ cross-attention or co-attention) -> answer logits.

    ``kind`` is one of MODELS. forward(images (B, 3, 32, 32), ids (B, Tq), words (B, Tq) bool,
    need_weights=False) -> logits (B, 10), or (logits, weights) with weights a list of per-layer
    (B, H, Tq, 16) cross-attention maps (``cross``), [(B, 1, 1, 16)] image attention (``coattention``),
    or [] (``question_only``)."""

    def __init__(self, kind: str, d_model: int = 48, num_heads: int = 4, cross_layers: int = 2) -> None:
        super().__init__()
        if kind not in MODELS:
            raise ValueError(f"kind must be one of {MODELS}, got {kind!r}")
        self.kind = kind
        self.config = dict(kind=kind, d_model=d_model, num_heads=num_heads, cross_layers=cross_layers)
        self.word_embedding = nn.Embedding(len(WORDS), d_model, padding_idx=0)
        self.word_position = nn.Parameter(0.02 * torch.randn(MAX_QUESTION, d_model))
        self.question_encoder = ti.EncoderBlock(d_model, num_heads, 2 * d_model)
        if kind != "question_only":
            self.patch_embedding = nn.Linear(3 * CELL * CELL, d_model)
            self.patch_position = nn.Parameter(0.02 * torch.randn(GRID * GRID, d_model))
            self.image_encoder = ti.EncoderBlock(d_model, num_heads, 2 * d_model)
        if kind == "cross":
            self.cross = nn.ModuleList(CrossAttention(d_model, d_model, num_heads) for _ in range(cross_layers))
            self.cross_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(cross_layers))
            self.cross_ff = nn.ModuleList(ti.FeedForward(d_model, 2 * d_model) for _ in range(cross_layers))
            self.ff_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(cross_layers))
        if kind == "coattention":
            self.coattention = CoAttention(d_model, d_model, mode="alternating")
        width = 2 * d_model if kind == "coattention" else d_model
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * d_model), nn.GELU(),
                                  nn.Linear(2 * d_model, len(ANSWERS)))

    def forward(self, images, ids, words, need_weights: bool = False):
        q = self.word_embedding(ids) + self.word_position[:ids.shape[1]]  # (B, Tq, E)
        pad = words[:, None, None, :]  # (B, 1, 1, Tq): True = a real word
        q = self.question_encoder(q, mask=pad)  # (B, Tq, E)
        weights = []
        if self.kind != "question_only":
            v = self.patch_embedding(patches(images)) + self.patch_position  # (B, 16, E)
            v = self.image_encoder(v)  # (B, 16, E)
        if self.kind == "cross":
            for attn, norm, ff, ff_norm in zip(self.cross, self.cross_norms, self.cross_ff, self.ff_norms):
                a, w = attn(norm(q), v, need_weights=True)  # (B, Tq, E), (B, H, Tq, 16)
                q = q + a  # (B, Tq, E): each word adds what it read in the image
                q = q + ff(ff_norm(q))  # (B, Tq, E)
                weights.append(w)
        if self.kind == "coattention":
            (q_hat, v_hat), (_, a_image) = self.coattention(q, v, first_padding_mask=words, need_weights=True)
            pooled = torch.cat([q_hat, v_hat], dim=-1)  # (B, 2E)
            weights.append(a_image[:, None, None, :])  # (B, 1, 1, 16)
        else:
            m = words.unsqueeze(-1).float()  # (B, Tq, 1)
            pooled = (q * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, E): mean over the real words
        logits = self.head(pooled)  # (B, 10)
        return (logits, weights) if need_weights else logits


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Training, checkpoints, evaluation
# ----------------------------------------------------------------------------------------------

def learning_rate(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    warmup = min(warmup, max(1, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file, then rename: a crash mid-write never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s"


def train_model(name: str, args, device, log=print) -> dict:
    torch.manual_seed(args.seed)
    model = VQAModel(name, args.d_model, args.heads).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    settings = dict(seed=args.seed, batch_size=args.batch_size, lr=args.lr)
    path = Path(args.out) / "checkpoints" / f"{name}.pt"
    step, curve, train_seconds = 0, [], 0.0
    if path.exists() and not args.restart:
        try:
            ckpt = torch.load(path, map_location=device, weights_only=True)
            extra = ckpt["extra"]
            ok = ckpt["class"] == "VQAModel" and ckpt["config"] == model.config \
                and extra.get("format") == CHECKPOINT_FORMAT and extra["settings"] == settings \
                and extra["step"] <= args.steps
        except Exception as exc:  # a torn or foreign file
            ok, extra = False, None
            log(f"[{name}] ignoring {path}: it cannot be read ({type(exc).__name__})")
        if ok:
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(extra["optimizer"])
            step, curve, train_seconds = extra["step"], extra["curve"], extra["train_seconds"]
            log(f"[{name}] resuming from {path} at step {step}")
        elif extra is not None:
            log(f"[{name}] ignoring {path}: it was written with other settings or more steps")

    def checkpoint():
        extra = dict(format=CHECKPOINT_FORMAT, optimizer=optimizer.state_dict(), step=step, curve=curve,
                     train_seconds=train_seconds + time.perf_counter() - t0, settings=settings)
        atomic_save(dict(**{"class": "VQAModel"}, config=model.config, state_dict=model.state_dict(),
                         extra=extra), path)

    model.train()
    window, t0, start = [], time.perf_counter(), step
    while step < args.steps:
        rng = random.Random(args.seed * 1_000_003 + step)  # batch k depends only on (seed, k): resumable
        batch = encode_batch(make_examples(rng, args.batch_size), device, rng)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        logits = model(batch["images"], batch["ids"], batch["words"])  # (B, 10)
        loss = F.cross_entropy(logits, batch["answers"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            curve.append((step, sum(window) / len(window)))
            window = []
            elapsed = time.perf_counter() - t0
            rate = (step - start) / max(elapsed, 1e-9)
            log(f"[{name}] step {step:>5d}/{args.steps}  loss {curve[-1][1]:.4f}  {rate:5.1f} steps/s  "
                f"elapsed {_fmt_seconds(elapsed)}  ETA {_fmt_seconds((args.steps - step) / max(rate, 1e-9))}",
                flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            checkpoint()
    train_seconds += time.perf_counter() - t0
    return dict(model=model, curve=curve, train_seconds=train_seconds)


@torch.no_grad()
def evaluate(model: VQAModel, test_set: Sequence[tuple], device, batch_size: int = 250) -> dict:
    """Accuracy per question type, and where the naming words' attention goes."""
    model.eval()
    correct = {t: [0, 0] for t in QUESTION_TYPES}
    mass = None  # per layer: [sum of attention on the referenced patch, count]
    for i in range(0, len(test_set), batch_size):
        chunk = test_set[i:i + batch_size]
        batch = encode_batch(chunk, device, random.Random(TEST_SEED + i))
        logits, weights = model(batch["images"], batch["ids"], batch["words"], need_weights=True)
        hits = (logits.argmax(-1) == batch["answers"]).tolist()
        if mass is None:
            mass = [[0.0, 0] for _ in weights]
        for r, (_, _, _, refs, qtype) in enumerate(chunk):
            correct[qtype][0] += hits[r]
            correct[qtype][1] += 1
            for layer, w in enumerate(weights):
                for word, patch in refs:
                    row = w[r].mean(0)  # (Tq, 16) averaged over heads, or (1, 16) for co-attention
                    mass[layer][0] += float(row[min(word, row.shape[0] - 1), patch])
                    mass[layer][1] += 1
    acc = {t: c / max(n, 1) for t, (c, n) in correct.items()}
    acc["all"] = sum(c for c, _ in correct.values()) / max(1, sum(n for _, n in correct.values()))
    return dict(accuracy=acc, attention_on_named_object=[s / max(n, 1) for s, n in mass or []])


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def figure_examples(test_set: Sequence[tuple]) -> list:
    """The first test example of each question type."""
    return [next(e for e in test_set if e[4] == t) for t in QUESTION_TYPES]


@torch.no_grad()
def plot_word_attention(model: VQAModel, examples: Sequence[tuple], device, path: Path) -> Path:
    import plotting

    batch = encode_batch(examples, device, random.Random(1))
    logits, weights = model.eval()(batch["images"], batch["ids"], batch["words"], need_weights=True)
    rows = []
    for r, (_, words, answer, _, qtype) in enumerate(examples):
        w = weights[-1][r].mean(0)[:len(words)] if model.kind == "cross" else weights[0][r, 0]  # (Tq, 16)
        labels = words if model.kind == "cross" else ["(whole question)"]
        predicted = ANSWERS[int(logits[r].argmax())]
        rows.append(dict(image=batch["images"][r].permute(1, 2, 0).cpu(), tokens=labels,
                         weights=w.reshape(len(labels), GRID, GRID).cpu(),
                         title=f"{' '.join(words)}  ->  {predicted}" + ("" if predicted == answer else
                                                                        f" (want {answer})")))
    what = ("last cross-attention layer, mean over heads: each word's weights over the 16 patches"
            if model.kind == "cross" else "co-attention's image attention (guided by the question summary)")
    return plotting.plot_patch_attention_rows(rows, path, title=f"{model.kind}: {what}")


def plot_accuracy(results: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import plotting  # noqa: F401  (selects the Agg backend)

    names = list(results)
    types = list(QUESTION_TYPES) + ["all"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        ax.bar([i + k * width for i in range(len(types))], [results[name]["accuracy"][t] for t in types],
               width, label=name)
    for i, chance in enumerate([0.25, 0.25, 0.5, 0.5]):
        ax.hlines(chance, i - width / 2, i + 0.8 - width / 2, colors="k", linestyles=":", linewidth=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(types))])
    ax.set_xticklabels(types)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("VQA on drawn scenes (dotted: guessing without the image)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="y", alpha=0.3)
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
    names = MODELS if args.model == "all" else (args.model,)
    test_set = make_test_set(args.test_size)
    print(f"VQA on drawn scenes: {len(test_set)} held-out questions ({', '.join(QUESTION_TYPES)}); device {device}")
    command = "python examples/multimodal_attention.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = dict(command=command.strip(), machine=machine_info(device), steps=args.steps,
                   batch_size=args.batch_size, d_model=args.d_model, heads=args.heads, seed=args.seed,
                   test_size=len(test_set), chance=dict(colour=0.25, shape=0.25, exists=0.5, left_of=0.5),
                   uniform_attention=1 / (GRID * GRID), models={})
    figures = []
    for name in names:
        trained = train_model(name, args, device)
        scores = evaluate(trained["model"], test_set, device)
        results["models"][name] = dict(**scores, parameters=num_parameters(trained["model"]),
                                       train_seconds=round(trained["train_seconds"], 2),
                                       final_loss=trained["curve"][-1][1], curve=trained["curve"])
        acc = scores["accuracy"]
        print(f"[{name}] accuracy " + "  ".join(f"{t} {acc[t]:.1%}" for t in list(QUESTION_TYPES) + ["all"])
              + (f"  | attention on the named object, per layer: "
                 + ", ".join(f"{m:.2f}" for m in scores["attention_on_named_object"])
                 + f" (uniform {1 / 16:.3f})" if scores["attention_on_named_object"] else ""))
        if not args.no_figures and name != "question_only":
            figures.append(plot_word_attention(trained["model"], figure_examples(test_set), device,
                                               out / f"multimodal_attention_{name}.png"))
    if not args.no_figures:
        figures.append(plot_accuracy(results["models"], out / "multimodal_accuracy.png"))
    results["total_seconds"] = round(time.perf_counter() - t_start, 2)
    # CPU time of this process: about what the wall time would be on an idle machine (one torch thread).
    results["cpu_seconds"] = round(time.process_time(), 2)
    results["machine"]["load_average_1_5_15_at_end"] = cli.load_average()
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    print(f"wrote {out / 'results.json'}; total {results['total_seconds']:.1f}s wall, "
          f"{results['cpu_seconds']:.1f}s CPU, load average {results['machine']['load_average_1_5_15_at_end']}")
    if args.publish:
        docs = REPO_ROOT / "docs" / "examples"
        (docs / "results").mkdir(parents=True, exist_ok=True)
        (docs / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "results.json", docs / "results" / "multimodal_attention.json")
        for path in figures:
            shutil.copyfile(path, docs / "figures" / path.name)
        print(f"copied results and {len(figures)} figures into {docs}")
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the last checkpoint is kept
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
