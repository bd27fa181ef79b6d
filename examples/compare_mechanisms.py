#!/usr/bin/env python
"""Compare the attention mechanisms of ``mechanisms/`` in one small language model on three tasks.

    python examples/compare_mechanisms.py                          # the documented full run (17 min on 2 cores)
    python examples/compare_mechanisms.py --task mqar --mechanism multi_head_attention --mechanism linear_attention
    python examples/compare_mechanisms.py --quick --out /tmp/cmp   # smoke test: tiny model, seconds
    python examples/compare_mechanisms.py --list                   # the registry and the non-mixers

Every mechanism is wrapped by an *adapter* (the ``REGISTRY`` below: one line per mechanism) as a causal
token mixer ``(B, T, d) -> (B, T, d)`` and dropped into the SAME model: token embedding plus a learned
position embedding, ``--layers`` pre-norm blocks ``x + mixer(LN(x))`` then ``x + MLP(LN(x))`` (the MLP is
4d wide with GELU, only with ``--mlp``: Zoology's MQAR models have none), a final LayerNorm and a linear head. Files of ``mechanisms/``
that cannot serve as a causal token mixer are listed in ``NON_MIXERS`` with the reason; a test checks that
every file is in one or the other.

Tasks (generated on the fly, nothing downloaded):

* ``mqar``: multi-query associative recall exactly as Zoology defines it (Arora et al. 2023,
  arXiv:2312.04927, ``zoology/data/multiquery_ar.py``): the vocabulary is split into a key half
  ``1 .. V/2-1`` and a value half ``V/2 .. V-1``; ``--pairs`` distinct keys with distinct values are laid
  out as ``k1 v1 k2 v2 ...``; the rest of the ``--seq-len`` positions are gaps in which each key is asked
  again at a position drawn WITHOUT replacement from a power law ``p(g) ~ g^(a-1)``, a = 0.01 (the
  queries cluster right after the context); every other position holds a random token; the loss and the
  accuracy count ONLY the answer positions (the token after each query must be its value).
* ``selective_copy``: the selective-copying task of Gu & Dao (Mamba, arXiv:2312.00752): ``--copy-tokens``
  data tokens scattered at random positions among blank tokens, then as many marker tokens; at the i-th
  marker the model must emit the i-th data token. Loss and accuracy only at the markers.
* ``char_lm``: next-character prediction on the main job's corpus (``examples/train_char_lm.py``'s
  ``build_stdlib_corpus``: the standard library's own sources), validation loss after the fixed budget.

Each (mechanism, task, learning rate, seed) is one *run*; its result is written atomically to
``<out>/runs/<task>/<mechanism>/lr<lr>_seed<seed>.json`` and a rerun skips every finished run whose
settings match, so an interrupted grid resumes where it stopped. For each (mechanism, task) the best
learning rate of ``--lrs`` (Zoology sweeps the learning rate the same way) is kept, judged by the mean
over ``--seeds`` of the final metric. Recorded per (mechanism, task): parameters, milliseconds per
training step, peak memory of one training step (bytes allocated, counted by ``torch.profiler`` with
``profile_memory=True``; see ``peak_extra_bytes``), final accuracy (mqar, selective_copy) or validation
loss (char_lm), steps and seconds to reach ``--threshold`` accuracy, and the evaluation curve; and for the
mechanisms that return attention weights, the first layer's map on one MQAR example. Everything lands in
``<out>/compare_results.json`` plus PNGs (``compare_<task>_curves.png``, ``compare_<task>_bars.png``,
``compare_mqar_attention_maps.png``).

Budgets: the mechanisms of ``--focus`` (default: multi-head softmax attention, the Based-style hybrid and
elu+1 linear attention, the three of Zoology's headline comparison) train on MQAR for ``--steps`` steps
with every learning rate of ``--lrs``; every other mechanism trains on MQAR for ``--other-steps`` steps,
and every mechanism on selective_copy and char_lm for ``--task-steps`` steps, with the first learning
rate only. At these defaults the full grid (102 runs) took 17 min 17 s on 2 idle CPU cores (the docs page
gives the machine and every result). The learning rate is held constant after a short warm-up
(``--schedule``): MQAR's recall appears suddenly after a long plateau, and a decaying rate can end the run
before it does (measured on the docs page).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the mechanism files: ROOT/mechanisms
sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/cli.py

import cli  # noqa: E402  (standard library only: the command line is checked before torch loads)

TASKS = ("mqar", "selective_copy", "char_lm")
FOCUS = ("multi_head_attention", "hybrid_attention", "linear_attention")
RESULT_FORMAT = "compare-mechanisms-v2"


# --------------------------------------------------------------------------------------------------------
# The adapter registry: one line per mechanism. Each entry builds a module from (d_model, num_heads,
# max_seq_len) and says how to call it as a causal self-mixer. The call kinds:
#   "is_causal":  module(x, is_causal=True)                 (the standard forward of the project)
#   "mask":       module(x, mask=<causal (T, T) bool mask>)  (modules without is_causal)
#   "pair_mask":  module(x, x, mask=<causal mask>)           (modules whose key is a required argument)
#   "plain":      module(x)                                  (causal by construction)
#   "function":   a function f(q, k, v, is_causal=True) on (B, H, T, Dh), wrapped by FunctionMixer
# --------------------------------------------------------------------------------------------------------


def _mech(stem: str):
    """Import mechanisms/<stem>.py lazily, so one broken file cannot stop the other runs."""
    return importlib.import_module(f"mechanisms.{stem}")


@dataclasses.dataclass(frozen=True)
class Adapter:
    stem: str                                   # the file mechanisms/<stem>.py
    build: Callable[[int, int, int], object]    # (d_model, num_heads, max_seq_len) -> module or function
    call: str = "is_causal"                     # see the table above
    note: str = ""                              # what the adapter chose (window sizes, ...)


# The benchmark sets this to a constant, so that windowed and blocked mechanisms keep a FIXED window as T
# grows (their cost is then linear in T); in training the window is T/8.
FIXED_WINDOW: Optional[int] = None


def _window(t: int) -> int:
    return FIXED_WINDOW if FIXED_WINDOW is not None else max(2, t // 8)


REGISTRY: Dict[str, Adapter] = {
    "multi_head_attention": Adapter("multi_head_attention", lambda d, h, t: _mech("multi_head_attention").MultiHeadAttention(d, h)),
    "scaled_dot_product_attention": Adapter("scaled_dot_product_attention", lambda d, h, t: _mech("scaled_dot_product_attention").scaled_dot_product_attention, "function"),
    "flash_attention": Adapter("flash_attention", lambda d, h, t: _mech("flash_attention").flash_attention, "function"),
    "self_attention": Adapter("self_attention", lambda d, h, t: _mech("self_attention").SelfAttention(d), note="single head"),
    "cross_attention": Adapter("cross_attention", lambda d, h, t: _mech("cross_attention").CrossAttention(d, d, h), "pair_mask", "context = the sequence itself"),
    "additive_attention": Adapter("additive_attention", lambda d, h, t: _mech("additive_attention").AdditiveAttention(d, d, d), "pair_mask", "Bahdanau score, value = key = x"),
    "multiplicative_attention": Adapter("multiplicative_attention", lambda d, h, t: _mech("multiplicative_attention").LuongAttention(d, score="general"), "pair_mask", "Luong 'general' score, value = key = x"),
    "grouped_query_attention": Adapter("grouped_query_attention", lambda d, h, t: _mech("grouped_query_attention").GroupedQueryAttention(d, h, max(1, h // 2)), note="num_kv_heads = num_heads // 2"),
    "multi_head_latent_attention": Adapter("multi_head_latent_attention", lambda d, h, t: _mech("multi_head_latent_attention").MultiHeadLatentAttention(d, h, kv_latent_dim=d // 2), note="kv_latent_dim = d/2"),
    "rotary_embedding": Adapter("rotary_embedding", lambda d, h, t: _mech("rotary_embedding").RotarySelfAttention(d, h, max_seq_len=t)),
    "alibi": Adapter("alibi", lambda d, h, t: _mech("alibi").ALiBiAttention(d, h)),
    "relative_position": Adapter("relative_position", lambda d, h, t: _mech("relative_position").ShawRelativeAttention(d, h, max_relative_position=16), note="Shaw et al., clip 16"),
    "relative_position.t5": Adapter("relative_position", lambda d, h, t: _mech("relative_position").T5RelativeAttention(d, h, bidirectional=False), note="T5 buckets, unidirectional"),
    "gated_attention": Adapter("gated_attention", lambda d, h, t: _mech("gated_attention").GatedAttention(d, h)),
    "sigmoid_attention": Adapter("sigmoid_attention", lambda d, h, t: _mech("sigmoid_attention").SigmoidAttention(d, h)),
    "differential_attention": Adapter("differential_attention", lambda d, h, t: _mech("differential_attention").DifferentialAttention(d, h)),
    "sparse_attention": Adapter("sparse_attention", lambda d, h, t: _mech("sparse_attention").SparseAttention(d, h, method="sparsemax"), note="sparsemax"),
    "hard_attention": Adapter("hard_attention", lambda d, h, t: _mech("hard_attention").HardAttention(d, h), note="straight-through Gumbel"),
    "adversarial_attention": Adapter("adversarial_attention", lambda d, h, t: _mech("adversarial_attention").AdversarialAttention(d, h), note="no adversarial pass (no score_perturbation): plain attention here"),
    "dual_attention": Adapter("dual_attention", lambda d, h, t: _DualAttentionMixer(d, h, t), "is_causal", "self + relational heads, positional symbols"),
    "local_attention": Adapter("local_attention", lambda d, h, t: _mech("local_attention").LocalAttention(d, h, window=_window(t), causal=True), "plain", "window T/8"),
    "longformer_attention": Adapter("longformer_attention", lambda d, h, t: _mech("longformer_attention").LongformerAttention(d, h, window=_window(t)), note="window T/8, no global tokens"),
    "sparse_transformer_attention": Adapter("sparse_transformer_attention", lambda d, h, t: _mech("sparse_transformer_attention").SparseTransformerAttention(d, h, stride=max(2, int(math.sqrt(t)))), note="strided, stride sqrt(T)"),
    "bigbird_attention": Adapter("bigbird_attention", lambda d, h, t: _mech("bigbird_attention").BigBirdAttention(d, h, block_size=_window(t)), note="block T/8"),
    "adaptive_span": Adapter("adaptive_span", lambda d, h, t: _mech("adaptive_span").AdaptiveSpanAttention(d, h, max_span=t, ramp=_window(t)), "mask", "max span T, ramp T/8"),
    "convolutional_attention": Adapter("convolutional_attention", lambda d, h, t: _mech("convolutional_attention").ConvolutionalAttention(d, h)),
    "hybrid_attention": Adapter("hybrid_attention", lambda d, h, t: _mech("hybrid_attention").HybridAttention(d, h, window=_window(t)), note="Based: window T/8 + Taylor linear attention"),
    "linear_attention": Adapter("linear_attention", lambda d, h, t: _mech("linear_attention").LinearAttention(d, h), note="elu+1 feature map"),
    "performer": Adapter("performer", lambda d, h, t: _mech("performer").PerformerAttention(d, h)),
    "retention": Adapter("retention", lambda d, h, t: _mech("retention").MultiScaleRetention(d, h), "plain", "causal by construction"),
    "reformer_attention": Adapter("reformer_attention", lambda d, h, t: _mech("reformer_attention").ReformerAttention(d, h, chunk_size=max(4, _window(t))), note="chunk T/8, 4 buckets, 2 hashes"),
    "memory_augmented_attention": Adapter("memory_augmented_attention", lambda d, h, t: _mech("memory_augmented_attention").MemoryAugmentedAttention(d, h, num_persistent=4), note="4 persistent memory slots, no external memory"),
    "transformer_xl": Adapter("transformer_xl", lambda d, h, t: _mech("transformer_xl").TransformerXLAttention(d, h, mem_len=0), "plain", "one segment, no memory"),
}

# Files of mechanisms/ that are not causal token mixers, with the reason (a test checks the two lists cover
# every file; add a new file to one of them).
NON_MIXERS: Dict[str, str] = {
    "attention_pooling": "pools a sequence into a few vectors (Nadaraya-Watson / attention pooling): not a (B, T, d) -> (B, T, d) mixer",
    "attention_distillation": "a distillation loss between two attention modules, not a mixer",
    "axial_attention": "attention along the rows and columns of a 2-D grid (B, H, W, C); a 1-D sequence has no second axis",
    "graph_attention": "attention over the edges of a graph given by an adjacency matrix, not over a causal sequence",
    "co_attention": "attends between two different sequences (question and image/document) in both directions",
    "hierarchical_attention": "pools words into sentences into one document vector (HAN): no per-token output",
    "frequency_attention": "FNet's Fourier mixing and the global filter mix the whole sequence through an FFT: no causal form",
    "linformer": "projects the keys along the sequence axis (k = E K), which mixes future into past: no causal form "
                 "(LinformerAttention refuses is_causal=True)",
    "nystromformer": "each landmark averages a whole segment, future tokens included: no causal form "
                     "(NystromAttention refuses is_causal=True)",
    "bidirectional_attention": "BERT's bidirectional self-attention is multi_head_attention without the causal mask "
                               "(with it, it is exactly multi_head_attention); XLNet's two-stream attention needs a "
                               "permutation order and two streams",
}


def registered_stems() -> set:
    return {adapter.stem for adapter in REGISTRY.values()}


def missing_files(mechanism_dir: Path = ROOT / "mechanisms") -> List[str]:
    """Files of mechanisms/ in neither REGISTRY nor NON_MIXERS (the completeness test reports these)."""
    known = registered_stems() | set(NON_MIXERS)
    return sorted(p.stem for p in mechanism_dir.glob("*.py") if not p.stem.startswith("_") and p.stem not in known)


# --------------------------------------------------------------------------------------------------------
# Command line (checked before torch is imported)
# --------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See docs/examples/compare_mechanisms.md.")
    p.add_argument("--mechanism", action="append", default=None, metavar="NAME",
                   help="a registry name (repeatable; default: all). --list shows them")
    p.add_argument("--task", action="append", choices=TASKS, default=None, help="repeatable; default: all three")
    p.add_argument("--list", action="store_true", help="print the registry and the non-mixers, then exit")
    p.add_argument("--d-model", type=cli.int_range(4, 4096), default=64)
    p.add_argument("--heads", type=cli.int_range(1, 64), default=1,
                   help="heads of every mixer (default 1, as Zoology's MQAR attention baseline)")
    p.add_argument("--layers", type=cli.int_range(1, 64), default=2)
    p.add_argument("--mlp", action="store_true",
                   help="add the 4d GELU MLP to every block (off by default, as in Zoology's MQAR models, "
                        "whose state mixer is the identity)")
    p.add_argument("--batch-size", type=cli.int_range(1, 65536), default=64)
    p.add_argument("--steps", type=cli.int_range(1), default=1500,
                   help="MQAR training steps of the --focus mechanisms")
    p.add_argument("--other-steps", type=cli.int_range(1), default=100,
                   help="MQAR training steps of every other mechanism")
    p.add_argument("--task-steps", type=cli.int_range(1), default=50,
                   help="selective_copy and char_lm training steps (every mechanism)")
    p.add_argument("--focus", nargs="*", default=list(FOCUS), metavar="NAME",
                   help="mechanisms that get --steps and the whole --lrs sweep on MQAR")
    p.add_argument("--lrs", type=cli.float_range(0, 1, low_open=True), nargs="+", default=[3e-3, 1e-3],
                   help="learning rates swept (focus runs); the first one is used for the others")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate after the linear warm-up (5%% of the steps): constant (default), or a cosine "
                        "decay to 10%%. MQAR's recall circuit forms abruptly after a long plateau; a decay that "
                        "has already lowered the rate by then keeps the model on the plateau (see the docs page)")
    p.add_argument("--seeds", type=cli.int_range(1, 100), default=1, help="seeds per learning rate")
    p.add_argument("--seed", type=cli.int_range(0), default=0, help="first seed")
    p.add_argument("--threads", type=cli.int_range(0, 1024), default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--seq-len", type=cli.int_range(8, 65536), default=64, help="MQAR and selective-copy length T")
    p.add_argument("--pairs", type=cli.int_range(1, 4096), default=4, help="MQAR key-value pairs")
    p.add_argument("--vocab", type=cli.int_range(8, 1 << 20), default=8192, help="MQAR vocabulary (Zoology: 8192)")
    p.add_argument("--copy-tokens", type=cli.int_range(1, 4096), default=8, help="selective copy: tokens to copy")
    p.add_argument("--copy-vocab", type=cli.int_range(2, 4096), default=16, help="selective copy: data tokens")
    p.add_argument("--block-size", type=cli.int_range(8, 65536), default=64, help="char_lm context length")
    p.add_argument("--threshold", type=cli.float_range(0, 1), default=0.9,
                   help="accuracy whose first crossing is reported as steps/seconds to threshold")
    p.add_argument("--eval-every", type=cli.int_range(1), default=25)
    p.add_argument("--eval-examples", type=cli.int_range(1), default=512, help="held-out examples of the final evaluation")
    p.add_argument("--device", type=cli.device_name, default="auto")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model and budgets (seconds)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: tabulate and plot every finished run found under --out (for example the "
                        "runs of several invocations with different budgets, run side by side)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.heads, args.layers, args.batch_size = 16, 2, 1, 8
        args.steps, args.other_steps, args.task_steps, args.eval_every, args.eval_examples = 6, 4, 4, 3, 16
        args.seq_len, args.pairs, args.vocab, args.copy_tokens, args.block_size = 16, 2, 64, 3, 16
        args.lrs = args.lrs[:1]
    if args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    if args.seq_len % 2:
        parser.error(f"--seq-len {args.seq_len}: MQAR needs an even length (Zoology asserts it)")
    if 4 * args.pairs > args.seq_len:
        parser.error(f"--pairs {args.pairs}: MQAR needs 4 * pairs <= --seq-len ({args.seq_len})")
    if args.pairs >= args.vocab // 2:
        parser.error(f"--pairs {args.pairs}: needs more distinct keys, --vocab {args.vocab} gives {args.vocab // 2 - 1}")
    if args.copy_tokens >= args.seq_len:
        parser.error(f"--copy-tokens {args.copy_tokens} must be smaller than --seq-len {args.seq_len}")
    for name in (args.mechanism or []) + list(args.focus):
        if name not in REGISTRY:
            why = f" (listed as a non-mixer: {NON_MIXERS[name]})" if name in NON_MIXERS else ""
            parser.error(f"--mechanism/--focus {name!r}: not in the registry{why}; choose from {', '.join(REGISTRY)}")
    args.task = list(dict.fromkeys(args.task or TASKS))
    args.mechanism = list(dict.fromkeys(args.mechanism or REGISTRY))
    cli.check_output_folder(parser, args.out)
    return args


# torch is imported after the command line has been checked.
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# --------------------------------------------------------------------------------------------------------
# Adapters and the model
# --------------------------------------------------------------------------------------------------------


def causal_mask(t: int, device=None) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()  # (T, T), True = may attend


class FunctionMixer(nn.Module):
    """A function attention(q, k, v, is_causal) on (B, H, T, Dh) with the usual projections around it."""

    def __init__(self, fn, d_model: int, num_heads: int):
        super().__init__()
        self.fn, self.num_heads = fn, num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        out = self.fn(q, k, v, is_causal=True)
        out = out[0] if isinstance(out, tuple) else out
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))  # (B, T, d)


class _DualAttentionMixer(nn.Module):
    """Dual attention (Altabaa et al.): half the heads self-attention, half relational attention, with
    positional symbols (the paper's symbol retrieval for language modelling)."""

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int):
        super().__init__()
        mod = _mech("dual_attention")
        sa, ra = max(1, num_heads // 2), max(1, num_heads - num_heads // 2)
        self.symbols = mod.PositionalSymbolRetriever(d_model, max_seq_len)
        self.attn = mod.DualAttention(d_model, sa, ra, dropout=0.0)

    def forward(self, x: torch.Tensor, is_causal: bool = True, need_weights: bool = False):
        out = self.attn(x, self.symbols(x), is_causal=is_causal)
        return out[0] if isinstance(out, tuple) else out


class Mixer(nn.Module):
    """One registry entry as a causal (B, T, d) -> (B, T, d) mixer; ``weights(x)`` returns its attention
    map (B, H, T, T) when the mechanism can give one, else None."""

    def __init__(self, name: str, d_model: int, num_heads: int, max_seq_len: int):
        super().__init__()
        self.adapter = REGISTRY[name]
        built = self.adapter.build(d_model, num_heads, max_seq_len)
        self.inner = FunctionMixer(built, d_model, num_heads) if self.adapter.call == "function" else built

    def _call(self, x: torch.Tensor, need_weights: bool):
        kind, m = self.adapter.call, self.inner
        kw = {"need_weights": True} if need_weights else {}
        if kind == "function":
            return m(x)
        if kind == "is_causal":
            return m(x, is_causal=True, **kw)
        if kind == "mask":
            return m(x, mask=causal_mask(x.size(1), x.device), **kw)
        if kind == "pair_mask":
            return m(x, x, mask=causal_mask(x.size(1), x.device), **kw)
        if kind == "plain":
            return m(x, **kw)
        raise ValueError(f"unknown adapter call kind {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._call(x, False)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def weights(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.adapter.call == "function":
            return None
        try:
            out = self._call(x, True)
        except TypeError:
            return None
        w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if isinstance(w, (tuple, list)):
            w = w[0]
        if not torch.is_tensor(w) or w.dim() != 4 or w.shape[-1] != x.size(1) or w.shape[-2] != x.size(1):
            return None
        return w


class Block(nn.Module):
    def __init__(self, name: str, d_model: int, num_heads: int, max_seq_len: int, mlp: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = Mixer(name, d_model, num_heads, max_seq_len)
        self.norm2 = nn.LayerNorm(d_model) if mlp else None
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)) if mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))  # (B, T, d)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))  # (B, T, d)
        return x


