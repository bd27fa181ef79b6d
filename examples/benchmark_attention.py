#!/usr/bin/env python
"""How every mechanism's time and memory grow with the sequence length T, side by side in one run.

    python examples/benchmark_attention.py                             # every registered mechanism (minutes)
    python examples/benchmark_attention.py --mechanism linear_attention --mechanism local_attention
    python examples/benchmark_attention.py --quick --out /tmp/bench    # smoke test: tiny lengths, seconds

Each mechanism is the causal token mixer of ``examples/compare_mechanisms.py``'s registry (so exactly what
the comparison trains), at width ``--d-model`` with ``--heads`` heads, batch ``--batch``, float32. Windowed
and blocked mechanisms get a FIXED window of ``--window`` tokens here (in training it is T/8), so their cost
is linear in T. Two references are measured beside them on the bare (B, H, T, Dh) attention core:
``sdpa``, PyTorch's exact ``F.scaled_dot_product_attention(is_causal=True)``, and ``explicit``, the
textbook ``softmax(QK^T/sqrt(d) + causal mask) V`` that builds the T x T matrices.

For each T of 256, 512, ... up to ``--max-len`` and each mechanism still running, a *round* measures:

* ``forward``: the mixer under ``torch.no_grad()``; ``forward+backward``: the mixer, then ``out.sum()``'s
  backward to the input and the parameters;
* ``time_s``: the median of ``--repeats`` calls, the mechanisms ALTERNATING inside each repeat (mechanism 1,
  2, ..., then again), so a change of the machine's load hits all of them alike;
* ``peak_bytes``: the peak of extra live tensor storage during one call, counted from allocations by
  ``torch.profiler`` (``profile_memory=True``; ``compare_mechanisms.peak_extra_bytes``), never from a timer.

A mechanism drops out of the larger lengths once one forward+backward took more than ``--max-seconds``
(the result says so). From the points of each mechanism the exponent ``p`` of ``time ~ c * T^p`` and
``memory ~ c * T^p`` is fitted by least squares on log-log axes, over the points with T >= 1024 (where the
fixed costs no longer dominate; over all points when fewer than two qualify). Outputs in ``--out``
(default ``runs/benchmark_attention``): ``benchmark_attention.json`` (rows, exponents, the machine, its
load before and after, the command) and ``benchmark_attention.png`` (one log-log figure: time and memory of
forward+backward for every mechanism, the two references drawn in black).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402

REFERENCES = ("sdpa", "explicit")


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See docs/examples/benchmark_attention.md.")
    p.add_argument("--mechanism", action="append", default=None, metavar="NAME",
                   help="a registry name of compare_mechanisms.py (repeatable; default: all)")
    p.add_argument("--d-model", type=cli.int_range(2, 8192), default=64)
    p.add_argument("--heads", type=cli.int_range(1, 256), default=2)
    p.add_argument("--batch", type=cli.int_range(1, 1024), default=1)
    p.add_argument("--window", type=cli.int_range(1, 1 << 20), default=64, help="fixed window / block of the windowed mechanisms")
    p.add_argument("--min-len", type=cli.int_range(2, 1 << 22), default=256)
    p.add_argument("--max-len", type=cli.int_range(2, 1 << 22), default=8192)
    p.add_argument("--max-seconds", type=cli.float_range(0, None, low_open=True), default=1.0,
                   help="a mechanism stops growing T after a forward+backward slower than this")
    p.add_argument("--repeats", type=cli.int_range(1, 1000), default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the profiler's memory count (faster)")
    p.add_argument("--threads", type=cli.int_range(0, 1024), default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=cli.int_range(0), default=0)
    p.add_argument("--device", type=cli.device_name, default="auto")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmark_attention")
    p.add_argument("--quick", action="store_true", help="smoke test: T = 16, 32, 64, d_model 16")
    p.add_argument("--table", type=Path, default=None, metavar="JSON",
                   help="measure nothing: print the markdown table of an earlier benchmark_attention.json")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.heads, args.min_len, args.max_len, args.repeats, args.window = 16, 2, 16, 64, 1, 8
    if args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    if args.min_len > args.max_len:
        parser.error(f"--min-len {args.min_len} is larger than --max-len {args.max_len}")
    import compare_mechanisms as cm  # after the checks: it imports torch
    for name in args.mechanism or []:
        if name not in cm.REGISTRY and name not in REFERENCES:
            why = f" (a non-mixer: {cm.NON_MIXERS[name]})" if name in cm.NON_MIXERS else ""
            parser.error(f"--mechanism {name!r}: not in the registry{why}")
    args.mechanism = list(dict.fromkeys(args.mechanism or cm.REGISTRY))
    cli.check_output_folder(parser, args.out)
    return args


import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class CoreReference(nn.Module):
    """The bare attention core on (B, H, T, Dh) made from the input by a reshape (no projections):
    ``sdpa`` calls F.scaled_dot_product_attention, ``explicit`` builds the T x T scores and weights."""

    def __init__(self, kind: str, num_heads: int):
        super().__init__()
        self.kind, self.num_heads = kind, num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = x.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, H, T, Dh)
        if self.kind == "sdpa":
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True)  # (B, H, T, Dh)
        else:
            scores = q @ q.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, T)
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()  # (T, T)
            out = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ q  # (B, H, T, Dh)
        return out.transpose(1, 2).reshape(b, t, d)  # (B, T, d)


def fit_exponent(ts: List[int], ys: List[Optional[float]], min_t: int = 1024) -> Optional[float]:
    """Least-squares slope of log y on log T over the points with T >= min_t (all points if < 2 qualify)."""
    pts = [(t, y) for t, y in zip(ts, ys) if y is not None and y > 0]
    big = [(t, y) for t, y in pts if t >= min_t]
    pts = big if len(big) >= 2 else pts
    if len(pts) < 2:
        return None
    xs, zs = [math.log(t) for t, _ in pts], [math.log(y) for _, y in pts]
    mx, mz = sum(xs) / len(xs), sum(zs) / len(zs)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (z - mz) for x, z in zip(xs, zs)) / sxx if sxx > 0 else None


def lengths(lo: int, hi: int) -> List[int]:
    out, t = [], lo
    while t <= hi:
        out.append(t)
        t *= 2
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.table is not None:
        report = json.loads(args.table.read_text())
        print(markdown_table(report))
        return report
    import compare_mechanisms as cm
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(cli.pick_device(args.device))  # 'cpu', 'cuda', 'cuda:1', 'mps'
    cm.FIXED_WINDOW = args.window
    names = list(REFERENCES) + [m for m in args.mechanism if m not in REFERENCES]
    ts = lengths(args.min_len, args.max_len)
    rows: List[dict] = []
    stopped: Dict[str, str] = {}
    failed: Dict[str, str] = {}
    load_before, started = cli.load_average(), time.time()
    print(f"{len(names)} mechanisms, T = {ts}, d_model {args.d_model}, heads {args.heads}, batch {args.batch}, "
          f"device {device}, {torch.get_num_threads()} threads, load {load_before}", flush=True)
    for t in ts:
        active = [n for n in names if n not in stopped and n not in failed]
        if not active:
            break
        modules, inputs = {}, {}
        for n in active:
            try:
                torch.manual_seed(args.seed)
                m = CoreReference(n, args.heads) if n in REFERENCES else cm.Mixer(n, args.d_model, args.heads, t)
                modules[n] = m.to(device).eval()
            except Exception as exc:  # noqa: BLE001  (reported, never silently skipped)
                failed[n] = f"T={t}: {type(exc).__name__}: {exc}"
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch, t, args.d_model, generator=g).to(device)

        def passes(m):
            def fwd():
                with torch.no_grad():
                    return m(x)

            def fwd_bwd():
                xi = x.detach().requires_grad_(True)
                m(xi).sum().backward()
                m.zero_grad(set_to_none=True)
            return {"forward": fwd, "forward+backward": fwd_bwd}

        times: Dict[tuple, List[float]] = {}
        for r in range(args.repeats + 1):  # repeat 0 is the warm-up; mechanisms alternate within each repeat
            for n in list(modules):
                for pname, fn in passes(modules[n]).items():
                    try:
                        if device.startswith("cuda"):
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        fn()
                        if device.startswith("cuda"):
                            torch.cuda.synchronize()
                        elapsed = time.perf_counter() - start
                    except Exception as exc:  # noqa: BLE001
                        failed[n] = f"T={t} {pname}: {type(exc).__name__}: {exc}"
                        modules.pop(n)
                        break
                    if r > 0:
                        times.setdefault((n, pname), []).append(elapsed)
        for n, m in modules.items():
            for pname, fn in passes(m).items():
                sec = statistics.median(times[(n, pname)])
                peak = None if args.no_memory else cm.peak_extra_bytes(fn, device)
                rows.append({"mechanism": n, "T": t, "pass": pname, "time_s": sec, "peak_bytes": peak})
                mem = "" if peak is None else f" peak {peak / 2 ** 20:9.2f} MiB"
                print(f"  T={t:<6} {n:<30} {pname:<17} {sec * 1e3:10.2f} ms{mem}", flush=True)
            if statistics.median(times[(n, "forward+backward")]) > args.max_seconds and t < ts[-1]:
                stopped[n] = f"stopped after T={t}: forward+backward took more than --max-seconds {args.max_seconds:g} s"
        del modules
    exponents = {}
    for n in names:
        exponents[n] = {}
        for pname in ("forward", "forward+backward"):
            pts = [r for r in rows if r["mechanism"] == n and r["pass"] == pname]
            exponents[n][pname] = {
                "time": fit_exponent([r["T"] for r in pts], [r["time_s"] for r in pts]),
                "memory": fit_exponent([r["T"] for r in pts], [r["peak_bytes"] for r in pts]),
                "max_T": max((r["T"] for r in pts), default=None),
            }
    report = {
        "format": "benchmark-attention-v1",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpu": cm.cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": device, "torch": torch.__version__, "python": platform.python_version(),
                    "load_before": load_before, "load_after": cli.load_average()},
        "wall_seconds": round(time.time() - started, 1),
        "rows": rows, "exponents": exponents, "stopped": stopped, "failed": failed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    report["figure"] = str(plot(rows, names, args.out / "benchmark_attention.png"))
    cm.save_json(args.out / "benchmark_attention.json", report)
    print("\nfitted exponents (forward+backward, T >= 1024): time / memory")
    for n in names:
        e = exponents[n]["forward+backward"]
        fmt = lambda v: "   -" if v is None else f"{v:4.2f}"  # noqa: E731
        print(f"  {n:<30} {fmt(e['time'])} / {fmt(e['memory'])}   up to T={e['max_T']}")
    if failed:
        print("failed:", json.dumps(failed, indent=1))
    print("\n" + markdown_table(report))
    print(f"results: {args.out / 'benchmark_attention.json'}")
    return report


def markdown_table(report: dict, at: int = 1024) -> str:
    """The docs page's table: exponents of forward+backward time and memory, the largest T measured, and
    time and memory at T = `at` as multiples of the exact F.scaled_dot_product_attention reference."""
    rows, exps = report["rows"], report["exponents"]

    def value(n, key):
        hit = [r[key] for r in rows if r["mechanism"] == n and r["T"] == at and r["pass"] == "forward+backward"]
        return hit[0] if hit and hit[0] else None
    ref_t, ref_m = value("sdpa", "time_s"), value("sdpa", "peak_bytes")
    fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"| mechanism | time exponent | memory exponent | largest T | time at T={at} (ms) | x sdpa | "
             f"memory at T={at} (MiB) | x sdpa |", "|---|---|---|---|---|---|---|---|"]
    for n, e in exps.items():
        fb = e["forward+backward"]
        t, m = value(n, "time_s"), value(n, "peak_bytes")
        lines.append(f"| `{n}` | {fmt(fb['time'])} | {fmt(fb['memory'])} | {fb['max_T'] or '-'} | "
                     f"{fmt(t and t * 1e3, 1)} | {fmt(t and ref_t and t / ref_t, 1)} | {fmt(m and m / 2 ** 20, 1)} | "
                     f"{fmt(m and ref_m and m / ref_m, 1)} |")
    return "\n".join(lines)


def plot(rows: List[dict], names: List[str], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    cmap = plt.get_cmap("tab20")
    others = [n for n in names if n not in REFERENCES]
    for k, (key, label) in enumerate((("time_s", "forward+backward time (s)"), ("peak_bytes", "forward+backward peak extra memory (bytes)"))):
        ax = axes[k]
        for n in names:
            pts = [r for r in rows if r["mechanism"] == n and r["pass"] == "forward+backward" and r[key]]
            if not pts:
                continue
            style = ({"color": "black", "lw": 3, "ls": "-" if n == "sdpa" else "--", "zorder": 5}
                     if n in REFERENCES else {"color": cmap(others.index(n) % 20), "lw": 1.2, "marker": "o", "ms": 2.5,
                                              "ls": "-" if others.index(n) < 20 else ":"})
            ax.plot([r["T"] for r in pts], [r[key] for r in pts], label=n if k == 0 else None, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    fig.legend(loc="center right", fontsize=7)
    fig.suptitle("Every causal mixer, forward+backward: black = exact F.scaled_dot_product_attention (solid) "
                 "and the explicit T x T path (dashed)")
    fig.tight_layout(rect=(0, 0, 0.8, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
