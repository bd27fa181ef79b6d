#!/usr/bin/env python
"""Time and memory of the efficient attention family, side by side in one run, against exact attention.

    python examples/benchmark_efficient.py                     # every case, default lengths (minutes)
    python examples/benchmark_efficient.py --cases flash_attention linear_attention
    python examples/benchmark_efficient.py --quick --out /tmp/bench   # smoke test: tiny lengths, seconds

Every case measures its mechanism and the exact attention it replaces at several sequence lengths T, in
one process, one after the other, with B=1, H=4, Dh=64, float32 (``--heads``, ``--head-dim``), forward
and forward+backward. For each (case, method, pass) it records

* ``time_s``: the median wall time of ``--repeats`` calls (after one warm-up call);
* ``peak_bytes``: the peak of *extra* live tensor storage during one call, counted from allocations,
  not from a timer or the process size. On CUDA that is ``torch.cuda.max_memory_allocated`` minus the
  memory held before the call; on the CPU it is read from ``torch.profiler`` with ``profile_memory=True``:
  every allocation and free of tensor storage is recorded with its size and time, and their running sum
  in time order is the live extra memory, whose maximum is the peak (exact, allocation by allocation; it
  counts what torch allocates, not Python objects or the allocator's slack);
* and, over the lengths, the exponent ``p`` of a least-squares fit ``y = c * T^p`` on a log-log scale.

The results go to ``--out`` (default ``docs/mechanisms/results/efficient``): ``benchmark_efficient.json``
holds one entry per case under ``"cases"`` (its rows, fitted exponents and ratios, the machine, its load and
the command), merged into the file already there, so running some cases keeps the others' results; and one
PNG per case, ``<case>.png`` (time and peak memory against T, log-log). The mechanism pages quote these files.

Performance is measured here, never asserted in a test (the tests check correctness only; see the
project's DESIGN.md). The machine is shared: the JSON records the load average before and after the run.

Adding a case: write a function ``case_<name>(ctx) -> list[dict]`` below the marked line, decorate it with
``@register("<name>", "<one line>")``, and return rows made by ``ctx.measure(...)`` (see ``case_flash_attention``).
Optionally return a ``"summary"`` in ``ctx.summary[<name>]`` (ratios, claims checked) for the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the mechanism files live in ROOT/mechanisms

OUT_DIR = ROOT / "docs" / "mechanisms" / "results" / "efficient"


# ---------------------------------------------------------------------------------------------------------
# Measuring: time by repetition, memory by counting allocations.


def _memory_events(prof) -> List[tuple]:
    """(time, bytes) of every allocation (+) and free (-) of tensor storage the profiler recorded, in time order.

    These are the profiler's raw memory records (one per malloc/free, with its own timestamp), read from its
    Kineto results. The per-operator sums it also reports (``cpu_memory_usage``) are not enough: a free that
    happens inside an enclosing scope (an autograd.Function's forward, an autograd node) is credited to that
    scope as a whole, so no ordering of operators recovers when it happened.
    """
    raw = prof.profiler.kineto_results.events()
    return sorted((event.start_ns(), event.nbytes()) for event in raw if event.name() == "[memory]")


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak of extra live tensor storage while `fn()` runs (bytes allocated and not yet freed), see module doc."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in _memory_events(prof):
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def median_seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall time of `repeats` calls of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclasses.dataclass
class Context:
    """What a case needs: the settings and the two measuring functions, plus a place for its summary."""
    quick: bool
    device: str
    dtype: torch.dtype
    batch: int
    heads: int
    head_dim: int
    repeats: int
    seed: int
    summary: Dict[str, dict] = dataclasses.field(default_factory=dict)
    progress: Callable[[str], None] = print

    def qkv(self, t: int, requires_grad: bool = False):
        """Random (B, H, T, Dh) query, key and value with a fixed seed."""
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.batch, self.heads, t, self.head_dim)
        return [torch.randn(shape, generator=g).to(self.device, self.dtype).requires_grad_(requires_grad)
                for _ in range(3)]

    def measure(self, case: str, method: str, t: int, passes: Dict[str, Callable[[], object]],
                memory: bool = True, repeats: Optional[int] = None, **extra) -> List[dict]:
        """One row per pass name ("forward", "forward+backward", "decode", ...): time and peak extra memory."""
        rows = []
        for name, fn in passes.items():
            seconds = median_seconds(fn, self.repeats if repeats is None else repeats, self.device)
            peak = peak_extra_bytes(fn, self.device) if memory else None
            row = {"case": case, "method": method, "T": t, "pass": name, "time_s": seconds, "peak_bytes": peak}
            row.update(extra)
            rows.append(row)
            mem = "" if peak is None else f", peak {peak / 2**20:8.1f} MiB"
            self.progress(f"  {case:<22} {method:<34} T={t:<6} {name:<17} {seconds * 1e3:10.2f} ms{mem}")
        return rows


def fit_exponent(ts: List[int], ys: List[float]) -> Optional[float]:
    """Slope p of the least-squares line through (log T, log y): y ~ c * T^p. None with < 2 usable points."""
    pairs = [(math.log(t), math.log(y)) for t, y in zip(ts, ys) if y is not None and y > 0]
    if len(pairs) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    return sum((x - mx) * (y - my) for x, y in pairs) / sxx if sxx > 0 else None


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """Textbook attention that builds the (B, H, T, T) score and weight matrices: the baseline to beat."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, T)
    if is_causal:
        t = q.size(-2)
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, T, Dh)


