"""mechanisms/axial_attention.py: each pass is PyTorch's multi-head attention on every line of the image.

Oracle: two torch.nn.MultiheadAttention modules with the row pass's and the column pass's weights, applied
in a Python loop to every row of every image and then to every column of the result. Paper-specific facts:
after both passes every pixel depends on every pixel (one pass reaches only its own row); the causal mode
reaches exactly the pixels up-and-left; the score count is HW(H + W) instead of (HW)^2, read off the
weights the module really computes.
"""
import pathlib

import pytest
import torch

from mechanisms.axial_attention import AxialAttention, attention_score_counts, score_count_table
from tests.oracles import randomize_, torch_mha_like

FP64_TOL = 1e-10
D, HEADS, B, HT, WD = 8, 2, 2, 3, 4
PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "mechanisms" / "axial_attention.md"


def _model(dtype=torch.float64, seed=0, d_model=D, num_heads=HEADS, **kwargs):
    torch.manual_seed(seed)
    # non-zero biases, so a dropped one shows
    return randomize_(AxialAttention(d_model, num_heads, **kwargs).to(dtype).eval(), biases_only=True)


def _image(seed=1, height=HT, width=WD, dtype=torch.float64):
    return torch.randn(B, height, width, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _line(ref, seq, real, is_causal):
    """nn.MultiheadAttention on one line (1, L, C); its masks are True = NOT allowed."""
    length = seq.size(1)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1) if is_causal else None
    return ref(seq, seq, seq, key_padding_mask=~real[None], attn_mask=causal, average_attn_weights=False)


@pytest.mark.parametrize("is_causal", [False, True])
def test_rows_then_columns_equal_torch_multihead_attention(is_causal):
    model = _model()
    row_ref, col_ref = torch_mha_like(model.row_attn), torch_mha_like(model.col_attn)
    x = _image()
    kpm = torch.ones(B, HT, WD, dtype=torch.bool)
    kpm[0, 1, 2] = kpm[0, 2, 3] = kpm[1, 2, 1] = False  # padded pixels, never first in a row or column
    y = torch.zeros_like(x)
    row_w = torch.zeros(B, HT, HEADS, WD, WD, dtype=torch.float64)
    col_w = torch.zeros(B, WD, HEADS, HT, HT, dtype=torch.float64)
    expected = torch.zeros_like(x)
    with torch.no_grad():
        for b in range(B):
            for i in range(HT):  # row pass: pixel (i, j) attends to (i, j')
                out, w = _line(row_ref, x[b, i][None], kpm[b, i], is_causal)
                y[b, i], row_w[b, i] = out[0], w[0]
        for b in range(B):
            for j in range(WD):  # column pass on the row pass's output: (i, j) attends to (i', j)
                out, w = _line(col_ref, y[b, :, j][None], kpm[b, :, j], is_causal)
                expected[b, :, j], col_w[b, j] = out[0], w[0]
        got, (got_row_w, got_col_w) = model(x, key_padding_mask=kpm, is_causal=is_causal, need_weights=True)
        fused = model(x, key_padding_mask=kpm, is_causal=is_causal)
    assert (got - expected).abs().max() < FP64_TOL
    assert (fused - expected).abs().max() < FP64_TOL
    assert (got_row_w - row_w).abs().max() < FP64_TOL
    assert (got_col_w - col_w).abs().max() < FP64_TOL


def test_on_a_single_row_it_is_multi_head_attention():
    # A 1 x W image: the row pass is multi-head attention over the W pixels; in the column pass each pixel
    # sees only itself (weight 1), so that pass is its value map followed by its output map.
    model = _model()
    x = _image(height=1)
    ref = torch_mha_like(model.row_attn)
    with torch.no_grad():
        mha = ref(x[:, 0], x[:, 0], x[:, 0], need_weights=False)[0]  # (B, W, C)
        expected = model.col_attn.out_proj(model.col_attn.v_proj(mha))
        assert (model(x)[:, 0] - expected).abs().max() < FP64_TOL


