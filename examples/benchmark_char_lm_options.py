#!/usr/bin/env python
"""Measure two training options of the core on the character-level language model, side by side.

    python examples/benchmark_char_lm_options.py                  # both parts, results in runs/char_lm_options
    python examples/benchmark_char_lm_options.py --part moe       # dense against mixture of experts
    python examples/benchmark_char_lm_options.py --part checkpointing
    python examples/benchmark_char_lm_options.py --quick          # smoke test: a few steps, tiny sizes

``moe``: two runs of examples/train_char_lm.py with the same settings and seed, one with the dense
feed-forward layer (width 4E) and one with ``--ff moe`` (``--num-experts`` experts of width 4E / top_k, top_k
per token: the same work and the same active parameters per token, plus the router). Writes both loss
curves in one figure, ``moe_loss.png``, and a table: parameters in all and active per token, final
validation loss, training throughput, each beside the dense run's as a ratio.

``checkpointing``: a deeper model (``--ckpt-layers`` blocks) trained with and without
``model.gradient_checkpointing``. Peak memory: each configuration runs its training steps in a fresh
process and reports the growth of its peak resident memory (``ru_maxrss``) over its memory before the
first step, and the bytes autograd keeps for the backward pass (counted with saved-tensor hooks, a
number independent of the allocator). Step time: one process alternates the two configurations step by
step, so a change of the machine's load hits both alike; the median of each. Also the largest gradient
difference between the two (they must be equal).

Results in ``results.json`` under ``--out`` with the machine and its load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402


def build_parser():
    p = cli.ArgumentParser(description="Dense against mixture-of-experts char-LM training, and gradient "
                                       "checkpointing's memory and time, measured side by side.")
    p.add_argument("--part", choices=["all", "moe", "checkpointing"], default="all", help="what to measure")
    p.add_argument("--out", type=Path, default=Path("runs/char_lm_options"), help="folder for results and figures")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, a few steps")
    p.add_argument("--max-iters", type=cli.int_range(1, 10 ** 6), default=400, help="moe: training steps of each run")
    p.add_argument("--eval-interval", type=cli.int_range(1, 10 ** 6), default=50, help="moe: steps between evaluations")
    p.add_argument("--num-experts", type=cli.int_range(1, 64), default=4, help="moe: experts per layer")
    p.add_argument("--top-k", type=cli.int_range(1, 64), default=2, help="moe: experts per token")
    p.add_argument("--ckpt-layers", type=cli.int_range(1, 256), default=12, help="checkpointing: blocks")
    p.add_argument("--ckpt-block-size", type=cli.int_range(2, 4096), default=256, help="checkpointing: context")
    p.add_argument("--ckpt-batch-size", type=cli.int_range(1, 4096), default=8, help="checkpointing: batch")
    p.add_argument("--ckpt-steps", type=cli.int_range(1, 10 ** 4), default=6, help="checkpointing: timed steps of each")
    p.add_argument("--seed", type=cli.int_range(0, 2 ** 32 - 1), default=1337, help="seed of both runs")
    p.add_argument("--measure", choices=["plain", "checkpointed"], default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    cli.check_output_folder(p, args.out)
    if args.top_k > args.num_experts:
        p.error(f"--top-k {args.top_k} must not exceed --num-experts {args.num_experts}")
    if args.quick:
        args.max_iters, args.eval_interval = 4, 2
        args.ckpt_layers, args.ckpt_block_size, args.ckpt_batch_size, args.ckpt_steps = 3, 16, 2, 2
    return args


if __name__ == "__main__":
    parse_args()

import torch  # noqa: E402

import train_char_lm  # noqa: E402
from transformer_implementation import MoEFeedForward, Transformer  # noqa: E402


def machine() -> dict:
    return {"cpu": train_char_lm.cpu_name(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average_1_5_15": cli.load_average()}


# ------------------------------------------------------------------------------------------ moe


def active_parameters(model: Transformer) -> int:
    """Parameters one token uses: all, minus the experts it is not sent to."""
    idle = 0
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            per_expert = sum(p.numel() for p in m.experts[0].parameters())
            idle += (m.num_experts - m.top_k) * per_expert
    return model.num_parameters() - idle


def run_moe(args) -> dict:
    common = ["--max-iters", str(args.max_iters), "--eval-interval", str(args.eval_interval), "--seed", str(args.seed),
              "--threads", "1", "--sample-chars", "0", "--no-checkpoint"]
    if args.quick:
        common += ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "2",
                   "--eval-iters", "1", "--data", str(ROOT / "transformer_implementation.py")]
    runs = {}
    for name, extra in [("dense", []), ("moe", ["--ff", "moe", "--num-experts", str(args.num_experts),
                                                "--top-k", str(args.top_k)])]:
        print(f"---- {name} ----", flush=True)
        result = train_char_lm.main(common + extra + ["--out", str(args.out / name)])
        cfg = train_char_lm.TrainConfig(**result["config"])
        model = train_char_lm.make_model(cfg, result["corpus"]["vocab_size"])
        runs[name] = {"parameters": model.num_parameters(), "active_parameters": active_parameters(model),
                      "final_val_loss": result["final_val_loss"], "tokens_per_s": result["tokens_per_s"],
                      "train_time_s": result["train_time_s"], "evals": result["evals"],
                      "train_loss": result["train_loss"], "command": result["command"]}
    dense = runs["dense"]
    for r in runs.values():
        r["parameters_vs_dense"] = r["parameters"] / dense["parameters"]
        r["active_parameters_vs_dense"] = r["active_parameters"] / dense["active_parameters"]
        r["throughput_vs_dense"] = r["tokens_per_s"] / dense["tokens_per_s"]
        r["val_loss_minus_dense"] = r["final_val_loss"] - dense["final_val_loss"]
    title = f"char LM: dense vs {args.num_experts} experts, top-{args.top_k} (equal active parameters)"
    figure = plot_moe(runs, args.out / "moe_loss.png", title, skip=args.eval_interval)
    return {"runs": runs, "figure": str(figure)}


def plot_moe(runs: dict, path: Path, title: str, skip: int) -> Path:
    """Both runs' validation and (smoothed) training losses in one figure, from step ``skip`` on: the first
    steps fall from ~8 to ~2.5 and would squeeze the differences that matter into a thin band."""
    from plotting import plot_loss_curves
    curves = {}
    for name, r in runs.items():
        evals = [e for e in r["evals"] if e["step"] >= skip]
        curves[f"{name}: val"] = ([e["step"] for e in evals], [e["val"] for e in evals])
        xs, ys = smoothed(r["train_loss"], 10)
        curves[f"{name}: train (mean of 10 steps)"] = ([x for x in xs if x > skip], [y for x, y in zip(xs, ys) if x > skip])
    return plot_loss_curves(curves, path, title=title)


def smoothed(values, width):
    xs, ys = [], []
    for end in range(width, len(values) + 1, width):
        xs.append(end)
        ys.append(statistics.fmean(values[end - width:end]))
    return xs, ys


# ---------------------------------------------------------------------------------- checkpointing


def ckpt_model(args) -> Transformer:
    torch.manual_seed(args.seed)
    return Transformer(96, 128 if not args.quick else 16, 4 if not args.quick else 2, args.ckpt_layers,
                       512 if not args.quick else 64, args.ckpt_block_size, dropout=0.1, position="rotary")


def ckpt_batch(args, step):
    g = torch.Generator().manual_seed(args.seed + step)
    x = torch.randint(0, 96, (args.ckpt_batch_size, args.ckpt_block_size + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_one(args) -> None:
    """In a fresh process: the growth of peak RSS over the training steps, and the saved-tensor bytes."""
    torch.set_num_threads(1)
    model = ckpt_model(args).train()
    model.gradient_checkpointing = args.measure == "checkpointed"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():  # allocate gradients and AdamW's moments before the baseline
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    # A warm-up step on one short sequence loads every kernel and library the real steps need; its own
    # activations are negligible. The baseline is taken after it.
    x, y = ckpt_batch(args, 0)
    model(x[:1, :2], y[:1, :2])[1].backward()
    opt.zero_grad(set_to_none=False)
    before = rss_bytes()
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    for step in range(2):
        x, y = ckpt_batch(args, step)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(x, y)
        if step == 0:
            saved_bytes = saved[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"peak_growth_bytes": peak - before, "saved_tensor_bytes": saved_bytes}))


def run_checkpointing(args) -> dict:
    memory = {}
    for config in ("plain", "checkpointed"):
        argv = [sys.executable, __file__, "--measure", config, "--out", str(args.out), "--seed", str(args.seed),
                "--ckpt-layers", str(args.ckpt_layers), "--ckpt-block-size", str(args.ckpt_block_size),
                "--ckpt-batch-size", str(args.ckpt_batch_size)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(argv, capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        memory[config] = json.loads(proc.stdout.strip().splitlines()[-1])

    # Time, alternating the two configurations step by step in this one process; gradients compared.
    torch.set_num_threads(1)
    model = ckpt_model(args).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay put, every step is alike
    times = {"plain": [], "checkpointed": []}
    max_grad_diff = 0.0
    for step in range(args.ckpt_steps + 1):
        x, y = ckpt_batch(args, step)
        grads = {}
        for config in ("plain", "checkpointed"):
            model.gradient_checkpointing = config == "checkpointed"
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same dropout masks for both
            t0 = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if step > 0:  # step 0 warms up
                times[config].append(dt)
            grads[config] = [p.grad.clone() for p in model.parameters()]
        max_grad_diff = max(max_grad_diff, max((a - b).abs().max().item()
                                               for a, b in zip(grads["plain"], grads["checkpointed"])))
    plain, ckpt = memory["plain"], memory["checkpointed"]
    t_plain, t_ckpt = statistics.median(times["plain"]), statistics.median(times["checkpointed"])
    return {
        "model": {"layers": args.ckpt_layers, "width": 128 if not args.quick else 16, "context": args.ckpt_block_size,
                  "batch": args.ckpt_batch_size, "parameters": model.num_parameters(), "dropout": 0.1},
        "peak_memory_growth_bytes": {"plain": plain["peak_growth_bytes"], "checkpointed": ckpt["peak_growth_bytes"]},
        "saved_tensor_bytes": {"plain": plain["saved_tensor_bytes"], "checkpointed": ckpt["saved_tensor_bytes"]},
        "step_time_s_median": {"plain": t_plain, "checkpointed": t_ckpt},
        "peak_memory_ratio": ckpt["peak_growth_bytes"] / max(1, plain["peak_growth_bytes"]),
        "saved_tensor_ratio": ckpt["saved_tensor_bytes"] / max(1, plain["saved_tensor_bytes"]),
        "step_time_ratio": t_ckpt / t_plain, "steps_timed": args.ckpt_steps,
        "max_abs_gradient_difference": max_grad_diff,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.measure:
        measure_one(args)
        return {}
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {"machine_at_start": machine(),
              "command": "python examples/benchmark_char_lm_options.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.part in ("all", "moe"):
        report["moe"] = run_moe(args)
        for name, r in report["moe"]["runs"].items():
            print(f"{name}: {r['parameters']:,} parameters ({r['active_parameters']:,} active per token) | val loss "
                  f"{r['final_val_loss']:.4f} | {r['tokens_per_s']:,.0f} tok/s ({r['throughput_vs_dense']:.2f} x dense)")
    if args.part in ("all", "checkpointing"):
        c = report["checkpointing"] = run_checkpointing(args)
        print(f"checkpointing, {c['model']['layers']} layers, context {c['model']['context']}: peak memory growth "
              f"{cli.format_bytes(c['peak_memory_growth_bytes']['plain'])} -> "
              f"{cli.format_bytes(c['peak_memory_growth_bytes']['checkpointed'])} ({c['peak_memory_ratio']:.2f} x); "
              f"saved tensors {c['saved_tensor_ratio']:.2f} x; step time {c['step_time_s_median']['plain']:.3f} s -> "
              f"{c['step_time_s_median']['checkpointed']:.3f} s ({c['step_time_ratio']:.2f} x); gradient difference "
              f"{c['max_abs_gradient_difference']:.3g}")
    report["machine_at_end"] = machine()
    report["wall_time_s"] = time.perf_counter() - start
    tmp = args.out / "results.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, args.out / "results.json")
    print(f"wrote {args.out / 'results.json'}")
    return report


if __name__ == "__main__":
    main()
