"""Smoke test of examples/benchmark_char_lm_options.py --quick: both parts run and their records hold what
the char-LM page reads from them (equal active parameters for dense and MoE, equal gradients and fewer
saved activations with checkpointing)."""
import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
bench = importlib.import_module("benchmark_char_lm_options")


def test_quick_run_measures_both_parts(tmp_path):
    report = bench.main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text())["moe"]["runs"].keys() == {"dense", "moe"}
    runs = report["moe"]["runs"]
    # 4 experts of width 4E/2, two per token: about the dense layer's active parameters (plus the router)
    assert abs(runs["moe"]["active_parameters_vs_dense"] - 1) < 0.05
    assert runs["moe"]["parameters_vs_dense"] > 1.2
    assert (tmp_path / "moe_loss.png").stat().st_size > 0
    c = report["checkpointing"]
    assert c["max_abs_gradient_difference"] == 0.0
    assert c["saved_tensor_ratio"] < 0.5
    assert c["step_time_s_median"]["plain"] > 0 and c["peak_memory_growth_bytes"]["plain"] > 0
    assert report["machine_at_start"]["logical_cpus"] and "load_average_1_5_15" in report["machine_at_end"]