class TinyLM(nn.Module):
    """Embedding + learned positions, N pre-norm blocks (mixer, MLP), final LayerNorm, linear head."""

    def __init__(self, name: str, vocab_size: int, d_model: int, num_heads: int, layers: int, max_seq_len: int,
                 mlp: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_seq_len, d_model)
        self.blocks = nn.ModuleList(Block(name, d_model, num_heads, max_seq_len, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, T, d)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple:
        """Loss and (correct, counted) over the positions whose target is not -100. The head runs only on
        those positions (MQAR and copying score a few positions per example: no need for all logits)."""
        h = self.hidden(idx)  # (B, T, d)
        keep = targets != -100  # (B, T)
        logits = self.head(h[keep])  # (N, V)
        y = targets[keep]  # (N,)
        loss = F.cross_entropy(logits, y)
        return loss, int((logits.argmax(-1) == y).sum()), int(y.numel())


# --------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------


def mqar_batch(batch: int, seq_len: int, pairs: int, vocab: int, generator: torch.Generator,
               power_a: float = 0.01) -> tuple:
    """Zoology's multiquery_ar (random_non_queries=True, one pass), in torch: inputs and targets (B, T),
    targets -100 except at the query positions, where the target is the queried key's value."""
    context = 2 * pairs
    half = vocab // 2
    keys = torch.stack([torch.randperm(half - 1, generator=generator)[:pairs] + 1 for _ in range(batch)])  # (B, P) in 1..V/2-1
    values = torch.stack([torch.randperm(vocab - half, generator=generator)[:pairs] + half for _ in range(batch)])  # (B, P)
    kvs = torch.stack([keys, values], dim=2).reshape(batch, context)  # (B, 2P): k1 v1 k2 v2 ...
    space = (seq_len - context) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)  # power law over the gaps
    gaps = torch.stack([torch.multinomial(p, pairs, replacement=False, generator=generator) for _ in range(batch)])  # (B, P)
    queries = torch.zeros(batch, seq_len - context + 1, dtype=torch.long)  # (B, T - 2P + 1)
    queries.scatter_(1, gaps * 2, keys)
    examples = torch.cat([kvs, queries], dim=1)  # (B, T + 1)
    labels = torch.full((batch, seq_len + 1), -100, dtype=torch.long)  # (B, T + 1)
    labels.scatter_(1, gaps * 2 + context + 1, values)
    inputs, targets = examples[:, :-1].clone(), labels[:, 1:].clone()  # (B, T): target at the query position
    noise = torch.randint(vocab, inputs.shape, generator=generator)  # random non-query tokens, as Zoology
    inputs = torch.where(inputs == 0, noise, inputs)
    return inputs, targets


