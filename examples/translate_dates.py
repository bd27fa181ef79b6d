"""Translate dates written the many ways people write them into ISO ``YYYY-MM-DD``, three ways.

Attention was invented for machine translation: a decoder writing the output one symbol at a time
learns *where in the source to look* for each symbol. This example is that lesson at a size that
trains in minutes on a laptop CPU, with no download: the "language pair" is

    "3rd of March 2021" / "Mar 3, 21" / "03/03/2021" / "Wednesday, March 3, 2021" / ...  ->  "2021-03-03"

generated on the fly, character by character. Three models see the same data for the same number of
steps and are scored on the same 2,000 held-out calendar dates (no held-out date is ever seen in
training, in any format):

* ``bahdanau``    a bidirectional-GRU encoder and a GRU decoder with additive attention
                  (mechanisms/additive_attention.py): the decoder's *previous* state asks the question.
* ``luong``       the same encoder, a GRU decoder with multiplicative attention, "general" score
                  (mechanisms/multiplicative_attention.py): the decoder's *current* state asks.
* ``transformer`` the core's EncoderDecoderTransformer (transformer_implementation.py).

Rules that make every source string unambiguous (the model could not learn a guess):

* the dates run from 1950-01-01 to 2049-12-31, leap days included;
* a two-digit year ``yy`` means 20yy when yy <= 49 and 19yy when yy >= 50, which maps each of the
  100 two-digit years to exactly one year of the range;
* numbers separated by slashes are US order, month first (``03/14/2021``, ``3/14/21``);
* numbers separated by dots are day first (``14.03.2021``, ``14.03.21``), unless the first field has
  four digits, which makes it a year (``2021.03.14``, year-month-day);
* weekday names are always the true weekday of the date.

Outputs (under ``--out``, default ``runs/translate_dates``): ``results.json`` (with the machine and the
load average it ran under), ``checkpoints/<model>.pt`` (written atomically every ``--checkpoint-every``
steps; a rerun resumes from it), ``translate_dates_curves.png`` and
``translate_dates_alignment_<model>.png``. ``--publish`` also copies the results and figures into
``docs/examples/``. The page is docs/examples/translate_dates.md.

Checkpoints: ``transformer.pt`` is the core's format, written by ``EncoderDecoderTransformer.save`` with
this script's training state (optimizer, step, curve, settings) as its ``extra``, so
``EncoderDecoderTransformer.load("runs/translate_dates/checkpoints/transformer.pt")`` opens it. The two
recurrent models are not core models; their checkpoints keep this script's own layout, a dict with
``model`` (the state dict), ``optimizer``, ``step``, ``curve``, ``train_seconds`` and ``config``.

Run ``python examples/translate_dates.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so the imports below work from any directory
sys.path.insert(0, str(REPO_ROOT / "examples"))  # examples/cli.py, examples/plotting.py

import cli  # noqa: E402  (standard library only: the command line is checked before torch loads)

MODELS = ("bahdanau", "luong", "transformer")
DEFAULT_LR = {"bahdanau": 3e-3, "luong": 3e-3, "transformer": 2e-3}
TRANSFORMER_CHECKPOINT = "translate-dates-transformer-v1"  # the "format" inside a transformer.pt's extra

# ----------------------------------------------------------------------------------------------
# The data: one calendar date, many ways to write it
# ----------------------------------------------------------------------------------------------

FIRST_DATE = dt.date(1950, 1, 1)
LAST_DATE = dt.date(2049, 12, 31)
PIVOT = 50  # two-digit years: 00..49 -> 2000..2049, 50..99 -> 1950..1999
TEST_SIZE = 2000
TEST_SEED = 20240229  # the test set is fixed: it never depends on --seed
TARGET_LEN = 10  # "YYYY-MM-DD"; the decoder writes these 10 characters and then eos
MAX_SOURCE_LEN = 60  # longer sources are refused (the longest generated one has 37 characters)

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]  # date.weekday()


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 3 -> '3rd', 4 -> '4th', 11..13 -> 'th', 21 -> '21st', 22 -> '22nd'."""
    if 11 <= n % 100 <= 13:
        return f"{n}th"
    return f"{n}" + {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def two_digit_year(year: int) -> str:
    """The two-digit form of a year in the range; `full_year` is its inverse."""
    if not FIRST_DATE.year <= year <= LAST_DATE.year:
        raise ValueError(f"year must lie in {FIRST_DATE.year}..{LAST_DATE.year}, got {year}")
    return f"{year % 100:02d}"


def full_year(yy: int) -> int:
    """The pivot rule: 00..49 -> 2000..2049 and 50..99 -> 1950..1999."""
    if not 0 <= yy <= 99:
        raise ValueError(f"yy must be a two-digit year 0..99, got {yy}")
    return 2000 + yy if yy < PIVOT else 1900 + yy


def _fields(d: dt.date) -> dict:
    month, weekday = MONTHS[d.month - 1], WEEKDAYS[d.weekday()]
    return dict(d=d.day, m=d.month, DD=f"{d.day:02d}", MM=f"{d.month:02d}", YYYY=f"{d.year:04d}",
                yy=two_digit_year(d.year), Month=month, Mon=month[:3], Weekday=weekday, Wd=weekday[:3],
                ord=ordinal(d.day))


# Each format is a str.format template over the fields above. The name says what it is; the
# comment shows 2021-03-03 written that way.
FORMATS = {
    "ordinal_of": "{ord} of {Month} {YYYY}",                # 3rd of March 2021
    "mon_d_yy": "{Mon} {d}, {yy}",                          # Mar 3, 21
    "us_slash": "{MM}/{DD}/{YYYY}",                         # 03/03/2021   (month first)
    "us_slash_short": "{m}/{d}/{yy}",                       # 3/3/21       (month first)
    "weekday_long": "{Weekday}, {Month} {d}, {YYYY}",       # Wednesday, March 3, 2021
    "d_month_yyyy": "{d} {Month} {YYYY}",                   # 3 March 2021
    "year_dot": "{YYYY}.{MM}.{DD}",                         # 2021.03.03   (4-digit first: year first)
    "month_ordinal": "{Month} {ord}, {YYYY}",               # March 3rd, 2021
    "d_mon_dash": "{d}-{Mon}-{YYYY}",                       # 3-Mar-2021
    "eu_dot_short": "{DD}.{MM}.{yy}",                       # 03.03.21     (day first)
    "eu_dot": "{d}.{m}.{YYYY}",                             # 3.3.2021     (day first)
    "wd_d_mon": "{Wd} {d} {Mon} {YYYY}",                    # Wed 3 Mar 2021
    "compact": "{YYYY}{MM}{DD}",                            # 20210303
    "upper": "{MON} {DD} {YYYY}",                           # MAR 03 2021
    "lower": "{month} {d} {YYYY}",                          # march 3 2021
    "weekday_the_ordinal": "{Weekday} the {ord} of {Month}, {YYYY}",  # Wednesday the 3rd of March, 2021
    "mon_apostrophe": "{Mon} {d} '{yy}",                    # Mar 3 '21
}


def render(d: dt.date, fmt: str) -> str:
    """Write date `d` in format `fmt` (a key of FORMATS)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    if not FIRST_DATE <= d <= LAST_DATE:
        raise ValueError(f"date must lie in {FIRST_DATE}..{LAST_DATE}, got {d}")
    f = _fields(d)
    f.update(MON=f["Mon"].upper(), month=f["Month"].lower())
    return FORMATS[fmt].format(**f)


def iso(d: dt.date) -> str:
    """The target: ISO 8601 YYYY-MM-DD."""
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}"


def is_held_out(d: dt.date) -> bool:
    """About one date in ten is held out for testing, chosen by a hash of the date itself.

    Hashing the *calendar date* (not the string) means a held-out date never appears in training
    in any format, and the split never changes between runs, seeds or machines."""
    return zlib.crc32(iso(d).encode()) % 10 == 0


def all_dates() -> list:
    n = (LAST_DATE - FIRST_DATE).days + 1
    return [FIRST_DATE + dt.timedelta(days=i) for i in range(n)]


def split_dates() -> tuple:
    """(training dates, held-out dates), disjoint, covering the whole range."""
    dates = all_dates()
    return [d for d in dates if not is_held_out(d)], [d for d in dates if is_held_out(d)]


def make_test_set(size: int = TEST_SIZE) -> list:
    """`size` (source, target, format) triples over distinct held-out dates; fixed for every run."""
    _, held_out = split_dates()
    if not 1 <= size <= len(held_out):
        raise ValueError(f"test size must lie in 1..{len(held_out)}, got {size}")
    rng = random.Random(TEST_SEED)
    dates = rng.sample(held_out, size)
    names = sorted(FORMATS)
    fmts = [names[i % len(names)] for i in range(size)]  # every format equally often
    rng.shuffle(fmts)
    return [(render(d, f), iso(d), f) for d, f in zip(dates, fmts)]


def sample_pairs(rng: random.Random, dates: Sequence[dt.date], n: int) -> list:
    """`n` random (source, target) pairs: a uniform date from `dates`, a uniform format."""
    names = sorted(FORMATS)
    out = []
    for _ in range(n):
        d = rng.choice(dates)
        out.append((render(d, rng.choice(names)), iso(d)))
    return out


def load_pairs(path) -> tuple:
    """Your own data for --data: a UTF-8 text file with one ``source<TAB>YYYY-MM-DD`` pair per line.

    Lines are split into training and test by the same hash of the *target date* as the generated
    data, so no test date is trained on. Returns (train pairs, test triples (source, target, "file"))."""
    train, test = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'source<TAB>YYYY-MM-DD', got {line!r}")
        source, target = parts[0].strip(), parts[1].strip()
        try:
            date = dt.date.fromisoformat(target)
        except ValueError:
            date = None
        if date is None or len(target) != TARGET_LEN:
            raise ValueError(f"{path}:{number}: target must be an ISO date YYYY-MM-DD, got {target!r}")
        if not 1 <= len(source) <= MAX_SOURCE_LEN:
            raise ValueError(f"{path}:{number}: source must have 1..{MAX_SOURCE_LEN} characters, "
                             f"got {len(source)}: {source!r}")
        if is_held_out(date):
            test.append((source, target, "file"))
        else:
            train.append((source, target))
    if not train or not test:
        raise ValueError(f"{path}: need pairs on both sides of the held-out split, got {len(train)} for "
                         f"training and {len(test)} held out; add more distinct dates")
    random.Random(TEST_SEED).shuffle(test)
    return train, test


# ----------------------------------------------------------------------------------------------
# Character vocabularies
# ----------------------------------------------------------------------------------------------

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


class Vocab:
    """Characters <-> ids. Id 0 is padding (the models rely on that), then bos, eos, unk."""

    def __init__(self, chars: Sequence[str]) -> None:
        self.itos = [PAD, BOS, EOS, UNK] + sorted(set(chars))
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list:
        ids = [self.stoi.get(c, self.unk_id) for c in text]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Characters up to the first eos; bos and pad are skipped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.itos[i])
        return "".join(out)


def _source_alphabet() -> str:
    words = MONTHS + WEEKDAYS + ["of", "the", "st", "nd", "rd", "th"]
    text = "".join(words) + "".join(w.upper() for w in words) + "".join(w.lower() for w in words)
    return text + "0123456789 ,./-'"


SRC_VOCAB = Vocab(_source_alphabet())
TGT_VOCAB = Vocab("0123456789-")


def encode_batch(pairs: Sequence[tuple], device) -> dict:
    """Pad a list of (source, target) pairs into tensors.

    src (B, S) right-padded with 0, src_len (B,), tgt_in = bos + target (B, T), tgt_out = target + eos
    (B, T). Every target has the same length, so the target side needs no padding."""
    src = [SRC_VOCAB.encode(s) for s, _ in pairs]
    S = max(len(s) for s in src)
    src_ids = torch.tensor([s + [SRC_VOCAB.pad_id] * (S - len(s)) for s in src], dtype=torch.long)  # (B, S)
    src_len = torch.tensor([len(s) for s in src], dtype=torch.long)  # (B,)
    tgt = [TGT_VOCAB.encode(t) for _, t in pairs]
    tgt_in = torch.tensor([[TGT_VOCAB.bos_id] + t for t in tgt], dtype=torch.long)  # (B, T)
    tgt_out = torch.tensor([t + [TGT_VOCAB.eos_id] for t in tgt], dtype=torch.long)  # (B, T)
    return dict(src=src_ids.to(device), src_len=src_len.to(device), tgt_in=tgt_in.to(device),
                tgt_out=tgt_out.to(device))


# ----------------------------------------------------------------------------------------------
# The command line, checked before torch is imported
# ----------------------------------------------------------------------------------------------

def estimate_batch_bytes(batch_size: int) -> int:
    """A generous estimate of a training step's memory for the largest model (the transformer) at the
    longest source (MAX_SOURCE_LEN = 60 characters), per example: 2 encoder and 2 decoder layers, each
    keeping about 16 (S, 64) float32 activations and its 4 heads' (S, S) attention weights with their
    gradients for the backward pass. About 1.4 MB per example; the weights are negligible."""
    S, E, H, layers = MAX_SOURCE_LEN, 64, 4, 4
    return batch_size * layers * 4 * (16 * S * E + 2 * H * S * S)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS + ("all",), default="all", help="which model(s) to train")
    p.add_argument("--steps", type=cli.int_range(1, 10_000_000), default=1000,
                   help="training steps per model (the shared budget)")
    p.add_argument("--batch-size", type=cli.int_range(1, 1_048_576), default=128,
                   help="dates per training step; refused when its estimated memory exceeds half the RAM")
    p.add_argument("--lr", type=cli.float_range(0, 10, low_open=True), default=None,
                   help="peak Adam learning rate (default: 3e-3 for the GRUs, 2e-3 for the transformer)")
    p.add_argument("--warmup", type=cli.int_range(0, 10_000_000), default=100,
                   help="linear warm-up steps before the cosine decay")
    p.add_argument("--seed", type=cli.int_range(0, 2 ** 32 - 1), default=0,
                   help="seed for initialisation and the training stream")
    p.add_argument("--device", type=cli.device_name, default="auto",
                   help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=cli.int_range(0, 1024), default=1,
                   help="CPU threads for torch; these models are too small to gain much from more, and on a "
                        "busy machine extra threads mostly wait for each other (0 = torch's default)")
    p.add_argument("--test-size", type=cli.int_range(1, 1_000_000), default=TEST_SIZE,
                   help="held-out dates to score on (at most the number of held-out dates or pairs)")
    p.add_argument("--data", type=Path, default=None, metavar="PATH",
                   help="your own pairs instead of generated ones: one 'source<TAB>YYYY-MM-DD' per line")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "translate_dates",
                   help="output folder (created if missing)")
    p.add_argument("--log-every", type=cli.int_range(1, 10_000_000), default=50,
                   help="steps between progress lines / curve points")
    p.add_argument("--checkpoint-every", type=cli.int_range(1, 10_000_000), default=500,
                   help="steps between checkpoints")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints and train from scratch")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--publish", action="store_true",
                   help="also copy results.json and the figures into docs/examples/ (for the docs page)")
    p.add_argument("--translate", action="append", default=[], metavar="TEXT",
                   help=f"after training, translate TEXT (1 to {MAX_SOURCE_LEN} characters) with each model "
                        "(may be repeated)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the whole command line, --data's contents included, with the standard library only:
    every mistake ends here with one line and exit status 2, before any folder is created.
    ``args.pairs`` holds (train pairs, test triples) read from --data, or None."""
    p = build_parser()
    args = p.parse_args(argv)
    cli.check_output_folder(p, args.out)
    cli.check_memory(p, estimate_batch_bytes(args.batch_size), f"a training step with --batch-size {args.batch_size}")
    for text in args.translate:
        if not 1 <= len(text) <= MAX_SOURCE_LEN:
            p.error(f"--translate {text!r}: must have 1 to {MAX_SOURCE_LEN} characters, got {len(text)}")
    args.pairs = None
    if args.data is not None:
        cli.check_input_file(p, args.data, "--data")
        try:
            args.pairs = load_pairs(args.data)
        except UnicodeDecodeError as exc:
            p.error(f"--data {args.data}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        except (ValueError, OSError) as exc:
            p.error(f"--data {exc}")
    else:
        held_out = len(split_dates()[1])
        if args.test_size > held_out:
            p.error(f"--test-size {args.test_size}: there are only {held_out} held-out dates")
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # a bad command line is refused here, before the slow imports below

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import transformer_implementation as ti  # noqa: E402
from mechanisms.additive_attention import AdditiveAttention  # noqa: E402
from mechanisms.multiplicative_attention import LuongAttention  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Greedy decoding, shared by the two recurrent models
# ----------------------------------------------------------------------------------------------

def greedy_loop(step: Callable, state, batch_size: int, bos_id: int, eos_id: int, pad_id: int,
                max_new_tokens: int, device) -> tuple:
    """Feed each row's own last output back in until every row has written eos.

    `step(prev_ids (B,), state) -> (logits (B, V), weights (B, Tk), state)` advances the decoder by
    one token. Rows finish independently: once a row has written eos, its later outputs are replaced
    by `pad_id` (the row keeps being computed, because the batch moves in lockstep, but its result
    no longer changes). The loop stops as soon as every row has finished.

    Returns ids (B, 1 + n) starting with bos, n <= max_new_tokens, and the attention weights
    (B, n, Tk) of each written token."""
    ids = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)  # (B, 1)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)  # (B,)
    all_weights = []
    for _ in range(max_new_tokens):
        logits, weights, state = step(ids[:, -1], state)  # (B, V), (B, Tk)
        nxt = logits.argmax(dim=-1)  # (B,)
        nxt = nxt.masked_fill(finished, pad_id)  # (B,)  finished rows only pad
        ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)  # (B, t + 1)
        all_weights.append(weights)
        finished = finished | (nxt == eos_id)
        if bool(finished.all()):
            break
    return ids, torch.stack(all_weights, dim=1)  # (B, 1 + n), (B, n, Tk)


