"""A Vision Transformer that must find a small shape among distractors, and a test of where it looks.

An image classifier built from the core's encoder blocks (Dosovitskiy et al. 2020, "An Image is Worth
16x16 Words", arXiv:2010.11929): the image is cut into square patches, each patch is a token, a learned
class token is prepended, and the class token's final state is classified. The data is drawn here, so the
right answer to "where should the model look?" is known for every image:

* a 24 x 24 grey image holds ONE shape (a hollow ``square``, a ``plus``, a diagonal ``cross`` or a
  ``ring``, 7 x 7 pixels) at a random place, which is the label;
* around it lie 6 to 10 short strokes of the same brightness (2 or 3 pixels long, in any of four
  directions) and Gaussian pixel noise (std 0.1): pieces of the shapes' lines that never form a whole
  shape, kept one pixel away from the shape, so the class can only be read from the shape itself.

Two models see the same stream of images for the same number of steps:

* ``vit``  patch embedding, class token, learned positions and ``EncoderBlock``s of
           transformer_implementation.py (pre-norm, GELU), a final LayerNorm and a linear head;
* ``dat``  ``VisionDualAttnTransformer`` of mechanisms/dual_attention.py (Altabaa & Lafferty 2024,
           arXiv:2405.16727): the same layout with dual-attention blocks, half the heads standard and
           half relational, with positional symbols and symmetric relations.

After training, each model is scored on 1,000 held-out images (fixed for every seed), and its attention is
tested against the truth: for every test image, attention rollout (Abnar & Zuidema 2020, arXiv:2005.00928,
the head-averaged attention with the residual added, composed over the layers) gives the class token's
weight on each patch; the example counts how often the patch with the highest rollout lies on the shape,
and compares that with chance (the share of patches the shape touches, averaged over the images). It does
the same for the last layer's raw class-token attention.

Outputs (under ``--out``, default ``runs/vision_transformer``): ``results.json`` (with the machine and the
load average it ran under), ``checkpoints/<model>.pt`` (written atomically every ``--checkpoint-every``
steps; a rerun with the same settings resumes from it), ``vision_transformer_examples.png`` (images with
their shape outlined), ``vision_transformer_attention_<model>.png`` (class-token attention per layer and the
rollout, over the image) and ``vision_transformer_curves.png``. ``--publish`` copies the results and figures
into ``docs/examples/``. The page is docs/examples/vision_transformer.md.

Checkpoints: a dict ``{"class", "config", "state_dict", "extra"}``, the layout of the core's
``Transformer.save`` (the core's ``save`` belongs to its language models and does not fit an image model):
``class`` is ``"VisionTransformer"`` or ``"VisionDualAttnTransformer"``, ``config`` the constructor's
arguments (``build_model(name, **config)`` rebuilds it), ``extra`` this script's training state
(optimizer, step, curve, settings).

Run ``python examples/vision_transformer.py --help`` for the options.
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

MODELS = ("vit", "dat")
SHAPES = ("square", "plus", "cross", "ring")  # the labels, in this order
SHAPE_SIZE = 7  # every shape is drawn in a 7 x 7 box
TEST_SEED = 20201022  # the test set never depends on --seed (ViT's arXiv date)
CHECKPOINT_FORMAT = "vision-transformer-v1"

# The 7 x 7 bitmaps, 1 = ink. Drawn as text so a reader sees them.
BITMAPS = {
    "square": ["#######",
               "#.....#",
               "#.....#",
               "#.....#",
               "#.....#",
               "#.....#",
               "#######"],
    "plus":   ["...#...",
               "...#...",
               "...#...",
               "#######",
               "...#...",
               "...#...",
               "...#..."],
    "cross":  ["#.....#",
               ".#...#.",
               "..#.#..",
               "...#...",
               "..#.#..",
               ".#...#.",
               "#.....#"],
    "ring":   ["..###..",
               ".#...#.",
               "#.....#",
               "#.....#",
               "#.....#",
               ".#...#.",
               "..###.."],
}
STROKE_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))  # (dy, dx): right, down, and the two diagonals


# ----------------------------------------------------------------------------------------------
# The command line, checked before torch is imported
# ----------------------------------------------------------------------------------------------

DEFAULTS = dict(steps=600, batch_size=64, test_size=1000, d_model=64, layers=3, heads=4, log_every=25)
QUICK = dict(steps=3, batch_size=8, test_size=24, d_model=16, layers=2, heads=2, log_every=1)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS + ("all",), default="all", help="which model(s) to train")
    p.add_argument("--steps", type=cli.int_range(1, 10_000_000), default=None,
                   help=f"training steps per model (default: {DEFAULTS['steps']}; --quick: {QUICK['steps']})")
    p.add_argument("--batch-size", type=cli.int_range(1, 65_536), default=None,
                   help=f"images per step (default: {DEFAULTS['batch_size']}; --quick: {QUICK['batch_size']})")
    p.add_argument("--lr", type=cli.float_range(0, 10, low_open=True), default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=cli.int_range(0, 10_000_000), default=50,
                   help="linear warm-up steps before the cosine decay")
    p.add_argument("--image-size", type=int, choices=(16, 24, 32, 48), default=24, help="image side in pixels")
    p.add_argument("--patch-size", type=int, choices=(2, 4, 8), default=4,
                   help="patch side in pixels (each choice divides each image size)")
    p.add_argument("--d-model", type=cli.int_range(4, 4096), default=None,
                   help=f"model width (default: {DEFAULTS['d_model']}; --quick: {QUICK['d_model']})")
    p.add_argument("--layers", type=cli.int_range(1, 64), default=None,
                   help=f"encoder blocks (default: {DEFAULTS['layers']}; --quick: {QUICK['layers']})")
    p.add_argument("--heads", type=cli.int_range(2, 64), default=None,
                   help=f"heads per block, an even number dividing --d-model; DAT uses half standard and half "
                        f"relational (default: {DEFAULTS['heads']}; --quick: {QUICK['heads']})")
    p.add_argument("--seed", type=cli.int_range(0, 2 ** 32 - 1), default=0,
                   help="seed for initialisation and the training stream")
    p.add_argument("--device", type=cli.device_name, default="auto",
                   help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=cli.int_range(0, 1024), default=1,
                   help="CPU threads for torch (0 = torch's default); one is fastest on a busy machine")
    p.add_argument("--test-size", type=cli.int_range(1, 1_000_000), default=None,
                   help=f"held-out images to score (default: {DEFAULTS['test_size']}; --quick: {QUICK['test_size']})")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "vision_transformer",
                   help="output folder (created if missing)")
    p.add_argument("--log-every", type=cli.int_range(1, 10_000_000), default=None,
                   help=f"steps between progress lines / curve points (default: {DEFAULTS['log_every']})")
    p.add_argument("--checkpoint-every", type=cli.int_range(1, 10_000_000), default=200,
                   help="steps between checkpoints")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints and train from scratch")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test in seconds: tiny model, 3 steps, 24 test images (explicit flags still win)")
    p.add_argument("--publish", action="store_true",
                   help="also copy results.json and the figures into docs/examples/ (for the docs page)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the whole command line with the standard library only: every mistake ends here
    with one line and exit status 2, before any folder is created."""
    p = build_parser()
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    cli.check_output_folder(p, args.out)
    if args.heads % 2 or args.d_model % args.heads:
        p.error(f"--heads {args.heads}: must be even (DAT splits it into standard and relational heads) and "
                f"divide --d-model {args.d_model}")
    tokens = (args.image_size // args.patch_size) ** 2 + 1
    need = args.batch_size * args.layers * 4 * (24 * tokens * args.d_model + 3 * args.heads * tokens * tokens)
    cli.check_memory(p, need, f"a training step with --batch-size {args.batch_size}")
    return args


if __name__ == "__main__":
    parse_args()  # a bad command line is refused here, before the slow imports below

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import transformer_implementation as ti  # noqa: E402
from mechanisms.dual_attention import VisionDualAttnTransformer  # noqa: E402
from visualize_attention import attention_rollout  # noqa: E402


# ----------------------------------------------------------------------------------------------
# The data: one shape among strokes
# ----------------------------------------------------------------------------------------------

def shape_mask(name: str) -> torch.Tensor:
    """The (7, 7) boolean bitmap of a shape."""
    if name not in BITMAPS:
        raise ValueError(f"shape must be one of {SHAPES}, got {name!r}")
    if name not in _MASKS:
        _MASKS[name] = torch.tensor([[c == "#" for c in row] for row in BITMAPS[name]], dtype=torch.bool)
    return _MASKS[name]


_MASKS: dict = {}


def draw_image(rng: random.Random, image_size: int, label: Optional[int] = None) -> tuple:
    """One image without its noise: (pixels (S, S) float, label, object mask (S, S) bool).

    The shape (7 x 7, intensity 0.6..1) goes at a uniform place; then 6..10 strokes of 2 or 3 pixels with
    the same intensity range are scattered so that no stroke pixel touches the shape's box grown by one
    pixel (the shape stays whole and unambiguous). `add_noise` adds the pixel noise."""
    S = image_size
    label = rng.randrange(len(SHAPES)) if label is None else label
    img = torch.zeros(S, S)
    obj = torch.zeros(S, S, dtype=torch.bool)
    y0, x0 = rng.randrange(S - SHAPE_SIZE + 1), rng.randrange(S - SHAPE_SIZE + 1)
    obj[y0:y0 + SHAPE_SIZE, x0:x0 + SHAPE_SIZE] = shape_mask(SHAPES[label])
    img[obj] = rng.uniform(0.6, 1.0)

    def free(py, px):  # inside the image and outside the shape's box grown by one pixel
        inside_box = y0 - 1 <= py <= y0 + SHAPE_SIZE and x0 - 1 <= px <= x0 + SHAPE_SIZE
        return 0 <= py < S and 0 <= px < S and not inside_box

    ys, xs, values = [], [], []
    n_strokes, placed, tries = rng.randint(6, 10), 0, 0
    while placed < n_strokes and tries < 200:
        tries += 1
        length = rng.choice((2, 3))
        dy, dx = rng.choice(STROKE_DIRECTIONS)
        y, x = rng.randrange(S), rng.randrange(S)
        pixels = [(y + i * dy, x + i * dx) for i in range(length)]
        if not all(free(py, px) for py, px in pixels):
            continue
        value = rng.uniform(0.6, 1.0)
        ys += [py for py, _ in pixels]
        xs += [px for _, px in pixels]
        values += [value] * length
        placed += 1
    img[torch.tensor(ys, dtype=torch.long), torch.tensor(xs, dtype=torch.long)] = torch.tensor(values)
    return img, label, obj


def add_noise(rng: random.Random, images: torch.Tensor, std: float = 0.1) -> torch.Tensor:
    """Gaussian pixel noise of standard deviation `std`, drawn from a generator seeded by `rng`."""
    g = torch.Generator().manual_seed(rng.getrandbits(63))
    return images + std * torch.randn(images.shape, generator=g)


def make_batch(rng: random.Random, n: int, image_size: int, labels: Optional[Sequence[int]] = None) -> tuple:
    """n images: pixels (n, 1, S, S) with noise, labels (n,), object masks (n, S, S). `labels` fixes the
    classes (default: uniform at random)."""
    labels = [None] * n if labels is None else list(labels)
    items = [draw_image(rng, image_size, label) for label in labels]
    images = add_noise(rng, torch.stack([im for im, _, _ in items]).unsqueeze(1))  # (n, 1, S, S)
    return (images, torch.tensor([lab for _, lab, _ in items], dtype=torch.long),
            torch.stack([m for _, _, m in items]))  # (n,), (n, S, S)


def make_test_set(size: int, image_size: int) -> tuple:
    """The held-out images, fixed for every run and seed: each class equally often (up to one)."""
    rng = random.Random(TEST_SEED)
    labels = [i % len(SHAPES) for i in range(size)]
    rng.shuffle(labels)
    return make_batch(rng, size, image_size, labels)


def patch_object_mask(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(n, S, S) pixel masks -> (n, N) patch masks, row-major like the models' patches: True where the
    patch holds at least one pixel of the shape."""
    n, S, _ = masks.shape
    g = S // patch_size
    blocks = masks.view(n, g, patch_size, g, patch_size)  # (n, g, p, g, p)
    return blocks.any(dim=4).any(dim=2).reshape(n, g * g)  # (n, N)


# ----------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------

class VisionTransformer(nn.Module):
    """ViT: patches -> tokens, a class token, learned positions, the core's pre-norm encoder blocks.

    forward(images (B, C, S, S), need_weights=False) -> logits (B, num_classes), or (logits, list of the L
    blocks' attention weights (B, H, N + 1, N + 1)). Token 0 is the class token; tokens 1.. are the patches
    in row-major order (the order of VisionDualAttnTransformer's patches, so the figures read the same)."""

    def __init__(self, image_size: int, patch_size: int, num_classes: int, d_model: int, num_layers: int,
                 num_heads: int, ff_dim: int, channels: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = dict(image_size=image_size, patch_size=patch_size, num_classes=num_classes, d_model=d_model,
                           num_layers=num_layers, num_heads=num_heads, ff_dim=ff_dim, channels=channels,
                           dropout=dropout)
        self.num_patches = (image_size // patch_size) ** 2
        # A patch_size-strided convolution is one Linear applied to every flattened patch.
        self.patch_embed = nn.Conv2d(channels, d_model, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, self.num_patches + 1, d_model))
        self.blocks = nn.ModuleList(
            ti.EncoderBlock(d_model, num_heads, ff_dim, dropout, norm_first=True, activation="gelu")
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, N, E): one token per patch, row-major, before the class token and positions."""
        x = self.patch_embed(images)  # (B, E, g, g)
        return x.flatten(2).transpose(1, 2)  # (B, N, E): row-major patches

    def forward(self, images: torch.Tensor, need_weights: bool = False):
        x = self.patch_tokens(images)  # (B, N, E)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, E)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding  # (B, N + 1, E)
        weights = []
        for block in self.blocks:
            if need_weights:
                x, w = block(x, need_weights=True)  # (B, N + 1, E), (B, H, N + 1, N + 1)
                weights.append(w)
            else:
                x = block(x)  # (B, N + 1, E)
        logits = self.head(self.norm(x[:, 0]))  # (B, classes)
        return (logits, weights) if need_weights else logits


def dat_forward_with_attention(model: VisionDualAttnTransformer, images: torch.Tensor) -> tuple:
    """VisionDualAttnTransformer.forward step for step, asking every block for its attention weights.

    Returns (logits (B, classes), list of L weights (B, H_sa + H_ra, N + 1, N + 1)): the standard heads'
    weights then the relational heads'. tests/test_vision_transformer.py checks that the logits equal
    model(images), so this copy cannot drift from the file it mirrors."""
    x = model.to_patch_embedding(images)  # (B, N, E)
    cls = model.cls_token.expand(x.size(0), -1, -1)  # (B, 1, E)
    x = torch.cat((cls, x), dim=1) + model.pos_embedding[:, : x.size(1) + 1]  # (B, N + 1, E)
    x = model.dropout(x)
    weights = []
    for block in model.encoder_blocks:
        symbols = model.symbol_retriever(x)  # (B, N + 1, E)

        def attend(h):
            out, sa_w, ra = block.dual_attn(h, symbols, is_causal=block.causal, need_weights=True)
            heads = [w for w in (sa_w, ra[0] if ra else None) if w is not None]
            weights.append(torch.cat(heads, dim=1))  # (B, H, N + 1, N + 1)
            return block.dropout(out)  # (B, N + 1, E)

        if block.norm_first:
            x = x + attend(block.norm1(x))
            x = x + block.dropout(block.ff_block(block.norm2(x)))
        else:
            x = block.dropout(block.norm1(x + attend(x)))
            x = block.norm2(x + block.dropout(block.ff_block(x)))
    x = x[:, 0] if model.pool == "cls" else x.mean(dim=1)  # (B, E)
    return model.final_out(x), weights


def model_config(name: str, args) -> dict:
    """The constructor arguments of model `name` for the sizes on the command line."""
    if name == "vit":
        return dict(image_size=args.image_size, patch_size=args.patch_size, num_classes=len(SHAPES),
                    d_model=args.d_model, num_layers=args.layers, num_heads=args.heads, ff_dim=2 * args.d_model)
    if name == "dat":
        tokens = (args.image_size // args.patch_size) ** 2 + 1
        return dict(image_shape=(1, args.image_size, args.image_size), patch_size=(args.patch_size, args.patch_size),
                    num_classes=len(SHAPES), d_model=args.d_model, n_layers=args.layers,
                    n_heads_sa=args.heads // 2, n_heads_ra=args.heads // 2, dff=2 * args.d_model, dropout_rate=0.0,
                    activation="gelu", norm_first=True, symbol_retrieval="positional_symbols",
                    symbol_retrieval_kwargs=dict(symbol_dim=args.d_model, max_length=tokens),
                    ra_kwargs=dict(symmetric_rels=True))
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def build_model(name: str, **config) -> nn.Module:
    if name == "vit":
        return VisionTransformer(**config)
    if name == "dat":
        return VisionDualAttnTransformer(**config)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def forward_with_attention(model: nn.Module, images: torch.Tensor) -> tuple:
    """(logits, per-layer weights (B, H, N + 1, N + 1)) for either model."""
    if isinstance(model, VisionDualAttnTransformer):
        return dat_forward_with_attention(model, images)
    return model(images, need_weights=True)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# Where the class token looks
# ----------------------------------------------------------------------------------------------

def class_token_maps(weights: Sequence[torch.Tensor]) -> tuple:
    """From per-layer weights (B, H, T, T): the class token's head-averaged attention on the patches at
    each layer (B, L, N), and its rollout over the patches (B, N) (row 0 of R = Â_L ... Â_1, without the
    class token's own column, renormalised to sum to 1)."""
    raw = torch.stack([w.float().mean(dim=1)[:, 0, 1:] for w in weights], dim=1)  # (B, L, N)
    rollouts = []
    for b in range(weights[0].shape[0]):
        r = attention_rollout([w[b] for w in weights])[-1][0, 1:]  # (N,)
        rollouts.append(r / r.sum())
    return raw, torch.stack(rollouts).float()  # (B, L, N), (B, N)


def hit_rate(maps: torch.Tensor, object_patches: torch.Tensor) -> float:
    """Fraction of images whose highest-weighted patch (maps (B, N)) touches the shape (object_patches (B, N))."""
    top = maps.argmax(dim=1)  # (B,)
    return object_patches.gather(1, top.unsqueeze(1)).float().mean().item()


def mass_on_object(maps: torch.Tensor, object_patches: torch.Tensor) -> float:
    """Mean share of the map's weight (rows sum to 1) that lies on patches touching the shape."""
    return (maps * object_patches).sum(dim=1).mean().item()


@torch.no_grad()
def evaluate(model: nn.Module, images, labels, masks, patch_size: int, device, batch_size: int = 250) -> dict:
    """Accuracy, and how often / how much the class token's attention lies on the shape."""
    model.eval()
    preds, raws, rolls = [], [], []
    for i in range(0, len(labels), batch_size):
        logits, weights = forward_with_attention(model, images[i:i + batch_size].to(device))
        raw, roll = class_token_maps([w.cpu() for w in weights])
        preds.append(logits.argmax(-1).cpu())
        raws.append(raw)
        rolls.append(roll)
    pred, raw, roll = torch.cat(preds), torch.cat(raws), torch.cat(rolls)  # (n,), (n, L, N), (n, N)
    obj = patch_object_mask(masks, patch_size)  # (n, N)
    correct = pred == labels
    per_class = {name: correct[labels == c].float().mean().item() for c, name in enumerate(SHAPES)
                 if (labels == c).any()}
    return dict(
        accuracy=correct.float().mean().item(), accuracy_by_shape=per_class,
        rollout_top_patch_on_object=hit_rate(roll, obj),
        rollout_top_patch_on_object_when_correct=hit_rate(roll[correct], obj[correct]) if correct.any() else None,
        last_layer_top_patch_on_object=hit_rate(raw[:, -1], obj),
        top_patch_on_object_by_layer=[hit_rate(raw[:, l], obj) for l in range(raw.shape[1])],
        rollout_mass_on_object=mass_on_object(roll, obj),
        chance_top_patch_on_object=obj.float().mean(dim=1).mean().item(),
        predictions=pred, raw=raw, rollout=roll)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file, then rename: a crash mid-write never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location=None) -> tuple:
    """(model in eval mode, extra) from a checkpoint this script wrote; ValueError naming what is wrong."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or not {"class", "config", "state_dict", "extra"} <= payload.keys():
        raise ValueError(f"{path}: not a checkpoint of examples/vision_transformer.py (expected a dict with "
                         f"'class', 'config', 'state_dict' and 'extra')")
    names = {"VisionTransformer": "vit", "VisionDualAttnTransformer": "dat"}
    if payload["class"] not in names:
        raise ValueError(f"{path}: holds a {payload['class']!r}, expected one of {sorted(names)}")
    config = dict(payload["config"])
    if payload["class"] == "VisionDualAttnTransformer":  # tuples come back as lists
        config["image_shape"], config["patch_size"] = tuple(config["image_shape"]), tuple(config["patch_size"])
    model = build_model(names[payload["class"]], **config)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["extra"]


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s"


def train_model(name: str, args, device, log=None) -> dict:
    """Train (or resume) one model on the image stream; returns the model, its curve and its time."""
    log = log or (lambda line: print(line, flush=True))  # flushed: progress shows even when piped to a file
    torch.manual_seed(args.seed)  # the same initialisation whether run alone or after the other model
    config = model_config(name, args)
    model = build_model(name, **config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    settings = dict(model=name, seed=args.seed, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup)
    ckpt_path = Path(args.out) / "checkpoints" / f"{name}.pt"
    step, curve, train_seconds = 0, [], 0.0

    if ckpt_path.exists() and not args.restart:
        try:
            payload = torch.load(ckpt_path, map_location=device, weights_only=True)
            extra = payload["extra"]
            ok = (payload["class"] == type(model).__name__ and extra.get("format") == CHECKPOINT_FORMAT
                  and json.dumps(payload["config"]) == json.dumps(config) and extra["settings"] == settings
                  and extra["step"] <= args.steps)
        except Exception:  # a torn or foreign file
            ok = False
        if ok:
            model.load_state_dict(payload["state_dict"])
            optimizer.load_state_dict(extra["optimizer"])
            step, curve, train_seconds = extra["step"], extra["curve"], extra["train_seconds"]
            log(f"[{name}] resuming from {ckpt_path} at step {step}")
        else:
            log(f"[{name}] ignoring {ckpt_path}: unreadable, or written with other settings or more steps")

    def checkpoint():
        extra = dict(format=CHECKPOINT_FORMAT, optimizer=optimizer.state_dict(), step=step, curve=curve,
                     train_seconds=train_seconds + (time.perf_counter() - t0), settings=settings)
        atomic_save(dict({"class": type(model).__name__, "config": config, "state_dict": model.state_dict(),
                          "extra": extra}), ckpt_path)

    model.train()
    window, t0, start_step, cpu0 = [], time.perf_counter(), step, time.process_time()
    interactive = sys.stdout.isatty()
    while step < args.steps:
        # The batch of step k depends only on (seed, k), so a resumed run sees the same images.
        rng = random.Random(args.seed * 1_000_003 + step)
        images, labels, _ = make_batch(rng, args.batch_size, args.image_size)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        logits = model(images.to(device))  # (B, classes)
        loss = F.cross_entropy(logits, labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append((loss.item(), (logits.argmax(-1).cpu() == labels).float().mean().item()))

        if step % args.log_every == 0 or step == args.steps:
            curve.append((step, sum(x for x, _ in window) / len(window), sum(a for _, a in window) / len(window)))
            window = []
            elapsed = time.perf_counter() - t0
            rate = (step - start_step) / max(elapsed, 1e-9)
            eta = (args.steps - step) / max(rate, 1e-9)
            line = (f"[{name}] step {step:>5d}/{args.steps}  loss {curve[-1][1]:.4f}  train acc {curve[-1][2]:.3f}  "
                    f"{rate:5.2f} steps/s  elapsed {_fmt_seconds(elapsed)}  ETA {_fmt_seconds(eta)}")
            if interactive:
                print("\r" + line, end="" if step < args.steps else "\n", flush=True)
            else:
                log(line)
        if step % args.checkpoint_every == 0 or step == args.steps:
            checkpoint()
    train_seconds += time.perf_counter() - t0
    return dict(model=model, curve=curve, train_seconds=train_seconds, cpu_seconds=time.process_time() - cpu0)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def figure_indices(labels: torch.Tensor, per_class: int = 1) -> list:
    """The first `per_class` test images of each shape (fixed, because the test set is)."""
    out = []
    for c in range(len(SHAPES)):
        out += [int(i) for i in (labels == c).nonzero().flatten()[:per_class]]
    return out


def plot_attention(name: str, images, masks, labels, result: dict, patch_size: int, path: Path,
                   per_class: int = 2) -> Path:
    from plotting import plot_image_overlays

    idx = figure_indices(labels, per_class=per_class)
    g = images.shape[-1] // patch_size
    L = result["raw"].shape[1]
    overlays, row_titles = [], []
    for i in idx:
        maps = [result["raw"][i, l].view(g, g) for l in range(L)] + [result["rollout"][i].view(g, g)]
        overlays.append(maps)
        pred = SHAPES[int(result["predictions"][i])]
        row_titles.append(f"{SHAPES[int(labels[i])]}" + ("" if pred == SHAPES[int(labels[i])] else f" (said {pred})"))
    col_titles = ["image"] + [f"layer {l + 1}: CLS attention" for l in range(L)] + ["rollout"]
    title = {"vit": "ViT (core EncoderBlocks): class token's attention, mean over heads",
             "dat": "DAT (VisionDualAttnTransformer): class token's attention, mean over standard + relational heads"}
    return plot_image_overlays([images[i, 0] for i in idx], overlays, path, row_titles=row_titles,
                               col_titles=col_titles, outlines=[masks[i] for i in idx], title=title[name])


def plot_examples(images, masks, labels, path: Path, per_class: int = 3) -> Path:
    from plotting import plot_image_overlays

    idx = figure_indices(labels, per_class=per_class)
    return plot_image_overlays([images[i, 0] for i in idx], [[] for _ in idx], path,
                               row_titles=[SHAPES[int(labels[i])] for i in idx], col_titles=["image"],
                               outlines=[masks[i] for i in idx], columns=len(SHAPES),
                               title="test images; the labelled shape is outlined in red")


def plot_curves(curves: dict, path: Path) -> Path:
    import plotting  # noqa: F401  (selects matplotlib's Agg backend before pyplot draws)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curve in curves.items():
        ax1.plot([s for s, _, _ in curve], [loss for _, loss, _ in curve], label=name)
        ax2.plot([s for s, _, _ in curve], [acc for _, _, acc in curve], label=name)
    ax1.set_ylabel("training cross-entropy (nats)")
    ax2.set_ylabel("training accuracy (per window)")
    for ax in (ax1, ax2):
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax2.axhline(1 / len(SHAPES), color="grey", linestyle=":", linewidth=1)
    fig.suptitle("Learning curves, same images and budget", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
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
                torch=torch.__version__, python=platform.python_version(), device=str(device),
                load_average_1_5_15_at_start=cli.load_average())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = cli.pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # only now: every check that can fail has passed
    names = MODELS if args.model == "all" else (args.model,)

    images, labels, masks = make_test_set(args.test_size, args.image_size)
    g = args.image_size // args.patch_size
    print(f"{args.image_size}x{args.image_size} images, {g}x{g} patches of {args.patch_size} px, shapes {SHAPES}; "
          f"{args.test_size} held-out test images; device {device}")
    command = "python examples/vision_transformer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = dict(command=command.strip(), machine=machine_info(device), shapes=list(SHAPES),
                   image_size=args.image_size, patch_size=args.patch_size, steps=args.steps,
                   batch_size=args.batch_size, lr=args.lr, seed=args.seed, test_size=args.test_size, models={})
    curves, figure_paths = {}, []
    for name in names:
        trained = train_model(name, args, device)
        model = trained["model"]
        t0 = time.perf_counter()
        r = evaluate(model, images, labels, masks, args.patch_size, device)
        eval_seconds = time.perf_counter() - t0
        summary = {k: v for k, v in r.items() if k not in ("predictions", "raw", "rollout")}
        results["models"][name] = dict(summary, parameters=num_parameters(model),
                                       config=model_config(name, args),
                                       train_seconds=round(trained["train_seconds"], 2),
                                       train_cpu_seconds_this_run=round(trained["cpu_seconds"], 2),
                                       eval_seconds=round(eval_seconds, 2), curve=trained["curve"])
        print(f"[{name}] accuracy {r['accuracy']:.2%}  "
              f"top-rollout patch on the shape {r['rollout_top_patch_on_object']:.2%} "
              f"(chance {r['chance_top_patch_on_object']:.2%}; last layer's raw attention "
              f"{r['last_layer_top_patch_on_object']:.2%})  params {num_parameters(model):,}  "
              f"train {trained['train_seconds']:.1f}s")
        curves[name] = trained["curve"]
        if not args.no_figures:
            figure_paths.append(plot_attention(name, images, masks, labels, r, args.patch_size,
                                               out / f"vision_transformer_attention_{name}.png",
                                               per_class=1 if args.quick else 2))
    if not args.no_figures:
        figure_paths.append(plot_examples(images, masks, labels, out / "vision_transformer_examples.png",
                                          per_class=1 if args.quick else 3))
        figure_paths.append(plot_curves(curves, out / "vision_transformer_curves.png"))
    results["total_seconds"] = round(time.perf_counter() - t_start, 2)
    # CPU time of this process since main() began (imports excluded): on a shared machine this, not the
    # wall clock, is what the run would take alone on one core.
    results["total_cpu_seconds"] = round(time.process_time() - cpu_start, 2)
    results["machine"]["load_average_1_5_15_at_end"] = cli.load_average()
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    print(f"wrote {out / 'results.json'}; total {results['total_seconds']:.1f}s wall clock, "
          f"{results['total_cpu_seconds']:.1f}s CPU")

    if args.publish:
        docs = REPO_ROOT / "docs" / "examples"
        (docs / "results").mkdir(parents=True, exist_ok=True)
        (docs / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "results.json", docs / "results" / "vision_transformer.json")
        for path in figure_paths:
            shutil.copyfile(path, docs / "figures" / path.name)
        print(f"copied results and {len(figure_paths)} figures into {docs}")
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: the last checkpoint (every --checkpoint-every steps) is kept
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
