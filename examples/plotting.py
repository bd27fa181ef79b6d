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

if __name__ == "__main__":  # a library, not a script: say what it offers (before the slow matplotlib import)
    import argparse
    import re

    # The list is read from this file, so a function added below appears here by itself.
    functions = re.findall(r"^def ([a-z]\w*)\(", Path(__file__).read_text(encoding="utf-8"), re.MULTILINE)
    argparse.ArgumentParser(
        prog="plotting.py", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="This module is a library: it has nothing to run. Its functions: " + ", ".join(functions) + ".",
    ).parse_args()
    print("examples/plotting.py is a library of figure functions for the examples; it has nothing to run. "
          "See --help.")
    raise SystemExit(0)

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


def plot_image_overlays(images: Sequence, overlays: Sequence, path, row_titles: Sequence[str] | None = None,
                        col_titles: Sequence[str] | None = None, outlines: Sequence | None = None,
                        columns: int | None = None, title: str | None = None) -> Path:
    """Images with patch-level maps laid over them (a ViT's attention, a rollout).

    ``images[i]`` is a grey (H, W) image; ``overlays[i]`` a list of K (g_h, g_w) maps, one per column after
    the image itself, each stretched over the image (one cell per patch), drawn semi-transparent, with its
    highest cell boxed in white. ``outlines[i]`` (optional) is an (H, W) boolean mask, drawn as a red
    outline on every panel of row i (the object the map should find). With no overlays at all, the images
    alone are laid out ``columns`` to a row."""
    imgs = [_as_array(im, 2, f"images[{i}]") for i, im in enumerate(images)]
    if not imgs:
        raise ValueError("images must hold at least one image, got an empty list")
    if len(overlays) != len(imgs):
        raise ValueError(f"overlays must have one list per image: {len(imgs)} images, got {len(overlays)}")
    maps = [[_as_array(m, 2, f"overlays[{i}][{k}]") for k, m in enumerate(row)] for i, row in enumerate(overlays)]
    K = len(maps[0])
    if any(len(row) != K for row in maps):
        raise ValueError(f"every image needs the same number of overlays, got {[len(r) for r in maps]}")
    masks = None if outlines is None else [_as_array(m, 2, f"outlines[{i}]") for i, m in enumerate(outlines)]
    for i, im in enumerate(imgs):
        if masks is not None and masks[i].shape != im.shape:
            raise ValueError(f"outlines[{i}] has shape {masks[i].shape}, expected the image's {im.shape}")
    if K == 0:
        cols = columns or min(len(imgs), 6)
        rows = math.ceil(len(imgs) / cols)
    else:
        rows, cols = len(imgs), K + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows + (0.3 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i, im in enumerate(imgs):
        H, W = im.shape
        panels = [(axes.flat[i], None)] if K == 0 else [(axes[i][k], None if k == 0 else maps[i][k - 1])
                                                          for k in range(cols)]
        for k, (ax, m) in enumerate(panels):
            ax.imshow(im, cmap="gray", interpolation="nearest", extent=(0, W, H, 0))
            if m is not None:
                gh, gw = m.shape
                ax.imshow(m, cmap="inferno", alpha=0.6, interpolation="nearest", extent=(0, W, H, 0),
                          vmin=0.0, vmax=max(float(m.max()), 1e-12))
                r, c = divmod(int(np.argmax(m)), gw)
                ph, pw = H / gh, W / gw
                ax.add_patch(plt.Rectangle((c * pw, r * ph), pw, ph, fill=False, edgecolor="white", linewidth=1.2))
            if masks is not None:
                ax.contour(np.arange(W) + 0.5, np.arange(H) + 0.5, masks[i].astype(float), levels=[0.5],
                           colors="red", linewidths=0.8)
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
            label = []
            if K and i == 0 and col_titles is not None and k < len(col_titles):
                label.append(col_titles[k])
            if row_titles is not None and (K == 0 or k == 0):
                label.append(row_titles[i])
            if label:
                ax.set_title("\n".join(label), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_spectrogram_attention(spectrograms: Sequence, weights: Sequence, path, frame_seconds: float,
                               events: Sequence | None = None, titles: Sequence[str] | None = None,
                               ylabel: str = "mel band", title: str | None = None) -> Path:
    """Spectrograms with the attention a model paid to each time frame drawn underneath.

    ``spectrograms[i]`` is (F, T) (frequency bands up, frames across), ``weights[i]`` is (T,) (for
    example attention pooling's weights over the frames), ``frame_seconds`` the hop between frames.
    ``events[i]`` (optional) is a (start, end) time in seconds, shaded on both panels: where the
    deciding sound is. ``titles[i]`` heads example i, ``title`` the whole figure."""
    specs = [_as_array(s, 2, f"spectrograms[{i}]") for i, s in enumerate(spectrograms)]
    ws = [_as_array(w, 1, f"weights[{i}]") for i, w in enumerate(weights)]
    if not specs or len(specs) != len(ws):
        raise ValueError(f"spectrograms and weights must be non-empty lists of equal length, "
                         f"got {len(specs)} and {len(ws)}")
    for i, (s, w) in enumerate(zip(specs, ws)):
        if s.shape[1] != w.shape[0]:
            raise ValueError(f"weights[{i}] has {w.shape[0]} frames, expected the spectrogram's {s.shape[1]}")
    if not frame_seconds > 0:
        raise ValueError(f"frame_seconds must be > 0, got {frame_seconds}")
    n = len(specs)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig = plt.figure(figsize=(6.0 * cols, 3.6 * rows))
    # Per example a spectrogram row, an attention row and an empty row that keeps the next title clear.
    grid = fig.add_gridspec(3 * rows, cols, height_ratios=[3, 1.2, 0.9] * rows, hspace=0.12, wspace=0.15,
                            top=0.95 if title else 0.99, bottom=0.01)
    for i, (s, w) in enumerate(zip(specs, ws)):
        r, c = divmod(i, cols)
        ax_s = fig.add_subplot(grid[3 * r, c])
        ax_w = fig.add_subplot(grid[3 * r + 1, c], sharex=ax_s)
        T = s.shape[1]
        ax_s.imshow(s, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                    extent=(0, T * frame_seconds, 0, s.shape[0]))
        ax_w.bar((np.arange(T) + 0.5) * frame_seconds, w, width=frame_seconds, color="tab:blue", alpha=0.8)
        if events is not None and events[i] is not None:
            start, end = events[i]
            ax_s.axvspan(start, end, fill=False, edgecolor="cyan", linewidth=1.2)
            ax_w.axvspan(start, end, color="orange", alpha=0.3, linewidth=0, zorder=0)
        ax_s.set_ylabel(ylabel, fontsize=7)
        ax_w.set_ylabel("attention", fontsize=7)
        ax_w.set_xlabel("time (s)", fontsize=7)
        ax_s.tick_params(labelbottom=False, labelsize=6)
        ax_w.tick_params(labelsize=6)
        ax_w.set_xlim(0, T * frame_seconds)
        if titles is not None:
            ax_s.set_title(titles[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9, y=0.985)
    return _save(fig, path)


def plot_patch_attention_rows(rows: Sequence[dict], path, title: str | None = None) -> Path:
    """Which image patches each token looks at, one figure row per example.

    ``rows[i]`` is a dict with ``image`` (H, W, 3) in [0, 1], ``tokens`` (n strings), ``weights`` (n, gh, gw):
    token j's attention over a gh x gw grid of patches, and an optional ``title``. Each row shows the image,
    then one panel per token with its weights upsampled over the image (brighter = more attention)."""
    import textwrap

    if not rows:
        raise ValueError("rows must hold at least one example, got none")
    cols = 1 + max(len(r["tokens"]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.55 * cols, 1.8 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, row in enumerate(rows):
        image = _as_array(row["image"], 3, f"rows[{i}]['image']")
        weights = _as_array(row["weights"], 3, f"rows[{i}]['weights']")
        if weights.shape[0] != len(row["tokens"]):
            raise ValueError(f"rows[{i}]: {weights.shape[0]} weight maps for {len(row['tokens'])} tokens")
        axes[i][0].imshow(np.clip(image, 0, 1), interpolation="nearest")
        axes[i][0].set_title("\n".join(textwrap.wrap(row.get("title", ""), 26)), fontsize=7, loc="left")
        extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)
        for j, (token, w) in enumerate(zip(row["tokens"], weights)):
            ax = axes[i][j + 1]
            ax.imshow(np.clip(image, 0, 1) * 0.45, interpolation="nearest")
            ax.imshow(w, cmap="magma", alpha=0.65, vmin=0.0, vmax=max(float(w.max()), 1e-12), extent=extent,
                      interpolation="nearest")
            ax.set_title(f"{printable_token(token)}  (max {w.max():.2f})", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_attention_arcs(ax, tokens: Sequence[str], weights, threshold: float = 0.05, color: str = "C0",
                        scores: Sequence[float] | None = None, title: str | None = None) -> None:
    """Attention as arcs over a token sequence, in the spirit of an attention-flow graph.

    ``weights`` (T, T) (row = query, column = key, e.g. one layer averaged over heads): an arc above the
    tokens joins key j and query i for every weight above ``threshold``, its width and opacity proportional
    to the weight. ``scores`` (T,), if given, colour the tokens (e.g. an explanation's relevance)."""
    from matplotlib.patches import Arc

    w = _as_array(weights, 2, "weights")
    T = len(tokens)
    if w.shape != (T, T):
        raise ValueError(f"weights has shape {w.shape}, expected (T, T) = ({T}, {T})")
    top = float(w.max()) or 1.0
    for i in range(T):
        for j in range(T):
            if i == j or w[i, j] < threshold:
                continue
            span = abs(i - j)
            ax.add_patch(Arc(((i + j) / 2, 0), span, span * 0.9, theta1=0, theta2=180,
                             linewidth=0.4 + 3.0 * w[i, j] / top,
                             alpha=min(1.0, 0.15 + 0.85 * w[i, j] / top), color=color))
    if scores is not None:
        s = _as_array(scores, 1, "scores")
        s = (s - s.min()) / max(float(s.max() - s.min()), 1e-12)
        ax.scatter(range(T), [0] * T, c=s, cmap="Reds", s=60, zorder=3, edgecolors="k", linewidths=0.3)
    for k, token in enumerate(tokens):
        ax.text(k, -0.3, printable_token(token), ha="center", va="top", fontsize=7, rotation=90)
    ax.set_xlim(-1, T)
    ax.set_ylim(-2.5, 0.45 * T + 0.5)
    ax.set_aspect("auto")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