# ----------------------------------------------------------------------------------------------
# The recurrent encoder-decoders
# ----------------------------------------------------------------------------------------------

def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first lengths[b] steps of each row of x (B, S, ...) and leave the padding after
    them in place: [a b c pad pad] -> [c b a pad pad]. Applying it twice gives x back."""
    B, S = x.shape[:2]
    t = torch.arange(S, device=x.device).expand(B, S)  # (B, S)
    lengths = lengths.to(x.device).unsqueeze(1)  # (B, 1)
    index = torch.where(t < lengths, lengths - 1 - t, t)  # (B, S)
    index = index.view(B, S, *([1] * (x.dim() - 2))).expand_as(x)  # (B, S, ...)
    return x.gather(1, index)  # (B, S, ...)


class GRUEncoder(nn.Module):
    """Embedding + bidirectional GRU over a right-padded batch, written as two one-way GRUs.

    The forward GRU reads each row left to right; the padding comes after the real characters, so
    it cannot change their states. The backward GRU reads each row *reversed within its length*
    ([a b c pad] -> [c b a pad]), so it too starts at the row's own last character and not at the
    padding. (nn.GRU(bidirectional=True) on the padded batch would start the backward pass in the
    padding; packing the batch fixes that as well, but costs more time on a CPU.)"""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.forward_rnn = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        self.backward_rnn = nn.GRU(embed_dim, hidden_dim, batch_first=True)

    def forward(self, src: torch.Tensor, src_len: torch.Tensor) -> tuple:
        """src (B, S), src_len (B,) -> memory (B, S, 2H), mask (B, 1, 1, S), final states (2, B, H)."""
        B, S = src.shape
        x = self.embed(src)  # (B, S, E)
        fwd, _ = self.forward_rnn(x)  # (B, S, H)
        bwd, _ = self.backward_rnn(reverse_within_length(x, src_len))  # (B, S, H), reversed order
        bwd = reverse_within_length(bwd, src_len)  # (B, S, H)  back in source order
        memory = torch.cat([fwd, bwd], dim=-1)  # (B, S, 2H): h_j = [forward h_j; backward h_j]
        last = (src_len - 1).to(src.device).view(B, 1, 1).expand(B, 1, fwd.shape[-1])  # (B, 1, H)
        # The forward summary is the state after the last real character; the backward one is the
        # state after reading the whole row from its end back to position 0.
        final = torch.stack([fwd.gather(1, last).squeeze(1), bwd[:, 0]])  # (2, B, H)
        mask = (src != 0).view(B, 1, 1, S)  # (B, 1, 1, S)  True = a real character, may attend
        return memory, mask, final


class RNNSearch(nn.Module):
    """Bahdanau, Cho & Bengio (2014): the decoder's previous state s_{i-1} queries the encoder states.

        c_i = AdditiveAttention(s_{i-1}, h)          (which characters matter for output i?)
        s_i = GRU([emb(y_{i-1}); c_i], s_{i-1})
        p(y_i) = softmax(W_o [s_i; c_i; emb(y_{i-1})])

    s_0 = tanh(W_s h_1^backward), the backward encoder's summary of the whole source, as in the paper.
    The attention comes *before* the recurrent step, so training must loop over target positions."""

    def __init__(self, src_vocab: int, tgt_vocab: int, embed_dim: int = 32, enc_hidden: int = 32,
                 dec_hidden: int = 64, attn_hidden: int = 32) -> None:
        super().__init__()
        self.encoder = GRUEncoder(src_vocab, embed_dim, enc_hidden)
        self.init_state = nn.Linear(enc_hidden, dec_hidden)  # W_s
        self.embed = nn.Embedding(tgt_vocab, embed_dim)
        self.attention = AdditiveAttention(query_dim=dec_hidden, key_dim=2 * enc_hidden, hidden_dim=attn_hidden)
        self.cell = nn.GRUCell(embed_dim + 2 * enc_hidden, dec_hidden)
        self.out = nn.Linear(dec_hidden + 2 * enc_hidden + embed_dim, tgt_vocab)

    def start(self, src: torch.Tensor, src_len: torch.Tensor) -> tuple:
        memory, mask, h_n = self.encoder(src, src_len)
        s0 = torch.tanh(self.init_state(h_n[1]))  # (B, Hd)  from the backward direction
        return s0, memory, mask

    def step(self, y_prev: torch.Tensor, s_prev: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> tuple:
        """One output token: y_prev (B,), s_prev (B, Hd) -> logits (B, V), weights (B, S), s (B, Hd)."""
        context, weights = self.attention(s_prev.unsqueeze(1), memory, mask=mask, need_weights=True)
        context = context.squeeze(1)  # (B, 2He)
        e = self.embed(y_prev)  # (B, E)
        s = self.cell(torch.cat([e, context], dim=-1), s_prev)  # (B, Hd)
        logits = self.out(torch.cat([s, context, e], dim=-1))  # (B, V)
        return logits, weights[:, 0, 0], s  # weights (B, 1, 1, S) -> (B, S)

    def forward(self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V) for the targets given the true previous characters."""
        s, memory, mask = self.start(src, src_len)
        logits = []
        for t in range(tgt_in.shape[1]):
            step_logits, _, s = self.step(tgt_in[:, t], s, memory, mask)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)  # (B, T, V)

    @torch.no_grad()
    def greedy_decode(self, src, src_len, bos_id, eos_id, pad_id, max_new_tokens) -> tuple:
        s, memory, mask = self.start(src, src_len)

        def step(prev, s):
            return self.step(prev, s, memory, mask)

        return greedy_loop(step, s, src.shape[0], bos_id, eos_id, pad_id, max_new_tokens, src.device)