def selective_copy_batch(batch: int, seq_len: int, n_copy: int, n_data: int, generator: torch.Generator) -> tuple:
    """Tokens: 0 = blank, 1..n_data = data, n_data + 1 = marker. The first T - n_copy positions hold n_copy data
    tokens at random sorted positions among blanks; then n_copy markers; target at marker i = data token i."""
    region = seq_len - n_copy
    data = torch.randint(1, n_data + 1, (batch, n_copy), generator=generator)  # (B, N)
    pos = torch.stack([torch.randperm(region, generator=generator)[:n_copy].sort().values for _ in range(batch)])  # (B, N)
    inputs = torch.zeros(batch, seq_len, dtype=torch.long)  # (B, T)
    inputs.scatter_(1, pos, data)
    inputs[:, region:] = n_data + 1
    targets = torch.full((batch, seq_len), -100, dtype=torch.long)  # (B, T)
    targets[:, region:] = data
    return inputs, targets


class CharLM:
    """The main job's corpus (examples/train_char_lm.py), random windows; every position is scored."""
    _cache = None

    def __init__(self, block_size: int, quick: bool):
        if CharLM._cache is None:
            import train_char_lm  # examples/train_char_lm.py
            text = train_char_lm.build_stdlib_corpus(60_000 if quick else train_char_lm.CORPUS_CHARS)
            CharLM._cache = train_char_lm.CharData(text)
        self.data, self.block_size = CharLM._cache, block_size

    def batch(self, split: str, batch: int, generator: torch.Generator) -> tuple:
        return self.data.batch(split, batch, self.block_size, generator)


