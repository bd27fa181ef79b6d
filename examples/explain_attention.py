"""Is attention an explanation? Six ways to say which input mattered, each tested for faithfulness.

A small Transformer classifier (the core's EncoderBlocks, a class token, 2 layers, 4 heads) is trained in
the script on generated "reviews" of 16 words: neutral filler words and a few evidence words, positive
(good, great, fine, nice) or negative (bad, awful, poor, sad), an odd number of them; the label says
whether positive words outnumber negative ones. So which words a prediction rests on is known in advance.

For held-out reviews, six methods rank the 16 words by their importance for the predicted class:

* ``raw``          the class token's attention in the last layer, mean over heads;
* ``rollout``      attention rollout (Abnar & Zuidema 2020, arXiv:2005.00928): the product over layers of
                   0.5 * (mean attention) + 0.5 * I, read at the class token;
* ``flow``         attention flow (same paper): the maximum flow from the class token at the top to each
                   input word through the layered graph whose capacities are those residual-mixed weights;
* ``grad_input``   gradient x input: (d log-odds / d embedding) . embedding, per word;
* ``attn_grad``    attention x gradient: the class token's last-layer weights times their gradient, mean
                   over heads;
* ``integrated``   integrated gradients (Sundararajan et al. 2017, arXiv:1703.01365), from the embedding of
                   the neutral word "the" to each word's own, 32 steps.

Faithfulness is measured by **deletion**: replace the top-ranked words by the neutral word "the", one more at a
time, and track the probability of the originally predicted class; the area under that curve (the mean over
0..16 deletions) is small when the ranking found what the model actually uses. Every method is compared with
a random ranking (mean of 10). Also reported: how often each method's top words are the evidence words of the
predicted polarity (``evidence precision``), and the Spearman rank correlation between every two methods.

``--checkpoint PATH`` explains a classifier saved by an earlier run (``checkpoints/classifier.pt`` under its
``--out``) instead of training one. Outputs (under ``--out``, default ``runs/explain_attention``):
``results.json``, ``checkpoints/classifier.pt`` (``{"class", "config", "state_dict", "extra"}``, written
atomically; a rerun resumes), ``explain_deletion.png``, ``explain_agreement.png``, ``explain_example.png``.
The page is docs/examples/explain_attention.md.
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

METHODS = ("raw", "rollout", "flow", "grad_input", "attn_grad", "integrated")
POSITIVE = ("good", "great", "fine", "nice")
NEGATIVE = ("bad", "awful", "poor", "sad")
NEUTRAL = ("the", "a", "movie", "was", "and", "it", "plot", "of", "very", "so", "but", "is")
WORDS = ("<cls>",) + NEUTRAL + POSITIVE + NEGATIVE
DELETE = "the"  # what a deleted word becomes: a neutral word the model saw everywhere in training
LENGTH = 16
EVIDENCE_COUNTS = (1, 3, 5)  # odd, so positive and negative words never tie
TEST_SEED = 20200528  # arXiv:2005.00928's month; the held-out reviews never depend on --seed
RANDOM_RANKINGS = 10
IG_STEPS = 32
CHECKPOINT_FORMAT = "explain-attention-v1"


def make_reviews(rng: random.Random, n: int) -> list:
    """`n` (words, label, polarity) triples: 16 words; polarity[i] is +1, -1 or 0 for word i; label 1 means
    more positive than negative words."""
    out = []
    for _ in range(n):
        k = rng.choice(EVIDENCE_COUNTS)
        positions = rng.sample(range(LENGTH), k)
        words = [rng.choice(NEUTRAL) for _ in range(LENGTH)]
        polarity = [0] * LENGTH
        for p in positions:
            sign = rng.choice((1, -1))
            words[p] = rng.choice(POSITIVE if sign > 0 else NEGATIVE)
            polarity[p] = sign
        out.append((words, int(sum(polarity) > 0), polarity))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=cli.int_range(1, 10_000_000), default=600, help="training steps")
    p.add_argument("--batch-size", type=cli.int_range(1, 4096), default=64, help="reviews per step")
    p.add_argument("--lr", type=cli.float_range(0, 1, low_open=True), default=3e-3, help="peak learning rate")
    p.add_argument("--layers", type=cli.int_range(1, 12), default=2, help="encoder layers")
    p.add_argument("--explain-size", type=cli.int_range(1, 100_000), default=300,
                   help="held-out reviews to explain and delete from")
    p.add_argument("--methods", type=str, default=",".join(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="PATH",
                   help="explain this saved classifier (written by an earlier run) instead of training one")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, training data and random rankings")
    p.add_argument("--device", type=cli.device_name, default="auto",
                   help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=cli.int_range(0, 1024), default=1, help="CPU threads for torch (0 = default)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "explain_attention", help="output folder")
    p.add_argument("--log-every", type=cli.int_range(1, 10_000_000), default=100, help="steps between progress lines")
    p.add_argument("--checkpoint-every", type=cli.int_range(1, 10_000_000), default=200, help="steps between checkpoints")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint under --out")
    p.add_argument("--quick", action="store_true", help="smoke test: 20 steps, 8 reviews explained (seconds)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--publish", action="store_true", help="also copy results.json and the figures into docs/examples/")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.explain_size, args.log_every = min(args.steps, 20), min(args.explain_size, 8), 5
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"--methods {args.methods!r}: must be a comma-separated subset of {', '.join(METHODS)}")
    args.methods = [m for m in METHODS if m in methods]
    if args.checkpoint is not None:
        cli.check_input_file(p, args.checkpoint, "--checkpoint")
    cli.check_output_folder(p, args.out)
    return args


if __name__ == "__main__":
    parse_args()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import transformer_implementation as ti  # noqa: E402

WORD_ID = {w: i for i, w in enumerate(WORDS)}


def encode(reviews: Sequence[tuple], device) -> tuple:
    """ids (B, 17) with the class token first, labels (B,), polarity (B, 16)."""
    ids = torch.tensor([[0] + [WORD_ID[w] for w in words] for words, _, _ in reviews], dtype=torch.long)
    labels = torch.tensor([label for _, label, _ in reviews])
    polarity = torch.tensor([pol for _, _, pol in reviews])
    return ids.to(device), labels.to(device), polarity.to(device)


class EvidenceClassifier(nn.Module):
    """Class token + words -> learned positions -> core EncoderBlocks (pre-norm) -> norm -> linear on the class token.

    forward(ids (B, T) or None, embeds (B, T, d) or None) -> (logits (B, 2), per-layer weights [(B, H, T, T)]).
    ``embeds`` replaces the word embeddings (positions are still added): what the gradient methods
    differentiate with respect to."""

    def __init__(self, d_model: int = 32, num_heads: int = 4, num_layers: int = 2) -> None:
        super().__init__()
        self.config = dict(d_model=d_model, num_heads=num_heads, num_layers=num_layers)
        self.embedding = nn.Embedding(len(WORDS), d_model)
        self.position = nn.Parameter(0.02 * torch.randn(LENGTH + 1, d_model))
        self.blocks = nn.ModuleList(ti.EncoderBlock(d_model, num_heads, 2 * d_model) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 2)

    def forward(self, ids: Optional[torch.Tensor] = None, embeds: Optional[torch.Tensor] = None):
        x = (self.embedding(ids) if embeds is None else embeds) + self.position  # (B, T, d)
        weights = []
        for block in self.blocks:
            x, w = block(x, need_weights=True)  # (B, T, d), (B, H, T, T)
            weights.append(w)
        return self.head(self.norm(x[:, 0])), weights  # (B, 2), [(B, H, T, T)]


def log_odds(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) logit of the target class minus the other's: what every gradient method explains."""
    return logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, (1 - target)[:, None]).squeeze(1)


