"""Classify synthetic sounds with attention over time, and measure whether the attention finds the sound.

A one-second clip at 8 kHz holds background sounds that every class shares and ONE deciding event at a
random time; the label is the kind of that event:

* ``up_chirp``    a tone sweeping up from 600 to 2,400 Hz (0.12 to 0.2 s);
* ``down_chirp``  the same sweep downwards;
* ``tone``        a steady tone at a random pitch between 800 and 2,000 Hz (0.12 to 0.2 s);
* ``pulses``      three 30 ms beeps of one such pitch, 30 ms apart (0.15 s).

The background, in every clip whatever its class: a low hum (150 to 250 Hz) for the whole second, white
noise, and one to three loud broadband noise bursts (40 to 150 ms) at random times that never overlap the
event. So the class can only be read from a short stretch of the clip, and where that stretch lies is
known for every clip: the right attention pattern is known in advance.

The pipeline, in torch only (no torchaudio): the waveform goes through ``torch.stft`` (256-sample Hann
window, hop 128, so 63 frames of 16 ms) to a power spectrogram, a mel filter bank built in this file (32
triangular filters, equally spaced on the HTK mel scale, 0 to 4 kHz) turns it into a log-mel spectrogram
(32 bands x 63 frames), and two models read the frames as tokens:

* ``pool``     frames -> 2 x Conv1d over time (kernel 3) -> AttentionPooling -> Linear: the pooling
               (mechanisms/attention_pooling.py, a learned query that weighs the frames) is the only
               place where frames meet;
* ``encoder``  the same with positions and ``EncoderBlock``s of transformer_implementation.py between the
               convolutions and the pooling, so frames exchange information before they are pooled.

After training, each model's pooling weights over the frames are compared with the event on 1,000
held-out clips (fixed for every seed): the attention *mass* on the event's frames (a frame is on the event
when its centre lies inside it) against the event's share of the frames, which is what a uniform
weighting would give; and how often the single most-weighted frame is on the event. For ``encoder`` the
same is measured for the pooling weights carried back through the encoder by attention rollout (Abnar &
Zuidema 2020, arXiv:2005.00928), since its pooling reads frames that have already mixed.

Outputs (under ``--out``, default ``runs/audio_attention``): ``results.json`` (with the machine and the load
average it ran under), ``checkpoints/<model>.pt`` (``{"class", "config", "state_dict", "extra"}``, the
layout of the core's ``Transformer.save``, written atomically every ``--checkpoint-every`` steps; a rerun
with the same settings resumes from it), ``audio_attention_<model>.png`` (log-mel spectrograms with the
pooling's attention over time under each) and ``audio_attention_curves.png``. ``--publish`` copies the
results and figures into ``docs/examples/``. The page is docs/examples/audio_attention.md.

Run ``python examples/audio_attention.py --help`` for the options.
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
sys.path.insert(0, str(REPO_ROOT))  # so the imports below work from any directory
sys.path.insert(0, str(REPO_ROOT / "examples"))  # examples/cli.py, examples/plotting.py

import cli  # noqa: E402  (standard library only: the command line is checked before torch loads)

MODELS = ("pool", "encoder")
CLASSES = ("up_chirp", "down_chirp", "tone", "pulses")
SAMPLE_RATE = 8000  # Hz
DURATION = 1.0  # seconds per clip
N_SAMPLES = int(SAMPLE_RATE * DURATION)
N_FFT = 256  # 32 ms window
HOP = 128  # 16 ms between frames
N_MELS = 32
N_FRAMES = 1 + N_SAMPLES // HOP  # torch.stft with center=True: 63
TEST_SEED = 20160930  # the test set never depends on --seed
CHECKPOINT_FORMAT = "audio-attention-v1"

DEFAULTS = dict(steps=500, batch_size=32, test_size=1000, d_model=64, layers=2, heads=4, log_every=25)
QUICK = dict(steps=3, batch_size=8, test_size=24, d_model=16, layers=1, heads=2, log_every=1)


# ----------------------------------------------------------------------------------------------
# The command line, checked before torch is imported
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS + ("all",), default="all", help="which model(s) to train")
    p.add_argument("--steps", type=cli.int_range(1, 10_000_000), default=None,
                   help=f"training steps (default: {DEFAULTS['steps']}; --quick: {QUICK['steps']})")
    p.add_argument("--batch-size", type=cli.int_range(1, 65_536), default=None,
                   help=f"clips per step (default: {DEFAULTS['batch_size']}; --quick: {QUICK['batch_size']})")
    p.add_argument("--lr", type=cli.float_range(0, 10, low_open=True), default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=cli.int_range(0, 10_000_000), default=50,
                   help="linear warm-up steps before the cosine decay")
    p.add_argument("--d-model", type=cli.int_range(2, 4096), default=None,
                   help=f"model width (default: {DEFAULTS['d_model']}; --quick: {QUICK['d_model']})")
    p.add_argument("--layers", type=cli.int_range(1, 64), default=None,
                   help=f"encoder blocks of the encoder model (the pool model has none) "
                        f"(default: {DEFAULTS['layers']}; --quick: {QUICK['layers']})")
    p.add_argument("--heads", type=cli.int_range(1, 64), default=None,
                   help=f"heads of the encoder blocks, dividing --d-model (default: {DEFAULTS['heads']}; "
                        f"--quick: {QUICK['heads']})")
    p.add_argument("--pool-heads", type=cli.int_range(1, 64), default=1,
                   help="heads of the attention pooling, dividing --d-model")
    p.add_argument("--seed", type=cli.int_range(0, 2 ** 32 - 1), default=0,
                   help="seed for initialisation and the training stream")
    p.add_argument("--device", type=cli.device_name, default="auto",
                   help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=cli.int_range(0, 1024), default=1,
                   help="CPU threads for torch (0 = torch's default); one is fastest on a busy machine")
    p.add_argument("--test-size", type=cli.int_range(1, 1_000_000), default=None,
                   help=f"held-out clips to score (default: {DEFAULTS['test_size']}; --quick: {QUICK['test_size']})")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "audio_attention",
                   help="output folder (created if missing)")
    p.add_argument("--log-every", type=cli.int_range(1, 10_000_000), default=None,
                   help=f"steps between progress lines / curve points (default: {DEFAULTS['log_every']})")
    p.add_argument("--checkpoint-every", type=cli.int_range(1, 10_000_000), default=200,
                   help="steps between checkpoints")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and train from scratch")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test in seconds: tiny model, 3 steps, 24 test clips (explicit flags still win)")
    p.add_argument("--publish", action="store_true",
                   help="also copy results.json and the figures into docs/examples/ (for the docs page)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the whole command line with the standard library only: every mistake ends here
    with one line and exit status 2, before any folder is created."""
    p = build_parser()
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    cli.check_output_folder(p, args.out)
    if args.d_model % args.heads:
        p.error(f"--heads {args.heads} must divide --d-model {args.d_model}")
    if args.d_model % args.pool_heads:
        p.error(f"--pool-heads {args.pool_heads} must divide --d-model {args.d_model}")
    need = args.batch_size * 4 * (4 * N_SAMPLES + args.layers * (24 * N_FRAMES * args.d_model
                                                                       + 3 * args.heads * N_FRAMES ** 2))
    cli.check_memory(p, need, f"a training step with --batch-size {args.batch_size}")
    return args


