"""Token mixing in the frequency domain: FNet's Fourier mixing and GFNet's learnable global filter.

Papers: James Lee-Thorp, Joshua Ainslie, Ilya Eckstein, Santiago Ontanon, "FNet: Mixing Tokens with Fourier
Transforms", 2021, arXiv:2105.03824; Yongming Rao, Wenliang Zhao, Zheng Zhu, Jiwen Lu, Jie Zhou, "Global
Filter Networks for Image Classification", 2021, arXiv:2107.00645.

Idea: the job of attention in a Transformer block is to mix information across tokens. FNet replaces it by
a fixed, parameter-free mixing: a 2-D discrete Fourier transform over the hidden and the sequence axis,
keeping the real part. GFNet keeps the Fourier transform but learns what to do in between: the sequence
(or image) is transformed, multiplied elementwise by a learnable complex filter, and transformed back,
which is a learnable global circular convolution, one kernel per channel. Neither computes weights from
the input: the "attention matrix" is fixed (FNet) or learned but the same for every input (GFNet).

Equations (page):  DFT  (F_N)_{nm} = exp(-2 pi i n m / N)                                           eq. (1)
                   FNet  Y = Re(F_T X F_d) = C_T X C_d - S_T X S_d  (C, S: cosine and sine parts)     eq. (2)
                   GFNet  Y = F^-1( K * F(X) ),  F over the sequence (or the two image axes)          eq. (3)
                   equivalently  y_t = sum_s k_{(t - s) mod T} x_s,  k = F^-1(K) per channel          eq. (4)

Complexity in sequence length T (width d): FNet O(T d log(T d)) time with the FFT, O(T d) memory, no
parameters; GlobalFilter O(T d log T) time, O(T d) memory, T/2+1 complex numbers per channel of parameters
(for images H x (W/2+1) x d). Neither has a causal form: every output depends on every position.

Reduces to / oracle: FNetMixing equals Re(F_T X F_d) computed with explicit DFT matrices; GlobalFilter with
an identity filter (K = 1) returns its input, and for any filter equals an explicit circular convolution
with the kernel k = F^-1(K) (tests/test_frequency_attention.py).

Docs page: docs/mechanisms/frequency_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn


def _fft_dtype(x: torch.Tensor) -> torch.dtype:
    """torch.fft has no bfloat16 kernels (and float16 only for power-of-two sizes on CUDA): compute those in
    float32 and cast the result back."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class FNetMixing(nn.Module):
    """FNet's token mixing, eq. (2): Y = Re(FFT_seq(FFT_hidden(X))). No parameters.

    Args:
        d_model: width of the input (checked, so that a wrong width is an error, not a silent transform).

    forward(x, key_padding_mask=None): x (B, T, d_model) -> (B, T, d_model).
        key_padding_mask (B, T), True = a real token: padded tokens enter the transform as zero vectors,
        so they influence no output. No `mask`, `is_causal` or weights: the mixing is fixed, not a
        weighted sum computed from the input.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        self.d_model = d_model

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_sequence(x, "x", self.d_model, "d_model")
        _check_key_padding_mask(key_padding_mask, x.size(0), x.size(1))
        if key_padding_mask is not None:
            x = x.masked_fill(~key_padding_mask[..., None], 0.0)  # (B, T, d_model): padding contributes 0
        # FFT over the hidden axis, then over the sequence axis, keep the real part, eq. (2). fft2 over the
        # last two axes does both; the order does not matter, the 2-D DFT is separable.
        mixed = torch.fft.fft2(x.to(_fft_dtype(x)), dim=(-2, -1))  # (B, T, d_model), complex
        return mixed.real.to(x.dtype)  # (B, T, d_model)


class GlobalFilter(nn.Module):
    """GFNet's global filter layer, eq. (3): FFT over the token axes, times a learnable complex filter K,
    inverse FFT. The state dict key `complex_weight` (real and imaginary parts in a last axis of 2) and its
    initialisation N(0, 0.02^2) follow the GFNet code, so its checkpoints' filters load.

    Args:
        d_model: number of channels d (one filter per channel).
        size: T for sequences (B, T, d_model), or (H, W) for images (B, H, W, d_model). The filter is
            defined for this size only (a global filter has one coefficient per frequency).

    forward(x, key_padding_mask=None): x (B, T, d_model) or (B, H, W, d_model) -> the same shape.
        key_padding_mask (B, T), sequences only, True = a real token: padded tokens enter as zeros.
    """

    def __init__(self, d_model: int, size: Union[int, Tuple[int, int]]) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        sizes = (size,) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
        if len(sizes) not in (1, 2):
            raise ValueError(f"size must be T (sequences) or (H, W) (images), got {size!r}")
        for n in sizes:
            _check_positive_int(n, "size")
        self.d_model, self.size = d_model, sizes
        # A real signal's spectrum is conjugate-symmetric along the last transformed axis: rfftn keeps
        # only n // 2 + 1 frequencies there, so the filter has that many.
        freqs = sizes[:-1] + (sizes[-1] // 2 + 1,)
        self.complex_weight = nn.Parameter(torch.randn(*freqs, d_model, 2) * 0.02)  # (T//2+1, d, 2) or (H, W//2+1, d, 2)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        spatial = len(self.size)
        shape = "(B, T, d_model)" if spatial == 1 else "(B, H, W, d_model)"
        expected = self.size + (self.d_model,)
        if not isinstance(x, torch.Tensor) or x.dim() != spatial + 2 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape {shape} = (B, {', '.join(map(str, expected))}) (the filter is "
                             f"defined for size={self.size if spatial > 1 else self.size[0]}), got {got}")
        if key_padding_mask is not None:
            if spatial != 1:
                raise ValueError("key_padding_mask is for sequences (B, T, d_model); images have no padding")
            _check_key_padding_mask(key_padding_mask, x.size(0), x.size(1))
            x = x.masked_fill(~key_padding_mask[..., None], 0.0)  # (B, T, d_model): padding contributes 0
        dims = tuple(range(1, 1 + spatial))  # the token axes
        spectrum = torch.fft.rfftn(x.to(_fft_dtype(x)), dim=dims, norm="ortho")  # (B, T//2+1, d) complex
        weight = torch.view_as_complex(self.complex_weight.to(spectrum.real.dtype).contiguous())  # (T//2+1, d)
        filtered = spectrum * weight  # (B, T//2+1, d): one complex gain per frequency and channel, eq. (3)
        out = torch.fft.irfftn(filtered, s=self.size, dim=dims, norm="ortho")  # (B, T, d) real
        return out.to(x.dtype)

    def kernel(self) -> torch.Tensor:
        """The spatial kernel k = F^-1(K) of eq. (4), shape (*size, d_model): y = k (circularly convolved) x."""
        weight = torch.view_as_complex(self.complex_weight.contiguous())  # (*freqs, d)
        dims = tuple(range(len(self.size)))
        # The 1 / sqrt(N) of the forward and of the inverse "ortho" transforms make 1 / N together, which is
        # the inverse transform's own factor under the default normalisation: y = irfftn(K * rfftn(x)), and by
        # the convolution theorem that is x circularly convolved with irfftn(K).
        return torch.fft.irfftn(weight, s=self.size, dim=dims)  # (*size, d)


def _demo() -> None:
    """Demo of `python mechanisms/frequency_attention.py`; the guard at the end of the file calls it."""
    torch.manual_seed(0)
    t, d = 10, 6
    x = torch.randn(2, t, d, dtype=torch.float64)
    y = FNetMixing(d)(x)
    # Oracle inline, eq. (2): Re(F_T X F_d) = C_T X C_d - S_T X S_d with explicit cosine/sine DFT matrices.

    def cos_sin(n):
        angle = 2 * math.pi * torch.outer(torch.arange(n), torch.arange(n)).double() / n
        return angle.cos(), angle.sin()

    (ct, st), (cd, sd) = cos_sin(t), cos_sin(d)
    diff = (y - (ct @ x @ cd - st @ x @ sd)).abs().max().item()
    print(f"FNetMixing: output shape {tuple(y.shape)}, max |FFT - explicit DFT matrices| = {diff:.1e}")
    assert diff < 1e-10

    gf = GlobalFilter(d, t).double()
    with torch.no_grad():
        gf.complex_weight[..., 0], gf.complex_weight[..., 1] = 1.0, 0.0  # K = 1: the identity filter
    identity = (gf(x) - x).abs().max().item()
    print(f"GlobalFilter with K = 1: max |output - input| = {identity:.1e}")
    assert identity < 1e-12


# =====================================================================================================
# Input checks and mask helpers, identical letter for letter in every mechanism file that uses them
# (tests/test_shared_helpers.py compares the copies). Fix one copy, fix them all.
# =====================================================================================================


def _check_positive_int(value: int, name: str) -> None:
    """Raise unless `value` is a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
