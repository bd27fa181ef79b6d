#!/usr/bin/env python
"""Training speed of the core model at nanoGPT's CPU configuration, and time to a target loss.

    python examples/benchmark_training.py                              # everything
    python examples/benchmark_training.py --parts throughput           # tokens/s and MFU only
    python examples/benchmark_training.py --parts time-to-target       # default vs nanogpt-cpu to val 1.45

Part ``throughput``: the nanogpt-cpu model (4 layers, 4 heads, 128 dims, context 64, batch 12) trained
on the default corpus with the same AdamW step as ``train_char_lm.py``, once with attention on the fused
kernel (``F.scaled_dot_product_attention``) and once on the explicit, readable path (scores, mask,
softmax, weighted sum). The two are timed in alternating rounds so that a change in machine load hits
both alike; each path's figure is its median round.

MFU (model FLOPs utilisation) = achieved FLOP/s / peak FLOP/s, where

* achieved = tokens/s x FLOPs per token, with FLOPs per token = 6 N + 12 L E T, nanoGPT's PaLM-style
  estimate (forward 2 N + backward 4 N for every weight, plus the attention scores and weighted sum:
  2 matmuls of T x E per token and layer, times 3 for forward + backward, counted over the full T x T
  square as nanoGPT and PaLM do). N counts every weight that takes part in a matmul: all parameters
  except the token and position embedding tables, plus the output layer's V x E once: it is tied to the
  token embedding, so it is not a separate parameter, but its matmul is real work.
* peak = the best fp32 ``torch.mm`` rate on square matrices (sizes 1024 to 3072, best of several runs),
  measured in the same process, with the same thread count, before and after the training rounds.

Part ``time-to-target``: ``train_char_lm.py`` with ``--preset default`` and with ``--preset nanogpt-cpu``
(each as a fresh run, seed 1337), evaluated every ``--eval-every`` steps; the figure is the training time
(optimizer steps only, evaluations excluded) until the validation loss first reaches ``--target``.

Results are printed as a table and written to ``results.json`` in the ``--out`` folder (default
``runs/benchmark_training``), with the machine, the thread count and the load average they ran under.
The command line, ``--out`` included, is checked before anything is timed.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402  (standard library only: the command line is checked before torch loads)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=["throughput", "time-to-target"],
                   default=["throughput", "time-to-target"], help="which measurements to run")
    p.add_argument("--skip-time-to-target", action="store_true", help="same as --parts throughput")
    p.add_argument("--steps", type=cli.int_range(1, 100_000), default=20, help="training steps per timed round")
    p.add_argument("--rounds", type=cli.int_range(1, 1000), default=6, help="alternating fused/explicit rounds")
    p.add_argument("--warmup", type=cli.int_range(0, 100_000), default=5, help="untimed steps per path first")
    p.add_argument("--peak-sizes", type=cli.int_range(16, 32768), nargs="+", default=[1024, 2048, 3072],
                   help="square matmul sizes tried for the fp32 peak")
    p.add_argument("--target", type=cli.float_range(0, low_open=True), default=1.45,
                   help="validation loss to reach")
    p.add_argument("--eval-every", type=cli.int_range(1, 100_000), default=50,
                   help="evaluation interval (steps) for time-to-target")
    p.add_argument("--seed", type=cli.int_range(0, 2 ** 32 - 1), default=1337, help="seed of the time-to-target runs")
    p.add_argument("--threads", type=cli.int_range(1, 1024), default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark_training"),
                   help="folder for results.json (created if missing)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line with the standard library only, before anything is timed."""
    p = build_parser()
    args = p.parse_args(argv)
    cli.check_output_folder(p, args.out)
    if args.out.suffix == ".json":
        p.error(f"--out {args.out}: --out is a folder (results.json is written in it), not a .json file name")
    n = max(args.peak_sizes)
    cli.check_memory(p, 3 * n * n * 4, f"the matmul peak at --peak-sizes {n}")
    if args.skip_time_to_target:
        args.parts = [x for x in args.parts if x != "time-to-target"]
    return args


