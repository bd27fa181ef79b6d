"""mechanisms/frequency_attention.py: FNet's Fourier mixing and GFNet's global filter.

Oracles: explicit DFT matrices exp(-2 pi i n m / N) for FNet; for the global filter, the identity filter,
an explicit circular convolution whose kernel is built from the filter by the inverse DFT sum written out
here, and GFNet's published forward (rfft2, multiply, irfft2, norm="ortho") for images.
"""
import cmath
import math

import pytest
import torch
import torch.nn as nn

from mechanisms.frequency_attention import FNetMixing, GlobalFilter

TOL = 1e-10


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dft(n):
    """(F_N)_{nm} = exp(-2 pi i n m / N), eq. (1), entry by entry."""
    return torch.tensor([[cmath.exp(-2j * math.pi * a * b / n) for b in range(n)] for a in range(n)],
                        dtype=torch.complex128)


def _random_filter(module, seed=1):
    with torch.no_grad():
        module.complex_weight.copy_(_x(*module.complex_weight.shape, seed=seed))
    return module


@pytest.mark.parametrize("t,d", [(5, 4), (8, 6)])
def test_fnet_equals_the_real_part_of_explicit_dft_matrices(t, d):
    x = _x(3, t, d)
    expected = (_dft(t) @ x.to(torch.complex128) @ _dft(d)).real  # Re(F_T X F_d), eq. (2)
    assert (FNetMixing(d)(x) - expected).abs().max() < TOL
    # the cosine/sine form of eq. (2): Re(F_T X F_d) = C_T X C_d - S_T X S_d (F = C - iS)
    c_t, s_t, c_d, s_d = _dft(t).real, -_dft(t).imag, _dft(d).real, -_dft(d).imag
    assert (FNetMixing(d)(x) - (c_t @ x @ c_d - s_t @ x @ s_d)).abs().max() < TOL


def test_fnet_padding_enters_as_zeros_and_the_width_is_checked():
    x = _x(2, 6, 4)
    real = torch.ones(2, 6, dtype=torch.bool)
    real[1, 4:] = False
    zeroed = x.clone()
    zeroed[1, 4:] = 0.0
    assert torch.equal(FNetMixing(4)(x, key_padding_mask=real), FNetMixing(4)(zeroed))
    with pytest.raises(ValueError, match="d_model"):  # d_model is FNet's only argument: the width it accepts
        FNetMixing(5)(x)


@pytest.mark.parametrize("size", [7, 8, (4, 6), (5, 3)])
def test_identity_filter_returns_the_input(size):
    sizes = (size,) if isinstance(size, int) else size
    module = GlobalFilter(3, size).double()
    with torch.no_grad():
        module.complex_weight[..., 0] = 1.0
        module.complex_weight[..., 1] = 0.0
    x = _x(2, *sizes, 3)
    assert (module(x) - x).abs().max() < TOL


@pytest.mark.parametrize("t", [7, 8])
def test_global_filter_is_an_explicit_circular_convolution(t):
    d = 3
    module = _random_filter(GlobalFilter(d, t).double())
    w = module.complex_weight.detach()
    half = w[..., 0] + 1j * w[..., 1]  # (t//2 + 1, d) complex filter K
    # Complete K to all t frequencies of a real kernel: K_{t-f} = conj(K_f); the DC (and, for even t, the
    # Nyquist) coefficient of a real signal is real, so its imaginary part has no effect.
    full = torch.zeros(t, d, dtype=torch.complex128)
    for f in range(t):
        full[f] = half[f] if f <= t // 2 else half[t - f].conj()
    full[0] = full[0].real
    if t % 2 == 0:
        full[t // 2] = full[t // 2].real
    kernel = torch.stack([sum(full[f] * cmath.exp(2j * math.pi * f * s / t) for f in range(t)) / t
                          for s in range(t)]).real  # k = F^-1(K), eq. (4)
    assert (module.kernel() - kernel).abs().max() < TOL
    x = _x(2, t, d, seed=2)
    expected = torch.zeros_like(x)
    for i in range(t):
        for s in range(t):
            expected[:, i] += kernel[(i - s) % t] * x[:, s]  # y_i = sum_s k_{(i - s) mod t} x_s
    assert (module(x) - expected).abs().max() < TOL


def test_global_filter_on_images_equals_the_published_gfnet_forward_and_its_impulse_response():
    a, b, d = 4, 6, 3
    module = _random_filter(GlobalFilter(d, (a, b)).double())
    assert module.complex_weight.shape == (a, b // 2 + 1, d, 2)  # GFNet's layout of `complex_weight`
    x = _x(2, a, b, d, seed=2)
    # GFNet's GlobalFilter.forward (Rao et al.'s code), after its reshape of (B, N, C) tokens to (B, a, b, C):
    spectrum = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")
    expected = torch.fft.irfft2(spectrum * torch.view_as_complex(module.complex_weight), s=(a, b), dim=(1, 2),
                                norm="ortho")
    assert (module(x) - expected).abs().max() < TOL
    impulse = torch.zeros(1, a, b, d, dtype=torch.float64)
    impulse[0, 0, 0] = 1.0
    assert (module(impulse)[0] - module.kernel()).abs().max() < TOL  # response to a delta = the kernel


def test_distinct_from_attention_linear_and_shift_equivariant_not_permutation_equivariant():
    t, d = 6, 4
    x, y = _x(2, t, d), _x(2, t, d, seed=3)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    mha = nn.MultiheadAttention(d, 2, batch_first=True, dtype=torch.float64).eval()
    attend = lambda z: mha(z, z, z)[0]  # noqa: E731
    # Attention without positions is nonlinear and permutation-equivariant.
    with torch.no_grad():
        assert (attend(x + y) - attend(x) - attend(y)).abs().max() > 1e-2
        assert (attend(x[:, perm]) - attend(x)[:, perm]).abs().max() < TOL
    for mixer in (FNetMixing(d), _random_filter(GlobalFilter(d, t).double())):
        with torch.no_grad():
            out = mixer(x)
            assert (mixer(2 * x - 3 * y) - (2 * out - 3 * mixer(y))).abs().max() < TOL  # linear
            assert (mixer(x[:, perm]) - out[:, perm]).abs().max() > 1e-2  # order matters
            assert (out - attend(x)).abs().max() > 1e-2
    # Shifting the sequence circularly shifts the global filter's output (a convolution has no positions but
    # does have distances). FNet's real part is not shift-equivariant: a shift multiplies the spectrum by a phase.
    gf = _random_filter(GlobalFilter(d, t).double())
    with torch.no_grad():
        assert (gf(x.roll(2, dims=1)) - gf(x).roll(2, dims=1)).abs().max() < TOL


def test_every_constructor_argument_matters():
    x = _x(2, 6, 4)
    with pytest.raises(ValueError, match="size"):
        GlobalFilter(4, 5)(x)  # size: the filter exists for one length only
    with pytest.raises(ValueError, match="d_model"):
        GlobalFilter(3, 6)(x)
    assert GlobalFilter(4, 6)(x).shape == x.shape
    short, long = GlobalFilter(4, 6).double(), GlobalFilter(4, 7).double()
    with torch.no_grad():
        long.complex_weight.copy_(short.complex_weight[:4])  # the same 4 frequency gains, other length
        assert (long(_x(2, 7, 4))[:, :6] - short(x)).abs().max() > 1e-4
    assert GlobalFilter(4, (2, 3)).complex_weight.shape == (2, 2, 4, 2)  # d_model: one filter per channel