# ----------------------------------------------------------------------------------------------
# The six explanation methods: each returns scores (B, 16) over the words (class token excluded)
# ----------------------------------------------------------------------------------------------

def residual_attention(weights: Sequence[torch.Tensor]) -> list:
    """Per layer, 0.5 * (mean over heads) + 0.5 * I, rows renormalised: the residual connection counted as
    attention to oneself, as Abnar & Zuidema do."""
    out = []
    for w in weights:
        a = w.mean(1)  # (B, T, T)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)  # (B, T, T)
        out.append(a / a.sum(-1, keepdim=True))
    return out


def attention_rollout(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, T, T): row i says how much of position i's top-layer state comes from each input, by the product
    A_L ... A_1 of the residual-mixed attention maps."""
    layers = residual_attention(weights)
    rollout = layers[0]
    for a in layers[1:]:
        rollout = a @ rollout  # (B, T, T): compose with the layer above
    return rollout


def max_flow_layered(capacities: Sequence[Sequence[Sequence[float]]], source: int, sink: int) -> float:
    """Maximum flow through a layered graph (Edmonds-Karp).

    ``capacities[l][i][j]`` is the capacity of the edge from node i of layer l+1 down to node j of layer l
    (l = 0..L-1, layer 0 = the inputs). The flow enters at node ``source`` of the top layer L and leaves at
    node ``sink`` of layer 0."""
    L, T = len(capacities), len(capacities[0])
    n = (L + 1) * T

    def node(layer, i):
        return layer * T + i

    residual = [dict() for _ in range(n)]  # residual[u][v] = remaining capacity u -> v
    for layer in range(L):
        for i in range(T):
            if layer == L - 1 and i != source:
                continue  # no flow enters another top node: its edges can never carry any
            for j in range(T):
                if layer == 0 and j != sink:
                    continue  # no flow leaves another input node: edges into it are dead ends
                c = float(capacities[layer][i][j])
                if c > 0:
                    u, v = node(layer + 1, i), node(layer, j)
                    residual[u][v] = residual[u].get(v, 0.0) + c
                    residual[v].setdefault(u, 0.0)
    s, t, flow = node(L, source), node(0, sink), 0.0
    while True:
        parent = {s: None}
        queue = [s]
        for u in queue:  # breadth-first search for the shortest augmenting path
            if u == t:
                break
            for v, c in residual[u].items():
                if c > 1e-12 and v not in parent:
                    parent[v] = u
                    queue.append(v)
        if t not in parent:
            return flow
        path, v = [], t
        while parent[v] is not None:
            path.append((parent[v], v))
            v = parent[v]
        push = min(residual[u][v] for u, v in path)
        for u, v in path:
            residual[u][v] -= push
            residual[v][u] += push
        flow += push


def attention_flow(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, 16): the maximum flow from the class token at the top layer to each input word."""
    layers = [a.detach().cpu().tolist() for a in residual_attention(weights)]  # [(B, T, T)] as lists
    B, T = len(layers[0]), len(layers[0][0])
    out = torch.zeros(B, T - 1)
    for b in range(B):
        caps = [layer[b] for layer in layers]  # capacities[l][i][j]: layer l+1 node i reads layer l node j
        for j in range(1, T):
            out[b, j - 1] = max_flow_layered(caps, 0, j)
    return out


