"""Tests of examples/audio_attention.py: the mel filter bank against a loop over its definition, the
log-mel spectrogram against the sounds it is fed (a tone lands in its band, a chirp climbs, an event lands
in its frames), the attention-mass measure on a model whose weights are known, and a --quick run end to end
with its resume and checkpoint."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import audio_attention as aa  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The mel filter bank and the spectrogram
# ---------------------------------------------------------------------------------------------

def test_mel_scale_round_trips_and_matches_htk_at_1000_hz():
    f = torch.tensor([0.0, 440.0, 1000.0, 4000.0], dtype=torch.float64)
    torch.testing.assert_close(aa.mel_to_hz(aa.hz_to_mel(f)), f, rtol=0, atol=1e-9)
    assert float(aa.hz_to_mel(1000.0)) == pytest.approx(1000.0, abs=0.1)  # the scale's anchor: 1 kHz ~ 1000 mel


def test_filter_bank_against_a_loop_over_the_triangles():
    n_mels, n_fft, sr = 6, 32, 8000
    bank = aa.mel_filter_bank(n_mels, n_fft, sr).double()
    top = 2595 * math.log10(1 + (sr / 2) / 700)
    points = [700 * (10 ** (top * i / (n_mels + 1) / 2595) - 1) for i in range(n_mels + 2)]
    for m in range(n_mels):
        lo, c, hi = points[m], points[m + 1], points[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            want = (f - lo) / (c - lo) if lo <= f <= c else (hi - f) / (hi - c) if c < f <= hi else 0.0
            assert float(bank[m, k]) == pytest.approx(want, abs=1e-6), (m, k)
    with pytest.raises(ValueError, match="f_min"):
        aa.mel_filter_bank(f_min=5000.0)


def test_a_tone_lands_in_the_band_centred_nearest_it():
    bank = aa.mel_filter_bank()
    centres = aa.mel_to_hz(torch.linspace(0, float(aa.hz_to_mel(4000.0)), aa.N_MELS + 2))[1:-1]
    for freq in (300.0, 1000.0, 2500.0):
        mel = aa.log_mel(aa._tone(freq, freq, aa.N_SAMPLES)[None])[0]  # (T, M)
        band = int(mel[10:-10].mean(0).argmax())
        assert abs(band - int((centres - freq).abs().argmin())) <= 1, (freq, band)


def test_log_mel_shape_frames_and_event_frames():
    waves = torch.zeros(2, aa.N_SAMPLES)
    click = 3200  # sample 3200 is t = 0.4 s, the centre of frame 25
    waves[:, click - 64:click + 64] = torch.randn(128)
    mel = aa.log_mel(waves)
    assert mel.shape == (2, aa.N_FRAMES, aa.N_MELS) == (2, 63, 32)
    assert int(mel[0].mean(-1).argmax()) == 25
    torch.testing.assert_close(mel.mean(dim=(1, 2)), torch.zeros(2), rtol=0, atol=1e-5)
    on = aa.event_frames(torch.tensor([[0.1, 0.2], [0.0, 0.016]], dtype=torch.float64))
    assert on[0].nonzero().flatten().tolist() == [7, 8, 9, 10, 11, 12]  # centres 0.112 .. 0.192 s
    assert on[1].nonzero().flatten().tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------
# The sounds
# ---------------------------------------------------------------------------------------------

def _event_track(label: int) -> list:
    """The loudest mel band in each frame of a clip holding only the event (no background)."""
    wave = aa.event_wave(random.Random(label), label)
    clip = torch.zeros(aa.N_SAMPLES)
    clip[2000:2000 + wave.shape[0]] = wave
    mel = aa.log_mel(clip[None])[0]  # (T, M)
    frames = aa.event_frames(torch.tensor([[2000 / aa.SAMPLE_RATE, (2000 + wave.shape[0]) / aa.SAMPLE_RATE]],
                                          dtype=torch.float64))[0]
    return mel[frames].argmax(-1)[1:-1].tolist()  # the frames inside the event, edges dropped


def test_chirps_climb_and_fall_and_the_tone_stays():
    up, down, tone = _event_track(0), _event_track(1), _event_track(2)
    assert up[-1] - up[0] >= 8 and all(b >= a for a, b in zip(up, up[1:]))
    assert down[0] - down[-1] >= 8 and all(b <= a for a, b in zip(down, down[1:]))
    assert max(tone) - min(tone) <= 1


def test_clips_are_deterministic_balanced_and_keep_the_event_inside():
    a, b = aa.make_test_set(40), aa.make_test_set(40)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    waves, labels, events = a
    assert waves.shape == (40, aa.N_SAMPLES) and torch.bincount(labels).tolist() == [10, 10, 10, 10]
    duration = events[:, 1] - events[:, 0]
    assert (events[:, 0] >= 0.05 - 1e-9).all() and (events[:, 1] <= 0.95 + 1e-9).all()
    assert (duration >= 0.12 - 1e-3).all() and (duration <= 0.2 + 1e-3).all()
    assert torch.isfinite(waves).all()


# ---------------------------------------------------------------------------------------------
# The model and the measure
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [0, 1])
def test_model_weights_are_a_distribution_over_frames_and_do_not_change_the_logits(layers):
    torch.manual_seed(0)
    model = aa.AudioAttentionClassifier(aa.N_MELS, 4, d_model=16, num_layers=layers, num_heads=2, ff_dim=32,
                                        pool_heads=2).eval()
    frames = aa.log_mel(aa.make_batch(random.Random(0), 3)[0])
    with torch.no_grad():
        logits, w, blocks = model(frames, need_weights=True)
        torch.testing.assert_close(logits, model(frames))
    assert w.shape == (3, 2, aa.N_FRAMES) and len(blocks) == layers
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2))
    assert model.pool.__class__.__module__ == "mechanisms.attention_pooling"


def test_the_two_models_differ_only_in_the_encoder_blocks():
    import argparse
    args = argparse.Namespace(d_model=16, layers=2, heads=2, pool_heads=1)
    pool, enc = aa.model_config("pool", args), aa.model_config("encoder", args)
    assert pool["num_layers"] == 0 and enc["num_layers"] == 2
    assert {k: v for k, v in pool.items() if k != "num_layers"} == {k: v for k, v in enc.items() if k != "num_layers"}


def test_pooling_rollout_by_hand():
    g = torch.Generator().manual_seed(0)
    T = 4
    pool = torch.softmax(torch.randn(2, T, generator=g), -1)
    blocks = [torch.softmax(torch.randn(2, 2, T, T, generator=g), -1) for _ in range(2)]
    got = aa.pooling_rollout(pool, blocks)
    for b in range(2):
        a1 = 0.5 * (blocks[0][b].mean(0) + torch.eye(T))
        a2 = 0.5 * (blocks[1][b].mean(0) + torch.eye(T))
        torch.testing.assert_close(got[b], pool[b] @ a2 @ a1, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2), rtol=0, atol=1e-6)
    assert aa.pooling_rollout(pool, []) is pool


class _Oracle(nn.Module):
    """A stand-in model that puts all its pooling weight on frames it is told, and predicts class 0."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights  # (n, T)
        self.calls = 0
        self.blocks = nn.ModuleList()

    def forward(self, frames, need_weights=False):
        n = frames.shape[0]
        w = self.weights[self.calls:self.calls + n]
        self.calls += n
        return torch.eye(4)[[0] * n], w[:, None], []