def test_distinct_from_full_attention_over_all_pixels():
    # Full multi-head attention over the H*W pixels with the row pass's weights is a different function.
    model = _model()
    x = _image()
    ref = torch_mha_like(model.row_attn)
    flat = x.reshape(B, HT * WD, D)
    with torch.no_grad():
        full = ref(flat, flat, flat, need_weights=False)[0].view(B, HT, WD, D)
        axial, (row_w, _) = model(x, need_weights=True)
        assert (axial - full).abs().max() > 1e-3
        assert (model.row_attn(x.reshape(B * HT, WD, D), None, False, False)[0].view(B, HT, WD, D)
                - full).abs().max() > 1e-3


def _dependence(model, x, pixel, **kwargs):
    """(H, W) bool: which input pixels output pixel (i, j) of image 0 depends on (non-zero gradient)."""
    x = x.clone().requires_grad_(True)
    model(x, **kwargs)[0, pixel[0], pixel[1]].sum().backward()
    return x.grad[0].abs().sum(-1) > 0


def test_two_passes_connect_every_pixel_to_every_other():
    model = _model()
    x = _image()
    for pixel in [(0, 0), (1, 2), (HT - 1, WD - 1)]:
        assert _dependence(model, x, pixel).all(), pixel
    # One pass alone (the row pass) reaches only the pixel's own row.
    rows = x.clone().requires_grad_(True)
    model.row_attn(rows.reshape(B * HT, WD, D), None, False, False)[0].view(B, HT, WD, D)[0, 1, 2].sum().backward()
    reached = rows.grad[0].abs().sum(-1) > 0
    assert reached[1].all() and not reached[0].any() and not reached[2].any()


def test_causal_mode_reaches_exactly_the_pixels_up_and_left():
    # Causal row pass, then causal column pass: (i, j) depends on (i', j') iff i' <= i and j' <= j. No
    # raster-later pixel, but also not the raster-earlier pixels up and to the right (the page says so).
    model = _model()
    x = _image()
    for i, j in [(0, 0), (1, 2), (2, 1), (HT - 1, WD - 1)]:
        expected = torch.zeros(HT, WD, dtype=torch.bool)
        expected[:i + 1, :j + 1] = True
        assert torch.equal(_dependence(model, x, (i, j), is_causal=True), expected), (i, j)


def test_score_counts_are_the_weights_the_module_computes():
    model = _model()
    _, (row_w, col_w) = model(_image(), need_weights=True)
    per_head = (row_w[0, :, 0].numel() + col_w[0, :, 0].numel())  # weights of one image and one head
    counts = attention_score_counts(HT, WD)
    assert counts["axial"] == per_head == HT * WD * (HT + WD)
    assert counts["full"] == (HT * WD) ** 2
    assert counts["ratio"] == pytest.approx((HT + WD) / (HT * WD))
    with pytest.raises(ValueError, match="height"):
        attention_score_counts(0, 4)


def test_score_count_table_is_the_one_on_the_page():
    page = PAGE.read_text(encoding="utf-8")
    for row in score_count_table():
        line = next((ln for ln in page.splitlines() if ln.startswith(f"| {row['height']} × {row['width']} |")), None)
        assert line is not None, f"page table has no row for {row['height']} × {row['width']}"
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:] == [f"{row['full']:,}", f"{row['axial']:,}", f"{row['ratio']:.4f}",
                             f"{1 / row['ratio']:.0f}"], cells


def test_every_constructor_argument_changes_the_output():
    base = _model()
    x = _image()
    out = base(x)
    one_head = _model(num_heads=1)
    one_head.load_state_dict(base.state_dict())  # the same weights, cut into one head instead of two
    assert (one_head(x) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({k: v for k, v in base.state_dict().items() if k.endswith("weight")})
    assert (no_bias(x) - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5)
    dropped.load_state_dict(base.state_dict())
    torch.manual_seed(0)
    assert (dropped.train()(x) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=4, num_heads=2)(x[..., :4]).shape == (B, HT, WD, 4), "d_model"
