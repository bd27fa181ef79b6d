"""Tests of examples/translate_dates.py: the date data, the vocabularies, greedy decoding, and a few-step
run of every model end to end.

The data tests check the generator against an independent reference: a small rule-based parser written
here from the rules the example states (slashes are month first, dots day first unless the first field
has four digits, two-digit years pivot at 50), plus hand-written strings and ISO dates.
"""

import datetime as dt
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import translate_dates as td  # noqa: E402

MONTH_NAMES = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
               "october", "november", "december"]
DAY_NAMES = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


def reference_parse(text: str) -> dt.date:
    """Read a date written by a person, from the rules alone (not from the generator's templates).

    Returns the date; raises AssertionError if a weekday name disagrees with the calendar."""
    def year_of(field: str) -> int:
        n = int(field)
        if len(field) == 4:
            return n
        assert len(field) == 2, text
        return 2000 + n if n < 50 else 1900 + n  # the pivot, written independently

    s = text.strip()
    if re.fullmatch(r"\d{8}", s):
        return dt.date(int(s[:4]), int(s[4:6]), int(s[6:]))
    if "/" in s:  # month first
        m, d, y = s.split("/")
        return dt.date(year_of(y), int(m), int(d))
    if re.fullmatch(r"[\d.]+", s):
        a, b, c = s.split(".")
        if len(a) == 4:
            return dt.date(int(a), int(b), int(c))
        return dt.date(year_of(c), int(b), int(a))  # day first
    words = re.findall(r"[A-Za-z]+", s)
    month = weekday = None
    for w in words:
        w = w.lower()
        for i, name in enumerate(MONTH_NAMES):
            if w in (name, name[:3]):
                month = i + 1
        for i, name in enumerate(DAY_NAMES):
            if w in (name, name[:3]):
                weekday = i
    numbers = re.findall(r"\d+", s)
    assert month is not None and len(numbers) == 2, text
    day, year = int(numbers[0]), year_of(numbers[1])
    date = dt.date(year, month, day)
    if weekday is not None:
        assert date.weekday() == weekday, f"{text!r}: {date} is not a {DAY_NAMES[weekday]}"
    return date


# ---------------------------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------------------------

def test_every_format_round_trips_through_an_independent_parser():
    rng = random.Random(1)
    dates = td.all_dates()
    edge = [dt.date(1950, 1, 1), dt.date(2049, 12, 31), dt.date(1999, 12, 31), dt.date(2000, 1, 1),
            dt.date(2000, 2, 29), dt.date(1952, 2, 29), dt.date(2048, 2, 29), dt.date(2024, 2, 29)]
    assert len(td.FORMATS) >= 12
    for fmt in td.FORMATS:
        for d in edge + rng.sample(dates, 150):
            source = td.render(d, fmt)
            assert reference_parse(source) == d, (fmt, source)
            assert td.iso(d) == d.isoformat()