def test_attention_mass_and_top_frame_on_hand_made_weights():
    waves, labels, events = aa.make_test_set(8)
    on = aa.event_frames(events).float()  # (8, T)
    uniform = torch.full((8, aa.N_FRAMES), 1 / aa.N_FRAMES)
    r = aa.evaluate(_Oracle(on / on.sum(1, keepdim=True)), waves, labels, events, "cpu")
    assert r["attention_mass_on_event"] == pytest.approx(1.0) and r["top_frame_on_event"] == 1.0
    assert r["accuracy"] == pytest.approx(float((labels == 0).float().mean()))
    r = aa.evaluate(_Oracle(uniform), waves, labels, events, "cpu")
    assert r["attention_mass_on_event"] == pytest.approx(r["event_share_of_frames"])
    assert r["mass_over_share"] == pytest.approx(1.0)
    off = (1 - on) / (1 - on).sum(1, keepdim=True)
    r = aa.evaluate(_Oracle(off), waves, labels, events, "cpu")
    assert r["attention_mass_on_event"] == pytest.approx(0.0, abs=1e-7) and r["top_frame_on_event"] == 0.0


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_quick_run_writes_results_figures_and_a_checkpoint_then_resumes(tmp_path, capsys):
    common = ["--quick", "--out", str(tmp_path), "--device", "cpu"]
    results = aa.main(common)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["models"].keys() == set(aa.MODELS)
    for name in aa.MODELS:
        r = on_disk["models"][name]
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["attention_mass_on_event"] <= 1.0
        assert 0.05 < r["event_share_of_frames"] < 0.3
        assert [s for s, _, _ in r["curve"]] == [1, 2, 3]
        assert ("rollout_mass_on_event" in r) == (name == "encoder")
        model, extra = aa.load_checkpoint(tmp_path / "checkpoints" / f"{name}.pt")
        assert extra["step"] == 3 and aa.num_parameters(model) == r["parameters"]
        assert (tmp_path / f"audio_attention_{name}.png").stat().st_size > 1000
    assert (tmp_path / "audio_attention_curves.png").stat().st_size > 1000
    assert results["models"]["pool"]["accuracy"] == on_disk["models"]["pool"]["accuracy"]
    assert not list(tmp_path.rglob("*.tmp"))

    capsys.readouterr()
    aa.main(common + ["--steps", "4", "--model", "pool", "--no-figures"])
    assert "resuming" in capsys.readouterr().out
    curve = json.loads((tmp_path / "results.json").read_text())["models"]["pool"]["curve"]
    assert [s for s, _, _ in curve] == [1, 2, 3, 4]