@dataclasses.dataclass
class TaskSpec:
    name: str
    vocab: int
    seq_len: int
    sample: Callable[[str, int, torch.Generator], tuple]  # (split, batch, generator) -> (inputs, targets)
    metric: str  # "accuracy" or "val_loss"


def make_task(name: str, args) -> TaskSpec:
    if name == "mqar":
        return TaskSpec(name, args.vocab, args.seq_len,
                        lambda split, b, g: mqar_batch(b, args.seq_len, args.pairs, args.vocab, g), "accuracy")
    if name == "selective_copy":
        return TaskSpec(name, args.copy_vocab + 2, args.seq_len,
                        lambda split, b, g: selective_copy_batch(b, args.seq_len, args.copy_tokens, args.copy_vocab, g),
                        "accuracy")
    data = CharLM(args.block_size, args.quick)
    return TaskSpec(name, data.data.vocab_size, args.block_size, data.batch, "val_loss")


# --------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------


def peak_extra_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak of extra live tensor storage while ``fn()`` runs. CUDA: ``max_memory_allocated`` minus what
    was held before. CPU: ``torch.profiler`` with ``profile_memory=True``; every operator's own net
    allocation (``self_cpu_memory_usage``, frees negative) is placed at the operator's end and summed in
    time order; the running maximum is the peak (a lower bound at operator granularity)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.end, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------------------
