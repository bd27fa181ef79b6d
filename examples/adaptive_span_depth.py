#!/usr/bin/env python
"""Do the lower layers of a character-level language model learn shorter attention spans than the upper ones?

    python examples/adaptive_span_depth.py                 # the run quoted on docs/mechanisms/adaptive_span.md
    python examples/adaptive_span_depth.py --seed 1        # another seed
    python examples/adaptive_span_depth.py --quick         # smoke test: tiny sizes, a few steps

Sukhbaatar et al. (2019, arXiv:1905.07799, "Adaptive Attention Span in Transformers") report that in their
trained 12-layer character-level models the lower layers learn short spans and only some heads of the upper
layers learn long ones. This script checks the claim at toy scale: a small causal byte-level language model
(token and learned position embeddings, ``--layers`` pre-norm blocks, each ``AdaptiveSpanAttention`` from
mechanisms/adaptive_span.py plus a 4x MLP, a final LayerNorm and an output head tied to the embedding) is
trained with Adam on Python source files that come with every Python install (a fixed list of modules from
the directory of the standard library's ``os`` module; ``--data PATH`` takes your own text file). Nothing is
downloaded. As in the paper, every span starts at ``--init-span`` (0) and the loss is

    cross-entropy (nats per byte) + penalty / H * sum over layers and heads of z_h

(eq. (7) of the page, via ``span_penalty()``), and ``clamp_span_()`` runs after every optimiser step. What
differs from the paper: 4 layers instead of 12, width 64, a maximum span of 64 bytes instead of 8192, a ramp
of 8 instead of 32, learned absolute position embeddings instead of relative ones, a few thousand steps on a
few hundred kilobytes of Python instead of days on enwik8/text8.

Prints the learned span of every head and the mean per layer, and writes ``results.json`` under ``--out``
(written atomically: a temporary file, then a rename) with the settings, the spans, their history every
``--log-every`` steps, the validation loss, the wall time and the machine's load average at start and end.
No checkpoint is kept: the default run takes a few minutes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402

# Modules of the standard library read as training text, in this order (those missing are skipped).
STDLIB_FILES = ["argparse.py", "textwrap.py", "random.py", "shutil.py", "inspect.py", "typing.py", "subprocess.py",
                "os.py", "dataclasses.py", "functools.py", "pathlib.py", "enum.py"]


def build_parser():
    p = cli.ArgumentParser(description="Train a small byte-level language model whose attention layers learn "
                                       "their spans (adaptive span), and print the learned span of every layer "
                                       "and head: do the lower layers learn shorter spans?")
    p.add_argument("--out", type=Path, default=Path("runs/adaptive_span_depth"), help="folder for results.json")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, a few steps (seconds)")
    p.add_argument("--seed", type=cli.int_range(0, 2 ** 32 - 1), default=0, help="seed of weights and batches")
    p.add_argument("--steps", type=cli.int_range(1, 10 ** 7), default=1200, help="Adam steps")
    p.add_argument("--layers", type=cli.int_range(1, 64), default=4, help="number of blocks")
    p.add_argument("--d-model", type=cli.int_range(1, 4096), default=64, help="width")
    p.add_argument("--heads", type=cli.int_range(1, 64), default=4, help="attention heads per layer")
    p.add_argument("--max-span", type=cli.int_range(1, 10 ** 5), default=64, help="largest span S a head can learn")
    p.add_argument("--ramp", type=cli.int_range(1, 10 ** 5), default=8, help="length R of the soft mask's ramp")
    p.add_argument("--init-span", type=cli.float_range(0), default=0.0, help="span every head starts with (tokens)")
    p.add_argument("--penalty", type=cli.float_range(0), default=2e-5,
                   help="lambda: loss += lambda / H * sum of the spans (tokens) over layers and heads")
    p.add_argument("--context", type=cli.int_range(2, 10 ** 5), default=128, help="training sequence length")
    p.add_argument("--batch-size", type=cli.int_range(1, 4096), default=16, help="sequences per step")
    p.add_argument("--lr", type=cli.float_range(0, low_open=True), default=3e-3, help="Adam learning rate")
    p.add_argument("--log-every", type=cli.int_range(1, 10 ** 7), default=100, help="steps between progress lines")
    p.add_argument("--eval-batches", type=cli.int_range(1, 10 ** 5), default=20, help="validation batches at the end")
    p.add_argument("--data", type=Path, default=None, help="a text file to train on instead of the stdlib sources")
    p.add_argument("--device", type=cli.device_name, default="auto", help="auto (cuda, then mps, then cpu), cpu, "
                                                                          "cuda, cuda:N or mps")
    p.add_argument("--threads", type=cli.int_range(1, 1024), default=2, help="CPU threads torch may use")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    cli.check_output_folder(p, args.out)
    if args.data is not None:
        cli.check_input_file(p, args.data, "--data")
    if args.quick:
        args.steps, args.layers, args.d_model, args.heads = min(args.steps, 30), min(args.layers, 2), 16, 2
        args.max_span, args.ramp, args.context, args.batch_size = 16, 4, 24, 4
        args.log_every, args.eval_batches = 10, 2
        args.init_span = min(args.init_span, args.max_span)
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    if args.init_span > args.max_span:
        p.error(f"--init-span {args.init_span:g} must not exceed --max-span {args.max_span}")
    return args


if __name__ == "__main__":
    parse_args()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mechanisms.adaptive_span import AdaptiveSpanAttention  # noqa: E402


class Block(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, heads: int, max_span: int, ramp: int, init_span: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = AdaptiveSpanAttention(d_model, heads, max_span=max_span, ramp=ramp, init_span=init_span)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))  # (B, T, d_model); the module is always causal
        return x + self.mlp(self.ln2(x))  # (B, T, d_model)


class SpanLM(nn.Module):
    """Byte-level causal LM: embeddings, blocks of adaptive-span attention, tied output head."""

    def __init__(self, args) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, args.d_model)
        self.pos = nn.Embedding(args.context, args.d_model)
        self.blocks = nn.ModuleList(Block(args.d_model, args.heads, args.max_span, args.ramp, args.init_span)
                                    for _ in range(args.layers))
        self.ln_f = nn.LayerNorm(args.d_model)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))  # (B, T, d_model)
        for block in self.blocks:
            x = block(x)  # (B, T, d_model)
        return self.ln_f(x) @ self.tok.weight.t()  # (B, T, 256): tied head

    def attentions(self) -> list:
        return [block.attn for block in self.blocks]

    def span_penalty(self) -> torch.Tensor:
        """sum over layers of (1 / H) * sum_h z_h: eq. (7) summed over the layers."""
        return sum(a.span_penalty() / a.num_heads for a in self.attentions())

    def clamp_span_(self) -> None:
        for a in self.attentions():
            a.clamp_span_()

    def spans(self) -> list:
        """[[z_h for each head] for each layer], in tokens."""
        return [[round(z, 3) for z in a.spans().tolist()] for a in self.attentions()]


def load_text(args) -> tuple[bytes, list]:
    if args.data is not None:
        return args.data.read_bytes(), [str(args.data)]
    folder = Path(sys.modules["os"].__file__).resolve().parent
    names = [n for n in STDLIB_FILES if (folder / n).is_file()]
    if not names:
        raise SystemExit(f"error: none of {', '.join(STDLIB_FILES)} found in {folder}; pass --data PATH")
    return b"\n".join((folder / n).read_bytes() for n in names), [str(folder / n) for n in names]


def batch(data: torch.Tensor, args, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, data.numel() - args.context - 1, (args.batch_size,), generator=g)
    rows = torch.stack([data[s:s + args.context + 1] for s in start.tolist()]).long().to(device)  # (B, T + 1)
    return rows[:, :-1], rows[:, 1:]


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average_1_5_15": cli.load_average()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = cli.pick_device(args.device)
    torch.manual_seed(args.seed)
    text, files = load_text(args)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    if val.numel() <= args.context + 1:
        raise SystemExit(f"error: the text ({data.numel()} bytes) is too short for --context {args.context}")
    model = SpanLM(args).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    report = {"command": "python examples/adaptive_span_depth.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "device": str(device), "machine_at_start": machine(),
              "data": {"files": files, "bytes": data.numel(), "train_bytes": train.numel()},
              "parameters": sum(p.numel() for p in model.parameters()), "history": []}
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch(train, args, g, device)
        ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss = ce + args.penalty * model.span_penalty()  # eq. (7), summed over layers
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_span_()  # keep every span in [0, max_span], as the paper's code does
        if step % args.log_every == 0 or step == args.steps:
            spans = model.spans()
            means = [sum(layer) / len(layer) for layer in spans]
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (args.steps - step)
            report["history"].append({"step": step, "train_loss": round(ce.item(), 4), "spans": spans})
            print(f"step {step}/{args.steps} | loss {ce.item():.3f} nats/byte | mean span per layer "
                  f"{' '.join(f'{m:.1f}' for m in means)} | {elapsed:.0f} s, ETA {eta:.0f} s", flush=True)
    train_time = time.perf_counter() - start
    model.eval()
    gv = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        val_loss = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                       for x, y in (batch(val, args, gv, device) for _ in range(args.eval_batches))) / args.eval_batches
    spans = model.spans()
    report.update({
        "spans_per_layer_and_head": spans,
        "mean_span_per_layer": [round(sum(layer) / len(layer), 3) for layer in spans],
        "max_span_per_layer": [max(layer) for layer in spans],
        "cache_length_per_layer": [a.cache_length() for a in model.attentions()],
        "val_loss_nats_per_byte": round(val_loss, 4), "val_bits_per_byte": round(val_loss / math.log(2), 4),
        "train_time_s": round(train_time, 1), "machine_at_end": machine(),
    })
    print(f"validation loss {val_loss:.3f} nats/byte ({val_loss / math.log(2):.3f} bits/byte) after {args.steps} "
          f"steps, {train_time:.0f} s; load average at start {report['machine_at_start']['load_average_1_5_15']}, "
          f"at end {report['machine_at_end']['load_average_1_5_15']}")
    print(f"learned spans (tokens; max_span {args.max_span}, ramp {args.ramp}, init {args.init_span:g}):")
    for i, layer in enumerate(spans):
        print(f"  layer {i}: mean {sum(layer) / len(layer):6.2f} | heads " + " ".join(f"{z:6.2f}" for z in layer))
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "results.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, args.out / "results.json")  # atomic: a reader never sees half a file
    print(f"wrote {args.out / 'results.json'}")
    return report


if __name__ == "__main__":
    main()
