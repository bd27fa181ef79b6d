"""Multi-scale retention (RetNet): causal attention without softmax, with an exponential decay per head.

Paper: Yutao Sun, Li Dong, Shaohan Huang, Shuming Ma, Yuqing Xia, Jilong Xue, Jianyong Wang, Furu Wei,
"Retentive Network: A Successor to Transformer for Large Language Models", 2023, arXiv:2307.08621.

Idea: drop the softmax and weight each (query n, key m) pair by q_n . k_m times gamma^(n - m), a decay that
forgets the past geometrically. Because gamma^(n - m) = gamma^n / gamma^m, the same function has three exact
forms: parallel (a masked T x T matrix, for training), recurrent (a state S_n = gamma S_(n-1) + k_n^T v_n of
fixed size, for O(1)-per-token decoding) and chunkwise (parallel inside chunks, recurrent between them, for
long sequences). Each head h has its own gamma_h = 1 - 2^(-5-h): several time scales at once. A per-head
normalisation and a swish gate finish the layer.

Equation:  Q = (X W_Q) rotated by n theta,  K = (X W_K) rotated by m theta,  V = X W_V,
           Retention(X) = (Q K^T / sqrt(Dh) * D) V,  D_nm = gamma^(n - m) if n >= m else 0,
           MSR(X) = (swish(X W_G) * GroupNorm(head_1, ..., head_H)) W_O.

Complexity in sequence length T: parallel time O(T^2 Dh) and memory O(T^2) per head; recurrent O(Dh^2) time
and memory per token; chunkwise time O(T C Dh + T Dh^2), memory O(C^2 + Dh^2) per head for chunk size C.

Reduces to / oracle: the parallel, recurrent and chunkwise forms (every chunk size, T divisible or not) and
prefill + step decoding agree to 1e-10 in float64 and equal an explicit double loop over the paper's
formula (tests/test_retention.py::test_parallel_recurrent_and_chunkwise_forms_equal_the_double_loop). With
gamma = 1 and no normalisation it would be unnormalised linear attention; it never equals softmax attention
(tests/test_retention.py::test_distinct_from_softmax_attention_with_the_same_projections).

Docs page: docs/mechanisms/retention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def retention_decays(num_heads: int) -> torch.Tensor:
    """gamma_h = 1 - 2^(-5-h) for h = 0..H-1, eq. (3): from 0.969 (a memory of ~32 tokens) towards 1."""
    _check_positive_int(num_heads, "num_heads")
    return 1.0 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64))  # (H,)


def _rotate(x: torch.Tensor, start: int) -> torch.Tensor:
    """Rotate each pair of coordinates (2i, 2i+1) of x (B, H, T, Dh) by angle (start + t) * theta_i, eq. (1)."""
    head_dim, length = x.size(-1), x.size(-2)
    theta = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=x.device) / head_dim)  # (Dh/2,)
    angle = torch.arange(start, start + length, dtype=torch.float64, device=x.device)[:, None] * theta  # (T, Dh/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)  # (T, Dh/2)
    even, odd = x[..., 0::2], x[..., 1::2]  # (B, H, T, Dh/2) each
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)  # (B, H, T, Dh)


def decay_matrix(gammas: torch.Tensor, length: int) -> torch.Tensor:
    """D_nm = gamma^(n - m) for n >= m, else 0, eq. (2); gammas (H,) -> (H, T, T)."""
    n = torch.arange(length, device=gammas.device)
    distance = (n[:, None] - n[None, :]).to(gammas.dtype)  # (T, T)
    causal = distance >= 0
    return torch.where(causal, gammas[:, None, None] ** distance.clamp(min=0), 0.0)  # (H, T, T)


def retention_parallel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       gammas: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The parallel form, eq. (2): (Q K^T * D) V; inputs (B, H, T, .) already rotated and scaled.

    Returns (output (B, H, T, Dv), the retention scores Q K^T * D (B, H, T, T)).
    """
    scores = (query @ key.transpose(-2, -1)) * decay_matrix(gammas, query.size(2))  # (B, H, T, T)  eq. (2)
    return scores @ value, scores  # (B, H, T, Dv), (B, H, T, T)


