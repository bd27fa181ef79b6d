"""The conformance registry: how to build each attention module small and how to call it.

One `Entry` per public attention class or function of every file in `mechanisms/` and of the core. The
entries live in `tests/conformance/entries/<stem>.py` (one file per mechanism file, `core.py` for
`transformer_implementation.py`), each defining

    ENTRIES = [Entry(...), ...]                 # the attention modules of that file
    NOT_ENTRIES = {"public_name": "reason"}     # public names that are not attention modules (helpers,
                                                # models, tables), each with the reason and the test
                                                # that covers it instead

`tests/conformance/test_conformance.py` runs every generic check over every entry. An entry says what
its module accepts; a check that cannot apply to it is listed in `exempt` with the reason, which the
suite prints as the skip message. Nothing is skipped silently.

The uniform calling convention the checks use is

    out = entry.call(module, query, key, value, mask=..., key_padding_mask=..., is_causal=...,
                     need_weights=...)

with `query` (B, Tq, d_model), `key`/`value` (B, Tk, d_kv) (None for self-attention), and `out` either
the (B, Tq, d_out) output or `(output, weights)` when need_weights=True. Options an entry does not
accept are never passed to it. The default `call` passes them straight to `module(...)`, which fits
every module with the project's standard forward signature; an entry whose forward differs (a function
on (B, H, T, Dh) tensors, a module taking `x` only, a pooling module) supplies its own adapter.
"""
import dataclasses
import importlib
import pathlib
from typing import Callable, Dict, FrozenSet, Optional, Sequence

import torch
import torch.nn as nn

ALL_MASKS = frozenset({"mask", "key_padding_mask", "is_causal"})

# The generic checks, by the name an entry uses in `exempt`.
CHECKS = (
    "bad_input",        # wrong rank/width/batch/length, bad masks, too long: ValueError/TypeError naming the argument
    "empty_rows",       # a query row with no visible key: documented finite value, finite grads, fp32/bf16/fp16
    "masked_keys",      # keys hidden by key_padding_mask (or mask) have no influence on outputs or gradients
    "causal",           # with is_causal (or causal by construction) a future token changes no earlier output
    "gradcheck",        # torch.autograd.gradcheck in float64 over inputs and every parameter
    "dropout",          # off in eval; p = 0 in train equals eval; unbiased in train; weights before dropout
    "param_grads",      # every parameter that can matter gets a gradient; documented ones get exactly zero
    "state_dict",       # state dict round trip into a freshly built module gives the same output
    "noncontiguous",    # non-contiguous inputs give the same output as contiguous ones
    "batch_one",        # batch element b alone gives row b of the batched output
    "to_float64",       # module.to(torch.float64) runs and matches float32
    "bf16",             # bfloat16 output within `bf16_tol` of float32 for the same weights
    "weights",          # need_weights: shape (B, H, Tq, Tk), rows of visible keys sum to 1, masked entries 0
    "fused_explicit",   # the fused path (need_weights=False) equals the explicit one (need_weights=True)
    "mask_forms",       # a (Tq, Tk) mask acts exactly like the same mask written out as (B, 1, Tq, Tk)
)


def default_call(module, query, key=None, value=None, **options):
    """Call a module with the project's standard forward signature."""
    return module(query, key, value, **options)


def self_call(module, query, key=None, value=None, **options):
    """Call a self-attention module whose forward takes only `x` (key and value are the query)."""
    return module(query, **options)


def zero_row(module, d_out, dtype, device):
    """A fully masked row returns exactly zero (no output bias)."""
    return torch.zeros(d_out, dtype=dtype, device=device)


def bias_row(attribute: str = "out_proj"):
    """A fully masked row returns the bias of `module.<attribute>` (zero attention before the projection)."""
    def row(module, d_out, dtype, device):
        layer = module.get_submodule(attribute)
        if layer.bias is None:
            return torch.zeros(d_out, dtype=dtype, device=device)
        return layer.bias.detach().to(dtype)
    return row


@dataclasses.dataclass
class Entry:
    name: str                                   # "<stem>.<PublicName>", e.g. "grouped_query_attention.GroupedQueryAttention";
                                                # several configurations of one name: "<stem>.<Name>[<config>]"
    build: Callable[..., nn.Module]             # build(**overrides) -> a small module in float32; must accept
                                                # dropout=p when `dropout` is True. Called after torch.manual_seed.
    d_model: int                                # width of the query input
    d_kv: Optional[int] = None                  # width of key/value inputs (default d_model)
    d_out: Optional[int] = None                 # width of the output (default d_model)
    call: Callable = default_call               # see the module docstring
    self_only: bool = False                     # key and value are always the query (no cross-attention)
    same_length: bool = False                   # Tk must equal Tq when key/value are given
    masks: FrozenSet[str] = ALL_MASKS           # which of mask / key_padding_mask / is_causal it accepts
    causal_always: bool = False                 # causal by construction (or by default with no way to turn off)
    num_heads: int = 1                          # H in the 4-D mask and in the returned weights
    empty_row: Optional[Callable] = zero_row    # what a fully masked row returns: f(module, d_out, dtype, device)
    dropout: bool = True                        # build(dropout=p) exists and drops attention weights
    need_weights: bool = True                   # accepts need_weights=True and returns (output, weights)
    weights_sum_to_one: bool = True             # each row of the returned weights is a distribution
    max_seq_len: Optional[int] = None           # the longest query the module accepts, if it declares one
    zero_grad: Sequence[str] = ()               # parameters (or slices, "in_proj.bias[8:16]") whose gradient is
                                                # exactly zero by the math (documented)
    unused: Dict[str, str] = dataclasses.field(default_factory=dict)  # parameter -> why it gets no gradient in this call
    arg_names: Dict[str, str] = dataclasses.field(default_factory=dict)  # error-message names, e.g. {"query": "x"}
    lengths: tuple = (5, 6)                     # (Tq, Tk) the checks use; Tq is used for self-attention
    stochastic: bool = False                    # output is random in train mode even with dropout 0 (e.g. sampling)
    bf16_tol: float = 0.05                      # max |bf16 - fp32| relative to max |fp32|
    exempt: Dict[str, str] = dataclasses.field(default_factory=dict)  # check name -> reason it does not apply

    @property
    def kv_width(self) -> int:
        return self.d_model if self.d_kv is None else self.d_kv

    @property
    def out_width(self) -> int:
        return self.d_model if self.d_out is None else self.d_out

    @property
    def stem(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def public_name(self) -> str:
        """The class or function the entry covers: "<stem>.Name[configuration]" -> "Name"."""
        return self.name.split(".", 1)[1].split("[", 1)[0]


ENTRIES_DIR = pathlib.Path(__file__).resolve().parent / "entries"
BROKEN: Dict[str, str] = {}  # entry file -> the error that stopped it from importing


def load_registry():
    """(entries, not_entries): every ENTRIES list and NOT_ENTRIES dict under entries/, keyed by stem."""
    entries, not_entries = [], {}
    for path in sorted(ENTRIES_DIR.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"tests.conformance.entries.{path.stem}")
        except Exception as error:  # reported by test_entry_files_import; the other entries still run
            BROKEN[path.name] = f"{type(error).__name__}: {error}"
            continue
        for entry in getattr(module, "ENTRIES", []):
            unknown = set(entry.exempt) - set(CHECKS)
            if unknown:
                raise ValueError(f"{path.name}: entry {entry.name} exempts unknown checks {sorted(unknown)}")
            entries.append(entry)
        not_entries[path.stem] = dict(getattr(module, "NOT_ENTRIES", {}))
    return entries, not_entries
