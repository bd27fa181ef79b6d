"""examples/plotting.py: every figure is written, and misshapen input is refused with a clear error."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import plotting  # noqa: E402


def causal_weights(T: int, seed: int = 0) -> torch.Tensor:
    scores = torch.randn(T, T, generator=torch.Generator().manual_seed(seed))
    return scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)  # (T, T)


def test_every_figure_is_written(tmp_path):
    tokens = list("def f(x):")
    T = len(tokens)
    path = plotting.plot_loss_curves({"train": ([1, 2, 3], [3.0, 2.5, 2.0]), "val": ([3], [2.2])},
                                     tmp_path / "loss.png", title="t")
    assert path.stat().st_size > 1000
    layers = [torch.stack([causal_weights(T, 2 * l + h) for h in range(2)]) for l in range(3)]  # 3 x (2, T, T)
    assert plotting.plot_head_grid(layers, tokens, tmp_path / "grid.png").stat().st_size > 1000
    assert plotting.plot_attention_across_layers([w.mean(0) for w in layers], tokens,
                                                 tmp_path / "layers.png").stat().st_size > 1000
    fig, ax = plotting.plt.subplots()
    image = plotting.plot_attention_heatmap(ax, causal_weights(T), tokens, tokens, title="one head")
    assert image.get_array().shape == (T, T)
    assert [t.get_text() for t in ax.get_xticklabels()][3] == "\u2423"  # the space is drawn visibly
    plotting.plt.close(fig)


def test_misshapen_input_is_refused(tmp_path):
    fig, ax = plotting.plt.subplots()
    with pytest.raises(ValueError, match=r"expected \(len\(y_labels\), len\(x_labels\)\) = \(2, 3\)"):
        plotting.plot_attention_heatmap(ax, torch.ones(3, 2), ["a", "b", "c"], ["a", "b"])
    plotting.plt.close(fig)
    with pytest.raises(ValueError, match="weights\\[1\\] has shape"):
        plotting.plot_head_grid([torch.ones(2, 3, 3), torch.ones(2, 4, 4)], list("abc"), tmp_path / "g.png")
    with pytest.raises(ValueError, match="3 x values but 2 losses"):
        plotting.plot_loss_curves({"a": ([1, 2, 3], [1.0, 2.0])}, tmp_path / "l.png")
    with pytest.raises(ValueError, match="query_index"):
        plotting.plot_attention_across_layers([torch.eye(3)], list("abc"), tmp_path / "x.png", query_index=3)
