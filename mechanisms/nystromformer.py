"""Nystromformer: self-attention approximated by the Nystrom method with segment-mean landmarks.

Paper: Yunyang Xiong, Zhanpeng Zeng, Rudrasis Chakraborty, Mingxing Tan, Glenn Fung, Yin Li, Vikas Singh (2021),
"Nystromformer: A Nystrom-Based Algorithm for Approximating Self-Attention", arXiv:2102.03902.

Idea: the softmax matrix S = softmax(Q K^T / sqrt(d)) is (n, n). Pick m << n landmark queries Q~ and keys K~
(the means of m contiguous segments) and rebuild S from three small softmax matrices: the queries against
the landmark keys F (n, m), the landmarks against each other A (m, m), and the landmark queries against the
keys B (m, n): S ~ F A^+ B, the Nystrom approximation of a matrix from some of its rows and columns. The
pseudo-inverse A^+ is computed by an iteration of matrix products (Newton-Schulz), which GPUs like better
than an SVD. Nothing of size (n, n) is built: the output is F (A^+ (B V)).

Equations (page eq. (1)-(6)):
    Q~_s = mean of Q over segment s,  K~_s likewise           (m segments, padding excluded)
    F = softmax(Q K~^T / sqrt(Dh)),  A = softmax(Q~ K~^T / sqrt(Dh)),  B = softmax(Q~ K^T / sqrt(Dh))
    out = F A^+ (B V)
    Z_0 = A^T / (||A||_1 ||A||_inf),  Z_{j+1} = Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))) / 4

Complexity in sequence length T with m landmarks: time O(T m Dh + m^2 Dh + m^3 iterations), memory O(T m):
linear in T at fixed m. need_weights=True additionally forms the (T, T) approximation F A^+ B.

Reduces to / oracle: with m = T landmarks (every token its own segment) and the exact pseudo-inverse, S = S S^+ S,
so it is exactly softmax attention; the iteration is checked against torch.linalg.pinv
(tests/test_nystromformer.py).

Docs page: docs/mechanisms/nystromformer.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn


def newton_schulz_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Approximate Moore-Penrose pseudo-inverse of the (..., m, m) matrices `a` by the iteration of eq. (5)-(6).

    Z_0 = A^T / (||A||_1 ||A||_inf) makes ||I - A Z_0|| < 1 for a non-zero A, and each step cuts the error
    quickly from there (Razavi et al. 2014, as used by the paper). Low-precision input is iterated in float32.
    """
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    work = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
    eye = torch.eye(work.size(-1), dtype=work.dtype, device=work.device)
    norm_1 = work.abs().sum(dim=-2).amax(dim=-1, keepdim=True)  # (..., 1): max column sum
    norm_inf = work.abs().sum(dim=-1).amax(dim=-1, keepdim=True)  # (..., 1): max row sum
    z = work.transpose(-2, -1) / (norm_1 * norm_inf).clamp(min=1e-30)[..., None]  # (..., m, m)  eq. (5)
    for _ in range(iterations):
        az = work @ z  # (..., m, m)
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))  # eq. (6)
    return z.to(a.dtype)