if __name__ == "__main__":
    parse_args()  # a bad command line is refused here, before the slow imports below

import torch  # noqa: E402

import transformer_implementation as core  # noqa: E402
import train_char_lm as lm  # noqa: E402


def matmul_peak(sizes=(1024, 2048, 3072), repeats: int = 5) -> dict:
    """Best fp32 matmul FLOP/s over a few square sizes (the machine's practical ceiling)."""
    best = {"flops": 0.0, "size": None}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            dt = time.perf_counter() - t0
            rate = 2 * n ** 3 / dt
            if rate > best["flops"]:
                best = {"flops": rate, "size": n}
    return best


def flops_per_token(model: core.Transformer) -> dict:
    cfg = model.config
    E, L, T, V = cfg["embed_dim"], cfg["num_layers"], cfg["max_seq_length"], cfg["vocab_size"]
    tables = model.token_embedding.weight.numel()
    if isinstance(model.pos, core.LearnedPositionalEmbedding):
        tables += model.pos.weight.numel()
    n_matmul = model.num_parameters() - tables + V * E  # + the (tied) output layer's matmul
    return {"n_params": model.num_parameters(), "n_matmul_params": n_matmul,
            "flops_per_token": 6 * n_matmul + 12 * L * E * T}


def explicit_attention(enabled: bool):
    """Make the core's attention use the explicit path (True) or its default, the fused kernel (False).

    The core exposes the switch per call (``scaled_dot_product_attention(..., fused=False)``);
    ``MultiHeadAttention`` looks the function up in the module at call time, so rebinding the module
    attribute switches every layer of every model at once.
    """
    original = getattr(explicit_attention, "_original", core.scaled_dot_product_attention)
    explicit_attention._original = original
    core.scaled_dot_product_attention = functools.partial(original, fused=False) if enabled else original