HAND_WRITTEN = [
    # (format, date, source written by hand, ISO written by hand)
    ("ordinal_of", dt.date(2021, 3, 3), "3rd of March 2021", "2021-03-03"),
    ("mon_d_yy", dt.date(2021, 3, 3), "Mar 3, 21", "2021-03-03"),
    ("us_slash", dt.date(2021, 3, 14), "03/14/2021", "2021-03-14"),
    ("weekday_long", dt.date(2021, 3, 3), "Wednesday, March 3, 2021", "2021-03-03"),
    ("d_month_yyyy", dt.date(2021, 3, 3), "3 March 2021", "2021-03-03"),
    ("year_dot", dt.date(2021, 3, 14), "2021.03.14", "2021-03-14"),
    ("month_ordinal", dt.date(2021, 3, 22), "March 22nd, 2021", "2021-03-22"),
    ("d_mon_dash", dt.date(2021, 3, 3), "3-Mar-2021", "2021-03-03"),
    ("eu_dot_short", dt.date(2021, 3, 14), "14.03.21", "2021-03-14"),
    ("wd_d_mon", dt.date(1969, 7, 20), "Sun 20 Jul 1969", "1969-07-20"),
    ("ordinal_of", dt.date(2011, 1, 11), "11th of January 2011", "2011-01-11"),
    ("month_ordinal", dt.date(1990, 5, 31), "May 31st, 1990", "1990-05-31"),
    ("weekday_the_ordinal", dt.date(2001, 9, 11), "Tuesday the 11th of September, 2001", "2001-09-11"),
    # leap days, several formats
    ("weekday_long", dt.date(2024, 2, 29), "Thursday, February 29, 2024", "2024-02-29"),
    ("us_slash", dt.date(2024, 2, 29), "02/29/2024", "2024-02-29"),
    ("eu_dot", dt.date(2024, 2, 29), "29.2.2024", "2024-02-29"),
    ("compact", dt.date(2024, 2, 29), "20240229", "2024-02-29"),
    ("upper", dt.date(2024, 2, 29), "FEB 29 2024", "2024-02-29"),
    ("lower", dt.date(2024, 2, 29), "february 29 2024", "2024-02-29"),
    ("weekday_the_ordinal", dt.date(2000, 2, 29), "Tuesday the 29th of February, 2000", "2000-02-29"),
    ("wd_d_mon", dt.date(1952, 2, 29), "Fri 29 Feb 1952", "1952-02-29"),
    # two-digit years on both sides of the pivot (00..49 -> 20xx, 50..99 -> 19xx)
    ("us_slash_short", dt.date(2049, 12, 31), "12/31/49", "2049-12-31"),
    ("eu_dot_short", dt.date(1950, 1, 1), "01.01.50", "1950-01-01"),
    ("mon_d_yy", dt.date(2000, 2, 29), "Feb 29, 00", "2000-02-29"),
    ("mon_apostrophe", dt.date(1999, 12, 31), "Dec 31 '99", "1999-12-31"),
    ("mon_apostrophe", dt.date(2007, 6, 1), "Jun 1 '07", "2007-06-01"),
]


@pytest.mark.parametrize("fmt, date, source, target", HAND_WRITTEN)
def test_hand_written_cases(fmt, date, source, target):
    assert td.render(date, fmt) == source
    assert td.iso(date) == target
    assert reference_parse(source).isoformat() == target


def test_two_digit_year_pivot_and_range():
    assert [td.full_year(y) for y in (0, 21, 49, 50, 69, 99)] == [2000, 2021, 2049, 1950, 1969, 1999]
    # every two-digit year names exactly one year of the range, so "yy" sources are never ambiguous
    assert sorted(td.full_year(y) for y in range(100)) == list(range(1950, 2050))
    with pytest.raises(ValueError, match="yy"):
        td.full_year(100)
    with pytest.raises(ValueError, match="date"):
        td.render(dt.date(2050, 1, 1), "us_slash")
    with pytest.raises(ValueError, match="fmt"):
        td.render(dt.date(2000, 1, 1), "klingon")


def test_the_range_holds_every_day_and_every_leap_day():
    dates = td.all_dates()
    assert len(dates) == 36525 and len(set(dates)) == 36525  # 100 years, 25 of them leap years
    leap_days = [d for d in dates if (d.month, d.day) == (2, 29)]
    assert [d.year for d in leap_days] == list(range(1952, 2049, 4))


def test_test_set_is_fixed_distinct_held_out_and_covers_every_format():
    test_set = td.make_test_set()
    assert test_set == td.make_test_set()  # does not depend on any seed or state
    assert len(test_set) == 2000
    train, held_out = td.split_dates()
    assert set(train).isdisjoint(held_out) and len(train) + len(held_out) == 36525
    test_dates = [dt.date.fromisoformat(t) for _, t, _ in test_set]
    assert len(set(test_dates)) == 2000
    assert set(test_dates) <= set(held_out) and set(test_dates).isdisjoint(train)
    assert {f for _, _, f in test_set} == set(td.FORMATS)
    for source, target, fmt in test_set[:300]:
        assert reference_parse(source).isoformat() == target