def explain(model: EvidenceClassifier, ids: torch.Tensor, methods: Sequence[str]) -> dict:
    """Scores (B, 16) per method, for the class the model predicts."""
    model.eval()
    with torch.no_grad():
        logits, weights = model(ids)
    target = logits.argmax(-1)  # (B,)
    scores = {}
    if "raw" in methods:
        scores["raw"] = weights[-1].mean(1)[:, 0, 1:]  # (B, 16)
    if "rollout" in methods:
        scores["rollout"] = attention_rollout(weights)[:, 0, 1:]  # (B, 16)
    if "flow" in methods:
        scores["flow"] = attention_flow(weights).to(ids.device)  # (B, 16)
    if "grad_input" in methods or "attn_grad" in methods:
        embeds = model.embedding(ids).detach().requires_grad_(True)  # (B, T, d)
        logits, weights = model(embeds=embeds)
        for w in weights:
            w.retain_grad()  # the weights are the tensor the output was computed from (explicit path, eval)
        log_odds(logits, target).sum().backward()
        if "grad_input" in methods:
            scores["grad_input"] = (embeds.grad * embeds).sum(-1)[:, 1:].detach()  # (B, 16)
        if "attn_grad" in methods:
            scores["attn_grad"] = (weights[-1] * weights[-1].grad).mean(1)[:, 0, 1:].detach()  # (B, 16)
    if "integrated" in methods:
        embeds = model.embedding(ids).detach()  # (B, T, d)
        baseline = model.embedding(torch.full_like(ids, WORD_ID[DELETE])).detach()
        baseline[:, 0] = embeds[:, 0]  # the class token is not explained: it stays itself
        total = torch.zeros_like(embeds)
        for k in range(IG_STEPS):  # midpoint Riemann sum of the path integral
            point = (baseline + (k + 0.5) / IG_STEPS * (embeds - baseline)).requires_grad_(True)
            logits, _ = model(embeds=point)
            grad, = torch.autograd.grad(log_odds(logits, target).sum(), point)
            total += grad
        scores["integrated"] = ((embeds - baseline) * total / IG_STEPS).sum(-1)[:, 1:]  # (B, 16)
    return dict(scores={m: scores[m] for m in methods}, target=target)