class LuongSeq2Seq(nn.Module):
    """Luong, Pham & Manning (2015), global attention with the "general" score: the decoder's
    *current* state h_t queries the encoder states after the recurrent step.

        h_t = GRU(emb(y_{t-1}), h_{t-1})
        c_t = LuongAttention_general(h_t, h)
        h~_t = tanh(W_c [c_t; h_t]);   p(y_t) = softmax(W_s h~_t)

    Because the query is the decoder's own output, the whole teacher-forced target runs through the
    GRU in one call and the attention scores every step at once. (We leave out the paper's optional
    "input feeding" of h~_{t-1}, which would force a loop like Bahdanau's.)"""

    def __init__(self, src_vocab: int, tgt_vocab: int, embed_dim: int = 32, enc_hidden: int = 32,
                 dec_hidden: int = 64) -> None:
        super().__init__()
        self.encoder = GRUEncoder(src_vocab, embed_dim, enc_hidden)
        self.init_state = nn.Linear(2 * enc_hidden, dec_hidden)
        self.embed = nn.Embedding(tgt_vocab, embed_dim)
        self.rnn = nn.GRU(embed_dim, dec_hidden, batch_first=True)
        self.attention = LuongAttention(query_dim=dec_hidden, key_dim=2 * enc_hidden, score="general")
        self.combine = nn.Linear(2 * enc_hidden + dec_hidden, dec_hidden)  # W_c
        self.out = nn.Linear(dec_hidden, tgt_vocab)  # W_s

    def start(self, src: torch.Tensor, src_len: torch.Tensor) -> tuple:
        memory, mask, h_n = self.encoder(src, src_len)
        h0 = torch.tanh(self.init_state(torch.cat([h_n[0], h_n[1]], dim=-1)))  # (B, Hd)
        return h0.unsqueeze(0), memory, mask  # (1, B, Hd): the GRU's layout for a hidden state

    def _read(self, h: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor, need_weights: bool):
        """h (B, T, Hd) -> logits (B, T, V) [, weights (B, T, S)]."""
        if need_weights:
            context, weights = self.attention(h, memory, mask=mask, need_weights=True)  # (B,T,2He), (B,1,T,S)
        else:
            context, weights = self.attention(h, memory, mask=mask), None  # (B, T, 2He)
        h_tilde = torch.tanh(self.combine(torch.cat([context, h], dim=-1)))  # (B, T, Hd)
        logits = self.out(h_tilde)  # (B, T, V)
        return logits, (weights[:, 0] if need_weights else None)

    def forward(self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        h0, memory, mask = self.start(src, src_len)
        h, _ = self.rnn(self.embed(tgt_in), h0)  # (B, T, Hd)
        return self._read(h, memory, mask, need_weights=False)[0]  # (B, T, V)

    @torch.no_grad()
    def greedy_decode(self, src, src_len, bos_id, eos_id, pad_id, max_new_tokens) -> tuple:
        h0, memory, mask = self.start(src, src_len)

        def step(prev, h_prev):
            h, h_next = self.rnn(self.embed(prev).unsqueeze(1), h_prev)  # (B, 1, Hd), (1, B, Hd)
            logits, weights = self._read(h, memory, mask, need_weights=True)  # (B, 1, V), (B, 1, S)
            return logits[:, 0], weights[:, 0], h_next

        return greedy_loop(step, h0, src.shape[0], bos_id, eos_id, pad_id, max_new_tokens, src.device)


class TransformerTranslator(nn.Module):
    """The core's EncoderDecoderTransformer behind the same two calls as the recurrent models.

    Its alignment picture is the cross-attention of the *last* decoder layer, averaged over heads:
    one of several reasonable choices (every layer and head has its own picture)."""

    def __init__(self, src_vocab: int, tgt_vocab: int, embed_dim: int = 64, num_heads: int = 4,
                 num_layers: int = 2, ff_dim: int = 128, max_seq_length: int = 64, **options) -> None:
        super().__init__()
        self.model = ti.EncoderDecoderTransformer(
            src_vocab, tgt_vocab, embed_dim, num_heads, num_layers, num_layers, ff_dim, max_seq_length,
            dropout=0.0, pad_id=0, **options)

    def forward(self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.model(src, tgt_in)  # (B, T, V); the model builds the padding mask from pad_id

    @torch.no_grad()
    def greedy_decode(self, src, src_len, bos_id, eos_id, pad_id, max_new_tokens) -> tuple:
        ids = self.model.greedy_decode(src, bos_id, eos_id, max_new_tokens)  # (B, 1 + n)
        # Re-run the decoded prefix once with attention on: row t of the cross-attention is the
        # query that produced output token t + 1.
        _, attn = self.model(src, ids[:, :-1], return_attention=True)
        weights = attn["cross"][-1].mean(dim=1)  # (B, n, S): last layer, mean over heads
        return ids, weights


def build_model(name: str) -> nn.Module:
    if name == "bahdanau":
        return RNNSearch(len(SRC_VOCAB), len(TGT_VOCAB))
    if name == "luong":
        return LuongSeq2Seq(len(SRC_VOCAB), len(TGT_VOCAB))
    if name == "transformer":
        return TransformerTranslator(len(SRC_VOCAB), len(TGT_VOCAB))
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)



# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def translate(model: nn.Module, sources: Sequence[str], device, batch_size: int = 500) -> tuple:
    """Greedy translations of `sources` (list of str) and their alignment weights (list of (n, S))."""
    model.eval()
    outputs, alignments = [], []
    for i in range(0, len(sources), batch_size):
        chunk = [(s, "") for s in sources[i:i + batch_size]]
        batch = encode_batch(chunk, device)
        ids, weights = model.greedy_decode(batch["src"], batch["src_len"], TGT_VOCAB.bos_id,
                                           TGT_VOCAB.eos_id, TGT_VOCAB.pad_id, TARGET_LEN + 2)
        for row in range(ids.shape[0]):
            text = TGT_VOCAB.decode(ids[row, 1:].tolist())
            n_src = int(batch["src_len"][row])
            outputs.append(text)
            alignments.append(weights[row, :len(text) + 1, :n_src].float().cpu())  # chars + eos
    return outputs, alignments


def score(predictions: Sequence[str], targets: Sequence[str]) -> tuple:
    """(exact-match accuracy, per-character accuracy). A character counts when the prediction has
    the right character at that position of the 10-character target; a short prediction loses the
    missing positions, and an over-long one is never an exact match."""
    exact = sum(p == t for p, t in zip(predictions, targets)) / len(targets)
    chars = sum(sum(1 for i, c in enumerate(t) if i < len(p) and p[i] == c) for p, t in zip(predictions, targets))
    return exact, chars / sum(len(t) for t in targets)


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


def read_checkpoint(path: Path, model: nn.Module, device) -> tuple:
    """(training state, weights, None) from a checkpoint of ``model``'s kind, or (None, None, why not).

    The transformer's checkpoint is the core's ``EncoderDecoderTransformer.save`` format with the training
    state in ``extra``; a recurrent model's is a dict of this script's own (see the module docstring)."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a torn or foreign file
        return None, None, f"it cannot be read ({type(exc).__name__})"
    if not isinstance(payload, dict):
        return None, None, "it is not a checkpoint of this script"
    if isinstance(model, TransformerTranslator):
        extra = payload.get("extra")
        if payload.get("class") != "EncoderDecoderTransformer" or not isinstance(extra, dict) \
                or extra.get("format") != TRANSFORMER_CHECKPOINT:
            return None, None, "it is not in the core's format (an older version of this script wrote it?)"
        return extra, payload["state_dict"], None
    if "model" not in payload or "config" not in payload:
        return None, None, "it is not a checkpoint of this script"
    return payload, payload["model"], None


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s"


def train_model(name: str, args, device, draw: Callable, log=print) -> dict:
    """Train (or resume) one model on batches from `draw(rng, n) -> n (source, target) pairs`;
    returns the model, its learning curve and its training time."""
    torch.manual_seed(args.seed)  # the same initialisation whether run alone or after the others
    model = build_model(name).to(device)
    lr = args.lr if args.lr is not None else DEFAULT_LR[name]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    config = dict(model=name, seed=args.seed, batch_size=args.batch_size, lr=lr, warmup=args.warmup,
                  data=str(Path(args.data).resolve()) if args.data else "generated")
    ckpt_path = Path(args.out) / "checkpoints" / f"{name}.pt"
    step, curve, train_seconds = 0, [], 0.0

    if ckpt_path.exists() and not args.restart:
        ckpt, weights, why = read_checkpoint(ckpt_path, model, device)
        if ckpt is None:
            log(f"[{name}] ignoring {ckpt_path}: {why}")
        elif ckpt["config"] == config and ckpt["step"] <= args.steps:
            (model.model if isinstance(model, TransformerTranslator) else model).load_state_dict(weights)
            optimizer.load_state_dict(ckpt["optimizer"])
            step, curve, train_seconds = ckpt["step"], ckpt["curve"], ckpt["train_seconds"]
            log(f"[{name}] resuming from {ckpt_path} at step {step}")
        else:
            log(f"[{name}] ignoring {ckpt_path}: it was written with other settings or more steps")

    def checkpoint():
        state = dict(optimizer=optimizer.state_dict(), step=step, curve=curve,
                     train_seconds=train_seconds + (time.perf_counter() - t0), config=config)
        if isinstance(model, TransformerTranslator):  # the core's format; Transformer.save writes atomically
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            model.model.save(ckpt_path, extra=dict(format=TRANSFORMER_CHECKPOINT, **state))
        else:  # the recurrent models are not core models: this script's own layout
            atomic_save(dict(model=model.state_dict(), **state), ckpt_path)

    model.train()
    window, t0, start_step = [], time.perf_counter(), step
    interactive = sys.stdout.isatty()
    while step < args.steps:
        # The batch of step k depends only on (seed, k), so a resumed run sees the same data.
        rng = random.Random(args.seed * 1_000_003 + step)
        batch = encode_batch(draw(rng, args.batch_size), device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, lr, args.warmup)
        logits = model(batch["src"], batch["src_len"], batch["tgt_in"])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["tgt_out"].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append(loss.item())

        if step % args.log_every == 0 or step == args.steps:
            curve.append((step, sum(window) / len(window)))
            window = []
            elapsed = time.perf_counter() - t0
            rate = (step - start_step) / max(elapsed, 1e-9)
            eta = (args.steps - step) / max(rate, 1e-9)
            line = (f"[{name}] step {step:>5d}/{args.steps}  loss {curve[-1][1]:.4f}  "
                    f"{rate:5.1f} steps/s  elapsed {_fmt_seconds(elapsed)}  ETA {_fmt_seconds(eta)}")
            if interactive:
                print("\r" + line, end="" if step < args.steps else "\n", flush=True)
            else:
                log(line)
        if step % args.checkpoint_every == 0 or step == args.steps:
            checkpoint()
    train_seconds += time.perf_counter() - t0
    return dict(model=model, curve=curve, train_seconds=train_seconds, lr=lr)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

FIGURE_FORMATS = ("weekday_long", "ordinal_of", "mon_apostrophe", "us_slash", "eu_dot_short", "year_dot")


def figure_examples(test_set: Sequence[tuple]) -> list:
    """The first test date written in each of FIGURE_FORMATS (fixed, because the test set is)."""
    chosen = [next((item for item in test_set if item[2] == fmt), None) for fmt in FIGURE_FORMATS]
    chosen = [item for item in chosen if item is not None]
    return chosen if len(chosen) == len(FIGURE_FORMATS) else list(test_set[:len(FIGURE_FORMATS)])  # --data


def plot_alignments(name: str, examples: Sequence[tuple], outputs: Sequence[str], weights: Sequence,
                    path: Path) -> Path:
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    import matplotlib.pyplot as plt
    from plotting import plot_attention_heatmap

    cols = 3
    rows = math.ceil(len(examples) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(15, 3.4 * rows), squeeze=False)
    for ax, (src, tgt, fmt), out, w in zip(axes.flat, examples, outputs, weights):
        y_labels = (list(out) + ["<eos>"])[:len(w)]  # no "<eos>" row if decoding hit the length cap
        plot_attention_heatmap(ax, w, list(src), y_labels,
                               title=f"{src!r} -> {out!r}" + ("" if out == tgt else f" (want {tgt})"))
        ax.set_xlabel("source character")
        ax.set_ylabel("output character")
    what = {"bahdanau": "additive attention of s_{i-1}",
            "luong": "general-score attention of h_t",
            "transformer": "last decoder layer's cross-attention, mean over 4 heads"}[name]
    fig.suptitle(f"{name}: {what}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_curves(curves: dict, path: Path) -> Path:
    """The learning curves of all models on one plot. (Drawn here rather than with
    plotting.plot_loss_curves because the losses span four decades and need a log axis.)"""
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    import matplotlib.pyplot as plt
    import plotting  # noqa: F401  (selects matplotlib's Agg backend before pyplot draws)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [loss for _, loss in curve], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("training step (one batch of dates)")
    ax.set_ylabel("training cross-entropy (nats / char, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("Learning curves, same data and budget")
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


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> dict:
    """Run the command line ``argv`` (default: sys.argv), or ``args`` already parsed by ``parse_args``."""
    args = args if args is not None else parse_args(argv)
    t_start = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = cli.pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # only now: every check that can fail has passed
    names = MODELS if args.model == "all" else (args.model,)

    if args.data:
        train_pairs, test_set = args.pairs
        test_set = test_set[:args.test_size]
        print(f"{args.data}: {len(train_pairs)} pairs for training, testing on {len(test_set)} pairs with "
              f"held-out dates; device {device}")

        def draw(rng, n):
            return [rng.choice(train_pairs) for _ in range(n)]
    else:
        train_dates, held_out = split_dates()
        test_set = make_test_set(args.test_size)
        print(f"dates {FIRST_DATE}..{LAST_DATE}: {len(train_dates)} for training, {len(held_out)} held out; "
              f"testing on {len(test_set)} held-out dates in {len(FORMATS)} formats; device {device}")

        def draw(rng, n):
            return sample_pairs(rng, train_dates, n)
    sources, targets = [s for s, _, _ in test_set], [t for _, t, _ in test_set]

    command = "python examples/translate_dates.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = dict(command=command.strip(), data=str(args.data) if args.data else "generated",
                   machine=machine_info(device),
                   steps=args.steps, batch_size=args.batch_size,
                   seed=args.seed, test_size=len(test_set), formats=sorted(FORMATS), models={})
    curves, alignment_paths = {}, []
    for name in names:
        trained = train_model(name, args, device, draw)
        model = trained["model"]
        t0 = time.perf_counter()
        predictions, _ = translate(model, sources, device)
        eval_seconds = time.perf_counter() - t0
        exact, per_char = score(predictions, targets)
        per_format = {}
        for fmt in sorted({f for _, _, f in test_set}):
            idx = [i for i, (_, _, f) in enumerate(test_set) if f == fmt]
            per_format[fmt] = score([predictions[i] for i in idx], [targets[i] for i in idx])[0]
        errors = [dict(source=sources[i], target=targets[i], prediction=predictions[i])
                  for i in range(len(targets)) if predictions[i] != targets[i]]
        results["models"][name] = dict(
            exact_match=exact, char_accuracy=per_char, parameters=num_parameters(model),
            train_seconds=round(trained["train_seconds"], 2), eval_seconds=round(eval_seconds, 2),
            lr=trained["lr"], final_loss=trained["curve"][-1][1], exact_match_by_format=per_format,
            errors=errors[:20], curve=trained["curve"])
        print(f"[{name}] exact match {exact:.2%}  per-char {per_char:.2%}  "
              f"({len(errors)} wrong of {len(targets)})  params {num_parameters(model):,}  "
              f"train {trained['train_seconds']:.1f}s")
        curves[name] = trained["curve"]

        if not args.no_figures:
            examples = figure_examples(test_set)
            outs, weights = translate(model, [s for s, _, _ in examples], device)
            alignment_paths.append(plot_alignments(name, examples, outs, weights,
                                                   out / f"translate_dates_alignment_{name}.png"))
        for text in args.translate:
            print(f"[{name}] {text!r} -> {translate(model, [text], device)[0][0]!r}")

    figure_paths = list(alignment_paths)
    if not args.no_figures:
        figure_paths.append(plot_curves(curves, out / "translate_dates_curves.png"))
    results["total_seconds"] = round(time.perf_counter() - t_start, 2)
    results["machine"]["load_average_1_5_15_at_end"] = cli.load_average()
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    print(f"wrote {out / 'results.json'}; total {results['total_seconds']:.1f}s")

    if args.publish:
        docs = REPO_ROOT / "docs" / "examples"
        (docs / "results").mkdir(parents=True, exist_ok=True)
        (docs / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "results.json", docs / "results" / "translate_dates.json")
        for path in figure_paths:
            shutil.copyfile(path, docs / "figures" / path.name)
        print(f"copied results and {len(figure_paths)} figures into {docs}")
    return results


if __name__ == "__main__":
    try:
        main(args=ARGS)
    except KeyboardInterrupt:  # Ctrl-C: the last checkpoint (every --checkpoint-every steps) is kept
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
