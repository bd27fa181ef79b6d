"""Tests of examples/attention_vs_rnn.py: the three tasks against answers computed here from the inputs,
matched parameter counts, causality of the recurrent models' attention, and a --quick run with resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import attention_vs_rnn as avr  # noqa: E402


@pytest.mark.parametrize("length", [12, 16, 40])
def test_tasks_answers_follow_from_the_inputs(length):
    g = torch.Generator().manual_seed(length)
    x, y = avr.make_batch("copy", length, 64, g)
    assert x.shape == (64, length) and y.shape == (64, 4)
    assert torch.equal(y, x[:, :4])  # the four symbols at the start are the answer
    assert (x[:, 4:length - 4] == avr.BLANK).all() and x[0, -4:].tolist() == [18, 19, 20, 21]

    x, y = avr.make_batch("recall", length, 64, g)
    for row, target in zip(x.tolist(), y[:, 0].tolist()):
        pairs = dict(zip(row[0:8:2], row[1:8:2]))
        assert len(pairs) == 4 and all(9 <= k <= 16 for k in pairs) and all(1 <= v <= 8 for v in pairs.values())
        assert row[-2] == avr.QUERY and pairs[row[-1]] == target
        assert set(row[8:-2]) <= {avr.BLANK}

    x, y = avr.make_batch("count", length, 256, g)
    counts = (x == avr.X).sum(-1)  # count the x tokens here, independently
    assert torch.equal(y[:, 0], counts + 1) and (x[:, -1] == avr.QUERY).all()
    assert set(counts.tolist()) == set(range(8))  # every count 0..7 occurs


def test_held_out_sets_are_fixed_and_differ_from_training():
    a, _ = avr.heldout_batch("recall", 64, 50)
    b, _ = avr.heldout_batch("recall", 64, 50)
    assert torch.equal(a, b)
    c, _ = avr.make_batch("recall", 64, 50, torch.Generator().manual_seed(0))
    assert not torch.equal(a, c)


def test_parameter_counts_are_matched_and_the_formula_is_right():
    counts = {name: avr.num_parameters(avr.build_model(name)) for name in avr.MODELS}
    target = counts["transformer"]
    for name, n in counts.items():
        assert abs(n - target) / target < 0.05, counts
    for cell, h, attention in [("lstm", 10, False), ("gru", 6, False), ("lstm", 8, True)]:
        model = avr.RecurrentModel(cell, h, attention=attention)
        assert avr.num_parameters(model) == avr.recurrent_parameters(cell, h, 32, attention)


@pytest.mark.parametrize("name", avr.MODELS)
def test_outputs_and_what_the_answer_positions_can_read(name):
    torch.manual_seed(0)
    model = avr.build_model(name).eval()
    x, y = avr.make_batch("copy", 20, 3, torch.Generator().manual_seed(1))
    logits, weights = model(x, 4, need_weights=True)
    assert logits.shape == (3, 4, avr.VOCAB)
    if name == "lstm_attn":
        assert weights.shape == (3, 1, 4, 20)
        # answer position 16 + i may read states 0..16 + i, never a later one (a left-to-right reader)
        for i in range(4):
            assert weights[:, 0, i, 17 + i:].abs().sum() == 0 and weights[:, 0, i, :17 + i].sum(-1).allclose(
                torch.ones(3))
            assert (weights[:, 0, i, 16 + i] > 0).all()  # ... including its own state
    if name == "transformer":
        assert weights.shape == (3, 4, 20, 20)
    # changing the first symbol changes the answers: the models read the start of the sequence
    x2 = x.clone()
    x2[:, 0] = (x[:, 0] % 8) + 1
    assert not torch.allclose(model(x2, 4), logits)


def test_quick_run_then_a_finished_grid_is_not_trained_again(tmp_path, capsys):
    args = ["--quick", "--out", str(tmp_path), "--device", "cpu", "--no-figures"]
    results = avr.main(args)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["lengths"] == [16] and set(on_disk["accuracy"]) == set(avr.TASKS)
    for task in avr.TASKS:
        for name in avr.MODELS:
            assert set(on_disk["accuracy"][task][name]) == {"16"}
    assert set(on_disk["seconds_per_step"]) == set(avr.MODELS)
    ckpt = torch.load(tmp_path / "checkpoints" / "copy_lstm_16.pt", weights_only=True)
    assert {"class", "config", "state_dict", "extra"} <= set(ckpt) and ckpt["extra"]["result"] is not None
    assert avr.restore_model(ckpt["config"]).load_state_dict(ckpt["state_dict"]) is not None
    capsys.readouterr()
    again = avr.main(args)
    assert "accuracy" in capsys.readouterr().out
    assert again["accuracy"] == results["accuracy"]  # read back from the finished cells' checkpoints


def test_figures_and_bad_arguments(tmp_path):
    script = str(REPO / "examples" / "attention_vs_rnn.py")
    proc = subprocess.run([sys.executable, script, "--lengths", "8"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--lengths" in proc.stderr
    proc = subprocess.run([sys.executable, script, "--models", "lstm,rnn"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--models" in proc.stderr
    grid = {"copy": {"lstm": {"16": {"accuracy": 0.5}, "32": {"accuracy": 0.25}}}}
    assert avr.plot_accuracy(grid, ["copy"], ["lstm"], [16, 32], tmp_path / "a.png").stat().st_size > 1000
    assert avr.plot_time({"lstm": {"16": 0.01, "32": 0.02}}, tmp_path / "t.png").stat().st_size > 1000