# ----------------------------------------------------------------------------------------------
# Faithfulness and agreement
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def deletion_curve(model: EvidenceClassifier, ids: torch.Tensor, target: torch.Tensor,
                   order: torch.Tensor) -> torch.Tensor:
    """(17,): mean probability of `target` after deleting the first k words of `order` (B, 16), k = 0..16."""
    points = []
    current = ids.clone()
    for k in range(LENGTH + 1):
        logits, _ = model(current)
        points.append(torch.softmax(logits, -1).gather(1, target[:, None]).mean())
        if k < LENGTH:
            rows = torch.arange(ids.shape[0], device=ids.device)
            current[rows, order[:, k] + 1] = WORD_ID[DELETE]  # +1: skip the class token
    return torch.stack(points)


def area(curve: torch.Tensor) -> float:
    """Area under a deletion curve over the fraction deleted, 0..1 (trapezoids)."""
    c = curve.double()
    return float(((c[1:] + c[:-1]) / 2).mean())


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) Spearman rank correlation between rows of a and b (B, n) (ties broken by position)."""
    ra = a.argsort(-1).argsort(-1).double()
    rb = b.argsort(-1).argsort(-1).double()
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def evidence_precision(scores: torch.Tensor, polarity: torch.Tensor, target: torch.Tensor) -> float:
    """How many of the top-m words are evidence for the predicted class, m = the number of such words."""
    sign = torch.where(target == 1, 1, -1)[:, None]  # (B, 1)
    support = polarity == sign  # (B, 16)
    m = support.sum(-1)  # (B,)
    order = scores.argsort(-1, descending=True)  # (B, 16)
    hits = support.gather(1, order).int().cumsum(-1)  # (B, 16): supporting words among the top k
    ok = m > 0
    return float((hits[ok].gather(1, (m[ok] - 1)[:, None]).squeeze(1) / m[ok]).mean())


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _fmt(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s"


def load_classifier(path: Path, device) -> tuple:
    """(model, extra) from a checkpoint this script wrote; ValueError naming what is wrong otherwise."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("class") != "EvidenceClassifier" or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a checkpoint of explain_attention.py (expected class 'EvidenceClassifier')")
    model = EvidenceClassifier(**ckpt["config"]).to(device)
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt.get("extra") or {}


