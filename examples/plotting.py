"""Figures the examples share: loss curves, attention heatmaps, a grid of heads, attention across layers.

Every function draws with matplotlib's non-interactive Agg backend (so it works on a machine with no
display), writes a small PNG (about 100 dpi) and returns nothing but the file it wrote, so scripts and
tests can call it without a GUI. Weights may be torch tensors or anything ``numpy.asarray`` accepts.

Import it from another example with the examples folder on ``sys.path``::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plotting import plot_attention_heatmap
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display needed; must come before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402  (matplotlib depends on numpy, so it is always present)

DPI = 100


def _as_array(weights, ndim: int, name: str) -> np.ndarray:
    """Turn a tensor or nested list into a float numpy array of the expected rank."""
    if hasattr(weights, "detach"):  # torch.Tensor, without importing torch here
        weights = weights.detach().float().cpu().numpy()
    array = np.asarray(weights, dtype=float)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(array.shape)}")
    return array


def printable_token(token: str) -> str:
    """A label a reader can see: spaces, newlines and tabs become visible symbols."""
    return {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "": "\u2205"}.get(token, token)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_loss_curves(curves: dict, path, xlabel: str = "step", title: str | None = None) -> Path:
    """One line per named curve; ``curves[name] = (xs, losses)`` with xs in steps or seconds."""
    if not curves:
        raise ValueError("curves must name at least one (xs, losses) pair, got an empty dict")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in curves.items():
        if len(xs) != len(ys):
            raise ValueError(f"curve {name!r}: {len(xs)} x values but {len(ys)} losses; expected equal")
        ax.plot(list(xs), list(ys), label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cross-entropy loss (nats / char)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_attention_heatmap(ax, weights, x_labels: Sequence[str], y_labels: Sequence[str],
                           title: str | None = None):
    """Draw one (Tq, Tk) attention matrix on ``ax``; rows are queries, columns keys. Returns the image."""
    w = _as_array(weights, 2, "weights")
    if w.shape != (len(y_labels), len(x_labels)):
        raise ValueError(f"weights has shape {w.shape}, expected (len(y_labels), len(x_labels)) = "
                         f"({len(y_labels)}, {len(x_labels)})")
    image = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=max(float(w.max()), 1e-12), aspect="auto",
                      interpolation="nearest")
    # Label every tick while they stay legible; thin them out for long sequences.
    fontsize = 7 if max(w.shape) <= 40 else 5
    step_x = max(1, math.ceil(len(x_labels) / 64))
    step_y = max(1, math.ceil(len(y_labels) / 64))
    ax.set_xticks(range(0, len(x_labels), step_x))
    ax.set_xticklabels([printable_token(t) for t in x_labels][::step_x], fontsize=fontsize, rotation=90)
    ax.set_yticks(range(0, len(y_labels), step_y))
    ax.set_yticklabels([printable_token(t) for t in y_labels][::step_y], fontsize=fontsize)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title, fontsize=9)
    return image


def plot_head_grid(weights: Sequence, tokens: Sequence[str], path, title: str | None = None) -> Path:
    """Every head of every layer: ``weights[l]`` is (H, T, T); rows are layers, columns heads."""
    layers = [_as_array(w, 3, f"weights[{i}]") for i, w in enumerate(weights)]
    if not layers:
        raise ValueError("weights must hold at least one layer, got an empty list")
    num_heads = layers[0].shape[0]
    for i, w in enumerate(layers):
        if w.shape != (num_heads, len(tokens), len(tokens)):
            raise ValueError(f"weights[{i}] has shape {w.shape}, expected (H, T, T) = "
                             f"({num_heads}, {len(tokens)}, {len(tokens)})")
    size = 2.2 if len(tokens) <= 24 else 3.0
    fig, axes = plt.subplots(len(layers), num_heads, figsize=(size * num_heads, size * len(layers)),
                             squeeze=False)
    for layer, w in enumerate(layers):
        for head in range(num_heads):
            ax = axes[layer][head]
            plot_attention_heatmap(ax, w[head], tokens, tokens, title=f"layer {layer} head {head}")
            if head:
                ax.set_ylabel("")
            if layer != len(layers) - 1:
                ax.set_xlabel("")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_attention_across_layers(weights: Sequence, tokens: Sequence[str], path, query_index: int = -1) -> Path:
    """How one query position spreads its attention at each layer: ``weights[l]`` is (T, T)
    (for example averaged over heads, or a rollout). One row of bars per layer over the key tokens."""
    layers = [_as_array(w, 2, f"weights[{i}]") for i, w in enumerate(weights)]
    if not layers:
        raise ValueError("weights must hold at least one layer, got an empty list")
    T = len(tokens)
    for i, w in enumerate(layers):
        if w.shape != (T, T):
            raise ValueError(f"weights[{i}] has shape {w.shape}, expected (T, T) = ({T}, {T})")
    if not -T <= query_index < T:
        raise ValueError(f"query_index must lie in [-{T}, {T}), got {query_index}")
    rows = np.stack([w[query_index] for w in layers])  # (L, T)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.22 * T + 1.5), 0.45 * len(layers) + 1.4))
    image = ax.imshow(rows, cmap="magma", aspect="auto", interpolation="nearest")
    ax.set_xticks(range(T))
    ax.set_xticklabels([printable_token(t) for t in tokens], fontsize=7)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([f"layer {i}" for i in range(len(layers))], fontsize=8)
    q = query_index % T
    ax.set_title(f"attention of query {q} ({printable_token(tokens[q])!r}) at each layer", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _save(fig, path)