class NystromAttention(nn.Module):
    """Nystrom-approximated multi-head self-attention, batch-first (B, T, d_model) in and out.

    Args:
        d_model: width of the input and the output; must be divisible by num_heads.
        num_heads: number of heads H.
        num_landmarks: m, the number of segments (and landmarks). A sequence with T <= m uses every token as
            its own landmark. Segments are contiguous and as equal as possible (T need not be a multiple of m).
        pinv_iterations: Newton-Schulz steps for A^+ (the paper uses 6); None uses the exact
            torch.linalg.pinv instead (the limit case and the reference).
        bias: whether the four projections have a bias.

    forward(x, mask=None, key_padding_mask=None, is_causal=False, need_weights=False): self-attention over x.
    key_padding_mask (B, T), True = real token: padded tokens are left out of the landmark means and get no
    weight in B. `mask` and `is_causal` are refused: the landmarks average over whole segments, future tokens
    included. need_weights=True returns the (B, H, T, T) approximation F A^+ B (rows sum to 1 only as far as
    A^+ is exact).
    """

    def __init__(self, d_model: int, num_heads: int, num_landmarks: int, pinv_iterations: Optional[int] = 6,
                 bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_positive_int(num_landmarks, "num_landmarks")
        if pinv_iterations is not None and (not isinstance(pinv_iterations, int) or isinstance(pinv_iterations, bool)
                                            or pinv_iterations < 0):
            raise ValueError(f"pinv_iterations must be None (exact) or an integer >= 0, got {pinv_iterations!r}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return f"num_landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}"

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        _check_sequence(x, "x", self.d_model, "d_model")
        if mask is not None:
            raise ValueError("mask is not supported by NystromAttention: the (T, T) matrix is never formed, and the "
                             "landmarks average whole segments; pass padding as key_padding_mask (B, T) (got mask "
                             f"of shape {tuple(getattr(mask, 'shape', ()))})")
        if is_causal:
            raise ValueError("is_causal=True is not supported by NystromAttention: each landmark averages a whole "
                             "segment, future tokens included, so no query can be kept from the future")
        batch, t, _ = x.shape
        _check_key_padding_mask(key_padding_mask, batch, t)
        device, heads, dh = x.device, self.num_heads, self.head_dim
        split = lambda y: y.view(batch, t, heads, dh).transpose(1, 2)  # noqa: E731  (B, H, T, Dh)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        real = torch.ones(batch, t, dtype=torch.bool, device=device) if key_padding_mask is None else key_padding_mask
        scale = 1.0 / math.sqrt(dh)

        # eq. (1): m contiguous segments, position i in segment floor(i m / T); landmark = mean over real tokens.
        m = min(self.num_landmarks, t)
        segment = torch.arange(t, device=device) * m // t  # (T,): segment of each position
        member = (segment[None, :] == torch.arange(m, device=device)[:, None])[None] & real[:, None, :]  # (B, m, T)
        count = member.sum(dim=-1, keepdim=True)  # (B, m, 1)
        valid = count[..., 0] > 0  # (B, m): a segment of padding only has no landmark
        average = (member.to(q.dtype) / count.clamp(min=1).to(q.dtype))[:, None]  # (B, 1, m, T)
        q_land, k_land = average @ q, average @ k  # (B, H, m, Dh) each

        # eq. (2)-(3): three softmax matrices, each masked where its keys are padding or missing landmarks.
        f = _masked_softmax(q @ k_land.transpose(-2, -1) * scale, valid[:, None, None, :])  # (B, H, T, m)
        a = _masked_softmax(q_land @ k_land.transpose(-2, -1) * scale, valid[:, None, None, :])  # (B, H, m, m)
        a = a * valid[:, None, :, None]  # a missing landmark's row is zero too: A = diag(A_valid, 0)
        b = _masked_softmax(q_land @ k.transpose(-2, -1) * scale, real[:, None, None, :])  # (B, H, m, T)
        if self.pinv_iterations is None:
            a_pinv = torch.linalg.pinv(a.float() if a.dtype in (torch.float16, torch.bfloat16) else a).to(a.dtype)
        else:
            a_pinv = newton_schulz_pinv(a, self.pinv_iterations)  # (B, H, m, m)  eq. (5)-(6)
        heads = f @ (a_pinv @ (b @ v))  # (B, H, T, Dh)  eq. (4): right to left, never (T, T)
        has_key = real.any(dim=-1)[:, None, None, None]  # (B, 1, 1, 1): a sequence of padding only returns zeros
        heads = heads * has_key
        out = self.out_proj(heads.transpose(1, 2).reshape(batch, t, self.d_model))  # (B, T, d_model)
        if not need_weights:
            return out
        return out, (f @ a_pinv @ b) * has_key  # (B, H, T, T): the approximation of S, for inspection


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where `allowed`; a row with nothing allowed is all zeros (never NaN)."""
    row_any = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~(allowed | ~row_any), float("-inf"))
    return torch.softmax(scores, dim=-1) * (allowed & row_any)


def _demo() -> None:
    """Demo of `python mechanisms/nystromformer.py`; the guard at the end of the file calls it."""
    torch.manual_seed(0)
    batch, t, d_model, num_heads = 2, 16, 16, 2
    x = torch.randn(batch, t, d_model)
    exact = NystromAttention(d_model, num_heads, num_landmarks=t, pinv_iterations=None).eval()
    with torch.no_grad():
        split = lambda y: y.view(batch, t, num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(exact.q_proj(x)), split(exact.k_proj(x)), split(exact.v_proj(x))
        full = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d_model // num_heads), dim=-1) @ v
        reference = exact.out_proj(full.transpose(1, 2).reshape(batch, t, d_model))
        diff = (exact(x) - reference).abs().max().item()
        print(f"output shape {tuple(reference.shape)}; m = T landmarks, exact pinv: max |Nystrom - softmax| = {diff:.2e}")
        assert diff < 1e-4, diff
        for m in (2, 4, 8):
            approx = NystromAttention(d_model, num_heads, num_landmarks=m)
            approx.load_state_dict(exact.state_dict())
            error = (approx(x) - reference).abs().mean().item()
            print(f"  m = {m:2d} landmarks, 6 Newton-Schulz steps: mean |error| = {error:.3e}")


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