if __name__ == "__main__":
    parse_args()  # a bad command line is refused here, before the slow imports below

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import transformer_implementation as ti  # noqa: E402
from mechanisms.attention_pooling import AttentionPooling  # noqa: E402
from visualize_attention import attention_rollout  # noqa: E402


# ----------------------------------------------------------------------------------------------
# The sounds
# ----------------------------------------------------------------------------------------------

def _tone(freq_start: float, freq_end: float, n: int) -> torch.Tensor:
    """n samples of a sine whose frequency moves linearly from freq_start to freq_end (a chirp; a tone
    when they are equal). The phase is the running integral of the frequency."""
    t = torch.arange(n, dtype=torch.float64) / SAMPLE_RATE  # (n,)
    duration = n / SAMPLE_RATE
    phase = 2 * math.pi * (freq_start * t + (freq_end - freq_start) * t ** 2 / (2 * duration))  # (n,)
    return torch.sin(phase).float()


def _fade(x: torch.Tensor, ms: float = 5.0) -> torch.Tensor:
    """Raised-cosine fade in and out, so an event's edges do not click across every frequency."""
    k = min(int(SAMPLE_RATE * ms / 1000), x.shape[-1] // 2)
    if k == 0:
        return x
    ramp = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, k))  # (k,)
    x = x.clone()
    x[:k] *= ramp
    x[-k:] *= ramp.flip(0)
    return x


