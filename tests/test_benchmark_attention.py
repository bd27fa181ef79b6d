"""examples/benchmark_attention.py: the smoke test (--quick) and the correctness of what it measures with.

No test asserts a time (DESIGN.md: performance is measured, not asserted by a timer).
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import benchmark_attention as bench  # noqa: E402
import compare_mechanisms as cm  # noqa: E402


@pytest.mark.slow
def test_quick_run_measures_every_pass_side_by_side(tmp_path):
    report = bench.main(["--quick", "--out", str(tmp_path), "--threads", "1",
                         "--mechanism", "linear_attention", "--mechanism", "local_attention"])
    data = json.loads((tmp_path / "benchmark_attention.json").read_text())
    assert data["rows"] == json.loads(json.dumps(report["rows"]))
    seen = {(r["mechanism"], r["T"], r["pass"]) for r in data["rows"]}
    names = ("sdpa", "explicit", "linear_attention", "local_attention")
    assert seen == {(n, t, p) for n in names for t in (16, 32, 64) for p in ("forward", "forward+backward")}
    assert all(r["time_s"] > 0 and r["peak_bytes"] > 0 for r in data["rows"])
    assert set(data["exponents"]) == set(names) and not data["failed"]
    assert (tmp_path / "benchmark_attention.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_exponent_recovers_a_power_law():
    ts = [256, 512, 1024, 2048, 4096]
    assert math.isclose(bench.fit_exponent(ts, [3e-9 * t ** 2 for t in ts]), 2.0, rel_tol=1e-9)
    # Only T >= 1024 counts: a constant cost at small T does not bend the fitted slope.
    assert math.isclose(bench.fit_exponent(ts, [1.0, 1.0, 1024.0, 2048.0, 4096.0]), 1.0, rel_tol=1e-9)
    assert bench.fit_exponent([256], [1.0]) is None


def test_the_two_references_compute_the_same_exact_causal_attention():
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    sdpa, explicit = bench.CoreReference("sdpa", 2), bench.CoreReference("explicit", 2)
    q = x.view(2, 12, 2, 4).transpose(1, 2)
    expected = F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(2, 12, 8)
    assert torch.allclose(sdpa(x), expected, atol=1e-12)
    assert torch.allclose(explicit(x), expected, atol=1e-12)


def test_windowed_mechanisms_keep_a_fixed_window_in_the_benchmark(monkeypatch):
    monkeypatch.setattr(cm, "FIXED_WINDOW", 16)
    assert cm.Mixer("local_attention", 8, 2, 4096).inner.window == 16
    monkeypatch.setattr(cm, "FIXED_WINDOW", None)
    assert cm.Mixer("local_attention", 8, 2, 4096).inner.window == 512  # T/8 in training


def test_unknown_mechanism_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--mechanism", "no_such_attention"])
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1
