"""Tests of examples/explain_attention.py: the reviews, each explanation method against a fact it must
satisfy (max flow against a closed form and hand-made graphs, rollout's limits, integrated gradients'
completeness), the deletion metric, and a --quick run end to end."""

import json
import subprocess
import sys
from pathlib import Path
import random

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import explain_attention as ea  # noqa: E402


def test_reviews_labels_follow_from_the_words():
    for words, label, polarity in ea.make_reviews(random.Random(0), 500):
        assert len(words) == 16
        pos = sum(w in ("good", "great", "fine", "nice") for w in words)
        neg = sum(w in ("bad", "awful", "poor", "sad") for w in words)
        assert (pos + neg) % 2 == 1 and label == int(pos > neg)
        assert polarity == [1 if w in ea.POSITIVE else -1 if w in ea.NEGATIVE else 0 for w in words]


def test_max_flow_on_hand_made_graphs():
    # One layer: the flow from top node i to bottom node j is the edge's capacity.
    assert ea.max_flow_layered([[[0.2, 0.8], [0.5, 0.5]]], 0, 1) == pytest.approx(0.8)
    # Two layers, a bottleneck: top 0 -> middle 1 has 0.9, middle 1 -> bottom 0 has only 0.1; the other
    # route (top 0 -> middle 0 -> bottom 0) carries min(0.1, 0.3) = 0.1. Total 0.2.
    caps = [[[0.3, 0.7], [0.1, 0.9]],  # layer 1 -> layer 0: capacities[0][middle][bottom]
            [[0.1, 0.9], [0.5, 0.5]]]  # layer 2 -> layer 1: capacities[1][top][middle]
    assert ea.max_flow_layered(caps, 0, 0) == pytest.approx(0.2)
    # Three layers: the only route to bottom node 1 is limited by its first edge (0.5).
    caps3 = [[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.0], [0.0, 0.6]], [[0.5, 0.5], [0.0, 0.0]]]
    assert ea.max_flow_layered(caps3, 0, 1) == pytest.approx(0.5)


def test_max_flow_equals_the_two_layer_closed_form():
    g = torch.Generator().manual_seed(0)
    a1 = torch.softmax(torch.randn(6, 6, generator=g), -1)
    a2 = torch.softmax(torch.randn(6, 6, generator=g), -1)
    for j in range(6):  # with two layers the paths s -> k -> j are disjoint: flow = sum_k min(a2[s,k], a1[k,j])
        expected = sum(min(float(a2[0, k]), float(a1[k, j])) for k in range(6))
        assert ea.max_flow_layered([a1.tolist(), a2.tolist()], 0, j) == pytest.approx(expected, abs=1e-9)


def test_rollout_limits():
    eye = torch.eye(5).expand(2, 3, 5, 5)  # every head attends to itself only
    assert torch.allclose(ea.attention_rollout([eye, eye]), torch.eye(5).expand(2, 5, 5))
    w = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    one = ea.attention_rollout([w])
    assert torch.allclose(one, 0.5 * w.mean(1) + 0.5 * torch.eye(5))
    w2 = torch.softmax(3 * torch.randn(2, 3, 5, 5), -1)
    two = ea.attention_rollout([w, w2])  # layer 0 first: rollout = A~_2 @ A~_1, the upper layer on the left
    assert torch.allclose(two, ea.attention_rollout([w2]) @ one) and torch.allclose(two.sum(-1), torch.ones(2, 5))
    assert not torch.allclose(two, one @ ea.attention_rollout([w2]))  # the order matters


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ea.EvidenceClassifier(d_model=16, num_heads=2).eval()


def test_integrated_gradients_is_complete(model, monkeypatch):
    # Completeness (Sundararajan et al.): the scores sum to f(input) - f(baseline).
    monkeypatch.setattr(ea, "IG_STEPS", 256)
    ids, _, _ = ea.encode(ea.make_reviews(random.Random(1), 4), "cpu")
    out = ea.explain(model, ids, ["integrated"])
    baseline = ids.clone()
    baseline[:, 1:] = ea.WORD_ID[ea.DELETE]
    with torch.no_grad():
        f = ea.log_odds(model(ids)[0], out["target"])
        f0 = ea.log_odds(model(baseline)[0], out["target"])
    torch.testing.assert_close(out["scores"]["integrated"].sum(-1), f - f0, atol=2e-3, rtol=1e-2)


