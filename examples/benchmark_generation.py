#!/usr/bin/env python
"""Generation speed with and without the key/value cache: same model, same prompt, greedy decoding.

    python examples/benchmark_generation.py                         # nanogpt-cpu sized model, 512 new tokens
    python examples/benchmark_generation.py --checkpoint runs/char_lm/ckpt.pt

Without the cache every new token re-runs the model over the whole context (T tokens: O(T) projections
and O(T^2) attention per step); with it only the newest token is projected and attends to the stored
keys and values (O(1) projections, O(T) attention). Both must produce exactly the same tokens; the
script asserts it, then prints tokens/s for each and their ratio, and writes JSON.

The model's context (``max_seq_length``) is made at least prompt + new tokens long, so neither path
crops its context: cropping would make the cached path re-fill its cache every step (see
``Transformer.generate``) and the comparison would measure something else. By default the model has the
shape of train_char_lm.py's default preset (4 layers, 4 heads, 128 dims, rotary positions, no biases)
with a 1024-character context and random weights (seeded): speed does not depend on what the weights
say. ``--checkpoint`` loads a trained
``train_char_lm.py`` model instead (opened with the core's ``Transformer.load``; the vocabulary is in the
checkpoint's ``extra``) and widens its context if needed (a learned position table is extended with fresh
rows; sinusoidal and rotary positions need nothing); the text past the trained context is then not
meaningful, the timing is.

``--out`` is a folder (default ``runs/benchmark_generation``): the script writes ``results.json`` there,
with the machine, the thread count and the load average the timings ran under. The command line,
``--out`` included, is checked before anything is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402  (standard library only: the command line is checked before torch loads)

PROMPT = "import os\nimport sys\n\n\ndef main(argv=None):\n    "
HEADS = 4  # of the default model; the memory estimate below uses it


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description="Greedy generation with and without the KV cache.")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a train_char_lm.py checkpoint (default: a model with random weights)")
    p.add_argument("--new-tokens", type=cli.int_range(1, 1_000_000), default=512,
                   help="tokens generated per timed run")
    p.add_argument("--prompt", default=PROMPT, help="the text generation starts from")
    p.add_argument("--prompt-chars", type=cli.int_range(1, 1_100_000), default=None, metavar="N",
                   help="use the first N characters of train_char_lm.py's default corpus as the prompt instead")
    p.add_argument("--context", type=cli.int_range(1, 1_000_000), default=1024,
                   help="max_seq_length of the default model (widened to prompt + new tokens if shorter)")
    p.add_argument("--repeats", type=cli.int_range(1, 1000), default=3,
                   help="timed runs per path (alternating); the median counts")
    p.add_argument("--seed", type=cli.int_range(0, 2 ** 32 - 1), default=1337, help="seed of the random weights")
    p.add_argument("--threads", type=cli.int_range(1, 1024), default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu",
                   help="where to run; auto picks CUDA if available, else the CPU")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark_generation"),
                   help="folder for results.json (created if missing)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line with the standard library only, before anything is timed."""
    p = build_parser()
    args = p.parse_args(argv)
    cli.check_output_folder(p, args.out)
    if args.out.suffix == ".json":
        p.error(f"--out {args.out}: --out is a folder (results.json is written in it), not a .json file name")
    if args.checkpoint is not None:
        cli.check_input_file(p, args.checkpoint, "--checkpoint")
    if not args.prompt:
        p.error("--prompt is empty")
    # The uncached path runs the model over the whole context: refuse a length whose attention matrices
    # (heads x T x T floats, per layer at a time) could not fit.
    T = (args.prompt_chars or len(args.prompt)) + args.new_tokens
    cli.check_memory(p, 4 * HEADS * T * T * 4, f"generation over {T:,} positions (prompt + --new-tokens)")
    return args


if __name__ == "__main__":
    parse_args()  # a bad command line is refused here, before the slow imports below

import torch  # noqa: E402

from transformer_implementation import Transformer  # noqa: E402
import train_char_lm  # noqa: E402
from train_char_lm import cpu_name  # noqa: E402


