#!/usr/bin/env python
"""Quantise and export a trained character-level language model, and measure what each form costs.

    python examples/export_model.py                                # runs/char_lm/ckpt.pt -> runs/export
    python examples/export_model.py --checkpoint PATH --out DIR    # any checkpoint of train_char_lm.py
    python examples/export_model.py --quick                        # a tiny model trained here, in seconds

The model, a ``transformer_implementation.Transformer`` saved by ``examples/train_char_lm.py``, in four forms:

  float32       the model as trained, run eagerly by PyTorch
  int8          PyTorch's dynamic int8 quantisation of every ``nn.Linear``
                (``torch.ao.quantization.quantize_dynamic``): weights stored as int8 with one scale per
                matrix, activations quantised on the fly, matrix products in int8; embeddings, norms and
                attention stay float32
  torch.export  the forward pass traced into an ``ExportedProgram`` (``torch.export.export``), saved as a
                ``.pt2`` file, loaded back and run; no Python model code needed to run it
  onnx          the same program as ONNX (``torch.onnx.export(..., dynamo=True)``), run by onnxruntime

For each form, one run measures side by side: the file size; the CPU latency per generated token (batch 1,
greedy, every form running the same loop over a sliding window of ``block_size`` characters without a KV
cache, so that the exported graphs, which have one fixed input shape, run exactly what eager runs; the forms
take turns, token by token, so that a load change on the machine hits all of them alike); the validation
loss on the checkpoint's own validation split (the same windows for every form); the largest difference of
its logits from float32's; and the share of greedy tokens equal to float32's. The exported forms must
equal float32 within ``EXPORT_TOLERANCE``; the script exits with status 1 when one does not.

Outputs under ``--out``: ``results.json`` (the table, the machine and its load), ``model_fp32.pt``,
``model_int8.pt`` (state dicts), ``model.pt2``, ``model.onnx``. A form that this torch cannot produce (or
whose package is absent: onnx, onnxscript, onnxruntime are test-only dependencies, requirements-test.txt)
is reported as skipped, with the torch version and the reason, never a traceback. Everything runs on the
CPU: the point is CPU latency, and dynamic int8 quantisation exists only there.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the core file lives at the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/cli.py, examples/train_char_lm.py

import cli  # noqa: E402  (standard library only: the command line is checked before torch loads)

EXPORT_TOLERANCE = 1e-4  # largest |logit difference| allowed between float32 eager and an exported form
DEFAULT_CHECKPOINT = Path("runs/char_lm/ckpt.pt")


def build_parser():
    p = cli.ArgumentParser(description="Quantise (int8) and export (torch.export, ONNX) a character-level "
                                       "language model trained by train_char_lm.py; measure size, latency "
                                       "and validation loss of each form side by side.")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"a checkpoint written by train_char_lm.py (default: {DEFAULT_CHECKPOINT}; with "
                        "--quick: a tiny model trained here)")
    p.add_argument("--out", type=Path, default=Path("runs/export"), help="folder for the files and results.json")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: without --checkpoint, train a tiny model for a few steps on the core "
                        "file's own source; fewer tokens and windows")
    p.add_argument("--tokens", type=cli.int_range(1, 100_000), default=None,
                   help="latency: token steps timed per form (default 200, --quick 10)")
    p.add_argument("--val-windows", type=cli.int_range(1, 100_000), default=None,
                   help="validation windows of block_size characters, batch 1 (default 200, --quick 8)")
    p.add_argument("--threads", type=cli.int_range(1, 1024), default=1,
                   help="threads for PyTorch and onnxruntime alike")
    p.add_argument("--seed", type=cli.int_range(0, 2 ** 32 - 1), default=0, help="seed of the windows and the prompt")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    cli.check_output_folder(p, args.out)
    if args.checkpoint is None and not args.quick:
        args.checkpoint = DEFAULT_CHECKPOINT
        if not args.checkpoint.is_file():
            p.error(f"--checkpoint: no checkpoint at {DEFAULT_CHECKPOINT}; run examples/train_char_lm.py first, "
                    "pass --checkpoint PATH, or use --quick")
    if args.checkpoint is not None:
        cli.check_input_file(p, args.checkpoint, "--checkpoint")
    args.tokens = args.tokens or (10 if args.quick else 200)
    args.val_windows = args.val_windows or (8 if args.quick else 200)
    return args


if __name__ == "__main__":
    parse_args()  # a bad command line is refused here, before the slow imports below

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from transformer_implementation import Transformer  # noqa: E402


# --------------------------------------------------------------------------------------------------
# The model and its data
# --------------------------------------------------------------------------------------------------

def train_quick_model(out: Path, steps: int = 60) -> Path:
    """A tiny char-LM trained for a few steps on the core file's source, saved like train_char_lm.py saves."""
    text = (ROOT / "transformer_implementation.py").read_text(encoding="utf-8")
    chars = "".join(sorted(set(text)))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text])
    train = ids[: int(0.9 * len(ids))]
    torch.manual_seed(0)
    block = 32
    model = Transformer(len(chars), 32, 2, 2, 128, block, dropout=0.1, position="rotary")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        offsets = torch.randint(len(train) - block - 1, (16,), generator=gen)
        window = train[offsets[:, None] + torch.arange(block + 1)]  # (16, block + 1)
        _, loss = model(window[:, :-1], window[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    path = out / "quick_ckpt.pt"
    corpus = {"source": str(ROOT / "transformer_implementation.py"), "chars": len(text),
              "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    model.save(path, extra={"vocab": chars, "corpus": corpus, "config": {"block_size": block}})
    return path


def load_text(corpus: dict) -> str:
    """The checkpoint's corpus again, checked against its sha256."""
    if corpus["source"].startswith("stdlib:"):
        from train_char_lm import build_stdlib_corpus
        text = build_stdlib_corpus(corpus["chars"])
    else:
        path = Path(corpus["source"])
        if not path.is_file():
            sys.exit(f"error: the checkpoint was trained on {path}, which is not there any more")
        text = path.read_text(encoding="utf-8")
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != corpus["sha256"]:
        sys.exit(f"error: the corpus {corpus['source']} differs from the one the checkpoint was trained on "
                 f"(sha256 {corpus['sha256'][:12]}...)")
    return text


def load_model(path: Path):
    """(model in eval mode, block size, validation ids) from a train_char_lm.py checkpoint."""
    try:
        model, extra = Transformer.load(path, map_location="cpu", return_extra=True)
    except (ValueError, RuntimeError, OSError) as exc:
        sys.exit(f"error: --checkpoint {path}: {str(exc).splitlines()[0]}")
    if not isinstance(extra, dict) or "vocab" not in extra or "corpus" not in extra:
        sys.exit(f"error: --checkpoint {path}: not a checkpoint of train_char_lm.py (no vocabulary and corpus in "
                 "its extra)")
    text = load_text(extra["corpus"])
    stoi = {c: i for i, c in enumerate(extra["vocab"])}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    val = ids[int(0.9 * len(ids)):]  # train_char_lm.py's split: the last 10%
    return model.eval(), model.max_seq_length, val


# --------------------------------------------------------------------------------------------------
# The four forms
# --------------------------------------------------------------------------------------------------

def skipped(what: str, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"skipped: {what} failed with torch {torch.__version__}: {type(exc).__name__}: {first}"


def file_bytes(path: Path) -> int:
    """The file, plus the external-data file ONNX writes beside a large model."""
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def make_forms(model, window, out: Path) -> dict:
    """name -> {"run": callable (1, T) long -> (1, T, V) float, "bytes": int} or {"skipped": reason}."""
    forms = {}
    torch.save(model.state_dict(), out / "model_fp32.pt")
    forms["float32"] = {"run": model, "bytes": file_bytes(out / "model_fp32.pt")}

    try:
        import warnings
        from torch.ao.quantization import quantize_dynamic
        with warnings.catch_warnings():  # the API is deprecated in favour of torchao, but still here and working
            warnings.simplefilter("ignore")
            int8 = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            torch.save(int8.state_dict(), out / "model_int8.pt")
        forms["int8"] = {"run": int8, "bytes": file_bytes(out / "model_int8.pt")}
    except Exception as exc:  # noqa: BLE001  (any failure of this path is reported, not raised)
        forms["int8"] = {"skipped": skipped("torch.ao.quantization.quantize_dynamic", exc)}

    program = None
    try:
        program = torch.export.export(model, (window,))
        torch.export.save(program, out / "model.pt2")
        loaded = torch.export.load(out / "model.pt2").module()
        forms["torch.export"] = {"run": loaded, "bytes": file_bytes(out / "model.pt2")}
    except Exception as exc:  # noqa: BLE001
        forms["torch.export"] = {"skipped": skipped("torch.export", exc)}

    try:
        import onnxruntime
    except ImportError as exc:
        forms["onnx"] = {"skipped": f"skipped: onnxruntime is not installed (pip install -r requirements-test.txt); "
                                    f"torch {torch.__version__}: {exc}"}
    else:
        try:
            onnx_path = out / "model.onnx"
            torch.onnx.export(program if program is not None else model, (window,), str(onnx_path), dynamo=True,
                              input_names=["input_ids"], output_names=["logits"], verbose=False)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

            def run_onnx(ids, session=session):
                return torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0])

            forms["onnx"] = {"run": run_onnx, "bytes": file_bytes(onnx_path),
                             "onnxruntime": onnxruntime.__version__}
        except Exception as exc:  # noqa: BLE001
            forms["onnx"] = {"skipped": skipped("torch.onnx.export(dynamo=True) or onnxruntime", exc)}
    return forms


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------

@torch.inference_mode()
def measure(forms: dict, val: torch.Tensor, block: int, n_tokens: int, n_windows: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(len(val) - block - 1, (n_windows,), generator=gen).tolist()
    windows = [val[o: o + block + 1] for o in offsets]
    live = {name: f for name, f in forms.items() if "run" in f}
    results = {name: {"skipped": f["skipped"]} for name, f in forms.items() if "skipped" in f}

    # Validation loss and the difference to float32's logits, on the same windows for every form.
    reference = [live["float32"]["run"](w[None, :-1]) for w in windows]  # each (1, T, V)
    for name, form in live.items():
        losses, diff = [], 0.0
        for w, ref in zip(windows, reference):
            logits = form["run"](w[None, :-1]).float()  # (1, T, V)
            losses.append(F.cross_entropy(logits[0], w[1:]).item())
            diff = max(diff, (logits - ref).abs().max().item())
        results[name] = {"file_bytes": form["bytes"], "val_loss": statistics.fmean(losses),
                         "max_abs_logit_diff_vs_float32": diff}

    # Greedy generation: the share of tokens equal to float32's, from the same prompt.
    prompt = windows[0][None, :-1]  # (1, T)
    greedy = {}
    for name, form in live.items():
        ids = prompt
        for _ in range(n_tokens):
            next_id = form["run"](ids[:, -block:])[:, -1].argmax(dim=-1, keepdim=True)  # (1, 1)
            ids = torch.cat([ids, next_id], dim=1)
        greedy[name] = ids[0, block:]
    for name in live:
        results[name]["greedy_tokens_equal_to_float32"] = (greedy[name] == greedy["float32"]).float().mean().item()

    # Latency per token: the forms take turns, one sliding-window step each, n_tokens rounds.
    times = {name: [] for name in live}
    for name, form in live.items():  # one untimed step each (first-call allocations)
        form["run"](prompt)
    for i in range(n_tokens):
        ids = torch.cat([prompt, greedy["float32"][None, :i]], dim=1)[:, -block:]  # (1, T)
        for name, form in live.items():
            t0 = time.perf_counter()
            form["run"](ids)[:, -1].argmax(dim=-1)
            times[name].append(time.perf_counter() - t0)
    fp32 = results["float32"]
    for name in live:
        r = results[name]
        r["ms_per_token"] = 1e3 * statistics.median(times[name])
        r["size_ratio_vs_float32"] = r["file_bytes"] / fp32["file_bytes"]
        r["latency_ratio_vs_float32"] = statistics.median(times[name]) / statistics.median(times["float32"])
    return results


def markdown_table(results: dict) -> str:
    rows = ["| form | file | size vs float32 | ms per token | latency vs float32 | val loss | "
            "max logit diff vs float32 | greedy tokens = float32 |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "skipped" in r:
            rows.append(f"| {name} | {r['skipped']} | | | | | | |")
            continue
        rows.append(f"| {name} | {cli.format_bytes(r['file_bytes'])} | {r['size_ratio_vs_float32']:.2f} | "
                    f"{r['ms_per_token']:.2f} | {r['latency_ratio_vs_float32']:.2f} | {r['val_loss']:.4f} | "
                    f"{r['max_abs_logit_diff_vs_float32']:.2g} | {r['greedy_tokens_equal_to_float32']:.0%} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_at_start = cli.load_average()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:  # --quick without a checkpoint
        print("training a tiny model for the smoke test ...", flush=True)
        checkpoint = train_quick_model(args.out)
    model, block, val = load_model(checkpoint)
    print(f"model: {checkpoint} | {model.num_parameters():,} parameters | context {block} | "
          f"validation split {len(val):,} characters", flush=True)
    # (1, T): the example input the exported graphs are traced with. A copy, not a view: torch.export saves
    # its example inputs in the .pt2 file, and a view would drag the whole validation split in with it.
    window = val[None, :block].clone()
    forms = make_forms(model, window, args.out)
    for name, form in forms.items():
        print(f"{name}: " + (form["skipped"] if "skipped" in form else f"{cli.format_bytes(form['bytes'])}"), flush=True)
    results = measure(forms, val, block, args.tokens, args.val_windows, args.seed)
    table = markdown_table(results)
    print(table)
    failed = [name for name in ("torch.export", "onnx")
              if "skipped" not in results[name] and results[name]["max_abs_logit_diff_vs_float32"] > EXPORT_TOLERANCE]
    report = {
        "checkpoint": str(checkpoint), "parameters": model.num_parameters(), "block_size": block,
        "forms": results, "export_tolerance": EXPORT_TOLERANCE, "exports_within_tolerance": not failed,
        "tokens_timed": args.tokens, "val_windows": args.val_windows, "threads": args.threads, "seed": args.seed,
        "torch": torch.__version__, "table_markdown": table,
        "command": "python examples/export_model.py " + " ".join(sys.argv[1:] if argv is None else map(str, argv)),
        "machine": {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1_5_15_at_start": load_at_start, "load_average_1_5_15_at_end": cli.load_average()},
    }
    tmp = args.out / "results.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, args.out / "results.json")
    print(f"wrote {args.out / 'results.json'}")
    if failed:
        for name in failed:
            print(f"error: {name} differs from float32 by {results[name]['max_abs_logit_diff_vs_float32']:.3g} "
                  f"> {EXPORT_TOLERANCE:g}", file=sys.stderr)
        sys.exit(1)
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