def test_every_method_scores_every_word(model):
    ids, _, _ = ea.encode(ea.make_reviews(random.Random(2), 3), "cpu")
    out = ea.explain(model, ids, ea.METHODS)
    for name, s in out["scores"].items():
        assert s.shape == (3, 16) and torch.isfinite(s).all() and s.abs().sum() > 0, name
    with torch.no_grad():
        _, weights = model(ids)
    rollout = ea.attention_rollout(weights)[:, 0, 1:]
    assert torch.allclose(out["scores"]["rollout"], rollout)
    assert (out["scores"]["flow"] <= 1 + 1e-6).all()  # no word receives more than the unit of flow


def test_deletion_curve_area_spearman_and_precision(model):
    ids, _, polarity = ea.encode(ea.make_reviews(random.Random(3), 5), "cpu")
    with torch.no_grad():
        probs = torch.softmax(model(ids)[0], -1)
    target = probs.argmax(-1)
    order = torch.arange(16).expand(5, 16)
    curve = ea.deletion_curve(model, ids, target, order)
    assert curve.shape == (17,)
    assert curve[0] == pytest.approx(float(probs.max(-1).values.mean()))
    everything_deleted = torch.full_like(ids, ea.WORD_ID[ea.DELETE])
    everything_deleted[:, 0] = 0
    with torch.no_grad():
        last = torch.softmax(model(everything_deleted)[0], -1).gather(1, target[:, None]).mean()
    assert curve[-1] == pytest.approx(float(last))
    assert ea.area(torch.full((17,), 0.3)) == pytest.approx(0.3)
    assert ea.area(torch.linspace(1, 0, 17)) == pytest.approx(0.5)
    a = torch.randn(4, 16)
    assert torch.allclose(ea.spearman(a, a), torch.ones(4, dtype=torch.double))
    assert torch.allclose(ea.spearman(a, -a), -torch.ones(4, dtype=torch.double))
    pol = torch.tensor([[1, 0, 0, 1, -1] + [0] * 11])
    scores = torch.tensor([[5.0, 4.0, 0, 3.0, 2.0] + [0.0] * 11])  # top 2: words 0 (+) and 1 (neutral)
    assert ea.evidence_precision(scores, pol, torch.tensor([1])) == pytest.approx(0.5)
    assert ea.evidence_precision(scores, pol, torch.tensor([0])) == pytest.approx(0.0)


def test_quick_run_resume_and_explaining_a_saved_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    results = ea.main(["--quick", "--out", str(out), "--device", "cpu", "--checkpoint-every", "10"])
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk["deletion_auc"]) == set(ea.METHODS) | {"random"}
    assert len(on_disk["spearman"]["matrix"]) == len(ea.METHODS)
    assert all(len(c) == 17 for c in on_disk["deletion_curves"].values())
    for png in ("explain_deletion.png", "explain_agreement.png", "explain_example.png"):
        assert (out / png).stat().st_size > 1000
    ckpt = torch.load(out / "checkpoints" / "classifier.pt", weights_only=True)
    assert {"class", "config", "state_dict", "extra"} <= set(ckpt) and ckpt["extra"]["step"] == 20
    capsys.readouterr()
    ea.main(["--quick", "--steps", "20", "--out", str(out), "--device", "cpu", "--no-figures"])
    assert "resuming from" in capsys.readouterr().out
    again = ea.main(["--checkpoint", str(out / "checkpoints" / "classifier.pt"), "--explain-size", "8",
                     "--methods", "raw,rollout", "--out", str(tmp_path / "b"), "--device", "cpu", "--no-figures"])
    assert again["accuracy"] == results["accuracy"]  # the same classifier, the same held-out reviews
    assert again["deletion_auc"]["raw"] == pytest.approx(results["deletion_auc"]["raw"])


def test_bad_arguments_are_one_line(tmp_path):
    script = str(REPO / "examples" / "explain_attention.py")
    for bad, flag in ((["--methods", "raw,lime"], "--methods"), (["--checkpoint", "nope.pt"], "--checkpoint")):
        proc = subprocess.run([sys.executable, script, *bad], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and flag in proc.stderr, proc.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, script, "--checkpoint", "junk.pt", "--out", str(tmp_path / "o")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --checkpoint") and proc.stderr.count("\n") == 1


def test_attention_arcs_draw_one_arc_per_weight_above_the_threshold(tmp_path):
    import matplotlib.pyplot as plt
    import plotting

    w = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.3, 0.5]])
    fig, ax = plt.subplots()
    plotting.plot_attention_arcs(ax, ["a", "b", "c"], w, threshold=0.25, scores=[0.1, 0.5, 0.2])
    assert len(ax.patches) == 2  # (1, 0) = 0.6 and (2, 1) = 0.3; the diagonal is never an arc
    plt.close(fig)
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="weights"):
        plotting.plot_attention_arcs(ax, ["a", "b"], w)
    plt.close(fig)
