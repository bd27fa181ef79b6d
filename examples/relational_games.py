"""Relational games: how many examples does a Transformer need to see a relation, with and without relational heads?

This is the sample-efficiency experiment of the Dual Attention Transformer paper (Altabaa & Lafferty 2024,
arXiv:2405.16727, Section 4.1 and Figure 2), rebuilt so that it runs offline on a CPU. The benchmark is
Shanahan et al.'s "Relational Games" (arXiv:1905.10307): a 36 x 36 RGB image holds a 3 x 3 grid of cells,
each cell empty or holding one 12 x 12 sprite, and a binary label says whether a relation between the
sprites holds. Instead of downloading DeepMind's files, we draw the images here:

* sprites are polyominoes, enumerated here and drawn with 2 x 2-pixel squares in one of 6 colours: the 12
  pentominoes for training and the in-distribution test, the 35 hexominoes for the out-of-distribution
  test, the split of shape families of the original benchmark (pentominoes for training, hexominoes for
  testing); two sprites are "the same" when shape AND colour agree;
* five tasks, our reading of Shanahan et al.'s definitions (see ``TASKS`` and the page):
  ``same`` (two of three sprites identical?), ``occurs`` (does the bottom sprite occur in the top row?),
  ``xoccurs`` (does it occur there exactly once?), ``between`` (in a line of three, are the two ends
  identical and the middle different?) and ``match_pattern`` (do the top and bottom rows follow the same
  same/different pattern, e.g. ABA and CDC?);
* the test sets are disjoint from every training set by construction: a scene (which sprite in which
  cell) belongs to the test side when a hash of its description says so, training draws only scenes of
  the other side, and no scene appears twice in any set.

Two models with one token per grid cell (12 x 12 patches, plus a class token), both the file
``mechanisms/dual_attention.py``'s ``VisionDualAttnTransformer``, 2 layers, d_model 128, pre-norm:

* ``transformer``  the ViT baseline: 2 standard heads per layer (n_heads_ra = 0 makes it a plain ViT);
* ``dat``          the Dual Attention Transformer: 1 standard head and 1 relational head per layer,
                   positional symbols and symmetric relations (the paper's configuration);

their parameter counts agree within 10% (printed at the start; a test checks it). Each is trained on
training sets of several sizes with several seeds and scored on the held-out scenes; the learning
curves (accuracy against training-set size, mean and standard error over the seeds) are drawn beside the
paper's published curves.

Outputs (under ``--out``, default ``runs/relational_games``): ``results.json`` (written after every run),
``checkpoints/current.pt`` (the run in progress, written atomically every ``--checkpoint-every`` steps),
``relational_games_curves.png``, ``relational_games_ood.png`` and ``relational_games_examples.png``.
A rerun with the same settings skips the finished runs and resumes the unfinished one. ``--data PATH``
trains on your own .npz of images and labels instead (DeepMind's file layout). ``--publish``
copies the results and figures into ``docs/examples/``. The page is docs/examples/relational_games.md.

Run ``python examples/relational_games.py --help`` for the options.
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
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so the import below works from any directory

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/cli.py, the examples' shared helpers

import cli  # noqa: E402
from mechanisms.dual_attention import VisionDualAttnTransformer  # noqa: E402

TASKS = ("same", "occurs", "xoccurs", "between", "match_pattern")
MODELS = ("transformer", "dat")
FAMILIES = ("pentomino", "hexomino")  # training / in-distribution test, out-of-distribution test

GRID = 3  # 3 x 3 cells
SPRITE = 12  # pixels per cell side
IMAGE = GRID * SPRITE  # 36
CELL_PIXELS = 2  # one polyomino square is 2 x 2 pixels, so a 6 x 6 polyomino box fills a sprite
TEST_SEED = 20190524  # the test sets never depend on --seed
TEST_SIDE_MODULUS = 4  # a scene is on the test side when crc32(scene) % 4 == 0: a quarter of all scenes

# Saturated colours on a black background; sprites of one colour and different shapes are "different".
PALETTE = ((1.0, 0.2, 0.2), (0.2, 0.9, 0.2), (0.3, 0.4, 1.0), (1.0, 0.9, 0.1), (0.9, 0.2, 0.9), (0.1, 0.9, 0.9))

# ----------------------------------------------------------------------------------------------
# Sprites: every fixed polyomino of n squares, drawn procedurally
# ----------------------------------------------------------------------------------------------


def _normalise(cells) -> Tuple[Tuple[int, int], ...]:
    """Translate a set of (row, col) squares so its top-left corner is (0, 0); sorted, so it is canonical."""
    r0 = min(r for r, _ in cells)
    c0 = min(c for _, c in cells)
    return tuple(sorted((r - r0, c - c0) for r, c in cells))


def fixed_polyominoes(n: int) -> List[Tuple[Tuple[int, int], ...]]:
    """Every fixed polyomino of n squares (rotations and reflections count as different shapes), sorted.

    Grown one square at a time from the monomino: each shape of size k + 1 is a shape of size k plus one
    neighbouring square, kept once in its normalised form. There are 1, 2, 6, 19, 63, 216 of sizes 1..6."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    shapes = {((0, 0),)}
    for _ in range(n - 1):
        grown = set()
        for shape in shapes:
            occupied = set(shape)
            for r, c in shape:
                for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    cell = (r + dr, c + dc)
                    if cell not in occupied:
                        grown.add(_normalise(occupied | {cell}))
        shapes = grown
    return sorted(shapes)


def _symmetries(shape) -> List[Tuple[Tuple[int, int], ...]]:
    """The 8 images of a shape under rotations and reflections, each normalised."""
    out = []
    for flip in (False, True):
        cells = [(r, -c) if flip else (r, c) for r, c in shape]
        for _ in range(4):
            cells = [(c, -r) for r, c in cells]  # rotate by 90 degrees
            out.append(_normalise(cells))
    return out


def free_polyominoes(n: int) -> List[Tuple[Tuple[int, int], ...]]:
    """One representative of every free polyomino of n squares (shapes equal up to rotation and reflection
    count once): the smallest of its 8 orientations, so the choice is fixed. 1, 1, 2, 5, 12, 35 of sizes
    1..6: the 12 pentominoes and the 35 hexominoes."""
    return sorted({min(_symmetries(shape)) for shape in fixed_polyominoes(n)})


def shape_family(family: str) -> List[Tuple[Tuple[int, int], ...]]:
    """The shapes of a family, one fixed orientation each: 'pentomino' (the 12 pentominoes) or 'hexomino'
    (the 35 hexominoes), as the sprites of Shanahan et al.'s training and test sets."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return free_polyominoes(5 if family == "pentomino" else 6)


def draw_sprite(shape, colour: Sequence[float]) -> torch.Tensor:
    """(3, 12, 12) image of one polyomino, centred in its cell, squares of 2 x 2 pixels, black elsewhere."""
    side = SPRITE // CELL_PIXELS  # 6 squares
    height = 1 + max(r for r, _ in shape)
    width = 1 + max(c for _, c in shape)
    if height > side or width > side:
        raise ValueError(f"shape of {height} x {width} squares does not fit a {side} x {side} sprite")
    top, left = (side - height) // 2, (side - width) // 2
    mask = torch.zeros(SPRITE, SPRITE)
    for r, c in shape:
        y, x = (top + r) * CELL_PIXELS, (left + c) * CELL_PIXELS
        mask[y:y + CELL_PIXELS, x:x + CELL_PIXELS] = 1.0
    return torch.tensor(colour).view(3, 1, 1) * mask  # (3, 12, 12)


class SpriteBank:
    """All sprites of a family, (n_shapes, n_colours, 3, 12, 12). An object is a pair (shape, colour)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.shapes = shape_family(family)
        self.n_shapes, self.n_colours = len(self.shapes), len(PALETTE)
        self.sprites = torch.stack([torch.stack([draw_sprite(s, c) for c in PALETTE]) for s in self.shapes])

    def render(self, scene) -> torch.Tensor:
        """A scene is a tuple of (cell, shape, colour), cell = 3 * row + column. Returns (3, 36, 36)."""
        image = torch.zeros(3, IMAGE, IMAGE)
        for cell, shape, colour in scene:
            r, c = divmod(cell, GRID)
            image[:, r * SPRITE:(r + 1) * SPRITE, c * SPRITE:(c + 1) * SPRITE] = self.sprites[shape, colour]
        return image


# ----------------------------------------------------------------------------------------------
# The tasks: a scene and its label
# ----------------------------------------------------------------------------------------------
#
# Every task draws its label first (exactly half of every generated set is positive) and then a scene
# with that label. Objects are (shape, colour) pairs. Whenever an image needs k different objects,
# half the time they all share ONE colour (so only the shape tells them apart) and otherwise colours
# are random: colour alone can never solve a task.

TOP_ROW, BOTTOM_ROW = (0, 1, 2), (6, 7, 8)
LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8))  # rows and columns
PATTERNS = ("AAA", "AAB", "ABA", "ABB", "ABC")  # same/different patterns of a row of three


def distinct_objects(rng: random.Random, bank: SpriteBank, k: int) -> List[Tuple[int, int]]:
    """k pairwise different (shape, colour) objects; half the time all of one colour."""
    if rng.random() < 0.5:
        colour = rng.randrange(bank.n_colours)
        return [(s, colour) for s in rng.sample(range(bank.n_shapes), k)]
    chosen: List[Tuple[int, int]] = []
    while len(chosen) < k:
        obj = (rng.randrange(bank.n_shapes), rng.randrange(bank.n_colours))
        if obj not in chosen:
            chosen.append(obj)
    return chosen


def _place(cells: Sequence[int], objects: Sequence[Tuple[int, int]]) -> tuple:
    return tuple(sorted((cell, s, c) for cell, (s, c) in zip(cells, objects)))