def train(args, device, log=print) -> tuple:
    path = Path(args.out) / "checkpoints" / "classifier.pt"
    torch.manual_seed(args.seed)
    model = EvidenceClassifier(num_layers=args.layers).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    settings = dict(seed=args.seed, batch_size=args.batch_size, lr=args.lr)
    step, curve, seconds = 0, [], 0.0
    if path.exists() and not args.restart:
        try:
            old, extra = load_classifier(path, device)
            ok = old.config == model.config and extra.get("format") == CHECKPOINT_FORMAT \
                and extra.get("settings") == settings and extra["step"] <= args.steps
        except (ValueError, RuntimeError, KeyError) as exc:
            ok = False
            log(f"ignoring {path}: {exc}")
        if ok:
            model.load_state_dict(old.state_dict())
            optimizer.load_state_dict(extra["optimizer"])
            step, curve, seconds = extra["step"], extra["curve"], extra["seconds"]
            log(f"resuming from {path} at step {step}")

    def save():
        extra = dict(format=CHECKPOINT_FORMAT, settings=settings, optimizer=optimizer.state_dict(), step=step,
                     curve=curve, seconds=seconds + time.perf_counter() - t0)
        atomic_save({"class": "EvidenceClassifier", "config": model.config, "state_dict": model.state_dict(),
                     "extra": extra}, path)

    model.train()
    t0, start, window = time.perf_counter(), step, []
    while step < args.steps:
        rng = random.Random(args.seed * 1_000_003 + step)
        ids, labels, _ = encode(make_reviews(rng, args.batch_size), device)
        warm = max(1, min(50, args.steps // 10))
        lr = args.lr * min(1.0, (step + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits, _ = model(ids)
        loss = F.cross_entropy(logits, labels)
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
            log(f"step {step:>5d}/{args.steps}  loss {curve[-1][1]:.4f}  {rate:5.1f} steps/s  "
                f"elapsed {_fmt(elapsed)}  ETA {_fmt((args.steps - step) / max(rate, 1e-9))}", flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            save()
    return model, dict(curve=curve, train_seconds=round(seconds + time.perf_counter() - t0, 2))


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def plot_deletion(curves: dict, aucs: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import plotting  # noqa: F401

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [k / LENGTH for k in range(LENGTH + 1)]
    for name, curve in curves.items():
        style = dict(color="k", linestyle=":", linewidth=2) if name == "random" else {}
        ax.plot(xs, curve, label=f"{name} (AUC {aucs[name]:.3f})", **style)
    ax.set_xlabel("fraction of words deleted (top-ranked first)")
    ax.set_ylabel("probability of the predicted class")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Deletion curves: lower = the ranking found what the model uses", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_agreement(matrix, methods, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import plotting

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels(methods, fontsize=8)
    for i in range(len(methods)):
        for j in range(len(methods)):
            ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title("mean Spearman rank correlation", fontsize=10)
    return plotting._save(fig, path)


def plot_example(model, ids, words, scores: dict, label: int, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import plotting

    with torch.no_grad():
        _, weights = model(ids)
    tokens = ["<cls>"] + list(words)
    n_layers = len(weights)
    fig, axes = plt.subplots(n_layers + 1, 1, figsize=(8, 2.4 * n_layers + 0.4 * len(scores) + 0.8),
                             gridspec_kw=dict(height_ratios=[2.4] * n_layers + [0.3 * len(scores) + 0.3]))
    for layer, ax in enumerate(axes[:-1]):
        w = weights[layer][0].mean(0)  # (T, T)
        off_diagonal = w[~torch.eye(w.shape[0], dtype=torch.bool)]
        threshold = float(torch.quantile(off_diagonal, 0.9))  # draw the strongest tenth of the links
        plotting.plot_attention_arcs(ax, tokens, w, threshold=threshold, color=f"C{layer}",
                                     title=f"layer {layer}: the strongest 10% of attention weights (mean over "
                                           f"heads, >= {threshold:.2f}); each arc joins a query and a key")
    table = torch.stack([s[0] / s[0].abs().max().clamp_min(1e-12) for s in scores.values()]).cpu().numpy()  # (M, 16)
    ax = axes[-1]
    ax.imshow(table, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_yticks(range(len(scores)))
    ax.set_yticklabels(list(scores), fontsize=7)
    ax.set_xticks(range(len(words)))
    ax.set_xticklabels(words, rotation=90, fontsize=7)
    ax.set_title(f"each method's scores, scaled to max |score| = 1 (label: {'positive' if label else 'negative'})",
                 fontsize=8)
    fig.tight_layout()
    return plotting._save(fig, path)


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
    command = "python examples/explain_attention.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = dict(command=command.strip(), machine=machine_info(device), seed=args.seed,
                   explain_size=args.explain_size, methods=args.methods)
    if args.checkpoint is not None:
        try:
            model, _ = load_classifier(args.checkpoint, device)
        except ValueError as exc:
            sys.exit(f"error: --checkpoint {exc}")
        results["checkpoint"] = str(args.checkpoint)
        print(f"explaining {args.checkpoint}")
    else:
        model, info = train(args, device)
        results.update(steps=args.steps, batch_size=args.batch_size, lr=args.lr, layers=args.layers, **info)
    model.eval()

    reviews = make_reviews(random.Random(TEST_SEED), args.explain_size)
    ids, labels, polarity = encode(reviews, device)
    with torch.no_grad():
        logits, _ = model(ids)
    results["accuracy"] = float((logits.argmax(-1) == labels).float().mean())
    print(f"held-out accuracy {results['accuracy']:.1%} on {len(reviews)} reviews; explaining with "
          f"{', '.join(args.methods)}", flush=True)
    t0 = time.perf_counter()
    explained = explain(model, ids, args.methods)
    results["explain_seconds"] = round(time.perf_counter() - t0, 2)
    scores, target = explained["scores"], explained["target"]

    curves, aucs, precision = {}, {}, {}
    for name, s in scores.items():
        curves[name] = deletion_curve(model, ids, target, s.argsort(-1, descending=True))
        aucs[name] = area(curves[name])
        precision[name] = evidence_precision(s, polarity, target)
    g = torch.Generator().manual_seed(args.seed)
    random_curves = [deletion_curve(model, ids, target, torch.rand(ids.shape[0], LENGTH, generator=g).argsort(-1).to(device))
                     for _ in range(RANDOM_RANKINGS)]
    curves["random"] = torch.stack(random_curves).mean(0)
    aucs["random"] = area(curves["random"])
    precision["random"] = evidence_precision(torch.rand(ids.shape[0], LENGTH, generator=g).to(device), polarity, target)
    names = list(scores)
    agreement = [[float(spearman(scores[a], scores[b]).mean()) for b in names] for a in names]
    results.update(deletion_auc=aucs, evidence_precision=precision,
                   deletion_curves={k: [round(float(v), 4) for v in c] for k, c in curves.items()},
                   spearman=dict(methods=names, matrix=agreement))
    print("method        deletion AUC (lower = more faithful)   evidence precision")
    for name in names + ["random"]:
        print(f"  {name:<12s} {aucs[name]:.3f}{'':<29s}{precision[name]:.2f}")
    figures = []
    if not args.no_figures:
        figures.append(plot_deletion({k: [float(v) for v in c] for k, c in curves.items()}, aucs,
                                     out / "explain_deletion.png"))
        figures.append(plot_agreement(agreement, names, out / "explain_agreement.png"))
        k = next((i for i, (_, _, pol) in enumerate(reviews) if sum(p != 0 for p in pol) == 3), 0)
        figures.append(plot_example(model, ids[k:k + 1], reviews[k][0], {n: s[k:k + 1] for n, s in scores.items()},
                                    reviews[k][1], out / "explain_example.png"))
    results["total_seconds"] = round(time.perf_counter() - t_start, 2)
    results["cpu_seconds"] = round(time.process_time(), 2)
    results["machine"]["load_average_1_5_15_at_end"] = cli.load_average()
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    print(f"wrote {out / 'results.json'}; total {results['total_seconds']:.1f}s wall, {results['cpu_seconds']:.1f}s "
          f"CPU, load average {results['machine']['load_average_1_5_15_at_end']}")
    if args.publish:
        docs = REPO_ROOT / "docs" / "examples"
        (docs / "results").mkdir(parents=True, exist_ok=True)
        (docs / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "results.json", docs / "results" / "explain_attention.json")
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