def build_model(args, need: int):
    if args.checkpoint is None:
        torch.manual_seed(args.seed)
        vocab = "".join(chr(c) for c in range(32, 127)) + "\n"
        model = Transformer(len(vocab), 128, HEADS, 4, 512, max(need, args.context), dropout=0.0,
                            position="rotary", bias=False)
        return model.eval(), vocab
    try:
        trained, extra = Transformer.load(args.checkpoint, map_location="cpu", return_extra=True)
    except ValueError as exc:  # another format, an older example's checkpoint included: say which
        sys.exit(f"error: --checkpoint {args.checkpoint}: {exc}")
    except Exception as exc:  # a torn or foreign file
        sys.exit(f"error: --checkpoint {args.checkpoint}: cannot be read as a checkpoint ({type(exc).__name__})")
    if not isinstance(extra, dict) or "vocab" not in extra:
        sys.exit(f"error: --checkpoint {args.checkpoint}: a Transformer without a vocabulary (extra['vocab']); "
                 "not a checkpoint written by examples/train_char_lm.py")
    config, state = trained.config, trained.state_dict()
    old = config["max_seq_length"]
    if need <= old:
        return trained, extra["vocab"]
    config["max_seq_length"] = need
    model = Transformer(**config)
    if "pos.weight" in state:  # a learned position table gets fresh rows for the new positions
        fresh = model.pos.weight.detach().clone()
        fresh[:old] = state["pos.weight"]
        state["pos.weight"] = fresh
    model.load_state_dict(state)
    return model.eval(), extra["vocab"]


def time_generation(model, ids, new_tokens: int, use_cache: bool):
    t0 = time.perf_counter()
    out = model.generate(ids, new_tokens, temperature=0.0, use_cache=use_cache)
    return time.perf_counter() - t0, out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        sys.exit(f"error: --device cuda: CUDA is not available here ({build})")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        sys.exit("error: --device mps: MPS is not available here")

    if args.prompt_chars is not None:
        args.prompt = train_char_lm.build_stdlib_corpus(args.prompt_chars)
    need = len(args.prompt) + args.new_tokens
    model, vocab = build_model(args, need)
    model.to(device)
    stoi = {c: i for i, c in enumerate(vocab)}
    unknown = sorted({c for c in args.prompt if c not in stoi})
    if unknown:
        sys.exit(f"error: --prompt has characters outside the vocabulary: {''.join(unknown)!r}")
    ids = torch.tensor([[stoi[c] for c in args.prompt]], dtype=torch.long, device=device)  # (1, T)
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, context {model.max_seq_length}; "
          f"prompt {ids.shape[1]} chars + {args.new_tokens} new; {torch.get_num_threads()} threads")

    time_generation(model, ids, 16, True)  # warm-up both paths
    time_generation(model, ids, 16, False)
    times = {"cache": [], "no_cache": []}
    outputs = {}
    for r in range(args.repeats):
        for path in (("cache", "no_cache") if r % 2 == 0 else ("no_cache", "cache")):
            dt, out = time_generation(model, ids, args.new_tokens, path == "cache")
            times[path].append(dt)
            outputs.setdefault(path, out)
            print(f"  run {r + 1}/{args.repeats} {path:<9} {args.new_tokens / dt:8.1f} tokens/s", flush=True)
    same = torch.equal(outputs["cache"], outputs["no_cache"])
    if not same:
        diff = (outputs["cache"] != outputs["no_cache"]).nonzero()[0, 1].item() - ids.shape[1]
        raise AssertionError(f"cached and uncached greedy tokens differ from new token {diff} on")

    result = {"machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "device": device,
                          "load_average_1_5_15": cli.load_average()},
              "command": "python examples/benchmark_generation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": {"config": model.config, "parameters": model.num_parameters(),
                        "checkpoint": str(args.checkpoint) if args.checkpoint else None},
              "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "identical_tokens": same}
    for path, ts in times.items():
        med = statistics.median(ts)
        result[path] = {"seconds": med, "tokens_per_s": args.new_tokens / med, "runs_s": ts}
    result["speedup"] = result["cache"]["tokens_per_s"] / result["no_cache"]["tokens_per_s"]
    text = "".join(vocab[i] for i in outputs["cache"][0, ids.shape[1]:].tolist())
    result["sample_start"] = text[:120]

    print(f"\n{'path':<12}{'seconds':>10}{'tokens/s':>12}")
    for path in ("no_cache", "cache"):
        print(f"{path:<12}{result[path]['seconds']:>10.3f}{result[path]['tokens_per_s']:>12.1f}")
    print(f"identical greedy tokens: {same}; the cache is {result['speedup']:.1f}x faster "
          f"at {args.new_tokens} new tokens")
    train_char_lm.save_json(args.out / "results.json", result)
    print(f"wrote {args.out / 'results.json'}")
    return result


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