def _pattern_objects(pattern: str, objects: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """'ABA' with objects [x, y, ...] -> [x, y, x]."""
    return [objects[ord(letter) - ord("A")] for letter in pattern]


def make_scene(task: str, label: int, rng: random.Random, bank: SpriteBank) -> tuple:
    """One scene of `task` whose true label is `label` (1 = the relation holds)."""
    if task == "same":
        # Three sprites in three random cells; positive: exactly two of them identical (A A B);
        # negative: three different ones (A B C).
        cells = rng.sample(range(GRID * GRID), 3)
        a, b, c = distinct_objects(rng, bank, 3)
        return _place(cells, [a, a, b] if label else [a, b, c])
    if task in ("occurs", "xoccurs"):
        # Three sprites fill the top row, one sprite sits in a random cell of the bottom row.
        # occurs:  positive: the bottom sprite equals one of the top three (which are all different);
        #          negative: it equals none of them.
        # xoccurs: positive: the bottom sprite occurs EXACTLY once on top (the other two top sprites are
        #          different from it, and half the time identical to each other: X B B, else X B C);
        #          negative: it occurs twice (X X B) or not at all (B C D), half and half.
        #          A duplicate pair on top is thus equally frequent in both classes (1/2).
        a, b, c, d = distinct_objects(rng, bank, 4)
        if task == "occurs":
            top = [a, b, c] if label else [b, c, d]
        elif label:
            top = [a, b, b] if rng.random() < 0.5 else [a, b, c]
        else:
            top = [a, a, b] if rng.random() < 0.5 else [b, c, d]
        rng.shuffle(top)
        return _place(list(TOP_ROW) + [rng.choice(BOTTOM_ROW)], top + [a])
    if task == "between":
        # Three sprites fill one random row or column. Positive: the two ends are identical and the one
        # between them is different (A B A). Negative: A A B, A B B or A B C, equally often, so that
        # "some pair is identical" does not decide it: the position of the pair does.
        line = rng.choice(LINES)
        pattern = "ABA" if label else rng.choice(("AAB", "ABB", "ABC"))
        return _place(line, _pattern_objects(pattern, distinct_objects(rng, bank, 3)))
    if task == "match_pattern":
        # The top row and the bottom row each hold three sprites following a pattern of PATTERNS; the
        # bottom row's sprites are all different from the top row's. Positive: both rows follow the same
        # pattern (e.g. A B A and C D C); negative: two different patterns, chosen uniformly.
        top_pattern = rng.choice(PATTERNS)
        bottom_pattern = top_pattern if label else rng.choice([p for p in PATTERNS if p != top_pattern])
        objects = distinct_objects(rng, bank, 6)
        top = _pattern_objects(top_pattern, objects[:3])
        bottom = _pattern_objects(bottom_pattern, objects[3:])
        return _place(list(TOP_ROW) + list(BOTTOM_ROW), top + bottom)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def true_label(task: str, scene: tuple) -> int:
    """The label of a scene, computed from the scene alone by the task's definition (the oracle the
    tests compare the generator against; independent of how make_scene built the scene)."""
    at = {cell: (s, c) for cell, s, c in scene}
    if task == "same":
        objs = list(at.values())
        return int(len(set(objs)) < len(objs))
    if task in ("occurs", "xoccurs"):
        top = [at[c] for c in TOP_ROW]
        bottom = [at[c] for c in BOTTOM_ROW if c in at]
        count = top.count(bottom[0])
        return int(count >= 1) if task == "occurs" else int(count == 1)
    if task == "between":
        line = next(l for l in LINES if all(c in at for c in l))
        a, b, c = (at[x] for x in line)
        return int(a == c and a != b)
    if task == "match_pattern":
        def pattern(row):
            objs = [at[c] for c in row]
            return tuple(objs.index(o) for o in objs)
        return int(pattern(TOP_ROW) == pattern(BOTTOM_ROW))
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def scene_key(family: str, task: str, scene: tuple) -> bytes:
    return repr((family, task, scene)).encode()


def on_test_side(family: str, task: str, scene: tuple) -> bool:
    """Each possible scene is on exactly one side, training or test, decided by a hash of the scene."""
    return zlib.crc32(scene_key(family, task, scene)) % TEST_SIDE_MODULUS == 0


def generate_scenes(task: str, n: int, rng: random.Random, bank: SpriteBank, side: str) -> List[tuple]:
    """n different scenes of `side` ('train' or 'test'), labels alternating 1, 0, 1, 0, ...

    Scenes of the other side are rejected, and so are repeats: the set is drawn without replacement."""
    if side not in ("train", "test"):
        raise ValueError(f"side must be 'train' or 'test', got {side!r}")
    want_test = side == "test"
    seen, scenes = set(), []
    attempts = 0
    while len(scenes) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} different {side} scenes of task {task!r}")
        label = 1 - len(scenes) % 2
        scene = make_scene(task, label, rng, bank)
        if scene in seen or on_test_side(bank.family, task, scene) != want_test:
            continue
        seen.add(scene)
        scenes.append(scene)
    return scenes


def to_tensors(task: str, scenes: Sequence[tuple], bank: SpriteBank) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 36, 36) images in [0, 1] and (N,) labels."""
    images = torch.stack([bank.render(s) for s in scenes]) if scenes else torch.zeros(0, 3, IMAGE, IMAGE)
    labels = torch.tensor([true_label(task, s) for s in scenes], dtype=torch.long)
    return images, labels


def load_npz(path) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Your own images for --data: an .npz file with `images` (N, 36, 36, 3), uint8 0..255 or float 0..1,
    and `labels` (N,) of 0/1 or one-hot (N, 2), the layout of DeepMind's Relational Games files.

    Identical images are kept once, and an image is a test image when crc32 of its bytes % 4 == 0, so,
    as for the generated data, no test image is ever trained on. Returns (train images (N, 3, 36, 36),
    train labels (N,), test images, test labels)."""
    import numpy as np  # matplotlib's dependency, so always present where the figures can be drawn

    try:
        with np.load(path) as f:
            images, labels = np.asarray(f["images"]), np.asarray(f["labels"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: expected an .npz file with arrays 'images' and 'labels' ({e})") from None
    if images.ndim != 4 or images.shape[1:] != (IMAGE, IMAGE, 3):
        raise ValueError(f"{path}: images must have shape (N, {IMAGE}, {IMAGE}, 3), got {images.shape}")
    if labels.ndim == 2 and labels.shape[1] == 2:
        labels = labels.argmax(1)
    if labels.shape != (len(images),) or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{path}: labels must be (N,) of 0/1 or one-hot (N, 2) with N = {len(images)}, "
                         f"got shape {labels.shape}")
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    train, test, seen = [], [], set()
    for i in range(len(images)):
        key = images[i].tobytes()
        if key in seen:
            continue
        seen.add(key)
        (test if zlib.crc32(key) % TEST_SIDE_MODULUS == 0 else train).append(i)
    if not train or not test:
        raise ValueError(f"{path}: need images on both sides of the split, got {len(train)} for training and "
                         f"{len(test)} for testing; add more distinct images")

    def pick(idx):
        x = torch.from_numpy(images[idx].astype(np.float32) / scale).permute(0, 3, 1, 2).contiguous()
        return x, torch.from_numpy(labels[idx].astype(np.int64))

    return (*pick(train), *pick(test))


def _stream_seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def training_scenes(task: str, seed: int, n: int, bank: SpriteBank) -> List[tuple]:
    """The training scenes of (task, seed): the first n of one fixed stream, so a smaller training set is
    a subset of a larger one (as when one dataset is subsampled); labels alternate, so every prefix is
    balanced."""
    rng = random.Random(_stream_seed("train", task, seed))
    return generate_scenes(task, n, rng, bank, "train")


def test_scenes(task: str, family: str, n: int, bank: SpriteBank) -> List[tuple]:
    """The fixed test scenes of a task and family (test side only; every family)."""
    rng = random.Random(_stream_seed("test", task, family, TEST_SEED))
    return generate_scenes(task, n, rng, bank, "test")


# ----------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------

MODEL_HEADS = {"transformer": (2, 0), "dat": (1, 1)}  # (n_heads_sa, n_heads_ra) per layer


def model_config(name: str, dropout: float = 0.0) -> dict:
    """The constructor arguments of the ViT baseline or DAT: 2 layers, d_model 128, feed-forward 256, GELU,
    pre-norm, 12 x 12 patches (one token per grid cell) plus a class token, positional symbols, symmetric
    relations. `VisionDualAttnTransformer(**model_config(name))` builds it (and a checkpoint stores it)."""
    if name not in MODEL_HEADS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    n_heads_sa, n_heads_ra = MODEL_HEADS[name]
    return dict(image_shape=(3, IMAGE, IMAGE), patch_size=(SPRITE, SPRITE), num_classes=2, d_model=128, n_layers=2,
                n_heads_sa=n_heads_sa, n_heads_ra=n_heads_ra, dff=256, dropout_rate=dropout, activation="gelu",
                norm_first=True, symbol_retrieval="positional_symbols",
                symbol_retrieval_kwargs=dict(symbol_dim=128, max_length=GRID * GRID + 1),
                ra_kwargs=dict(symmetric_rels=True), pool="cls")


def build_model(name: str, dropout: float = 0.0) -> VisionDualAttnTransformer:
    return VisionDualAttnTransformer(**model_config(name, dropout))


def num_parameters(model: nn.Module) -> int:
    """Every parameter, including the positional symbols (the baseline builds them too, and never uses them)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# The paper's published curves (for the figure and the page)
# ----------------------------------------------------------------------------------------------
#
# Mean test accuracy read from the authors' own data file for Figure 2, static/figs/relgames_learning_curves.json
# in github.com/Awni00/dual-attention (commit ab3ab767b5657bc11fadf3072b11f753f03e489c), rounded to 3 digits.
# Their models: 2 layers, d_model 128, 2 heads in total; "T" = (n_heads_sa, n_heads_ra) = (2, 0),
# "DAT" = (1, 1) and (0, 2). Their data: DeepMind's Relational Games files (pentominoes).

PUBLISHED_SIZES = (250, 500, 750, 1000, 1250, 1500, 1750, 2000, 2250, 2500)
PUBLISHED_SIZES_MATCH = (5000, 7500, 10000, 12500, 15000, 17500, 20000, 22500, 25000)
PUBLISHED = {
    "transformer (2, 0)": {
        "same": (.671, .750, .876, .898, .901, .924, .931, .938, .946, .946),
        "occurs": (.533, .525, .616, .646, .698, .752, .763, .825, .884, .885),
        "xoccurs": (.508, .504, .527, .546, .548, .584, .583, .598, .679, .653),
        "between": (.596, .618, .717, .774, .809, .845, .870, .886, .904, .911),
        "match_pattern": (.511, .521, .521, .524, .534, .538, .564, .565, .565),
    },
    "dat (1, 1)": {
        "same": (.639, .744, .828, .880, .899, .902, .917, .929, .937, .940),
        "occurs": (.619, .775, .855, .895, .900, .913, .918, .928, .926, .929),
        "xoccurs": (.522, .543, .585, .634, .716, .723, .827, .852, .866, .873),
        "between": (.640, .711, .816, .869, .898, .911, .923, .929, .930, .938),
        "match_pattern": (.546, .606, .639, .742, .740, .762, .832, .901, .855),
    },
    "dat (0, 2)": {
        "same": (.652, .744, .815, .863, .882, .898, .906, .914, .929, .926),
        "occurs": (.632, .787, .854, .886, .899, .910, .920, .916, .930, .931),
        "xoccurs": (.520, .556, .620, .666, .754, .772, .823, .860, .873, .886),
        "between": (.614, .750, .836, .881, .897, .908, .920, .929, .926, .931),
        "match_pattern": (.528, .682, .773, .792, .888, .915, .930, .918, .928),
    },
}


def published_curve(model: str, task: str) -> Tuple[Tuple[int, ...], Tuple[float, ...]]:
    sizes = PUBLISHED_SIZES_MATCH if task == "match_pattern" else PUBLISHED_SIZES
    return sizes, PUBLISHED[model][task]


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------

def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
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


def atomic_write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int = 250) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(images[i:i + batch_size].to(device))  # (b, 2)
        correct += int((logits.argmax(-1).cpu() == labels[i:i + batch_size]).sum())
    return correct / max(1, len(labels))


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One line per report: where the grid stands, and the time left, estimated from the steps done so far
    (a DAT step costs about twice a Transformer step on a CPU, so each model's own rate is used)."""

    def __init__(self, plan: Sequence[dict], steps: int, done_keys: set) -> None:
        self.t0 = time.perf_counter()
        self.steps = steps
        self.remaining = {m: sum(1 for r in plan if r["model"] == m and run_key(r) not in done_keys) * steps
                          for m in MODELS}
        self.rate: Dict[str, Tuple[int, float]] = {m: (0, 0.0) for m in MODELS}  # steps, seconds
        self.total_runs = len(plan)
        self.done_runs = len(done_keys & {run_key(r) for r in plan})

    def advance(self, model: str, n_steps: int, seconds: float) -> None:
        s, t = self.rate[model]
        self.rate[model] = (s + n_steps, t + seconds)
        self.remaining[model] = max(0, self.remaining[model] - n_steps)

    def eta(self) -> Optional[float]:
        total = 0.0
        known = [t / s for s, t in self.rate.values() if s > 0]
        if not known:
            return None
        for m in MODELS:
            s, t = self.rate[m]
            per_step = t / s if s > 0 else max(known)
            total += self.remaining[m] * per_step
        return total

    def line(self, text: str) -> str:
        eta = self.eta()
        elapsed = time.perf_counter() - self.t0
        return (f"[run {self.done_runs + 1}/{self.total_runs}] {text}  elapsed {_fmt_seconds(elapsed)}  "
                f"ETA {'?' if eta is None else _fmt_seconds(eta)}")


def run_key(run: dict) -> str:
    return f"{run['task']}|{run['model']}|{run['size']}|{run['seed']}"


def train_one(run: dict, args, device, data: dict, progress: Progress, log=print) -> dict:
    """Train one model on one training set, with the in-progress checkpoint; returns its result row."""
    task, name, size, seed = run["task"], run["model"], run["size"], run["seed"]
    images, labels = data["train"][(task, seed)]
    images, labels = images[:size], labels[:size]
    torch.manual_seed(_stream_seed("init", task, name, size, seed))
    model = build_model(name, args.dropout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ckpt_path = Path(args.out) / "checkpoints" / "current.pt"
    config = dict(run_config(args), key=run_key(run))
    cls_payload = {"class": type(model).__name__, "config": model_config(name, args.dropout)}
    step, train_seconds, window = 0, 0.0, []
    if ckpt_path.exists() and not args.restart:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt.get("extra", {}).get("run") == config:
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["extra"]["optimizer"])
            step, train_seconds = ckpt["extra"]["step"], ckpt["extra"]["train_seconds"]
            log(f"resuming {run_key(run)} from {ckpt_path} at step {step}")

    batch_seed = _stream_seed("batches", task, size, seed)  # the same batches for both models
    model.train()
    t0 = time.perf_counter()
    t_report, step_report = t0, step
    interactive = sys.stdout.isatty()
    while step < args.steps:
        g = torch.Generator().manual_seed(batch_seed * 100_003 + step)  # the batch of step k depends on k only
        idx = torch.randint(len(labels), (min(args.batch_size, len(labels)),), generator=g)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = F.cross_entropy(model(images[idx].to(device)), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append(loss.item())
        if step % args.checkpoint_every == 0 and step < args.steps:
            # The core's checkpoint layout (class, config, state_dict), the training state under "extra".
            atomic_save(dict(cls_payload, state_dict=model.state_dict(),
                             extra=dict(optimizer=optimizer.state_dict(), step=step, run=config,
                                        train_seconds=train_seconds + time.perf_counter() - t0)), ckpt_path)
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            progress.advance(name, step - step_report, now - t_report)
            t_report, step_report = now, step
            line = progress.line(f"{task} n={size} seed={seed} {name}: step {step}/{args.steps} "
                                 f"loss {sum(window[-args.log_every:]) / len(window[-args.log_every:]):.3f}")
            if interactive:
                print("\r" + line, end="" if step < args.steps else "\n", flush=True)
            else:
                log(line)
    train_seconds += time.perf_counter() - t0
    id_images, id_labels = data["test"][(task, "pentomino")]
    ood = data["test"].get((task, "hexomino"))  # none for --data
    tail = window[-20:] or [float("nan")]
    row = dict(task=task, model=name, size=size, seed=seed,
               accuracy=accuracy(model, id_images, id_labels, device),
               ood_accuracy=None if ood is None else accuracy(model, *ood, device),
               train_accuracy=accuracy(model, images, labels, device),
               final_loss=round(sum(tail) / len(tail), 5), train_seconds=round(train_seconds, 2))
    if ckpt_path.exists():
        ckpt_path.unlink()
    return row


def summarise(rows: Sequence[dict]) -> dict:
    """{task: {model: {size: {mean, sem, std, n, ood_mean, ood_sem}}}}: mean and standard error over seeds."""
    out: dict = {}
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["model"], r["size"]), []).append(r)
    for (task, model, size), rs in sorted(groups.items()):
        def stats(values):
            n = len(values)
            mean = sum(values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
            return mean, std, std / math.sqrt(n)
        mean, std, sem = stats([r["accuracy"] for r in rs])
        ood_mean = ood_sem = None  # no out-of-distribution test for --data
        if rs[0]["ood_accuracy"] is not None:
            ood_mean, _, ood_sem = (round(v, 4) for v in stats([r["ood_accuracy"] for r in rs]))
        out.setdefault(task, {}).setdefault(model, {})[str(size)] = dict(
            mean=round(mean, 4), std=round(std, 4), sem=round(sem, 4), n=len(rs),
            ood_mean=ood_mean, ood_sem=ood_sem,
            train_accuracy=round(sum(r["train_accuracy"] for r in rs) / len(rs), 4))
    return out


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

COLOURS = {"transformer": "tab:orange", "dat": "tab:blue"}
PUBLISHED_STYLE = {"transformer (2, 0)": ("tab:orange", "T (2,0)"), "dat (1, 1)": ("tab:blue", "DAT (1,1)"),
                   "dat (0, 2)": ("tab:purple", "DAT (0,2)")}


def _pyplot():
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    import plotting  # noqa: F401  (selects matplotlib's Agg backend before pyplot draws)
    import matplotlib.pyplot as plt
    return plt


def plot_curves(summary: dict, tasks: Sequence[str], path: Path, ood: bool = False) -> Path:
    """One panel per task: our mean accuracy +- standard error against the training-set size (solid), and,
    for the in-distribution test, the paper's published means (dashed, thin)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.3 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for model in MODELS:
            points = summary.get(task, {}).get(model, {})
            if not points:
                continue
            sizes = sorted(int(s) for s in points)
            mean = [points[str(s)]["ood_mean" if ood else "mean"] for s in sizes]
            sem = [points[str(s)]["ood_sem" if ood else "sem"] for s in sizes]
            n = points[str(sizes[0])]["n"]
            ax.errorbar(sizes, mean, yerr=sem, marker="o", capsize=3, color=COLOURS[model],
                        label=f"ours: {model} ({n} seeds)")
        if not ood and task in TASKS:
            for model, (colour, label) in PUBLISHED_STYLE.items():
                xs, ys = published_curve(model, task)
                ax.plot(xs, ys, linestyle="--", linewidth=1, color=colour, alpha=0.7, label=f"paper: {label}")
        ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(task)
        ax.set_xlabel("training-set size")
        ax.set_ylim(0.4, 1.0)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("hexomino (OOD) test accuracy" if ood else "test accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("Relational games: " + ("out-of-distribution shapes (hexominoes)" if ood else
                                         "accuracy against training-set size, ours (solid) and the paper's (dashed)"),
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_examples(banks: dict, path: Path, per_task: int = 4) -> Path:
    """A few training images of every task (pentominoes) with their labels, and a hexomino test image."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(TASKS), per_task + 1, figsize=(1.6 * (per_task + 1), 1.75 * len(TASKS)))
    for row, task in enumerate(TASKS):
        rng = random.Random(_stream_seed("figure", task))
        for col in range(per_task + 1):
            family = "pentomino" if col < per_task else "hexomino"
            label = 1 - col % 2 if col < per_task else 1
            scene = make_scene(task, label, rng, banks[family])
            image = banks[family].render(scene).permute(1, 2, 0).numpy()
            ax = axes[row][col]
            ax.imshow(image, interpolation="nearest")
            for k in (SPRITE, 2 * SPRITE):
                ax.axhline(k - 0.5, color="0.3", linewidth=0.5)
                ax.axvline(k - 0.5, color="0.3", linewidth=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(("true" if label else "false") + (" (OOD)" if family == "hexomino" else ""), fontsize=8)
            if col == 0:
                ax.set_ylabel(task, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def machine_info(device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(), device=str(device))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def generate_data(args, banks: dict) -> dict:
    """The generated data of a run: {"train": {(task, seed): (images, labels)}, "test": {(task, family): ...}}.

    One training stream of pentomino scenes per (task, seed), as long as the largest size (each size
    takes a prefix); a fixed test set per task of each family: pentominoes in distribution, hexominoes
    out of distribution."""
    data: dict = {"train": {}, "test": {}}
    for task in [t for t in args.tasks if t != "data"]:
        biggest = max(args.match_pattern_sizes if task == "match_pattern" else args.sizes)
        for seed in range(args.seeds):
            data["train"][(task, seed)] = to_tensors(task, training_scenes(task, seed, biggest, banks["pentomino"]),
                                                     banks["pentomino"])
        for family in FAMILIES:
            data["test"][(task, family)] = to_tensors(task, test_scenes(task, family, args.test_size, banks[family]),
                                                      banks[family])
    return data


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 2, got {text!r}")
    return sorted(set(values))


def _name_list(choices: Sequence[str]):
    def parse(text: str) -> List[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
        return [c for c in choices if c in names]
    return parse


def run_config(args) -> dict:
    """The settings a finished run depends on; results of other settings are not mixed in."""
    return dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                weight_decay=args.weight_decay, dropout=args.dropout, test_size=args.test_size,
                data=str(Path(args.data).resolve()) if args.data else "generated")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", type=_name_list(TASKS), default=list(TASKS),
                   help="comma-separated tasks, of " + ",".join(TASKS))
    p.add_argument("--models", type=_name_list(MODELS), default=list(MODELS),
                   help="comma-separated models, of " + ",".join(MODELS))
    p.add_argument("--sizes", type=_int_list, default=[250, 1000, 2500],
                   help="training-set sizes for every task but match_pattern (the paper: 250..2500 by 250)")
    p.add_argument("--match-pattern-sizes", type=_int_list, default=[1000, 2500, 5000],
                   help="training-set sizes for match_pattern (the paper: 5000..25000 by 2500)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per (task, model, size): 0 .. seeds-1")
    p.add_argument("--steps", type=int, default=120, help="optimiser steps per run, the same for every size")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout rate of both models (0: with a budget of a few epochs, dropout only slows learning)")
    p.add_argument("--test-size", type=int, default=500,
                   help="held-out scenes per task and shape family (pentomino and hexomino)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="your own .npz (images (N, 36, 36, 3), labels (N,) or one-hot (N, 2)), e.g. a DeepMind "
                        "Relational Games file, as one task 'data' instead of the generated ones")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps, ...")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (0 = torch's default); one is best on a busy machine")
    p.add_argument("--out", default=str(REPO_ROOT / "runs" / "relational_games"), help="output folder")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints of the current run")
    p.add_argument("--restart", action="store_true", help="ignore finished runs and checkpoints, start again")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--publish", action="store_true",
                   help="also copy results.json and the figures into docs/examples/ (for the docs page)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: every task and model, one tiny size, one seed, 3 steps, 20 test scenes "
                        "(options given explicitly keep their values)")
    args = p.parse_args(argv)
    if args.quick:  # tiny settings for every option left at its default
        quick = dict(sizes=[16], match_pattern_sizes=[16], seeds=1, steps=3, batch_size=8, test_size=20,
                     log_every=1, checkpoint_every=2, warmup=1)
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    for name in ("seeds", "steps", "batch_size", "test_size", "log_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr must be a positive number, got {args.lr}")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must lie in [0, 1), got {args.dropout}")
    if args.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.data is not None:
        if not Path(args.data).is_file():
            p.error(f"--data {args.data}: no such file")
        args.tasks = ["data"]
    if args.test_size % 2:
        p.error(f"--test-size must be even (half of each test set is positive), got {args.test_size}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = cli.pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    counts = {name: num_parameters(build_model(name)) for name in MODELS}
    ratio = max(counts.values()) / min(counts.values())
    print("parameters: " + ", ".join(f"{name} {n:,}" for name, n in counts.items())
          + f" (largest / smallest = {ratio:.4f}); device {device}")

    banks = {family: SpriteBank(family) for family in FAMILIES}
    plan = [dict(task=task, model=model, size=size, seed=seed)
            for task in args.tasks
            for size in (args.match_pattern_sizes if task == "match_pattern" else args.sizes)
            for seed in range(args.seeds)
            for model in args.models]

    # Data: one training stream per (task, seed), cut to each size; fixed test sets per (task, family).
    t0 = time.perf_counter()
    data: dict = {"train": {}, "test": {}}
    if args.data:
        try:
            train_x, train_y, test_x, test_y = load_npz(args.data)
        except ValueError as e:
            sys.exit(f"error: --data {e}")
        for seed in range(args.seeds):  # each seed trains on its own random order; a size takes a prefix
            order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(_stream_seed("data", seed)))
            data["train"][("data", seed)] = (train_x[order], train_y[order])
        data["test"][("data", "pentomino")] = (test_x[:args.test_size], test_y[:args.test_size])
        too_big = [n for n in args.sizes if n > len(train_y)]
        if too_big:
            sys.exit(f"error: --sizes {too_big} exceed the {len(train_y)} training images of {args.data}")
        print(f"{args.data}: {len(train_y)} training and {len(test_y)} test images (distinct, split by a hash "
              f"of the image); testing on {min(args.test_size, len(test_y))}")
    generated = generate_data(args, banks)
    data["train"].update(generated["train"])
    data["test"].update(generated["test"])
    if not args.data:
        print(f"generated the data in {time.perf_counter() - t0:.1f}s: {len(args.tasks)} tasks, "
              f"{len(banks['pentomino'].shapes)} pentominoes (training, in-distribution test) and "
              f"{len(banks['hexomino'].shapes)} hexominoes (out-of-distribution test) in {len(PALETTE)} colours; "
              f"{args.test_size} test scenes per task and family; {len(plan)} runs of {args.steps} steps")

    results_path = out / "results.json"
    command = "python examples/relational_games.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows: List[dict] = []
    if results_path.exists() and not args.restart:
        old = json.loads(results_path.read_text())
        if old.get("config") == run_config(args):
            rows = old.get("runs", [])
            if rows:
                print(f"resuming: {len(rows)} finished runs in {results_path}")
        else:
            print(f"ignoring {results_path}: it was written with other settings")
    wanted = {run_key(r) for r in plan}
    done = {run_key(r) for r in rows}
    progress = Progress(plan, args.steps, done)

    def results() -> dict:
        kept = [r for r in rows if run_key(r) in wanted]
        return dict(command=command.strip(), machine=machine_info(device), config=run_config(args),
                    tasks=args.tasks, models=args.models, sizes=args.sizes,
                    match_pattern_sizes=args.match_pattern_sizes, seeds=args.seeds, parameters=counts,
                    model_heads={m: dict(n_heads_sa=MODEL_HEADS[m][0], n_heads_ra=MODEL_HEADS[m][1])
                                 for m in MODELS},
                    families={f: len(banks[f].shapes) for f in FAMILIES}, colours=len(PALETTE),
                    summary=summarise(kept), runs=kept,
                    published=dict(source="github.com/Awni00/dual-attention static/figs/relgames_learning_curves.json "
                                          "(commit ab3ab767b5657bc11fadf3072b11f753f03e489c)",
                                   sizes=PUBLISHED_SIZES, match_pattern_sizes=PUBLISHED_SIZES_MATCH,
                                   accuracy=PUBLISHED),
                    total_seconds=round(time.perf_counter() - t_start, 2))

    for run in plan:
        if run_key(run) in done:
            continue
        row = train_one(run, args, device, data, progress)
        rows.append(row)
        done.add(run_key(row))
        progress.done_runs += 1
        ood = "" if row["ood_accuracy"] is None else f", hexomino {row['ood_accuracy']:.3f}"
        print(f"    {run_key(run)}: test accuracy {row['accuracy']:.3f}{ood}, "
              f"train {row['train_accuracy']:.3f} ({row['train_seconds']:.1f}s)")
        atomic_write_json(results(), results_path)

    final = results()
    atomic_write_json(final, results_path)
    for task in args.tasks:
        parts = []
        for model in args.models:
            pts = final["summary"].get(task, {}).get(model, {})
            parts.append(f"{model} " + " ".join(f"{s}:{v['mean']:.3f}+-{v['sem']:.3f}" for s, v in
                                                sorted(pts.items(), key=lambda kv: int(kv[0]))))
        print(f"{task:>13}: " + " | ".join(parts))

    figure_paths: List[Path] = []
    if not args.no_figures:
        figure_paths.append(plot_curves(final["summary"], args.tasks, out / "relational_games_curves.png"))
        if not args.data:
            figure_paths.append(plot_curves(final["summary"], args.tasks, out / "relational_games_ood.png", ood=True))
        figure_paths.append(plot_examples(banks, out / "relational_games_examples.png"))
    print(f"wrote {results_path}; total {final['total_seconds']:.1f}s")
    if args.publish:
        docs = REPO_ROOT / "docs" / "examples"
        (docs / "results").mkdir(parents=True, exist_ok=True)
        (docs / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(results_path, docs / "results" / "relational_games.json")
        for path in figure_paths:
            shutil.copyfile(path, docs / "figures" / path.name)
        print(f"copied results and {len(figure_paths)} figures into {docs}")
    return final


if __name__ == "__main__":
    main()