def _forward_and_backward(fn: Callable[[], torch.Tensor], inputs) -> Callable[[], None]:
    """A closure running fn() and a backward pass of its sum into `inputs` (grads cleared first)."""
    def run():
        for x in inputs:
            x.grad = None
        fn().sum().backward()
    return run


# ---------------------------------------------------------------------------------------------------------
# The registry of cases.


@dataclasses.dataclass
class Case:
    name: str
    description: str
    run: Callable[[Context], List[dict]]


CASES: Dict[str, Case] = {}


def register(name: str, description: str):
    """Decorator: add `fn(ctx) -> rows` to CASES under `name`."""
    def decorate(fn):
        CASES[name] = Case(name, description, fn)
        return fn
    return decorate


# ---------------------------------------------------------------------------------------------------------
# Cases of helper E1: flash_attention, linear_attention, retention (decoding).


@register("flash_attention", "tiled online-softmax attention vs the explicit T x T path, non-causal")
def case_flash_attention(ctx: Context) -> List[dict]:
    from mechanisms.flash_attention import flash_attention

    lengths = [32, 64] if ctx.quick else [1024, 2048, 4096]
    block = 16 if ctx.quick else 256
    rows = []
    for t in lengths:
        q, k, v = ctx.qkv(t, requires_grad=True)
        flash = lambda: flash_attention(q, k, v, block_size_q=block, block_size_k=block)  # noqa: E731
        explicit = lambda: explicit_attention(q, k, v)  # noqa: E731
        for method, fn in (("explicit (T x T)", explicit), (f"flash_attention (blocks {block})", flash)):
            rows += ctx.measure("flash_attention", method, t, {
                "forward": lambda fn=fn: _no_grad(fn),
                "forward+backward": _forward_and_backward(fn, (q, k, v)),
            })
    t = lengths[-1]
    ratios = {}
    for name in ("forward", "forward+backward"):
        get = lambda m: next(r for r in rows if r["T"] == t and r["pass"] == name and r["method"].startswith(m))  # noqa: E731
        ex, fl = get("explicit"), get("flash")
        ratios[name] = {"T": t, "memory_flash_over_explicit": fl["peak_bytes"] / max(ex["peak_bytes"], 1),
                        "time_flash_over_explicit": fl["time_s"] / ex["time_s"]}
    ctx.summary["flash_attention"] = ratios
    return rows


def _no_grad(fn):
    with torch.no_grad():
        return fn()


