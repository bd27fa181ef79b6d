"""examples/export_model.py: int8 quantisation, torch.export and ONNX of a char-LM, measured side by side.

The smoke test runs ``--quick`` (a tiny model trained in the script) in this process and checks what the
results claim: the exported forms equal float32 eager within the stated tolerance (checked here against a
bound written in this test, not only the script's own flag); int8 really is quantised (smaller file,
different logits) yet close in loss; every form produced its file. A path this torch cannot take is
reported as skipped with the torch version, never a traceback.
"""
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
export_model = importlib.import_module("export_model")

TOL = 1e-4  # the page's stated tolerance for exported logits against float32 eager


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    report = export_model.main(["--quick", "--out", str(out), "--tokens", "4", "--val-windows", "4"])
    return out, report


def test_quick_run_writes_results_and_every_file(quick):
    out, report = quick
    assert json.loads((out / "results.json").read_text())["forms"].keys() == report["forms"].keys()
    assert set(report["forms"]) == {"float32", "int8", "torch.export", "onnx"}
    assert report["export_tolerance"] == TOL
    for name, filename in [("float32", "model_fp32.pt"), ("int8", "model_int8.pt"), ("torch.export", "model.pt2"),
                           ("onnx", "model.onnx")]:
        row = report["forms"][name]
        if "skipped" in row:
            assert f"torch {torch.__version__}" in row["skipped"] or "requirements-test.txt" in row["skipped"]
            continue
        assert (out / filename).is_file() and row["file_bytes"] > 0
        assert row["ms_per_token"] > 0 and row["latency_ratio_vs_float32"] > 0
    assert "| form |" in report["table_markdown"] and report["machine"]["logical_cpus"]


def test_exported_forms_equal_float32_within_the_tolerance(quick):
    _, report = quick
    checked = 0
    for name in ("torch.export", "onnx"):
        row = report["forms"][name]
        if "skipped" in row:
            continue
        checked += 1
        assert row["max_abs_logit_diff_vs_float32"] < TOL, f"{name} differs from float32 eager"
        assert abs(row["val_loss"] - report["forms"]["float32"]["val_loss"]) < 1e-5
        assert row["greedy_tokens_equal_to_float32"] == 1.0
    # A failure inside a path is reported as "skipped"; where this torch and onnxruntime can take the path,
    # a skip is a bug, not a missing feature.
    if hasattr(torch, "export"):
        assert "skipped" not in report["forms"]["torch.export"], report["forms"]["torch.export"]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        assert "skipped" not in report["forms"]["onnx"], report["forms"]["onnx"]
    assert report["exports_within_tolerance"] is True
    assert checked >= 1


def test_int8_is_really_quantised_and_close_in_loss(quick):
    _, report = quick
    int8, fp32 = report["forms"]["int8"], report["forms"]["float32"]
    if "skipped" in int8:
        pytest.skip(int8["skipped"])
    assert int8["size_ratio_vs_float32"] < 0.7  # int8 matrices: about a quarter of their float32 bytes
    assert int8["max_abs_logit_diff_vs_float32"] > 1e-4  # not the float32 model under another name
    assert abs(int8["val_loss"] - fp32["val_loss"]) < 0.05
    assert fp32["max_abs_logit_diff_vs_float32"] == 0.0


def test_unsupported_paths_are_skipped_naming_the_torch_version(monkeypatch, tmp_path):
    def unsupported(*args, **kwargs):
        raise NotImplementedError("not in this version")

    monkeypatch.setattr(torch.export, "export", unsupported)
    monkeypatch.setattr(torch.onnx, "export", unsupported)
    monkeypatch.setattr(torch.ao.quantization, "quantize_dynamic", unsupported)
    model = torch.nn.Linear(4, 4)
    forms = export_model.make_forms(model, torch.zeros(1, 4), tmp_path)
    assert "run" in forms["float32"]
    for name in ("int8", "torch.export", "onnx"):
        message = forms[name]["skipped"]
        assert message.startswith("skipped:") and "Traceback" not in message
        assert f"torch {torch.__version__}" in message, message


def test_bad_command_lines_are_one_line_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for argv in (["--checkpoint", str(missing)], ["--quick", "--out", str(a_file)], ["--tokens", "0"]):
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "export_model.py"), *argv],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr
