"""Tests of examples/vision_transformer.py: the image generator, the patch bookkeeping the attention
measures rely on, rollout and the hit rate on hand-made numbers, the DAT attention read-out against the
model it mirrors, and a --quick run end to end with its resume and checkpoint."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import vision_transformer as vt  # noqa: E402
from mechanisms.dual_attention import _Patchify  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------------------------

def test_each_image_holds_its_shape_whole_and_strokes_keep_their_distance():
    rng = random.Random(1)
    seen = set()
    for _ in range(200):
        img, label, obj = vt.draw_image(rng, 24)  # no noise yet: ink is exactly where something was drawn
        ys, xs = obj.nonzero(as_tuple=True)
        y0, x0 = int(ys.min()), int(xs.min())
        # every shape touches all four sides of its 7 x 7 box, so the box is the mask's bounding box
        assert int(ys.max()) - y0 == int(xs.max()) - x0 == vt.SHAPE_SIZE - 1
        box = obj[y0:y0 + 7, x0:x0 + 7]
        assert torch.equal(box, torch.tensor([[c == "#" for c in row] for row in vt.BITMAPS[vt.SHAPES[label]]]))
        assert (img[obj] >= 0.6).all() and (img[obj] <= 1.0).all()
        grown = torch.zeros(24, 24, dtype=torch.bool)
        grown[max(0, y0 - 1):y0 + 8, max(0, x0 - 1):x0 + 8] = True
        assert (img[grown & ~obj] == 0).all()  # no stroke touches the shape
        strokes = int(((img > 0) & ~grown).sum())
        assert 2 <= strokes <= 10 * 3  # up to 10 strokes of 2-3 px (crossing strokes share pixels)
        seen.add(label)
    assert seen == set(range(len(vt.SHAPES)))


def test_the_four_bitmaps_are_distinct_7x7_shapes():
    masks = [vt.shape_mask(name) for name in vt.SHAPES]
    assert all(m.shape == (7, 7) for m in masks)
    assert len({tuple(m.flatten().tolist()) for m in masks}) == len(vt.SHAPES)
    with pytest.raises(ValueError, match="shape must be one of"):
        vt.shape_mask("triangle")


def test_test_set_is_fixed_and_balanced():
    a, b = vt.make_test_set(40, 24), vt.make_test_set(40, 24)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.bincount(a[1]).tolist() == [10, 10, 10, 10]
    assert a[0].shape == (40, 1, 24, 24) and a[2].shape == (40, 24, 24)


def test_training_batches_depend_only_on_the_seed_and_step():
    x1 = vt.make_batch(random.Random(7), 5, 24)
    x2 = vt.make_batch(random.Random(7), 5, 24)
    assert all(torch.equal(p, q) for p, q in zip(x1, x2))
    assert not torch.equal(x1[0], vt.make_batch(random.Random(8), 5, 24)[0])


def test_patch_object_mask_against_a_loop_and_the_models_patch_order():
    masks = torch.rand(3, 24, 24) > 0.97
    got = vt.patch_object_mask(masks, 4)  # (3, 36)
    for b in range(3):
        for r in range(6):
            for c in range(6):
                assert bool(got[b, r * 6 + c]) == bool(masks[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4].any())
    # DAT's patches (mechanisms/dual_attention.py) come in the same row-major order
    dat_patches = _Patchify(4, 4)(masks.float().unsqueeze(1))  # (3, 36, 16)
    assert torch.equal(dat_patches.amax(-1) > 0, got)


def test_vit_tokens_follow_the_same_patch_order():
    torch.manual_seed(0)
    model = vt.VisionTransformer(24, 4, 4, d_model=8, num_layers=1, num_heads=2, ff_dim=16).eval()
    with torch.no_grad():
        model.patch_embed.weight.fill_(1.0)
        model.patch_embed.bias.zero_()
    img = torch.zeros(1, 1, 24, 24)
    img[0, 0, 4 * 2 + 1, 4 * 5 + 3] = 1.0  # a pixel in patch row 2, column 5
    tokens = model.patch_tokens(img)[0]  # (36, 8)
    assert tokens.abs().sum(-1).nonzero().flatten().tolist() == [2 * 6 + 5]


# ---------------------------------------------------------------------------------------------
# Rollout and the hit rate
# ---------------------------------------------------------------------------------------------

def test_class_token_maps_by_hand():
    g = torch.Generator().manual_seed(0)
    T = 5
    weights = [torch.softmax(torch.randn(2, 3, T, T, generator=g, dtype=torch.float64), -1) for _ in range(2)]
    raw, roll = vt.class_token_maps(weights)
    assert raw.shape == (2, 2, T - 1) and roll.shape == (2, T - 1)
    for b in range(2):
        for l in range(2):
            torch.testing.assert_close(raw[b, l].double(), weights[l][b].mean(0)[0, 1:], rtol=0, atol=1e-6)
        # Abnar & Zuidema: A_hat = (mean_h A + I) / 2 (rows of A sum to 1), R = A_hat_2 A_hat_1
        a1 = 0.5 * (weights[0][b].mean(0) + torch.eye(T, dtype=torch.float64))
        a2 = 0.5 * (weights[1][b].mean(0) + torch.eye(T, dtype=torch.float64))
        row = (a2 @ a1)[0, 1:]
        torch.testing.assert_close(roll[b].double(), row / row.sum(), rtol=0, atol=1e-6)


def test_hit_rate_and_mass_on_object():
    maps = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    obj = torch.tensor([[False, True, False], [False, True, False], [True, True, True]])
    assert vt.hit_rate(maps, obj) == pytest.approx(2 / 3)  # rows 1 and 3: their top patch is on the object
    assert vt.mass_on_object(maps, obj) == pytest.approx((0.7 + 0.3 + 1.0) / 3)


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------

def tiny_args(**kw):
    import argparse
    base = dict(image_size=24, patch_size=4, d_model=16, layers=2, heads=4)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("name", vt.MODELS)
def test_attention_read_out_matches_the_plain_forward(name):
    torch.manual_seed(0)
    model = vt.build_model(name, **vt.model_config(name, tiny_args())).eval()
    images = vt.make_batch(random.Random(3), 3, 24)[0]
    with torch.no_grad():
        logits, weights = vt.forward_with_attention(model, images)
        torch.testing.assert_close(logits, model(images), rtol=1e-5, atol=1e-6)
    assert len(weights) == 2
    for w in weights:
        assert w.shape == (3, 4, 37, 37)  # DAT: 2 standard + 2 relational heads
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 4, 37), rtol=0, atol=1e-5)


def test_dat_is_the_mechanism_files_model_with_relational_heads():
    cfg = vt.model_config("dat", tiny_args())
    model = vt.build_model("dat", **cfg)
    block = model.encoder_blocks[0].dual_attn
    assert block.n_heads_sa == 2 and block.n_heads_ra == 2
    assert block.relational_attention.symmetric_rels
    assert type(model).__module__ == "mechanisms.dual_attention"


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_quick_run_writes_results_figures_and_a_checkpoint_then_resumes(tmp_path, capsys):
    common = ["--quick", "--out", str(tmp_path), "--device", "cpu"]
    results = vt.main(common)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["models"].keys() == set(vt.MODELS)
    for name in vt.MODELS:
        r = on_disk["models"][name]
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["rollout_top_patch_on_object"] <= 1.0
        assert 0.0 < r["chance_top_patch_on_object"] < 0.5
        assert [s for s, _, _ in r["curve"]] == [1, 2, 3]
        model, extra = vt.load_checkpoint(tmp_path / "checkpoints" / f"{name}.pt")
        assert extra["step"] == 3 and vt.num_parameters(model) == r["parameters"]
        assert (tmp_path / f"vision_transformer_attention_{name}.png").stat().st_size > 1000
    assert (tmp_path / "vision_transformer_examples.png").stat().st_size > 1000
    assert (tmp_path / "vision_transformer_curves.png").stat().st_size > 1000
    assert not list(tmp_path.rglob("*.tmp"))
    assert results["models"]["vit"]["accuracy"] == on_disk["models"]["vit"]["accuracy"]

    capsys.readouterr()
    vt.main(common + ["--steps", "4", "--model", "vit", "--no-figures"])
    assert "resuming" in capsys.readouterr().out
    curve = json.loads((tmp_path / "results.json").read_text())["models"]["vit"]["curve"]
    assert [s for s, _, _ in curve] == [1, 2, 3, 4]


@pytest.mark.slow
def test_help_and_one_line_errors(tmp_path):
    script = str(REPO / "examples" / "vision_transformer.py")
    proc = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for option in ("--model", "--steps", "--seed", "--device", "--out", "--quick", "--publish"):
        assert option in proc.stdout
    for bad, message in ((["--heads", "3"], "--heads 3: must be even"), (["--model", "cnn"], "invalid choice"),
                         (["--patch-size", "5"], "invalid choice"), (["--steps", "0"], "must be an integer")):
        proc = subprocess.run([sys.executable, script, *bad, "--out", str(tmp_path / "o")], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_overlay_figure_refuses_misshapen_input(tmp_path):
    import plotting
    img = torch.zeros(24, 24)
    with pytest.raises(ValueError, match="one list per image"):
        plotting.plot_image_overlays([img, img], [[torch.ones(6, 6)]], tmp_path / "x.png")
    with pytest.raises(ValueError, match="same number of overlays"):
        plotting.plot_image_overlays([img, img], [[torch.ones(6, 6)], []], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"outlines\[0\] has shape"):
        plotting.plot_image_overlays([img], [[]], tmp_path / "x.png", outlines=[torch.zeros(5, 5, dtype=torch.bool)])
    assert not (tmp_path / "x.png").exists()