def test_training_stream_covers_every_format_and_never_shows_a_held_out_date():
    train, held_out = td.split_dates()
    held_out = {d.isoformat() for d in held_out}
    pairs = td.sample_pairs(random.Random(3), train, 3000)
    seen_formats = set()
    for source, target in pairs:
        assert target not in held_out
        d = dt.date.fromisoformat(target)
        matches = [f for f in td.FORMATS if td.render(d, f) == source]
        assert matches, source
        seen_formats.update(matches)
    assert seen_formats == set(td.FORMATS)


def test_vocabularies_cover_the_data_and_round_trip():
    rng = random.Random(4)
    for d in rng.sample(td.all_dates(), 400) + [dt.date(2021, m, 1) for m in range(1, 13)]:
        for fmt in td.FORMATS:
            source = td.render(d, fmt)
            ids = td.SRC_VOCAB.encode(source)
            assert td.SRC_VOCAB.unk_id not in ids, source
            assert td.SRC_VOCAB.decode(ids) == source
    target_ids = td.TGT_VOCAB.encode("2024-02-29", bos=True, eos=True)
    assert target_ids[0] == td.TGT_VOCAB.bos_id and target_ids[-1] == td.TGT_VOCAB.eos_id
    assert td.TGT_VOCAB.decode(target_ids[1:] + [5, 6]) == "2024-02-29"  # stops at eos
    assert td.SRC_VOCAB.pad_id == td.TGT_VOCAB.pad_id == 0


def test_encode_batch_pads_and_shifts():
    batch = td.encode_batch([("3/3/21", "2021-03-03"), ("3rd of March 2021", "2021-03-03")], "cpu")
    assert batch["src"].shape == (2, 17) and batch["src_len"].tolist() == [6, 17]
    assert (batch["src"][0, 6:] == 0).all() and (batch["src"][0, :6] != 0).all()
    assert batch["tgt_in"].shape == batch["tgt_out"].shape == (2, 11)
    assert (batch["tgt_in"][:, 1:] == batch["tgt_out"][:, :-1]).all()  # teacher forcing: shifted by one
    assert (batch["tgt_out"][:, -1] == td.TGT_VOCAB.eos_id).all()


def test_score_counts_exact_matches_and_characters():
    exact, chars = td.score(["2021-03-03", "2021-03-04", "2021"], ["2021-03-03"] * 3)
    assert exact == pytest.approx(1 / 3)
    assert chars == pytest.approx((10 + 9 + 4) / 30)
    assert td.score(["2021-03-03x"], ["2021-03-03"]) == (0.0, 1.0)  # too long: not exact


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def test_reverse_within_length():
    x = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    out = td.reverse_within_length(x, torch.tensor([3, 5]))
    assert out.tolist() == [[3, 2, 1, 0, 0], [8, 7, 6, 5, 4]]
    y = torch.randn(2, 5, 4)
    lengths = torch.tensor([2, 4])
    assert torch.equal(td.reverse_within_length(td.reverse_within_length(y, lengths), lengths), y)


def test_greedy_loop_stops_at_eos_and_rows_finish_independently():
    # A scripted decoder: row r writes token 5, 6, 7, ... and writes eos at its own step finish[r].
    eos, pad, bos, vocab = 2, 0, 1, 12
    finish = [1, 3, 2]
    calls = []

    def step(prev, t):
        calls.append(prev.tolist())
        logits = torch.zeros(3, vocab)
        for r in range(3):
            logits[r, eos if t + 1 == finish[r] else 5 + t] = 1.0
        return logits, torch.full((3, 4), 0.25), t + 1

    ids, weights = td.greedy_loop(step, 0, 3, bos, eos, pad, max_new_tokens=10, device="cpu")
    assert ids.tolist() == [[bos, eos, pad, pad],
                            [bos, 5, 6, eos],
                            [bos, 5, eos, pad]]
    assert len(calls) == 3  # stopped once the last row finished, not after 10 steps
    assert calls[1] == [eos, 5, 5]  # each row is fed its own previous output
    assert weights.shape == (3, 3, 4)
    ids, _ = td.greedy_loop(step, 0, 3, bos, eos, pad, max_new_tokens=2, device="cpu")
    assert ids.shape == (3, 3)  # the length cap holds when a row never finishes


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in td.MODELS:
        torch.manual_seed(0)
        out[name] = td.build_model(name).eval()
    return out