def throughput(args) -> dict:
    cfg = lm.PRESETS["nanogpt-cpu"]
    text = lm.build_stdlib_corpus()
    data = lm.CharData(text)
    torch.manual_seed(0)
    model = lm.make_model(cfg, data.vocab_size)
    optimizer = lm.make_optimizer(model, cfg, "cpu")
    gen = torch.Generator().manual_seed(0)
    counts = flops_per_token(model)
    tokens_per_step = cfg.batch_size * cfg.block_size

    def steps(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = data.batch("train", cfg.batch_size, cfg.block_size, gen)
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            loss.item()
        return (time.perf_counter() - t0) / n

    peak_before = matmul_peak(args.peak_sizes)
    rounds = {"fused": [], "explicit": []}
    for path in ("fused", "explicit"):  # warm-up both paths (allocator, kernels)
        explicit_attention(path == "explicit")
        steps(args.warmup)
    for r in range(args.rounds):
        order = ("fused", "explicit") if r % 2 == 0 else ("explicit", "fused")
        for path in order:
            explicit_attention(path == "explicit")
            rounds[path].append(steps(args.steps))
        print(f"  round {r + 1}/{args.rounds}: fused {tokens_per_step / rounds['fused'][-1]:,.0f} tok/s, "
              f"explicit {tokens_per_step / rounds['explicit'][-1]:,.0f} tok/s", flush=True)
    explicit_attention(False)
    peak_after = matmul_peak(args.peak_sizes)
    peak = max(peak_before["flops"], peak_after["flops"])
    result = {"config": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")},
              **counts, "tokens_per_step": tokens_per_step,
              "matmul_peak_flops": peak, "matmul_peak_before": peak_before, "matmul_peak_after": peak_after,
              "steps_per_round": args.steps, "rounds": args.rounds, "paths": {}}
    for path, times in rounds.items():
        step_time = statistics.median(times)
        tps = tokens_per_step / step_time
        result["paths"][path] = {"step_time_s": step_time, "tokens_per_s": tps,
                                 "achieved_flops": tps * counts["flops_per_token"],
                                 "mfu": tps * counts["flops_per_token"] / peak,
                                 "round_step_times_s": times}
    return result


def time_to_target(args) -> dict:
    out = {}
    for preset in ("default", "nanogpt-cpu"):
        with tempfile.TemporaryDirectory() as tmp:
            argv = ["--preset", preset, "--out", tmp, "--eval-interval", str(args.eval_every),
                    "--target-loss", str(args.target), "--stop-at-target", "--no-checkpoint",
                    "--sample-chars", "0", "--seed", str(args.seed), "--log-interval", "100"]
            print(f"\n== time to val loss {args.target}: preset {preset} ==", flush=True)
            t0 = time.perf_counter()
            res = lm.main(argv)
            wall = time.perf_counter() - t0
        target = res["target"]
        out[preset] = {"reached": target is not None,
                       "train_time_s": target["train_time_s"] if target else None,
                       "step": target["step"] if target else None,
                       "steps_run": res["steps"], "final_val_loss": res["final_val_loss"],
                       "tokens_per_s": res["tokens_per_s"], "wall_time_s": wall,
                       "config": res["config"],
                       "val_curve": [(e["step"], e["train_time_s"], e["val"]) for e in res["evals"]]}
    d, n = out["default"], out["nanogpt-cpu"]
    out["ratio_default_over_nanogpt"] = (d["train_time_s"] / n["train_time_s"]
                                         if d["reached"] and n["reached"] else None)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {"machine": {"cpu": lm.cpu_name(), "logical_cpus": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                           "python": platform.python_version(),
                           "load_average_1_5_15": cli.load_average()},
               "command": "python examples/benchmark_training.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"machine: {results['machine']['cpu']}, {results['machine']['torch_threads']} torch threads, "
          f"torch {torch.__version__}")
    if "throughput" in args.parts:
        print("== throughput at the nanogpt-cpu configuration ==", flush=True)
        tp = throughput(args)
        results["throughput"] = tp
        print(f"\nFLOPs/token = 6 N + 12 L E T = 6 x {tp['n_matmul_params']:,} + 12 x 4 x 128 x 64 "
              f"= {tp['flops_per_token']:,};  matmul peak {tp['matmul_peak_flops'] / 1e9:.1f} GFLOP/s "
              f"(fp32, {torch.get_num_threads()} threads)")
        print(f"{'attention path':<16}{'ms/step':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'MFU':>8}")
        for path, r in tp["paths"].items():
            print(f"{path:<16}{r['step_time_s'] * 1e3:>10.1f}{r['tokens_per_s']:>12,.0f}"
                  f"{r['achieved_flops'] / 1e9:>10.1f}{r['mfu'] * 100:>7.1f}%")
        print(f"fused / explicit speed: {tp['paths']['fused']['tokens_per_s'] / tp['paths']['explicit']['tokens_per_s']:.2f}x")
    if "time-to-target" in args.parts:
        tt = time_to_target(args)
        results["time_to_target"] = tt
        print(f"\n{'preset':<14}{'reached':>8}{'step':>7}{'train time s':>14}{'tokens/s':>11}")
        for preset in ("default", "nanogpt-cpu"):
            r = tt[preset]
            ts = f"{r['train_time_s']:.1f}" if r["reached"] else "-"
            print(f"{preset:<14}{str(r['reached']):>8}{str(r['step']):>7}{ts:>14}{r['tokens_per_s']:>11,.0f}")
        if tt["ratio_default_over_nanogpt"] is not None:
            print(f"default needs {tt['ratio_default_over_nanogpt'] * 100:.0f}% of nanogpt-cpu's training time")
    results["machine"]["load_average_1_5_15_at_end"] = cli.load_average()
    lm.save_json(args.out / "results.json", results)
    print(f"wrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