def event_wave(rng: random.Random, label: int) -> torch.Tensor:
    """The deciding event of class `label` (its own duration), amplitude 0.4..0.8."""
    amplitude = rng.uniform(0.4, 0.8)
    name = CLASSES[label]
    if name in ("up_chirp", "down_chirp"):
        n = int(rng.uniform(0.12, 0.2) * SAMPLE_RATE)
        lo, hi = 600.0, 2400.0
        wave = _tone(lo, hi, n) if name == "up_chirp" else _tone(hi, lo, n)
        return amplitude * _fade(wave)
    freq = rng.uniform(800.0, 2000.0)
    if name == "tone":
        return amplitude * _fade(_tone(freq, freq, int(rng.uniform(0.12, 0.2) * SAMPLE_RATE)))
    if name == "pulses":
        beep, gap = int(0.03 * SAMPLE_RATE), int(0.03 * SAMPLE_RATE)
        wave = torch.zeros(3 * beep + 2 * gap)
        for i in range(3):
            wave[i * (beep + gap): i * (beep + gap) + beep] = _fade(_tone(freq, freq, beep), ms=3.0)
        return amplitude * wave
    raise ValueError(f"label must be in 0..{len(CLASSES) - 1}, got {label}")


def make_clip(rng: random.Random, label: Optional[int] = None) -> tuple:
    """One clip: (waveform (N_SAMPLES,), label, (event start, event end) in seconds).

    The event goes at a uniform place at least 50 ms from either end; then 1..3 noise bursts go where
    they overlap neither the event nor each other; then the hum and the white-noise floor."""
    label = rng.randrange(len(CLASSES)) if label is None else label
    g = torch.Generator().manual_seed(rng.getrandbits(63))
    wave = torch.zeros(N_SAMPLES)
    event = event_wave(rng, label)
    margin = int(0.05 * SAMPLE_RATE)
    start = rng.randrange(margin, N_SAMPLES - margin - event.shape[0] + 1)
    wave[start:start + event.shape[0]] += event
    busy = [(start, start + event.shape[0])]
    for _ in range(rng.randint(1, 3)):
        for _try in range(50):
            n = int(rng.uniform(0.04, 0.15) * SAMPLE_RATE)
            s = rng.randrange(0, N_SAMPLES - n + 1)
            if all(s + n <= a or s >= b for a, b in busy):
                burst = rng.uniform(0.3, 0.6) * torch.randn(n, generator=g)  # loud, every frequency
                wave[s:s + n] += _fade(burst)
                busy.append((s, s + n))
                break
    hum_freq = rng.uniform(150.0, 250.0)
    wave += rng.uniform(0.1, 0.3) * _tone(hum_freq, hum_freq, N_SAMPLES)
    wave += 0.03 * torch.randn(N_SAMPLES, generator=g)
    return wave, label, (start / SAMPLE_RATE, (start + event.shape[0]) / SAMPLE_RATE)


def make_batch(rng: random.Random, n: int, labels: Optional[Sequence[int]] = None) -> tuple:
    """n clips: waveforms (n, N_SAMPLES), labels (n,), events (n, 2) in seconds."""
    labels = [None] * n if labels is None else list(labels)
    clips = [make_clip(rng, label) for label in labels]
    return (torch.stack([w for w, _, _ in clips]), torch.tensor([lab for _, lab, _ in clips], dtype=torch.long),
            torch.tensor([ev for _, _, ev in clips], dtype=torch.float64))


def make_test_set(size: int) -> tuple:
    """The held-out clips, fixed for every run and seed: each class equally often (up to one)."""
    rng = random.Random(TEST_SEED)
    labels = [i % len(CLASSES) for i in range(size)]
    rng.shuffle(labels)
    return make_batch(rng, size, labels)


# ----------------------------------------------------------------------------------------------
# The log-mel spectrogram, in torch
# ----------------------------------------------------------------------------------------------