SOURCES = ["3/3/21", "Wednesday the 3rd of March, 2021", "14.03.21", "MAR 03 2021", "20210303"]


@pytest.mark.parametrize("name", td.MODELS)
def test_batch_decoding_matches_one_at_a_time_and_ignores_padding(models, name):
    model = models[name]
    args = (td.TGT_VOCAB.bos_id, td.TGT_VOCAB.eos_id, td.TGT_VOCAB.pad_id, 12)
    batch = td.encode_batch([(s, "") for s in SOURCES], "cpu")
    ids, weights = model.greedy_decode(batch["src"], batch["src_len"], *args)
    assert ids.shape[0] == len(SOURCES) and ids.shape[1] <= 13
    assert (ids[:, 0] == td.TGT_VOCAB.bos_id).all()
    for r, source in enumerate(SOURCES):
        single = td.encode_batch([(source, "")], "cpu")
        n = len(source)
        # extra padding columns on the right must change nothing
        padded = torch.cat([single["src"], torch.zeros(1, 7, dtype=torch.long)], dim=1)
        for src in (single["src"], padded):
            one, w = model.greedy_decode(src, single["src_len"], *args)
            row = ids[r, :one.shape[1]]
            assert torch.equal(one[0], row), (source, one, ids[r])
            assert (ids[r, one.shape[1]:] == td.TGT_VOCAB.pad_id).all()
            steps = one.shape[1] - 1
            torch.testing.assert_close(w[0, :steps, :n], weights[r, :steps, :n], atol=1e-5, rtol=1e-4)
            assert w[0, :steps, n:].abs().sum().item() == 0.0  # padding gets no attention
        # the padding never receives attention, and each row of weights sums to one
        assert weights[r, :, n:].abs().sum().item() == 0.0
        torch.testing.assert_close(weights[r].sum(-1), torch.ones(weights.shape[1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["bahdanau", "luong"])
def test_recurrent_decoder_stops_at_the_end_token(models, name):
    model = td.build_model(name).eval()
    model.load_state_dict(models[name].state_dict())
    with torch.no_grad():
        model.out.bias[td.TGT_VOCAB.eos_id] = 1e4  # eos now wins every argmax
    batch = td.encode_batch([(s, "") for s in SOURCES], "cpu")
    ids, weights = model.greedy_decode(batch["src"], batch["src_len"], td.TGT_VOCAB.bos_id,
                                       td.TGT_VOCAB.eos_id, td.TGT_VOCAB.pad_id, 12)
    assert ids.tolist() == [[td.TGT_VOCAB.bos_id, td.TGT_VOCAB.eos_id]] * len(SOURCES)
    assert weights.shape[:2] == (len(SOURCES), 1)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

def test_few_step_run_of_every_model_then_resume(tmp_path, capsys):
    common = ["--batch-size", "8", "--test-size", "34", "--log-every", "1", "--checkpoint-every", "2",
              "--warmup", "2", "--out", str(tmp_path), "--device", "cpu"]
    results = td.main(["--steps", "3", "--translate", "Mar 3, 21"] + common)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["models"].keys() == set(td.MODELS) and on_disk["test_size"] == 34
    for name in td.MODELS:
        r = on_disk["models"][name]
        assert 0.0 <= r["exact_match"] <= r["char_accuracy"] <= 1.0
        assert r["parameters"] == td.num_parameters(td.build_model(name)) > 0
        assert r["train_seconds"] > 0 and [s for s, _ in r["curve"]] == [1, 2, 3]
        assert set(r["exact_match_by_format"]) == set(td.FORMATS)
        ckpt = torch.load(tmp_path / "checkpoints" / f"{name}.pt", weights_only=True)
        if name == "transformer":  # the core's format, the training state in "extra"
            assert ckpt["class"] == "EncoderDecoderTransformer"
            ckpt = ckpt["extra"]
        assert ckpt["step"] == 3
        assert (tmp_path / f"translate_dates_alignment_{name}.png").stat().st_size > 1000
    assert (tmp_path / "translate_dates_curves.png").stat().st_size > 1000
    assert not list(tmp_path.rglob("*.tmp"))
    assert results["models"]["luong"]["exact_match"] == on_disk["models"]["luong"]["exact_match"]
    assert "'Mar 3, 21' ->" in capsys.readouterr().out

    # A second run with a bigger budget continues from the checkpoint instead of starting again.
    td.main(["--steps", "5", "--model", "luong", "--no-figures"] + common)
    assert "resuming" in capsys.readouterr().out
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [s for s, _ in on_disk["models"]["luong"]["curve"]] == [1, 2, 3, 4, 5]
    assert torch.load(tmp_path / "checkpoints" / "luong.pt", weights_only=True)["step"] == 5


def test_the_transformers_checkpoint_opens_with_the_cores_load_and_resumes(tmp_path, capsys):
    common = ["--model", "transformer", "--batch-size", "4", "--test-size", "5", "--log-every", "1",
              "--checkpoint-every", "2", "--warmup", "1", "--no-figures", "--out", str(tmp_path), "--device", "cpu"]
    td.main(["--steps", "2"] + common)
    path = tmp_path / "checkpoints" / "transformer.pt"
    model, extra = td.ti.EncoderDecoderTransformer.load(path, return_extra=True)
    assert not model.training and extra["step"] == 2 and extra["format"] == td.TRANSFORMER_CHECKPOINT
    trained = td.build_model("transformer")
    trained.model.load_state_dict(model.state_dict())  # the same architecture as the script's
    td.main(["--steps", "3"] + common)
    assert "[transformer] resuming from" in capsys.readouterr().out
    assert td.ti.EncoderDecoderTransformer.load(path, return_extra=True)[1]["step"] == 3
    # A checkpoint in the old layout (a plain dict) is ignored with a message, not a traceback.
    torch.save({"model": trained.state_dict(), "step": 1, "config": {}}, path)
    td.main(["--steps", "3"] + common)
    assert "not in the core's format" in capsys.readouterr().out


def test_help_runs_from_another_directory(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "translate_dates.py"), "--help"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for option in ("--model", "--steps", "--seed", "--device", "--out", "--publish"):
        assert option in proc.stdout


def test_data_option_reads_your_own_pairs_and_splits_by_held_out_date(tmp_path):
    train, held_out = td.split_dates()
    lines = [f"{d.day} {td.MONTHS[d.month - 1]} in the year {d.year}\t{d.isoformat()}"
             for d in train[:40] + held_out[:10]]
    data = tmp_path / "mine.tsv"
    data.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    train_pairs, test = td.load_pairs(data)
    assert len(train_pairs) == 40 and len(test) == 10
    assert {t for _, t, _ in test} == {d.isoformat() for d in held_out[:10]}
    results = td.main(["--data", str(data), "--model", "luong", "--steps", "2", "--batch-size", "4",
                       "--no-figures", "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert results["test_size"] == 10 and results["data"] == str(data)
    (tmp_path / "bad.tsv").write_text("3 March 2021\t03/03/2021\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.tsv:1: target must be an ISO date"):
        td.load_pairs(tmp_path / "bad.tsv")