def retention_recurrent(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gammas: torch.Tensor,
                        state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The recurrent form, eq. (4): S_n = gamma S_(n-1) + k_n^T v_n, o_n = q_n S_n, one token at a time.

    state (B, H, Dh, Dv) or None (zeros). Returns (output (B, H, T, Dv), state after the last token).
    """
    gamma = gammas[:, None, None]  # (H, 1, 1)
    if state is None:
        state = query.new_zeros(*query.shape[:2], query.size(-1), value.size(-1))  # (B, H, Dh, Dv)
    outputs = []
    for n in range(query.size(2)):
        state = gamma * state + key[:, :, n, :, None] * value[:, :, n, None, :]  # (B, H, Dh, Dv)  eq. (4)
        outputs.append(query[:, :, n, None, :] @ state)  # (B, H, 1, Dv)  eq. (4)
    return torch.cat(outputs, dim=2), state  # (B, H, T, Dv), (B, H, Dh, Dv)


def retention_chunkwise(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gammas: torch.Tensor,
                        chunk_size: int, state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The chunkwise form, eq. (5)-(6): parallel inside each chunk of `chunk_size`, recurrent across chunks.

    state (B, H, Dh, Dv) or None: the decayed sum of everything before the first token. The last chunk may be
    shorter. Returns (output (B, H, T, Dv), state after the last token).
    """
    gamma = gammas[:, None, None]  # (H, 1, 1)
    if state is None:
        state = query.new_zeros(*query.shape[:2], query.size(-1), value.size(-1))  # (B, H, Dh, Dv)
    outputs = []
    for start in range(0, query.size(2), chunk_size):
        q, k, v = (t[:, :, start:start + chunk_size] for t in (query, key, value))  # (B, H, L, .)
        length = q.size(2)
        local = torch.arange(length, device=query.device, dtype=gammas.dtype)  # (L,)
        inner = (q @ k.transpose(-2, -1)) * decay_matrix(gammas, length)  # (B, H, L, L)  eq. (5)
        xi = gamma ** (local[:, None] + 1)  # (H, L, 1): token j of the chunk is j + 1 steps after the state
        outputs.append(inner @ v + (q @ state) * xi)  # (B, H, L, Dv)  eq. (5)
        zeta = gamma ** (length - 1 - local[:, None])  # (H, L, 1): how far token j is from the chunk's end
        state = gamma ** length * state + k.transpose(-2, -1) @ (v * zeta)  # (B, H, Dh, Dv)  eq. (6)
    return torch.cat(outputs, dim=2), state  # (B, H, T, Dv), (B, H, Dh, Dv)


class MultiScaleRetention(nn.Module):
    """Multi-scale retention, causal self-attention over x (B, T, d_model).

    Args:
        d_model: width of the input and the output; must be divisible by num_heads, with an even head_dim.
        num_heads: number of heads H; head h decays with gamma_h = 1 - 2^(-5-h).
        chunk_size: None = the parallel form in forward (O(T^2), the paper's training form); an integer = the
            chunkwise form with chunks of that many tokens (O(T) memory). The result is the same.
        bias: whether the projections have a bias.
        eps: epsilon of the per-head normalisation.
    """

    def __init__(self, d_model: int, num_heads: int, chunk_size: Optional[int] = None, bias: bool = True,
                 eps: float = 1e-6) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_divisible(d_model // num_heads, "head_dim (d_model // num_heads)", 2, "2 (rotation pairs)")
        if chunk_size is not None:
            _check_positive_int(chunk_size, "chunk_size")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.chunk_size, self.eps = chunk_size, float(eps)
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.g_proj = nn.Linear(d_model, d_model, bias=bias)  # the swish gate of eq. (7)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _qkv(self, x: torch.Tensor, start: int, key_padding_mask: Optional[torch.Tensor]):
        """Rotated Q, scaled rotated K and V, (B, H, T, Dh), in float32 for half inputs; padded keys zeroed."""
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        split = lambda t: t.to(compute).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # noqa: E731
        q = _rotate(split(self.q_proj(x)), start)  # (B, H, T, Dh)  eq. (1)
        k = _rotate(split(self.k_proj(x)), start) / math.sqrt(self.head_dim)  # (B, H, T, Dh)  eq. (1)
        v = split(self.v_proj(x))  # (B, H, T, Dh)
        if key_padding_mask is not None:
            real = key_padding_mask[:, None, :, None]  # (B, 1, T, 1)
            k, v = k * real, v * real  # a padded token adds nothing to any later state
        gammas = retention_decays(self.num_heads).to(device=x.device, dtype=compute)  # (H,)  eq. (3)
        return q, k, v, gammas

    def _finish(self, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Per-head normalisation, swish gate and output projection, eq. (7); heads (B, H, T, Dh) -> (B, T, d_model)."""
        # RMS normalisation of each head's vector (torchscale's released choice; the paper's GroupNorm also subtracts
        # the mean). A head that retained nothing (all keys padded) stays exactly 0.
        heads = heads * torch.rsqrt(heads.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (B, H, T, Dh)  eq. (7)
        heads = heads.transpose(1, 2).reshape(x.size(0), x.size(1), self.d_model).to(x.dtype)  # (B, T, d_model)
        return self.out_proj(F.silu(self.g_proj(x)) * heads)  # (B, T, d_model)  eq. (7)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Causal retention over x (B, T, d_model). key_padding_mask: bool (B, T), True = a real token.

        `mask` is refused: the recurrent and chunkwise forms have no (T, T) matrix to mask (causality and the
        decay are built in). need_weights=True returns (output, scores Q K^T * D (B, H, T, T)) from the parallel
        form; they are not normalised (no softmax) and are 0 for future and padded keys.
        """
        _check_sequence(x, "x", self.d_model, "d_model")
        if mask is not None:
            raise ValueError(f"mask: MultiScaleRetention does not take a general (T, T) mask (got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}); it is "
                             f"causal by construction and its recurrent forms have no (T, T) matrix. Use key_padding_mask")
        _check_key_padding_mask(key_padding_mask, x.size(0), x.size(1))
        q, k, v, gammas = self._qkv(x, 0, key_padding_mask)
        scores = None
        if need_weights or self.chunk_size is None:
            heads, scores = retention_parallel(q, k, v, gammas)  # (B, H, T, Dh)
        else:
            heads, _ = retention_chunkwise(q, k, v, gammas, self.chunk_size)  # (B, H, T, Dh)
        out = self._finish(x, heads)  # (B, T, d_model)
        return (out, scores.to(x.dtype)) if need_weights else out

    def prefill(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, int]]:
        """Process a prompt x (B, T, d_model) chunkwise; returns (output, state) where state = (S, tokens so far)."""
        _check_sequence(x, "x", self.d_model, "d_model")
        q, k, v, gammas = self._qkv(x, 0, None)
        heads, state = retention_chunkwise(q, k, v, gammas, self.chunk_size or 64)  # (B, H, T, Dh)
        return self._finish(x, heads), (state, x.size(1))

    def step(self, x: torch.Tensor, state: Optional[Tuple[torch.Tensor, int]] = None
             ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, int]]:
        """Decode one token x (B, 1, d_model) from state (S (B, H, Dh, Dh), position); O(Dh^2) whatever the context."""
        _check_sequence(x, "x", self.d_model, "d_model")
        if x.size(1) != 1:
            raise ValueError(f"x must have shape (B, 1, d_model) = (B, 1, {self.d_model}): one token, got "
                             f"{tuple(x.shape)}; use prefill() for a prompt")
        s, position = (None, 0) if state is None else state
        q, k, v, gammas = self._qkv(x, position, None)
        heads, s = retention_recurrent(q, k, v, gammas, s)  # (B, H, 1, Dh)  eq. (4)
        return self._finish(x, heads), (s, position + 1)


def _demo() -> None:
    """The three forms on random data, and decoding from a prompt (python retention.py)."""
    torch.manual_seed(0)
    msr = MultiScaleRetention(d_model=32, num_heads=4).double().eval()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    with torch.no_grad():
        parallel, scores = msr(x, need_weights=True)
        msr.chunk_size = 5  # 19 = 3 * 5 + 4: a ragged last chunk
        chunkwise = msr(x)
        out, state = msr.prefill(x[:, :12])
        steps = [out]
        for i in range(12, 19):
            y, state = msr.step(x[:, i:i + 1], state)
            steps.append(y)
        recurrent = torch.cat(steps, dim=1)
    diff = max((parallel - chunkwise).abs().max().item(), (parallel - recurrent).abs().max().item())
    print(f"output shape {tuple(parallel.shape)}; decays {[round(g, 4) for g in retention_decays(4).tolist()]}; "
          f"scores {tuple(scores.shape)}, future entries all 0: {bool((scores.triu(1) == 0).all())}")
    print(f"max |parallel - chunkwise (5)| and |parallel - prefill 12 + 7 steps| = {diff:.2e}")
    assert diff < 1e-10, diff


# =====================================================================================================
# Input checks and mask helpers, identical letter for letter in every mechanism file that uses them
# (tests/test_shared_helpers.py compares the copies). Fix one copy, fix them all.
# =====================================================================================================


def _check_positive_int(value: int, name: str) -> None:
    """Raise unless `value` is a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_divisible(numerator: int, numerator_name: str, denominator: int, denominator_name: str) -> None:
    """Raise unless `denominator` divides `numerator` (both already checked positive)."""
    if numerator % denominator != 0:
        raise ValueError(f"{numerator_name}={numerator} is not divisible by {denominator_name}={denominator}; "
                         f"choose {numerator_name} as a multiple of {denominator_name}")


def _check_sequence(x: torch.Tensor, name: str, width: int, width_name: str) -> None:
    """Raise unless `x` is a batch-first (B, T, width) tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.size(-1) != width:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (B, T, {width_name}) = (B, T, {width}), got {got}")


def _check_key_padding_mask(key_padding_mask: Optional[torch.Tensor], batch: int, tk: int) -> None:
    """Raise unless `key_padding_mask` is None or a (B, Tk) boolean tensor, True = a real token."""
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
        raise TypeError(f"key_padding_mask must be a torch.bool tensor (True = a real token that may be "
                        f"attended), got {got}; convert a 0/1 mask with key_padding_mask.bool()")
    if tuple(key_padding_mask.shape) != (batch, tk):
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected (B, Tk) = "
                         f"({batch}, {tk})")


if __name__ == "__main__":
    _demo()