@register("linear_attention", "causal linear attention (chunkwise) vs F.scaled_dot_product_attention(is_causal=True)")
def case_linear_attention(ctx: Context) -> List[dict]:
    from mechanisms.linear_attention import causal_linear_attention_chunkwise, causal_linear_attention_cumsum, \
        elu_feature_map

    lengths = [32, 64] if ctx.quick else [1024, 2048, 4096, 8192, 16384]
    cumsum_max = 64 if ctx.quick else 4096  # the naive form holds a Dh x Dh state per position: O(T Dh^2)
    chunk = 16 if ctx.quick else 64
    rows = []
    for t in lengths:
        q, k, v = ctx.qkv(t, requires_grad=True)
        methods = [
            ("sdpa causal (exact)", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            (f"linear chunkwise (chunk {chunk})",
             lambda: causal_linear_attention_chunkwise(elu_feature_map(q), elu_feature_map(k), v, chunk)),
        ]
        if t <= cumsum_max:
            methods.append(("linear cumsum (naive oracle)",
                            lambda: causal_linear_attention_cumsum(elu_feature_map(q), elu_feature_map(k), v)))
        for method, fn in methods:
            rows += ctx.measure("linear_attention", method, t, {
                "forward": lambda fn=fn: _no_grad(fn),
                "forward+backward": _forward_and_backward(fn, (q, k, v)),
            })
    summary = {"memory_exponent": {}, "time_ratio_linear_over_sdpa": {}}
    for method in sorted({r["method"] for r in rows}):
        for name in ("forward", "forward+backward"):
            sel = [r for r in rows if r["method"] == method and r["pass"] == name]
            summary["memory_exponent"][f"{method} | {name}"] = fit_exponent(
                [r["T"] for r in sel], [r["peak_bytes"] for r in sel])
    for t in lengths:
        for name in ("forward", "forward+backward"):
            sel = {r["method"].split(" ")[0] + " " + r["method"].split(" ")[1]: r for r in rows
                   if r["T"] == t and r["pass"] == name}
            lin, sdpa = sel.get("linear chunkwise"), sel.get("sdpa causal")
            if lin and sdpa:
                summary["time_ratio_linear_over_sdpa"][f"T={t} | {name}"] = lin["time_s"] / sdpa["time_s"]
    ctx.summary["linear_attention"] = summary
    return rows


@register("decoding", "time per generated token against context length: retention and linear attention states")
def case_decoding(ctx: Context) -> List[dict]:
    from mechanisms.linear_attention import LinearAttention
    from mechanisms.retention import MultiScaleRetention

    contexts = [8, 16] if ctx.quick else [256, 1024, 4096, 16384]
    steps = 2 if ctx.quick else 32
    d_model = ctx.heads * ctx.head_dim
    torch.manual_seed(ctx.seed)
    modules = {"retention (recurrent step)": MultiScaleRetention(d_model, ctx.heads),
               "linear attention (recurrent step)": LinearAttention(d_model, ctx.heads)}
    rows = []
    for t in contexts:
        prompt = torch.randn(ctx.batch, t, d_model, device=ctx.device, dtype=ctx.dtype)
        new = torch.randn(ctx.batch, steps, d_model, device=ctx.device, dtype=ctx.dtype)
        for method, module in modules.items():
            module = module.to(ctx.device, ctx.dtype).eval()
            with torch.no_grad():
                _, state = module.prefill(prompt)

                def decode(module=module, state=state):
                    s = state
                    for i in range(steps):
                        _, s = module.step(new[:, i:i + 1], s)

            for row in ctx.measure("decoding", method, t, {"decode": lambda d=decode: _no_grad(d)}, repeats=3):
                row["time_per_token_s"] = row["time_s"] / steps
                rows.append(row)
        # the baseline: softmax attention reading a KV cache of length t for each new token
        q1 = torch.randn(ctx.batch, ctx.heads, 1, ctx.head_dim, device=ctx.device, dtype=ctx.dtype)
        kv = torch.randn(ctx.batch, ctx.heads, t, ctx.head_dim, device=ctx.device, dtype=ctx.dtype)

        def softmax_decode():
            for _ in range(steps):
                F.scaled_dot_product_attention(q1, kv, kv)

        for row in ctx.measure("decoding", "softmax + KV cache (attention only)", t,
                               {"decode": lambda: _no_grad(softmax_decode)}, repeats=3):
            row["time_per_token_s"] = row["time_s"] / steps
            rows.append(row)
    summary = {}
    for method in sorted({r["method"] for r in rows}):
        sel = [r for r in rows if r["method"] == method]
        summary[method] = {"time_exponent": fit_exponent([r["T"] for r in sel], [r["time_s"] for r in sel]),
                           "ms_per_token": {r["T"]: r["time_per_token_s"] * 1e3 for r in sel}}
    ctx.summary["decoding"] = summary
    return rows


# ---------------------------------------------------------------------------------------------------------
# Cases of helper E2 (longformer_attention, bigbird_attention, sparse_transformer_attention) go below.


def _dense_masked_module(module, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The dense-mask oracle of a sparse module: its own projections, then explicit T x T masked attention."""
    batch, t, d_model = x.shape
    split = lambda y: y.view(batch, t, module.num_heads, -1).transpose(1, 2)  # noqa: E731  (B, H, T, Dh)
    q, k, v = split(module.q_proj(x)), split(module.k_proj(x)), split(module.v_proj(x))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, T)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return module.out_proj((weights @ v).transpose(1, 2).reshape(batch, t, d_model))


def _sparse_case(ctx: Context, case: str, module, call: Callable, allowed_of: Callable[[int], torch.Tensor],
                 lengths: List[int], dense_max: int, setting: str) -> List[dict]:
    """Module (blocked, no T x T tensor) against the dense-mask oracle with the same weights, at each T."""
    module = module.to(ctx.device, ctx.dtype).eval()
    d_model = module.d_model
    rows = []
    for t in lengths:
        g = torch.Generator().manual_seed(ctx.seed)
        x = torch.randn(ctx.batch, t, d_model, generator=g).to(ctx.device, ctx.dtype).requires_grad_(True)
        methods = [(f"{case} ({setting})", lambda x=x, t=t: call(module, x, t))]
        if t <= dense_max:
            allowed = allowed_of(t).to(ctx.device)  # (B or 1, 1, T, T): built only where the oracle runs
            methods.insert(0, ("dense-mask oracle (T x T)", lambda x=x, a=allowed: _dense_masked_module(module, x, a)))
        for method, fn in methods:
            rows += ctx.measure(case, method, t, {
                "forward": lambda fn=fn: _no_grad(fn),
                "forward+backward": _forward_and_backward(fn, (x,)),
            })
    summary = {"setting": setting, "time_exponent": {}, "memory_exponent": {}}
    for method in sorted({r["method"] for r in rows}):
        for name in ("forward", "forward+backward"):
            sel = [r for r in rows if r["method"] == method and r["pass"] == name]
            key = f"{method} | {name}"
            summary["time_exponent"][key] = fit_exponent([r["T"] for r in sel], [r["time_s"] for r in sel])
            summary["memory_exponent"][key] = fit_exponent([r["T"] for r in sel], [r["peak_bytes"] for r in sel])
    ctx.summary[case] = summary
    return rows


@register("longformer_attention", "banded window in blocks + 2 global tokens vs dense attention with the same mask")
def case_longformer_attention(ctx: Context) -> List[dict]:
    from mechanisms.longformer_attention import LongformerAttention, longformer_mask

    window = 4 if ctx.quick else 64
    lengths = [32, 64] if ctx.quick else [512, 1024, 2048, 4096, 8192]
    torch.manual_seed(ctx.seed)
    module = LongformerAttention(ctx.heads * ctx.head_dim, ctx.heads, window, global_projections=False)

    def globals_of(t):
        mask = torch.zeros(ctx.batch, t, dtype=torch.bool)
        mask[:, [0, t // 2]] = True  # two global tokens: the first and the middle one
        return mask

    def call(module, x, t):
        return module(x, global_mask=globals_of(t).to(x.device))

    return _sparse_case(ctx, "longformer_attention", module, call,
                        lambda t: longformer_mask(t, window, globals_of(t)), lengths,
                        dense_max=64 if ctx.quick else 4096, setting=f"window {window}, 2 global tokens")


@register("sparse_transformer_attention", "strided and fixed patterns with l = sqrt(T) vs dense attention, same mask")
def case_sparse_transformer_attention(ctx: Context) -> List[dict]:
    from mechanisms.sparse_transformer_attention import SparseTransformerAttention, sparse_transformer_masks

    lengths = [16, 36] if ctx.quick else [576, 1024, 2304, 4096, 9216]  # perfect squares: l = sqrt(T)
    dense_max = 36 if ctx.quick else 4096
    d_model = ctx.heads * ctx.head_dim
    rows = []
    for t in lengths:
        stride = math.isqrt(t)
        g = torch.Generator().manual_seed(ctx.seed)
        x = torch.randn(ctx.batch, t, d_model, generator=g).to(ctx.device, ctx.dtype).requires_grad_(True)
        for pattern in ("strided", "fixed"):
            torch.manual_seed(ctx.seed)
            module = SparseTransformerAttention(d_model, ctx.heads, pattern, stride, num_summary=min(8, stride)).to(
                ctx.device, ctx.dtype).eval()
            methods = [(f"{pattern} (l = sqrt(T), c = 8)", lambda m=module, x=x: m(x))]
            if t <= dense_max and pattern == "strided":  # the oracle's cost does not depend on the pattern
                a1, a2 = sparse_transformer_masks(t, pattern, stride, min(8, stride), device=x.device)
                methods.insert(0, ("dense-mask oracle (T x T)",
                                   lambda m=module, x=x, a=a1 | a2: _dense_masked_module(m, x, a)))
            for method, fn in methods:
                rows += ctx.measure("sparse_transformer_attention", method, t, {
                    "forward": lambda fn=fn: _no_grad(fn),
                    "forward+backward": _forward_and_backward(fn, (x,)),
                }, stride=stride)
    summary = {"setting": "stride l = sqrt(T), num_summary c = 8", "time_exponent": {}, "memory_exponent": {}}
    for method in sorted({r["method"] for r in rows}):
        for name in ("forward", "forward+backward"):
            sel = [r for r in rows if r["method"] == method and r["pass"] == name]
            key = f"{method} | {name}"
            summary["time_exponent"][key] = fit_exponent([r["T"] for r in sel], [r["time_s"] for r in sel])
            summary["memory_exponent"][key] = fit_exponent([r["T"] for r in sel], [r["peak_bytes"] for r in sel])
    ctx.summary["sparse_transformer_attention"] = summary
    return rows


@register("bigbird_attention", "window + global + random blocks (block 64) vs dense attention with the same mask")
def case_bigbird_attention(ctx: Context) -> List[dict]:
    from mechanisms.bigbird_attention import BigBirdAttention

    block = 4 if ctx.quick else 64
    lengths = [32, 64] if ctx.quick else [512, 1024, 2048, 4096, 8192]
    torch.manual_seed(ctx.seed)
    module = BigBirdAttention(ctx.heads * ctx.head_dim, ctx.heads, block, num_window_blocks=3, num_global_blocks=2,
                              num_random_blocks=3)

    def allowed_of(t):
        tokens = torch.arange(t) // block
        return module.layout(t)[0][tokens[:, None], tokens[None, :]]  # (T, T): the layout expanded to tokens

    return _sparse_case(ctx, "bigbird_attention", module, lambda m, x, t: m(x), allowed_of, lengths,
                        dense_max=64 if ctx.quick else 4096,
                        setting=f"block {block}, window 3 blocks, 2 global, 3 random")


# ---------------------------------------------------------------------------------------------------------
# Plots, JSON, command line.


def plot_case(name: str, rows: List[dict], out_dir: Path) -> Path:
    """Time and peak memory against T, log-log, one line per (method, pass); returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_memory = any(r["peak_bytes"] for r in rows)
    fig, axes = plt.subplots(1, 2 if has_memory else 1, figsize=(11 if has_memory else 6, 4), squeeze=False)
    for (method, pass_name) in sorted({(r["method"], r["pass"]) for r in rows}):
        sel = sorted((r for r in rows if r["method"] == method and r["pass"] == pass_name), key=lambda r: r["T"])
        ts = [r["T"] for r in sel]
        style = "--" if pass_name == "forward+backward" else "-"
        label = f"{method}, {pass_name}"
        slope = fit_exponent(ts, [r["time_s"] for r in sel])
        axes[0, 0].plot(ts, [r["time_s"] for r in sel], style, marker="o",
                        label=label + ("" if slope is None else f" (T^{slope:.2f})"))
        if has_memory:
            mem = [r["peak_bytes"] / 2**20 if r["peak_bytes"] else float("nan") for r in sel]
            slope = fit_exponent(ts, [r["peak_bytes"] for r in sel])
            axes[0, 1].plot(ts, mem, style, marker="o", label=label + ("" if slope is None else f" (T^{slope:.2f})"))
    axes[0, 0].set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="seconds per call",
                   title=f"{name}: time")
    if has_memory:
        axes[0, 1].set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="peak extra MiB",
                       title=f"{name}: memory")
    for ax in axes[0]:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=None, metavar="CASE",
                        help=f"which cases to run (default: all of {', '.join(sorted(CASES))})")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny lengths, one repeat: a smoke test in seconds")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu",
                        help="where to run (default: %(default)s; auto = CUDA, then MPS, then CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="H (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=64, help="Dh (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--table", metavar="CASE", default=None,
                        help="measure nothing: print the markdown table of CASE from --out's JSON (for the docs pages)")
    args = parser.parse_args(argv)
    if args.table is not None:
        path = args.out / "benchmark_efficient.json"
        cases = json.loads(path.read_text(encoding="utf-8"))["cases"] if path.exists() else {}
        if args.table not in cases:
            parser.error(f"--table {args.table}: no such case in {path} (it has: {', '.join(sorted(cases)) or 'none'})")
        print(markdown_table(cases[args.table]))
        return cases[args.table]
    for name in ("threads", "heads", "head_dim", "repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else (
            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ctx = Context(quick=args.quick, device=device, dtype=torch.float32, batch=1, heads=args.heads,
                  head_dim=args.head_dim, repeats=1 if args.quick else args.repeats, seed=args.seed)
    names = args.cases or sorted(CASES)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.time()
    rows, figures, seconds = [], [], {}
    for i, name in enumerate(names):
        elapsed = time.time() - started
        eta = "" if i == 0 else f", ETA ~{elapsed / i * (len(names) - i):.0f} s"
        print(f"[{i + 1}/{len(names)}] {name}: {CASES[name].description} ({elapsed:.0f} s so far{eta})", flush=True)
        case_started = time.time()
        case_rows = CASES[name].run(ctx)
        seconds[name] = time.time() - case_started
        rows += case_rows
        figures.append(str(plot_case(name, case_rows, args.out)))
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
               "load_average_before": load_before,
               "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None}
    settings = {"batch": ctx.batch, "heads": ctx.heads, "head_dim": ctx.head_dim, "dtype": "float32",
                "repeats": ctx.repeats, "quick": ctx.quick, "seed": args.seed}
    command = "python examples/benchmark_efficient.py " + " ".join(sys.argv[1:] if argv is None else argv)
    # One entry per case, merged into the file already there: running some cases keeps the others' results.
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "benchmark_efficient.json"
    result = merge_results(path, {
        name: {"command": command, "machine": machine, "settings": settings, "seconds": seconds[name],
               "summary": ctx.summary.get(name), "rows": [r for r in rows if r["case"] == name],
               "figure": figure}
        for name, figure in zip(names, figures)})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    print(f"wrote {path} ({', '.join(names)}) and {len(figures)} figure(s) in {time.time() - started:.0f} s")
    return result


def markdown_table(case: dict) -> str:
    """The rows of one case's results as a markdown table: T, method, pass, time and peak extra memory."""
    lines = ["| T | method | pass | time (ms) | peak extra memory (MiB) |", "|---|---|---|---|---|"]
    for r in sorted(case["rows"], key=lambda r: (r["T"], r["method"], r["pass"])):
        memory = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['T']} | {r['method']} | {r['pass']} | {r['time_s'] * 1e3:.1f} | {memory} |")
    return "\n".join(lines)


def merge_results(path: Path, new_cases: Dict[str, dict]) -> dict:
    """{"cases": {name: result}} from the file at `path` (if any) with `new_cases` replacing same-named cases."""
    merged = {"cases": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            merged["cases"].update(old.get("cases", {}))
        except (json.JSONDecodeError, AttributeError):
            print(f"warning: {path} is not a results file of this script; starting a new one", file=sys.stderr)
    merged["cases"].update(new_cases)
    merged["cases"] = dict(sorted(merged["cases"].items()))
    return merged


if __name__ == "__main__":
    main()