# One run and the grid
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    mechanism: str
    task: str
    lr: float
    seed: int
    steps: int

    def path(self, out: Path) -> Path:
        return out / "runs" / self.task / self.mechanism / f"lr{self.lr:g}_seed{self.seed}.json"


def run_settings(run: Run, args) -> dict:
    """Everything that decides a run's result: a finished file is reused only when these match."""
    task_keys = {"mqar": ("seq_len", "pairs", "vocab"), "selective_copy": ("seq_len", "copy_tokens", "copy_vocab"),
                 "char_lm": ("block_size",)}[run.task]
    s = dict(dataclasses.asdict(run), d_model=args.d_model, heads=args.heads, layers=args.layers, mlp=args.mlp,
             schedule=args.schedule,
             batch_size=args.batch_size, eval_every=args.eval_every, eval_examples=args.eval_examples, quick=args.quick)
    s.update({k: getattr(args, k) for k in task_keys})
    return s


def evaluate(model: TinyLM, task: TaskSpec, examples: int, batch: int, seed: int, device: str) -> tuple:
    """(accuracy, loss) on a fixed held-out set drawn from its own seed (the same for every mechanism)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    model.eval()
    correct = counted = 0
    loss_sum = 0.0
    with torch.no_grad():
        done = 0
        while done < examples:
            n = min(batch, examples - done)
            x, y = task.sample("val", n, g)
            loss, c, k = model(x.to(device), y.to(device))
            loss_sum += float(loss) * k
            correct, counted, done = correct + c, counted + k, done + n
    model.train()
    return correct / max(1, counted), loss_sum / max(1, counted)


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps``, as a fraction of the peak: a linear warm-up
    over the first 5% of the steps, then 1 (``constant``) or a cosine decay that ends at 0.1 (``cosine``)."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - 1 - warmup)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")


def train_one(run: Run, task: TaskSpec, args, device: str, on_step: Callable[[int, dict], None]) -> dict:
    torch.manual_seed(run.seed)
    model = TinyLM(run.mechanism, task.vocab, args.d_model, args.heads, args.layers, task.seq_len, args.mlp).to(device)
    params = sum(p.numel() for p in model.parameters())
    mixer_params = sum(p.numel() for b in model.blocks for p in b.mixer.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.1, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(run.seed)
    curve, step_times = [], []
    reached = None
    train_seconds = 0.0

    def step_fn(x, y, step):
        for group in opt.param_groups:
            group["lr"] = run.lr * lr_factor(step, run.steps, args.schedule)
        loss, c, k = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    x0, y0 = task.sample("train", args.batch_size, torch.Generator().manual_seed(run.seed + 777))
    peak = peak_extra_bytes(lambda: model(x0.to(device), y0.to(device))[0].backward(), device)
    model.zero_grad(set_to_none=True)
    loss = float("nan")
    for step in range(run.steps):
        x, y = task.sample("train", args.batch_size, g)
        x, y = x.to(device), y.to(device)
        start = time.perf_counter()
        loss = step_fn(x, y, step)
        elapsed = time.perf_counter() - start
        step_times.append(elapsed)
        train_seconds += elapsed
        if not math.isfinite(loss):
            break
        if (step + 1) % args.eval_every == 0 or step + 1 == run.steps:
            acc, val = evaluate(model, task, min(args.eval_examples, 256), args.batch_size, run.seed, device)
            curve.append({"step": step + 1, "seconds": round(train_seconds, 3), "train_loss": loss,
                          "val_loss": val, "accuracy": acc})
            if reached is None and task.metric == "accuracy" and acc >= args.threshold:
                reached = {"step": step + 1, "seconds": round(train_seconds, 3)}
            on_step(step + 1, curve[-1])
    acc, val = evaluate(model, task, args.eval_examples, args.batch_size, run.seed, device)
    step_times.sort()
    result = {"settings": run_settings(run, args), "format": RESULT_FORMAT, "params": params, "mixer_params": mixer_params,
              "ms_per_step": 1e3 * step_times[len(step_times) // 2] if step_times else None,
              "peak_train_step_bytes": peak, "final_accuracy": acc, "final_val_loss": val, "final_train_loss": loss,
              "to_threshold": reached, "train_seconds": round(train_seconds, 3), "curve": curve,
              "diverged": not math.isfinite(loss)}
    if run.task == "mqar":  # the first layer's attention map on one held-out example, where there is one
        x, _ = task.sample("val", 1, torch.Generator().manual_seed(4242))
        model.eval()
        with torch.no_grad():
            h = model.embed(x.to(device)) + model.pos(torch.arange(x.size(1), device=device))
            w = model.blocks[0].mixer.weights(model.blocks[0].norm1(h))
        result["attention_map"] = None if w is None else [[round(float(v), 4) for v in row] for row in w[0].mean(0)]
        result["attention_tokens"] = x[0].tolist()
    return result


def plan(args) -> List[Run]:
    runs = []
    for task in args.task:
        for mech in args.mechanism:
            focus = task == "mqar" and mech in args.focus
            lrs = args.lrs if focus else args.lrs[:1]
            steps = args.steps if focus else args.other_steps if task == "mqar" else args.task_steps
            for lr in lrs:
                for s in range(args.seed, args.seed + args.seeds):
                    runs.append(Run(mech, task, lr, s, steps))
    return runs


def collect(out: Path) -> tuple:
    """(runs, results) of every finished run file under <out>/runs, whatever invocation wrote it."""
    runs, results = [], {}
    for path in sorted((out / "runs").glob("*/*/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("format") != RESULT_FORMAT:
            continue
        s = data["settings"]
        results[len(runs)] = data
        runs.append(Run(s["mechanism"], s["task"], s["lr"], s["seed"], s["steps"]))
    return runs, results


def summarize(runs: List[Run], results: Dict[int, dict]) -> Dict[str, Dict[str, dict]]:
    """Per (task, mechanism): the best learning rate's runs averaged over seeds (at the largest budget
    that mechanism was trained with, when several were)."""
    table: Dict[str, Dict[str, dict]] = {}
    groups: Dict[tuple, Dict[float, List[dict]]] = {}
    budget: Dict[tuple, int] = {}
    for i, run in enumerate(runs):
        if i in results and "error" not in results[i]:
            budget[(run.task, run.mechanism)] = max(budget.get((run.task, run.mechanism), 0), run.steps)
    for i, run in enumerate(runs):
        if i in results and "error" not in results[i] and run.steps == budget[(run.task, run.mechanism)]:
            groups.setdefault((run.task, run.mechanism), {}).setdefault(run.lr, []).append(results[i])
    for (task, mech), by_lr in groups.items():
        def score(rs):
            return (sum(r["final_accuracy"] for r in rs) / len(rs) if task != "char_lm"
                    else -sum(r["final_val_loss"] for r in rs) / len(rs))
        best_lr = max(by_lr, key=lambda lr: score(by_lr[lr]))
        rs = by_lr[best_lr]
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        reached = [r["to_threshold"] for r in rs if r["to_threshold"]]
        table.setdefault(task, {})[mech] = {
            "best_lr": best_lr, "lrs_tried": sorted(by_lr), "seeds": len(rs), "steps": rs[0]["settings"]["steps"],
            "params": rs[0]["params"], "mixer_params": rs[0]["mixer_params"], "ms_per_step": mean("ms_per_step"),
            "peak_train_step_bytes": max(r["peak_train_step_bytes"] for r in rs),
            "final_accuracy": mean("final_accuracy"), "final_val_loss": mean("final_val_loss"),
            "accuracy_per_seed": [r["final_accuracy"] for r in rs],
            "steps_to_threshold": (sum(r["step"] for r in reached) / len(reached)) if len(reached) == len(rs) else None,
            "seconds_to_threshold": (sum(r["seconds"] for r in reached) / len(reached)) if len(reached) == len(rs) else None,
            "curve": rs[0]["curve"], "attention_map": rs[0].get("attention_map"),
            "attention_tokens": rs[0].get("attention_tokens"),
            "accuracy_per_lr": {f"{lr:g}": score(v) if task != "char_lm" else None for lr, v in by_lr.items()},
        }
    return table


def markdown_tables(table: Dict[str, Dict[str, dict]]) -> str:
    """The tables of the docs page, as printed at the end of a run (the page quotes this output)."""
    lines = []
    for task, rows in table.items():
        acc = task != "char_lm"
        lines += [f"\n{task}:\n", "| mechanism | " + ("accuracy" if acc else "val loss (nats/char)") +
                  " | best lr | steps | steps / seconds to threshold | ms / step | peak MiB / step | params (mixers) |",
                  "|---|---|---|---|---|---|---|---|"]
        order = sorted(rows, key=lambda m: -rows[m]["final_accuracy"] if acc else rows[m]["final_val_loss"])
        for m in order:
            r = rows[m]
            reach = "-" if r["steps_to_threshold"] is None else f"{r['steps_to_threshold']:.0f} / {r['seconds_to_threshold']:.0f} s"
            metric = f"{r['final_accuracy']:.3f}" if acc else f"{r['final_val_loss']:.3f}"
            lines.append(f"| `{m}` | {metric} | {r['best_lr']:g} (of {', '.join(f'{x:g}' for x in r['lrs_tried'])}) | "
                         f"{r['steps']} | {reach} | {r['ms_per_step']:.0f} | {r['peak_train_step_bytes'] / 2 ** 20:.1f} | "
                         f"{r['params']:,} ({r['mixer_params']:,}) |")
    return "\n".join(lines)


def plot(table: Dict[str, Dict[str, dict]], args, out: Path) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for task, rows in table.items():
        metric = "accuracy" if task != "char_lm" else "val_loss"
        fig, ax = plt.subplots(figsize=(8, 5))
        for mech, row in sorted(rows.items()):
            xs = [c["step"] for c in row["curve"]]
            ys = [c[metric] for c in row["curve"]]
            bold = mech in args.focus
            ax.plot(xs, ys, lw=2.2 if bold else 0.9, alpha=1 if bold else 0.6, label=mech if (bold or len(rows) <= 12) else None)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out " + metric.replace("_", " "))
        ax.set_title(f"{task}: held-out {metric.replace('_', ' ')} during training (best lr each)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        path = out / f"compare_{task}_curves.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
        names = sorted(rows, key=lambda m: rows[m]["final_accuracy"] if task != "char_lm" else -rows[m]["final_val_loss"])
        fig, ax = plt.subplots(figsize=(8, max(3, 0.22 * len(names) + 1)))
        vals = [rows[m]["final_accuracy"] if task != "char_lm" else rows[m]["final_val_loss"] for m in names]
        ax.barh(names, vals, color=["C3" if m in args.focus else "C0" for m in names])
        ax.set_xlabel("final held-out " + ("accuracy" if task != "char_lm" else "validation loss (nats/char)"))
        ax.set_title(f"{task}: final result per mechanism (steps: {sorted({rows[m]['steps'] for m in names})})")
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        path = out / f"compare_{task}_bars.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    maps = [(m, r["attention_map"]) for m, r in sorted(table.get("mqar", {}).items()) if r.get("attention_map")]
    if maps:
        cols = min(6, len(maps))
        nrows = math.ceil(len(maps) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(2.3 * cols, 2.4 * nrows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (m, w) in zip(axes.flat, maps):
            ax.imshow(w, cmap="viridis", vmin=0)
            ax.set_title(m, fontsize=7)
        fig.suptitle("MQAR: first-layer attention (mean over heads) on one held-out example; rows = queries")
        fig.tight_layout()
        path = out / "compare_mqar_attention_maps.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.list:
        for name, a in REGISTRY.items():
            print(f"{name:<32} mechanisms/{a.stem}.py  call={a.call}  {a.note}")
        print("\nnot token mixers:")
        for stem, why in NON_MIXERS.items():
            print(f"{stem:<32} {why}")
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(cli.pick_device(args.device))  # 'cpu', 'cuda', 'cuda:1', 'mps'
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(args)
    results: Dict[int, dict] = {}
    todo = []
    if args.report_only:
        runs, results = collect(out)

    def finished(run: Run) -> Optional[dict]:
        """The run's result file, if one with the same settings is there (from this or another invocation)."""
        try:
            old = json.loads(run.path(out).read_text())
        except (OSError, ValueError):
            return None
        ok = old.get("settings") == run_settings(run, args) and old.get("format") == RESULT_FORMAT
        return old if ok else None

    for i, run in enumerate(runs if not args.report_only else []):
        old = finished(run)
        if old is not None:
            results[i] = old
        else:
            todo.append(i)
    total_steps = sum(runs[i].steps for i in todo)
    print(f"{len(runs)} runs ({len(runs) - len(todo)} already done), {total_steps:,} training steps to go, "
          f"device {device}, {torch.get_num_threads()} threads, load {cli.load_average()}", flush=True)
    tasks = {name: make_task(name, args) for name in args.task} if todo else {}
    started = time.perf_counter()
    steps_done = 0
    wall_start = time.time()
    load_before = cli.load_average()
    for n, i in enumerate(todo):
        run = runs[i]
        last_print = [0.0]

        def on_step(step, point, run=run, n=n):
            now = time.perf_counter()
            if now - last_print[0] < 2.0 and step != run.steps:
                return
            last_print[0] = now
            done = steps_done + step
            rate = (now - started) / max(1, done)
            eta = rate * (total_steps - done)
            print(f"[{n + 1}/{len(todo)}] {run.task:<14} {run.mechanism:<30} lr={run.lr:<6g} seed={run.seed} "
                  f"step {step}/{run.steps} acc {point['accuracy']:.3f} val {point['val_loss']:.3f} | "
                  f"grid {100 * done / max(1, total_steps):5.1f}% ETA {format_seconds(eta)}", flush=True)

        done_meanwhile = finished(run)  # another invocation, run side by side into the same --out, did it
        if done_meanwhile is not None:
            print(f"[{n + 1}/{len(todo)}] {run.task} {run.mechanism} lr={run.lr:g} seed={run.seed}: "
                  "finished meanwhile by another invocation, skipped", flush=True)
            results[i] = done_meanwhile
            steps_done += run.steps
            continue
        try:
            result = train_one(run, tasks[run.task], args, device, on_step)
        except Exception as exc:  # a mechanism that fails is reported, never silently skipped
            result = {"settings": run_settings(run, args), "format": RESULT_FORMAT, "error": f"{type(exc).__name__}: {exc}"}
            print(f"[{n + 1}/{len(todo)}] {run.task} {run.mechanism}: FAILED {result['error']}", flush=True)
        save_json(run.path(out), result)
        results[i] = result
        steps_done += run.steps
    table = summarize(runs, results)
    failed = {f"{runs[i].task}/{runs[i].mechanism}": r["error"] for i, r in results.items() if "error" in r}
    report = {
        "format": RESULT_FORMAT,
        "command": "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + (argv if argv is not None else sys.argv[1:])),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": device, "torch": torch.__version__, "python": platform.python_version(),
                    "load_before": load_before, "load_after": cli.load_average()},
        "wall_seconds_this_invocation": round(time.time() - wall_start, 1),
        "train_seconds_all_runs": round(sum(r.get("train_seconds", 0) for r in results.values()), 1),
        "results": table, "failed": failed,
        "non_mixers": NON_MIXERS,
    }
    save_json(out / "compare_results.json", report)
    report["figures"] = plot(table, args, out)
    save_json(out / "compare_results.json", report)
    print(markdown_tables(table))
    if failed:
        print("\nfailed:", json.dumps(failed, indent=1))
    print(f"\nresults: {out / 'compare_results.json'}")
    return report


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted (finished runs are kept; rerun to resume)", file=sys.stderr)
        sys.exit(130)
