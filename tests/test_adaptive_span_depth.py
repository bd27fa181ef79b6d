"""Smoke test of examples/adaptive_span_depth.py --quick: the record holds a learned span for every layer and
head, each within [0, max_span], and the span penalty is really applied (a large penalty pulls spans that
start in the middle of their range down; without it they are free to stay or grow)."""
import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
depth = importlib.import_module("adaptive_span_depth")


def test_quick_run_records_a_span_per_layer_and_head(tmp_path):
    report = depth.main(["--quick", "--out", str(tmp_path), "--threads", "1", "--device", "cpu"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["spans_per_layer_and_head"] == report["spans_per_layer_and_head"]
    s = saved["settings"]
    spans = saved["spans_per_layer_and_head"]
    assert len(spans) == s["layers"] and all(len(layer) == s["heads"] for layer in spans)
    assert all(0.0 <= z <= s["max_span"] for layer in spans for z in layer)
    assert len(saved["mean_span_per_layer"]) == s["layers"]
    assert saved["machine_at_start"]["logical_cpus"] and "load_average_1_5_15" in saved["machine_at_end"]
    assert saved["val_loss_nats_per_byte"] > 0 and not (tmp_path / "results.json.tmp").exists()


def test_the_span_penalty_is_applied(tmp_path):
    common = ["--quick", "--threads", "1", "--device", "cpu", "--init-span", "8", "--steps", "20"]
    free = depth.main(common + ["--penalty", "0", "--out", str(tmp_path / "free")])
    paid = depth.main(common + ["--penalty", "10", "--out", str(tmp_path / "paid")])
    free_spans = [z for layer in free["spans_per_layer_and_head"] for z in layer]
    paid_spans = [z for layer in paid["spans_per_layer_and_head"] for z in layer]
    # Adam moves each fraction by about lr = 3e-3 per step, i.e. 0.05 tokens of span 16 per step: 20 steps
    # against a dominant penalty take every span about 1 token below its start of 8.
    assert max(paid_spans) < 7.5, paid_spans
    assert min(free_spans) > max(paid_spans), (free_spans, paid_spans)
