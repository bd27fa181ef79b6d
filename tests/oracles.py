"""Independent oracle helpers shared by the mechanism tests (tests/test_<stem>.py).

The per-mechanism tests compare a module with an independent reference: most often PyTorch's own
`torch.nn.MultiheadAttention` holding the module's projection weights, fed random inputs and random masks.
This module holds that scaffolding once, so that a test file keeps only what is specific to its mechanism.

Rules every helper here follows:

* It never calls the module under test. Where it takes the module, it only READS its parameters
  (`q_proj`, `k_proj`, `v_proj`, `out_proj`, `num_heads`) or overwrites them in place (`randomize_`,
  `load_matching_`); the answer comes from PyTorch's own code or from the arguments alone.
* Our mask convention is True = may attend (`mask`) and True = a real token (`key_padding_mask`);
  PyTorch's module takes the opposite polarity. The helpers convert, so a test passes our masks.
* Random data come from a `torch.Generator` seeded by the caller (or, in `randomize_`, from torch's global
  RNG that the test seeded before building the module), so every test sees the same numbers on every run.

Import as `from tests.oracles import ...` (pytest puts the repository root on sys.path; see pyproject.toml).
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn


def output_of(result):
    """The output tensor of a module's result: `result[0]` for an `(out, weights)` tuple, else `result`.

    Pure bookkeeping on the value it is given; it calls nothing.
    """
    return result[0] if isinstance(result, tuple) else result


@torch.no_grad()
def randomize_(model: nn.Module, scale: float = 0.5, *, seed: Optional[int] = None, biases_only: bool = False,
               skip: Sequence[str] = ()) -> nn.Module:
    """Overwrite `model`'s parameters in place with `torch.randn_like(p) * scale`; returns `model`.

    Non-zero biases (and, unless `biases_only`, non-default weights) make a dropped bias or a swapped
    matrix visible to an oracle. The numbers come from torch's GLOBAL generator, in `named_parameters()`
    order, exactly like the loop each test used to write after `torch.manual_seed(seed)` and the
    constructor; pass `seed` to call `torch.manual_seed(seed)` first instead.

    biases_only: touch only parameters whose name ends in "bias" (keep the constructor's weights).
    skip: parameter names left as they are (e.g. a learned span that must keep its initial value).

    It writes parameters and never calls the module's forward.
    """
    if seed is not None:
        torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name in skip or (biases_only and not name.endswith("bias")):
            continue
        p.copy_(torch.randn_like(p) * scale)
    return model


@torch.no_grad()
def load_matching_(model: nn.Module, state: dict) -> nn.Module:
    """Load the entries of `state` whose names `model` also has (a variant built with other arguments
    receives every tensor it shares with the base model, so the two differ only by that argument); returns
    `model`. It writes parameters and never calls the module's forward.
    """
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own})
    return model


def random_inputs(batch: int, lengths: Union[int, Sequence[int]], width: Union[int, Sequence[int]], *, seed: int,
                  dtype: torch.dtype = torch.float64):
    """Standard-normal sequences drawn from one `torch.Generator().manual_seed(seed)`, in order.

    lengths an int: one tensor (batch, lengths, width). lengths a sequence, e.g. (Tq, Tk, Tk): a tuple of
    tensors (batch, t, w), one per length, drawn one after the other from the same generator; `width` is
    one int for all or one per tensor (cross-attention: (d_model, context_dim)). Arguments only; no module.
    """
    g = torch.Generator().manual_seed(seed)
    if isinstance(lengths, int):
        return torch.randn(batch, lengths, width, generator=g, dtype=dtype)
    widths = [width] * len(lengths) if isinstance(width, int) else list(width)
    if len(widths) != len(lengths):
        raise ValueError(f"width: expected an int or {len(lengths)} widths, got {widths}")
    return tuple(torch.randn(batch, t, w, generator=g, dtype=dtype) for t, w in zip(lengths, widths))


def random_mask(shape, seed: int = 2, threshold: float = 0.4) -> torch.Tensor:
    """A random boolean mask (True = may attend) of `shape`, with `rand > threshold` drawn from
    `torch.Generator().manual_seed(seed)`, and key 0 kept in every row: every query sees at least one key
    (PyTorch's module and a plain softmax give NaN for a row with none). Arguments only; no module.
    """
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > threshold
    mask[..., 0] = True
    return mask


@torch.no_grad()
def torch_mha_like(model: nn.Module, dtype: Optional[torch.dtype] = None, *, num_heads: Optional[int] = None,
                   identity_out_proj: bool = False) -> nn.MultiheadAttention:
    """`torch.nn.MultiheadAttention(batch_first=True)` in eval mode holding `model`'s projection weights.

    Reads `model.q_proj`, `k_proj`, `v_proj` (nn.Linear) and `model.out_proj`, and `model.num_heads` unless
    `num_heads` is given. Widths come from the weights: embed_dim = q_proj's input width, kdim/vdim the key
    and value projections' input widths (PyTorch then keeps separate q/k/v matrices, as for
    cross-attention). Biases are copied when the model has them (`bias=False` otherwise).
    identity_out_proj: the model has no output projection; PyTorch's gets the identity and a zero bias.
    dtype: the reference's dtype (default: the model's q_proj weight dtype).

    It only reads the model's parameters; the answer of the returned module is PyTorch's own code.
    Building it draws PyTorch's default initialisation from the global RNG (overwritten at once), as
    building `nn.MultiheadAttention` in the test did.
    """
    q_w, k_w, v_w = model.q_proj.weight, model.k_proj.weight, model.v_proj.weight
    embed_dim, kdim, vdim = q_w.shape[1], k_w.shape[1], v_w.shape[1]
    if q_w.shape[0] != embed_dim:
        raise ValueError(f"q_proj: nn.MultiheadAttention needs a square query projection, got {tuple(q_w.shape)}")
    bias = model.q_proj.bias is not None
    dtype = q_w.dtype if dtype is None else dtype
    heads = model.num_heads if num_heads is None else num_heads
    ref = nn.MultiheadAttention(embed_dim, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=True, dtype=dtype)
    if ref._qkv_same_embed_dim:
        ref.in_proj_weight.copy_(torch.cat([q_w, k_w, v_w]))
    else:
        ref.q_proj_weight.copy_(q_w)
        ref.k_proj_weight.copy_(k_w)
        ref.v_proj_weight.copy_(v_w)
    if identity_out_proj:
        ref.out_proj.weight.copy_(torch.eye(embed_dim))
    else:
        ref.out_proj.weight.copy_(model.out_proj.weight)
    if bias:
        ref.in_proj_bias.copy_(torch.cat([model.q_proj.bias, model.k_proj.bias, model.v_proj.bias]))
        if identity_out_proj:
            ref.out_proj.bias.zero_()
        else:
            ref.out_proj.bias.copy_(model.out_proj.bias)
    return ref.eval()


def torch_attn_mask(mask: Optional[torch.Tensor], batch: int, num_heads: int, tq: int, tk: int,
                    is_causal: bool = False) -> Optional[torch.Tensor]:
    """Our `mask` (True = may attend; (Tq, Tk) or 4-D broadcastable to (B, H, Tq, Tk)) AND, if `is_causal`,
    the bottom-right aligned causal mask (query i sees keys j <= i + Tk - Tq), as PyTorch's `attn_mask`
    (True = blocked): (Tq, Tk) when it is shared by every batch element and head, else (B * H, Tq, Tk).
    None when nothing is masked. Arguments only; no module.
    """
    allowed = mask
    if is_causal:
        causal = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
        allowed = causal if allowed is None else allowed & causal
    if allowed is None:
        return None
    if allowed.dim() == 2:
        return ~allowed
    return ~allowed.expand(batch, num_heads, tq, tk).reshape(batch * num_heads, tq, tk)


def mha_reference(model: nn.Module, query: torch.Tensor, key: Optional[torch.Tensor] = None,
                  value: Optional[torch.Tensor] = None, *, mask: Optional[torch.Tensor] = None,
                  key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                  ref: Optional[nn.MultiheadAttention] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(output, weights (B, H, Tq, Tk)) of `torch.nn.MultiheadAttention` with `model`'s weights copied in.

    Our conventions in, PyTorch's module underneath: key defaults to query and value to key; `mask`
    (True = may attend) and `is_causal` (bottom-right) become `attn_mask` by `torch_attn_mask`;
    `key_padding_mask` (True = real token) is negated. `ref`: a module from `torch_mha_like` to reuse
    (default: build one from `model`). Every query row must keep a key (PyTorch gives NaN otherwise).

    It never calls `model`: it reads its parameters through `torch_mha_like` and runs PyTorch's module.
    """
    key = query if key is None else key
    value = key if value is None else value
    ref = torch_mha_like(model) if ref is None else ref
    attn_mask = torch_attn_mask(mask, query.size(0), ref.num_heads, query.size(1), key.size(1), is_causal)
    kpm = None if key_padding_mask is None else ~key_padding_mask
    return ref(query, key, value, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=True,
               average_attn_weights=False)