def hz_to_mel(f):
    """The HTK mel scale: m = 2595 log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m):
    """The inverse of hz_to_mel."""
    return 700.0 * (10.0 ** (torch.as_tensor(m, dtype=torch.float64) / 2595.0) - 1.0)


def mel_filter_bank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                    f_min: float = 0.0, f_max: Optional[float] = None) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters. Filter m rises linearly from the frequency of mel
    point m to 1 at point m + 1 and falls back to 0 at point m + 2, where the n_mels + 2 points are
    equally spaced on the mel scale from f_min to f_max (default: half the sample rate)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}")
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (K,) bin frequencies
    points = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                      dtype=torch.float64))  # (n_mels + 2,)
    lower, centre, upper = points[:-2, None], points[1:-1, None], points[2:, None]  # (n_mels, 1) each
    rising = (bins[None] - lower) / (centre - lower)  # (n_mels, K)
    falling = (upper - bins[None]) / (upper - centre)  # (n_mels, K)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()  # (n_mels, K)


_BANKS: dict = {}


def log_mel(waves: torch.Tensor) -> torch.Tensor:
    """(B, N_SAMPLES) waveforms -> (B, N_FRAMES, N_MELS) log-mel frames, each clip scaled to zero mean and
    unit variance (so the loudness of a clip does not matter, only its shape)."""
    key = (waves.device, waves.dtype)
    if key not in _BANKS:
        _BANKS[key] = (mel_filter_bank().to(waves.device, waves.dtype),
                       torch.hann_window(N_FFT, device=waves.device, dtype=waves.dtype))
    bank, window = _BANKS[key]
    spec = torch.stft(waves, N_FFT, hop_length=HOP, window=window, center=True, return_complex=True)  # (B, K, T)
    power = spec.abs() ** 2  # (B, K, T)
    mel = torch.log(bank @ power + 1e-6)  # (B, M, T)
    mel = (mel - mel.mean(dim=(1, 2), keepdim=True)) / (mel.std(dim=(1, 2), keepdim=True) + 1e-5)  # (B, M, T)
    return mel.transpose(1, 2)  # (B, T, M)


def frame_times() -> torch.Tensor:
    """The centre time (s) of every frame: frame t is centred on sample t * HOP (center=True)."""
    return torch.arange(N_FRAMES, dtype=torch.float64) * HOP / SAMPLE_RATE  # (T,)


def event_frames(events: torch.Tensor) -> torch.Tensor:
    """(n, 2) event (start, end) in seconds -> (n, T) bool: frames whose centre lies in the event."""
    t = frame_times()[None]  # (1, T)
    return (t >= events[:, :1]) & (t <= events[:, 1:])  # (n, T)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class AudioAttentionClassifier(nn.Module):
    """Log-mel frames -> two small convolutions over time -> sinusoidal positions -> the core's
    EncoderBlocks -> AttentionPooling (one learned query) -> Linear.

    The convolutions (kernel 3, GELU, as in Whisper's front end) give each token a view of 5 frames
    (80 ms): enough to tell a rising sweep from a falling one and a beep train from a steady tone, which
    a single frame cannot, so the attention layers need not learn that from scratch.

    With num_layers = 0 it is the ``pool`` model: no positions, no blocks, the pooling reads the
    convolutions' features directly (a weighted mean is order-free, so positions would add nothing there
    that the convolutions do not already see).

    forward(frames (B, T, n_mels), need_weights=False) -> logits (B, classes), or (logits, the pooling's
    weights over the frames (B, pool_heads, T), the blocks' weights [(B, H, T, T)] * num_layers)."""

    def __init__(self, n_mels: int, num_classes: int, d_model: int, num_layers: int, num_heads: int,
                 ff_dim: int, pool_heads: int = 1, max_frames: int = N_FRAMES, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = dict(n_mels=n_mels, num_classes=num_classes, d_model=d_model, num_layers=num_layers,
                           num_heads=num_heads, ff_dim=ff_dim, pool_heads=pool_heads, max_frames=max_frames,
                           dropout=dropout)
        self.conv1 = nn.Conv1d(n_mels, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1)
        self.pos = ti.SinusoidalPositionalEncoding(d_model, max_frames)
        self.blocks = nn.ModuleList(
            ti.EncoderBlock(d_model, num_heads, ff_dim, dropout, norm_first=True, activation="gelu")
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.pool = AttentionPooling(d_model, num_queries=1, num_heads=pool_heads)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, frames: torch.Tensor, need_weights: bool = False):
        x = F.gelu(self.conv1(frames.transpose(1, 2)))  # (B, E, T)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T, E)
        if self.blocks:
            x = self.pos(x)  # (B, T, E)
        block_weights = []
        for block in self.blocks:
            if need_weights:
                x, w = block(x, need_weights=True)  # (B, T, E), (B, H, T, T)
                block_weights.append(w)
            else:
                x = block(x)  # (B, T, E)
        pooled, weights = self.pool(self.norm(x), need_weights=True)  # (B, 1, E), (B, Hp, 1, T)
        logits = self.head(pooled[:, 0])  # (B, classes)
        return (logits, weights[:, :, 0], block_weights) if need_weights else logits  # weights (B, Hp, T)


def model_config(name: str, args) -> dict:
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    return dict(n_mels=N_MELS, num_classes=len(CLASSES), d_model=args.d_model,
                num_layers=args.layers if name == "encoder" else 0, num_heads=args.heads, ff_dim=2 * args.d_model,
                pool_heads=args.pool_heads)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# Evaluation: accuracy, and attention on the event
# ----------------------------------------------------------------------------------------------

def pooling_rollout(pool_weights: torch.Tensor, block_weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The pooling's weights carried back through the encoder blocks to the input frames.

    pool_weights (n, T), block_weights L x (n, H, T, T). Attention rollout's R = Â_L ... Â_1 (Â = the
    head-averaged weights with the residual added, rows renormalised; examples/visualize_attention.py),
    then w R: how much each input frame feeds the pooled vector through the attention paths."""
    if not block_weights:
        return pool_weights
    rows = []
    for b in range(pool_weights.shape[0]):
        R = attention_rollout([w[b] for w in block_weights])[-1].float()  # (T, T)
        rows.append(pool_weights[b] @ R)  # (T,)
    return torch.stack(rows)  # (n, T)


def attention_on_event(weights: torch.Tensor, on: torch.Tensor) -> tuple:
    """Per clip: the weights' mass on the event's frames, and whether the top frame is on the event.
    weights (n, T), rows summing to 1; on (n, T) bool. Returns ((n,), (n,))."""
    mass = (weights * on).sum(dim=1)  # (n,)
    top_on = on.gather(1, weights.argmax(dim=1, keepdim=True)).squeeze(1).float()  # (n,)
    return mass, top_on


@torch.no_grad()
def evaluate(model: nn.Module, waves, labels, events, device, batch_size: int = 250) -> dict:
    """Accuracy, and how much of the pooling's attention (and, with encoder blocks, of its rollout) lies
    on the deciding event, against the event's share of the frames."""
    model.eval()
    preds, weights, rolled = [], [], []
    for i in range(0, len(labels), batch_size):
        logits, w, blocks = model(log_mel(waves[i:i + batch_size].to(device)), need_weights=True)
        w = w.float().mean(dim=1).cpu()  # (b, T): mean over the pooling's heads
        preds.append(logits.argmax(-1).cpu())
        weights.append(w)
        rolled.append(pooling_rollout(w, [x.cpu() for x in blocks]))
    pred, w, roll = torch.cat(preds), torch.cat(weights), torch.cat(rolled)  # (n,), (n, T), (n, T)
    on = event_frames(events)  # (n, T)
    correct = pred == labels
    mass, top_on = attention_on_event(w, on)
    share = on.float().mean(dim=1)  # (n,)
    by_class = {name: dict(accuracy=correct[labels == c].float().mean().item(),
                           attention_mass_on_event=mass[labels == c].mean().item())
                for c, name in enumerate(CLASSES) if (labels == c).any()}
    out = dict(accuracy=correct.float().mean().item(), by_class=by_class,
               attention_mass_on_event=mass.mean().item(),
               attention_mass_on_event_when_correct=mass[correct].mean().item() if correct.any() else None,
               event_share_of_frames=share.mean().item(),
               top_frame_on_event=top_on.mean().item(),
               mass_over_share=(mass.mean() / share.mean()).item(),
               predictions=pred, weights=w)
    if len(model.blocks):
        roll_mass, roll_top = attention_on_event(roll, on)
        out.update(rollout_mass_on_event=roll_mass.mean().item(), rollout_top_frame_on_event=roll_top.mean().item(),
                   rollout_mass_over_share=(roll_mass.mean() / share.mean()).item())
    return out


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file, then rename: a crash mid-write never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location=None) -> tuple:
    """(model in eval mode, extra) from a checkpoint this script wrote; ValueError naming what is wrong."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or not {"class", "config", "state_dict", "extra"} <= payload.keys() \
            or payload["class"] != "AudioAttentionClassifier":
        raise ValueError(f"{path}: not a checkpoint of examples/audio_attention.py (expected a dict with 'class' "
                         f"= 'AudioAttentionClassifier', 'config', 'state_dict' and 'extra')")
    model = AudioAttentionClassifier(**payload["config"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["extra"]


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s"


def train(name: str, args, device, log=None) -> dict:
    """Train (or resume) model `name` on the clip stream; returns the model, its curve and its time."""
    log = log or (lambda line: print(line, flush=True))  # flushed: progress shows even when piped to a file
    torch.manual_seed(args.seed)  # the same initialisation whether run alone or after the other model
    config = model_config(name, args)
    model = AudioAttentionClassifier(**config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    settings = dict(seed=args.seed, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup)
    ckpt_path = Path(args.out) / "checkpoints" / f"{name}.pt"
    step, curve, train_seconds = 0, [], 0.0

    if ckpt_path.exists() and not args.restart:
        try:
            payload = torch.load(ckpt_path, map_location=device, weights_only=True)
            extra = payload["extra"]
            ok = (payload["class"] == "AudioAttentionClassifier" and extra.get("format") == CHECKPOINT_FORMAT
                  and payload["config"] == config and extra["settings"] == settings and extra["step"] <= args.steps)
        except Exception:  # a torn or foreign file
            ok = False
        if ok:
            model.load_state_dict(payload["state_dict"])
            optimizer.load_state_dict(extra["optimizer"])
            step, curve, train_seconds = extra["step"], extra["curve"], extra["train_seconds"]
            log(f"[{name}] resuming from {ckpt_path} at step {step}")
        else:
            log(f"[{name}] ignoring {ckpt_path}: unreadable, or written with other settings or more steps")

    def checkpoint():
        extra = dict(format=CHECKPOINT_FORMAT, optimizer=optimizer.state_dict(), step=step, curve=curve,
                     train_seconds=train_seconds + (time.perf_counter() - t0), settings=settings)
        atomic_save({"class": "AudioAttentionClassifier", "config": config, "state_dict": model.state_dict(),
                     "extra": extra}, ckpt_path)

    model.train()
    window, t0, start_step, cpu0 = [], time.perf_counter(), step, time.process_time()
    interactive = sys.stdout.isatty()
    while step < args.steps:
        # The batch of step k depends only on (seed, k), so a resumed run hears the same clips.
        rng = random.Random(args.seed * 1_000_003 + step)
        waves, labels, _ = make_batch(rng, args.batch_size)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        logits = model(log_mel(waves.to(device)))  # (B, classes)
        loss = F.cross_entropy(logits, labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append((loss.item(), (logits.argmax(-1).cpu() == labels).float().mean().item()))

        if step % args.log_every == 0 or step == args.steps:
            curve.append((step, sum(x for x, _ in window) / len(window), sum(a for _, a in window) / len(window)))
            window = []
            elapsed = time.perf_counter() - t0
            rate = (step - start_step) / max(elapsed, 1e-9)
            eta = (args.steps - step) / max(rate, 1e-9)
            line = (f"[{name}] step {step:>5d}/{args.steps}  loss {curve[-1][1]:.4f}  train acc {curve[-1][2]:.3f}  "
                    f"{rate:5.2f} steps/s  elapsed {_fmt_seconds(elapsed)}  ETA {_fmt_seconds(eta)}")
            if interactive:
                print("\r" + line, end="" if step < args.steps else "\n", flush=True)
            else:
                log(line)
        if step % args.checkpoint_every == 0 or step == args.steps:
            checkpoint()
    train_seconds += time.perf_counter() - t0
    return dict(model=model, curve=curve, train_seconds=train_seconds, cpu_seconds=time.process_time() - cpu0)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def plot_examples(name: str, waves, labels, events, result: dict, path: Path, per_class: int = 2) -> Path:
    from plotting import plot_spectrogram_attention

    idx = []
    for c in range(len(CLASSES)):
        idx += [int(i) for i in (labels == c).nonzero().flatten()[:per_class]]
    mels = log_mel(waves[idx])  # (n, T, M)
    titles = []
    for i in idx:
        pred = CLASSES[int(result["predictions"][i])]
        on = event_frames(events[i:i + 1])[0]
        mass = float((result["weights"][i] * on).sum())
        titles.append(f"{CLASSES[int(labels[i])]}" + ("" if pred == CLASSES[int(labels[i])] else f" (said {pred})")
                      + f": {mass:.0%} of the attention on the event ({float(on.float().mean()):.0%} of the frames)")
    what = {"pool": "pool model (convolutions, then attention pooling)",
            "encoder": "encoder model (convolutions, encoder blocks, then attention pooling)"}[name]
    return plot_spectrogram_attention([m.T for m in mels], [result["weights"][i] for i in idx], path,
                                      frame_seconds=HOP / SAMPLE_RATE,
                                      events=[tuple(events[i].tolist()) for i in idx], titles=titles,
                                      title=f"{what}: log-mel spectrogram, and the pooling's weight on each "
                                            f"frame; the deciding event is boxed / shaded")


def plot_curves(curves: dict, path: Path) -> Path:
    import plotting  # noqa: F401  (selects matplotlib's Agg backend before pyplot draws)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, curve in curves.items():
        ax1.plot([s for s, _, _ in curve], [loss for _, loss, _ in curve], label=name)
        ax2.plot([s for s, _, _ in curve], [acc for _, _, acc in curve], label=name)
    ax2.axhline(1 / len(CLASSES), color="grey", linestyle=":", linewidth=1)
    ax1.set_ylabel("training cross-entropy (nats)")
    ax2.set_ylabel("training accuracy (per window)")
    for ax in (ax1, ax2):
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def machine_info(device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(), device=str(device),
                load_average_1_5_15_at_start=cli.load_average())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = cli.pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # only now: every check that can fail has passed

    names = MODELS if args.model == "all" else (args.model,)
    waves, labels, events = make_test_set(args.test_size)
    print(f"{DURATION:g} s clips at {SAMPLE_RATE} Hz -> {N_FRAMES} frames x {N_MELS} mel bands; classes {CLASSES}; "
          f"{args.test_size} held-out test clips; device {device}")
    command = "python examples/audio_attention.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = dict(command=command.strip(), machine=machine_info(device), classes=list(CLASSES),
                   sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop=HOP, n_mels=N_MELS, frames=N_FRAMES,
                   steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   test_size=args.test_size, models={})
    curves, figure_paths = {}, []
    for name in names:
        trained = train(name, args, device)
        model = trained["model"]
        t0 = time.perf_counter()
        r = evaluate(model, waves, labels, events, device)
        results["models"][name] = dict(
            {k: v for k, v in r.items() if k not in ("predictions", "weights")},
            config=model_config(name, args), parameters=num_parameters(model),
            train_seconds=round(trained["train_seconds"], 2),
            train_cpu_seconds_this_run=round(trained["cpu_seconds"], 2),
            eval_seconds=round(time.perf_counter() - t0, 2), curve=trained["curve"])
        rollout = (f"; through the encoder by rollout {r['rollout_mass_on_event']:.2%}"
                   if "rollout_mass_on_event" in r else "")
        print(f"[{name}] accuracy {r['accuracy']:.2%}  attention mass on the event {r['attention_mass_on_event']:.2%} "
              f"(the event is {r['event_share_of_frames']:.2%} of the frames; {r['mass_over_share']:.1f}x{rollout})  "
              f"top frame on the event {r['top_frame_on_event']:.2%}  params {num_parameters(model):,}  "
              f"train {trained['train_seconds']:.1f}s")
        curves[name] = trained["curve"]
        if not args.no_figures:
            figure_paths.append(plot_examples(name, waves, labels, events, r, out / f"audio_attention_{name}.png",
                                              per_class=1 if args.quick else 2))
    if not args.no_figures:
        figure_paths.append(plot_curves(curves, out / "audio_attention_curves.png"))
    results["total_seconds"] = round(time.perf_counter() - t_start, 2)
    # CPU time of this process since main() began (imports excluded): on a shared machine this, not the
    # wall clock, is what the run would take alone on one core.
    results["total_cpu_seconds"] = round(time.process_time() - cpu_start, 2)
    results["machine"]["load_average_1_5_15_at_end"] = cli.load_average()
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    print(f"wrote {out / 'results.json'}; total {results['total_seconds']:.1f}s wall clock, "
          f"{results['total_cpu_seconds']:.1f}s CPU")

    if args.publish:
        docs = REPO_ROOT / "docs" / "examples"
        (docs / "results").mkdir(parents=True, exist_ok=True)
        (docs / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "results.json", docs / "results" / "audio_attention.json")
        for path in figure_paths:
            shutil.copyfile(path, docs / "figures" / path.name)
        print(f"copied results and {len(figure_paths)} figures into {docs}")
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: the last checkpoint (every --checkpoint-every steps) is kept
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