@pytest.mark.slow
def test_help_and_one_line_errors(tmp_path):
    script = str(REPO / "examples" / "audio_attention.py")
    proc = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for option in ("--model", "--steps", "--layers", "--seed", "--device", "--out", "--quick", "--publish"):
        assert option in proc.stdout
    for bad, message in ((["--heads", "3"], "--heads 3 must divide --d-model 64"),
                         (["--pool-heads", "5"], "--pool-heads 5 must divide"),
                         (["--device", "tpu"], "must be auto, cpu"), (["--lr", "-1"], "must be a number"),
                         (["--layers", "0"], "must be an integer in 1.."), (["--model", "rnn"], "invalid choice")):
        proc = subprocess.run([sys.executable, script, *bad, "--out", str(tmp_path / "o")], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_spectrogram_figure_refuses_misshapen_input(tmp_path):
    import plotting
    spec = torch.zeros(32, 63)
    with pytest.raises(ValueError, match=r"weights\[0\] has 60 frames, expected the spectrogram's 63"):
        plotting.plot_spectrogram_attention([spec], [torch.ones(60)], tmp_path / "x.png", frame_seconds=0.016)
    with pytest.raises(ValueError, match="equal length"):
        plotting.plot_spectrogram_attention([spec, spec], [torch.ones(63)], tmp_path / "x.png", frame_seconds=0.016)
    with pytest.raises(ValueError, match="frame_seconds"):
        plotting.plot_spectrogram_attention([spec], [torch.ones(63)], tmp_path / "x.png", frame_seconds=0)
    assert not (tmp_path / "x.png").exists()
