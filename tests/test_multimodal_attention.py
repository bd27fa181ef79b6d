"""Tests of examples/multimodal_attention.py: the scenes and questions against an independent reader of the
rendered pixels, the patch layout, what each model can see, and a --quick run end to end with resume."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import multimodal_attention as mm  # noqa: E402

# Lit pixels per shape, counted by hand from the drawings in the module docstring's grid (8x8 cells with a
# one-pixel margin): square 6x6, circle 4+6+6+6+6+4, triangle 2+2+4+4+6, cross two 2x6 bars minus the overlap.
LIT = {36: "square", 32: "circle", 18: "triangle", 20: "cross"}
RGB = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}


def read_scene(image: torch.Tensor) -> list:
    """Decode (shape, colour, row, col) of every object from the pixels alone: background pixels are below
    0.21 in every channel, a shape's pixels are its colour exactly."""
    found = []
    for r in range(4):
        for c in range(4):
            cell = image[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8]  # (3, 8, 8)
            lit = cell.max(0).values > 0.3  # (8, 8)
            n = int(lit.sum())
            if n == 0:
                continue
            rgb = tuple(round(float(v), 2) for v in cell[:, lit][:, 0])
            colour = next(name for name, value in RGB.items() if tuple(round(x, 2) for x in value) == rgb)
            found.append((LIT[n], colour, r, c))
    return found


def answer(objects: list, words: list) -> str:
    """Answer a question from the decoded objects, by reading the words (not the generator's templates)."""
    by_shape = {o[0]: o for o in objects}
    by_colour = {o[1]: o for o in objects}
    if words[:2] == ["what", "colour"]:
        return by_shape[words[4]][1]
    if words[:2] == ["what", "shape"]:
        return by_colour[words[4]][0]
    if words[:2] == ["is", "there"]:
        return "yes" if (words[4], words[3]) in {(o[0], o[1]) for o in objects} else "no"
    assert words[3:5] == ["left", "of"], words
    return "yes" if by_shape[words[2]][3] < by_shape[words[6]][3] else "no"


def test_questions_are_answered_by_the_pixels():
    rng = random.Random(5)
    seen = {t: set() for t in mm.QUESTION_TYPES}
    for scene, words, ans, refs, qtype in mm.make_examples(rng, 400):
        image = mm.render(scene, rng)
        objects = read_scene(image)
        assert len(objects) == 3 and len({o[3] for o in objects}) == 3  # three objects, distinct columns
        assert answer(objects, words) == ans, (words, objects)
        seen[qtype].add(ans)
        for word, patch in refs:  # the referenced patch holds the object the word names
            obj = next(o for o in objects if o[2] * 4 + o[3] == patch)
            assert words[word] in (obj[0], obj[1])
    assert seen["colour"] == set(mm.COLOURS) and seen["shape"] == set(mm.SHAPES)
    assert seen["exists"] == seen["left_of"] == {"yes", "no"}


def test_yes_no_answers_are_balanced_and_the_test_set_is_fixed():
    test = mm.make_test_set(400)
    assert [e[1] for e in test] == [e[1] for e in mm.make_test_set(400)]
    for qtype in ("exists", "left_of"):
        answers = [e[2] for e in test if e[4] == qtype]
        assert len(answers) == 100 and 30 <= answers.count("yes") <= 70
    assert [e[4] for e in test[:4]] == list(mm.QUESTION_TYPES)


def test_patches_are_the_cells_in_row_major_order():
    images = torch.rand(2, 3, 32, 32)
    p = mm.patches(images)
    assert p.shape == (2, 16, 192)
    for i in range(16):
        r, c = divmod(i, 4)
        assert torch.equal(p[1, i], images[1, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8].reshape(-1))


@pytest.mark.parametrize("kind", mm.MODELS)
def test_what_each_model_can_see(kind):
    torch.manual_seed(0)
    model = mm.VQAModel(kind, d_model=16, num_heads=2).eval()
    batch = mm.encode_batch(mm.make_examples(random.Random(1), 3), "cpu")
    logits, weights = model(batch["images"], batch["ids"], batch["words"], need_weights=True)
    assert logits.shape == (3, len(mm.ANSWERS))
    other = model(torch.rand_like(batch["images"]), batch["ids"], batch["words"])
    if kind == "question_only":
        assert weights == [] and torch.equal(logits, other)  # the baseline never sees the image
    else:
        assert not torch.allclose(logits, other)
        expected = (3, 2, 8, 16) if kind == "cross" else (3, 1, 1, 16)
        assert all(w.shape == expected for w in weights)
        torch.testing.assert_close(weights[0].sum(-1), torch.ones(expected[:3]))
    if kind == "cross":  # padding words of the question change nothing
        ids = batch["ids"].clone()
        ids[~batch["words"]] = mm.WORD_ID["red"]
        torch.testing.assert_close(model(batch["images"], ids, batch["words"]), logits)


def test_quick_run_end_to_end_then_resume(tmp_path, capsys):
    common = ["--quick", "--steps", "3", "--log-every", "1", "--checkpoint-every", "2", "--out", str(tmp_path),
              "--device", "cpu"]
    mm.main(common)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["models"]) == set(mm.MODELS) and results["test_size"] == 40
    for name, r in results["models"].items():
        assert set(r["accuracy"]) == set(mm.QUESTION_TYPES) | {"all"}
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        assert len(r["attention_on_named_object"]) == {"cross": 2, "coattention": 1, "question_only": 0}[name]
        ckpt = torch.load(tmp_path / "checkpoints" / f"{name}.pt", weights_only=True)
        assert {"class", "config", "state_dict", "extra"} <= set(ckpt) and ckpt["extra"]["step"] == 3
    for png in ("multimodal_accuracy.png", "multimodal_attention_cross.png", "multimodal_attention_coattention.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert not list(tmp_path.rglob("*.tmp"))
    capsys.readouterr()
    mm.main(["--quick", "--steps", "4", "--model", "cross", "--no-figures", "--out", str(tmp_path), "--device", "cpu"])
    assert "resuming from" in capsys.readouterr().out
    assert torch.load(tmp_path / "checkpoints" / "cross.pt", weights_only=True)["extra"]["step"] == 4


def test_help_and_a_bad_argument_from_another_directory(tmp_path):
    script = str(REPO / "examples" / "multimodal_attention.py")
    proc = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--model" in proc.stdout and "--quick" in proc.stdout
    proc = subprocess.run([sys.executable, script, "--d-model", "30", "--heads", "4"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--d-model 30" in proc.stderr


def test_patch_attention_figure_checks_its_rows(tmp_path):
    import plotting

    row = dict(image=torch.rand(32, 32, 3), tokens=["what", "colour"], weights=torch.rand(2, 4, 4), title="t")
    assert plotting.plot_patch_attention_rows([row, row], tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="2 tokens"):
        plotting.plot_patch_attention_rows([dict(row, weights=torch.rand(3, 4, 4))], tmp_path / "q.png")
