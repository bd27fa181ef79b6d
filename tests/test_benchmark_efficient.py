"""examples/benchmark_efficient.py: the smoke test (--quick) and the correctness of what it measures with.

Nothing here asserts a time: the benchmark measures speed, the tests check that it runs, writes its files,
merges results, fits exponents correctly and counts allocated bytes correctly.
"""
import importlib.util
import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("benchmark_efficient", ROOT / "examples" / "benchmark_efficient.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["benchmark_efficient"] = bench  # its dataclasses look their module up there
spec.loader.exec_module(bench)


@pytest.mark.slow
def test_quick_run_of_every_case_writes_json_and_figures(tmp_path):
    result = bench.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "benchmark_efficient.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert set(data["cases"]) == set(bench.CASES)
    for name, case in data["cases"].items():
        assert case["rows"] and all(r["case"] == name and r["time_s"] > 0 for r in case["rows"]), name
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flash = data["cases"]["flash_attention"]["summary"]["forward+backward"]
    assert flash["memory_flash_over_explicit"] > 0


def test_a_run_replaces_its_own_cases_and_keeps_the_others(tmp_path):
    path = tmp_path / "benchmark_efficient.json"
    path.write_text(json.dumps({"cases": {"someone_elses_case": {"rows": [1]}}}))
    bench.main(["--quick", "--out", str(tmp_path), "--cases", "decoding", "--heads", "2", "--head-dim", "8"])
    first = json.loads(path.read_text())
    assert set(first["cases"]) == {"someone_elses_case", "decoding"}
    assert {r["method"] for r in first["cases"]["decoding"]["rows"]} >= {"retention (recurrent step)",
                                                                        "linear attention (recurrent step)"}
    assert (tmp_path / "decoding.png").exists()
    bench.main(["--quick", "--out", str(tmp_path), "--cases", "decoding", "--seed", "3", "--heads", "2", "--head-dim", "8"])
    second = json.loads(path.read_text())
    assert second["cases"]["someone_elses_case"] == {"rows": [1]}
    assert second["cases"]["decoding"]["settings"]["seed"] == 3


def test_peak_memory_counts_allocated_bytes():
    n = 1 << 20  # 4 MiB of float32

    def two_alive():
        a = torch.ones(n)
        b = torch.ones(n)  # a and b alive together: 8 MiB
        return (a + b).sum()

    def one_at_a_time():
        for _ in range(3):
            torch.ones(n).sum()  # each freed before the next: 4 MiB at most

    assert 8 * 2**20 <= bench.peak_extra_bytes(two_alive, "cpu") <= 12 * 2**20 + 64
    assert 4 * 2**20 <= bench.peak_extra_bytes(one_at_a_time, "cpu") < 8 * 2**20


class _Churn(torch.autograd.Function):
    """Allocates and frees 4 MiB ten times inside its forward: the frees happen inside one profiler scope."""

    @staticmethod
    def forward(ctx, x):
        for _ in range(10):
            x = x + torch.ones(1 << 20).sum()
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_peak_memory_sees_frees_inside_an_autograd_function():
    x = torch.zeros(3, requires_grad=True)
    assert 4 * 2**20 <= bench.peak_extra_bytes(lambda: _Churn.apply(x), "cpu") < 5 * 2**20


def test_fit_exponent_recovers_a_power_law():
    ts = [100, 200, 400, 800]
    assert bench.fit_exponent(ts, [3.0 * t ** 1.5 for t in ts]) == pytest.approx(1.5)
    assert bench.fit_exponent(ts, [7.0] * 4) == pytest.approx(0.0, abs=1e-12)
    assert bench.fit_exponent([100], [1.0]) is None


def test_explicit_baseline_is_attention():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    for causal in (False, True):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert (bench.explicit_attention(q, k, v, causal) - expected).abs().max() < 1e-5


def test_bad_arguments_are_one_line_errors(capsys):
    for argv in (["--cases", "no_such_case"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


PAGES = {"flash_attention": ["flash_attention"], "linear_attention": ["linear_attention", "decoding"],
         "retention": ["decoding"]}


@pytest.mark.parametrize("stem", sorted(PAGES))
def test_pages_quote_the_committed_results(stem):
    """The tables on the pages are the ones `--table CASE` prints from the committed JSON: no number drifts."""
    path = bench.OUT_DIR / "benchmark_efficient.json"
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} not written yet (python examples/benchmark_efficient.py)")
    cases = json.loads(path.read_text())["cases"]
    page = (ROOT / "docs" / "mechanisms" / f"{stem}.md").read_text()
    for case in PAGES[stem]:
        assert case in cases, f"{case} missing from {path.relative_to(ROOT)}"
        assert bench.markdown_table(cases[case]) in page, (
            f"docs/mechanisms/{stem}.md does not show the current table of {case}; paste the output of "
            f"python examples/benchmark_efficient.py --table {case}")
