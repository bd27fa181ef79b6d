"""Performer attention (FAVOR+): softmax attention estimated without bias by positive orthogonal random features.

Paper: Krzysztof Choromanski, Valerii Likhosherstov, David Dohan, Xingyou Song, Andreea Gane, Tamas Sarlos,
Peter Hawkins, Jared Davis, Afroz Mohiuddin, Lukasz Kaiser, David Belanger, Lucy Colwell, Adrian Weller,
"Rethinking Attention with Performers", 2020, arXiv:2009.14794.

Idea: the softmax kernel exp(x.y) is an expectation over Gaussian vectors w of exp(w.x - |x|^2/2) exp(w.y - |y|^2/2).
Averaging over m random w's gives features phi(x) in R^m, all positive, with E[phi(x).phi(y)] = exp(x.y) exactly,
so softmax attention becomes linear attention with these features: O(T m Dh) instead of O(T^2 Dh). Drawing
the w's orthogonal to each other (with Gaussian-like lengths) keeps the estimate unbiased and lowers its
variance. Causal attention uses the same prefix sums over chunks as linear attention.

Equation:  phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),  W (m, Dh) with rows w_i ~ N(0, I), orthogonal in blocks,
           x = q / Dh^(1/4) or k / Dh^(1/4)  (so that E[phi(q').phi(k')] = exp(q.k / sqrt(Dh))),
           out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / phi(q_i)^T sum_j phi(k_j).

Complexity in sequence length T with m features: time O(T m Dh), memory O(m Dh) non-causal; causal chunkwise
O(T C m + T m Dh) time and O(T C + (T / C) m Dh) memory for chunk size C. need_weights=True: O(T^2).

Reduces to / oracle: the kernel estimate is unbiased (its mean over many draws of W is exp(q.k / sqrt(Dh)):
tests/test_performer.py::test_the_kernel_estimate_is_unbiased); the output error against exact softmax
attention falls like 1/sqrt(m) (fitted slope, tests/test_performer.py::test_output_error_falls_like_one_over_sqrt_m);
orthogonal features beat i.i.d. ones (tests/test_performer.py::test_orthogonal_features_beat_iid_features);
every form equals a double loop over the features (tests/test_performer.py::test_every_form_equals_the_double_loop).

Docs page: docs/mechanisms/performer.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def gaussian_projection(num_features: int, dim: int, orthogonal: bool = True,
                        generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                        device: Optional[torch.device] = None) -> torch.Tensor:
    """W (num_features, dim): rows distributed as N(0, I); with `orthogonal`, rows within each block of `dim` are
    orthogonal, eq. (5).

    Orthogonal rows come from the QR decomposition of a Gaussian matrix; each row is then given the length of
    an independent Gaussian vector (chi-distributed with `dim` degrees of freedom), so every single row still
    has the N(0, I) distribution the unbiasedness of eq. (2) needs, while rows of a block never point the same
    way (which is what lowers the variance). num_features > dim uses several independent blocks.
    """
    _check_positive_int(num_features, "num_features")
    _check_positive_int(dim, "dim")
    gaussian = torch.randn(num_features, dim, generator=generator, dtype=torch.float64)  # (m, Dh)
    if orthogonal:
        n_blocks = -(-num_features // dim)  # ceil(m / Dh) independent blocks
        square = torch.randn(n_blocks, dim, dim, generator=generator, dtype=torch.float64)  # (n, Dh, Dh)
        q, r = torch.linalg.qr(square)  # q: (n, Dh, Dh) with orthonormal columns
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar-random, not biased by QR's signs
        directions = q.transpose(-2, -1).reshape(n_blocks * dim, dim)[:num_features]  # (m, Dh): orthonormal rows per block
        lengths = gaussian.norm(dim=1, keepdim=True)  # (m, 1): chi_Dh, the length of a Gaussian vector
        gaussian = directions * lengths  # (m, Dh)  eq. (5)
    return gaussian.to(dtype=dtype, device=device)


def positive_random_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """phi(x) = exp(W x - |x|^2 / 2) / sqrt(m), eq. (2), without stabiliser: E[phi(x).phi(y)] = exp(x . y).

    x (..., Dh), projection W (m, Dh) -> (..., m). Positive, so attention weights built from it are positive.
    """
    m = projection.size(0)
    return torch.exp(x @ projection.T - x.pow(2).sum(dim=-1, keepdim=True) / 2) / math.sqrt(m)  # (..., m)  eq. (2)


def _stable_features(x: torch.Tensor, projection: torch.Tensor, per_row: bool,
                     real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """phi(x) of eq. (2) times a constant exp(-c) that keeps exp() from overflowing; the constant cancels in eq. (4).

    per_row (queries): c is each row's own maximum, which cancels between the numerator and denominator of that
    query. Otherwise (keys): c is one maximum per (batch, head) over the real keys, a common factor of every term
    of both sums. c is detached: it changes no value, so it must carry no gradient (and none to padded keys).
    real: (B, 1, T, 1) bool, True = a real key, or None.
    """
    exponent = x @ projection.T - x.pow(2).sum(dim=-1, keepdim=True) / 2  # (B, H, T, m)  eq. (2)
    if per_row:
        shift = exponent.amax(dim=-1, keepdim=True)  # (B, H, T, 1)
    else:
        visible = exponent if real is None else exponent.masked_fill(~real, float("-inf"))
        shift = visible.amax(dim=(-2, -1), keepdim=True)  # (B, H, 1, 1)
        shift = shift.masked_fill(shift == float("-inf"), 0.0)  # all keys padded: nothing to stabilise
    features = torch.exp(exponent - shift.detach()) / math.sqrt(projection.size(0))  # (B, H, T, m)
    return features if real is None else features * real  # padded keys: zero features, eq. (4)


def _with_ones(value: torch.Tensor) -> torch.Tensor:
    """Values with a column of ones appended: the same products then give the denominator of eq. (4)."""
    return torch.cat([value, torch.ones_like(value[..., :1])], dim=-1)  # (B, H, T, Dv + 1)


def _normalise(numerator_and_denominator: torch.Tensor) -> torch.Tensor:
    """Divide by the last column, eq. (4); a query that sees no key gets 0."""
    numerator, denominator = numerator_and_denominator[..., :-1], numerator_and_denominator[..., -1:]
    has_key = denominator > 0
    return numerator / torch.where(has_key, denominator, 1.0) * has_key  # (B, H, T, Dv)


def _causal_chunkwise(phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor, chunk_size: int,
                      state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal eq. (4) by prefix sums over chunks, eq. (6): the masked product inside a chunk, the state between."""
    length = phi_q.size(2)
    values = _with_ones(value)  # (B, H, T, Dv + 1)
    n_chunks = -(-length // chunk_size)
    pad = n_chunks * chunk_size - length
    if pad:  # zero features add nothing; the padded queries are dropped at the end
        phi_q, phi_k, values = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, values))  # (B, H, n*C, .)
    q_c, k_c, v_c = (t.unflatten(2, (n_chunks, chunk_size)) for t in (phi_q, phi_k, values))  # (B, H, n, C, .)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=phi_q.device).tril()  # (C, C)
    intra = (q_c @ k_c.transpose(-2, -1)).masked_fill(~causal, 0.0) @ v_c  # (B, H, n, C, Dv + 1)  eq. (6)
    chunk_states = k_c.transpose(-2, -1) @ v_c  # (B, H, n, m, Dv + 1)
    before = chunk_states.cumsum(dim=2) - chunk_states  # (B, H, n, m, Dv + 1): exclusive prefix sum  eq. (6)
    if state is not None:
        before = before + state[:, :, None]
    inter = q_c @ before  # (B, H, n, C, Dv + 1)  eq. (6)
    return _normalise((intra + inter).flatten(2, 3)[:, :, :length])  # (B, H, T, Dv)


class PerformerAttention(nn.Module):
    """Multi-head Performer (FAVOR+) attention, batch-first (B, T, d_model).

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H; head_dim = d_model // num_heads.
        num_features: m, random features per head; None = round(head_dim * ln(head_dim)) (at least head_dim), the
            paper's choice. More features: a better estimate of softmax attention, more work.
        orthogonal: draw the features orthogonal in blocks (FAVOR+) or i.i.d. Gaussian.
        chunk_size: tokens per chunk of the causal prefix sums (changes the work, not the result).
        bias: whether the four projections have a bias.
    The random projection is a buffer (saved in the state dict, so a checkpoint reproduces its outputs), drawn
    from torch's global generator at construction; `redraw_features()` draws a new one, as training with
    periodic redrawing does. No dropout: no attention matrix exists on the linear-time paths.
    """

    def __init__(self, d_model: int, num_heads: int, num_features: Optional[int] = None, orthogonal: bool = True,
                 chunk_size: int = 64, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_positive_int(chunk_size, "chunk_size")
        if not isinstance(orthogonal, bool):
            raise ValueError(f"orthogonal must be True or False, got {orthogonal!r}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        if num_features is None:
            num_features = max(self.head_dim, round(self.head_dim * math.log(self.head_dim)))
        _check_positive_int(num_features, "num_features")
        self.num_features, self.orthogonal, self.chunk_size = num_features, orthogonal, chunk_size
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.register_buffer("projection", gaussian_projection(num_features, self.head_dim, orthogonal))  # (m, Dh)

    @torch.no_grad()
    def redraw_features(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw a new random projection W in place (same shape, device and dtype)."""
        self.projection.copy_(gaussian_projection(self.num_features, self.head_dim, self.orthogonal, generator))

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from `query` (B, Tq, d_model) to `key`/`value` (B, Tk, d_model), both defaulting to `query`.

        key_padding_mask: bool (B, Tk), True = a real token. is_causal: bottom-right aligned. `mask` is refused:
        the factored sums have no (Tq, Tk) matrix to mask. need_weights=True takes the explicit O(T^2) path and
        returns (output, weights (B, H, Tq, Tk)): the estimated softmax weights, each visible row summing to 1.
        """
        key = query if key is None else key
        value = key if value is None else value
        _check_sequence(query, "query", self.d_model, "d_model")
        _check_sequence(key, "key", self.d_model, "d_model")
        _check_sequence(value, "value", self.d_model, "d_model")
        _check_matching(query, "query", key, "key", 0, "batch size")
        _check_matching(key, "key", value, "value", 0, "batch size")
        _check_matching(key, "key", value, "value", 1, "length")
        if mask is not None:
            raise ValueError(f"mask: PerformerAttention does not take a general (Tq, Tk) mask (got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}); its "
                             f"linear-time form sums over keys without a (Tq, Tk) matrix. Use key_padding_mask "
                             f"(B, Tk) and/or is_causal=True")
        batch, tq, tk = query.size(0), query.size(1), key.size(1)
        _check_key_padding_mask(key_padding_mask, batch, tk)
        compute = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
        split = lambda t: t.to(compute).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # noqa: E731
        scale = self.head_dim ** -0.25  # eq. (3): q' . k' = q . k / sqrt(Dh)
        q = split(self.q_proj(query)) * scale  # (B, H, Tq, Dh)
        k = split(self.k_proj(key)) * scale  # (B, H, Tk, Dh)
        v = split(self.v_proj(value))  # (B, H, Tk, Dh)
        real = None if key_padding_mask is None else key_padding_mask[:, None, :, None]  # (B, 1, Tk, 1)
        projection = self.projection.to(compute)  # (m, Dh)
        phi_q = _stable_features(q, projection, per_row=True)  # (B, H, Tq, m)
        phi_k = _stable_features(k, projection, per_row=False, real=real)  # (B, H, Tk, m)
        if real is not None:
            v = v * real
        weights = None
        if need_weights:
            similarity = phi_q @ phi_k.transpose(-2, -1)  # (B, H, Tq, Tk): estimated exp(q.k / sqrt(Dh)), scaled
            if is_causal:
                similarity = similarity.masked_fill(~_causal_mask(tq, tk, query.device), 0.0)
            total = similarity.sum(dim=-1, keepdim=True)  # (B, H, Tq, 1)
            weights = similarity / torch.where(total > 0, total, 1.0) * (total > 0)  # (B, H, Tq, Tk)  eq. (4)
            out = weights @ v  # (B, H, Tq, Dh)
        elif not is_causal:
            state = phi_k.transpose(-2, -1) @ _with_ones(v)  # (B, H, m, Dh + 1)  eq. (4)
            out = _normalise(phi_q @ state)  # (B, H, Tq, Dh)  eq. (4)
        else:
            out = self._causal(phi_q, phi_k, v)  # (B, H, Tq, Dh)
        out = out.transpose(1, 2).reshape(batch, tq, self.d_model).to(query.dtype)  # (B, Tq, d_model)
        out = self.out_proj(out)  # (B, Tq, d_model)
        return (out, weights.to(query.dtype)) if need_weights else out

    def _causal(self, phi_q, phi_k, v):
        """Bottom-right causal: the first Tk - Tq keys are a prefix every query sees, folded into the state."""
        offset = phi_k.size(2) - phi_q.size(2)
        if offset >= 0:
            state = phi_k[:, :, :offset].transpose(-2, -1) @ _with_ones(v[:, :, :offset])  # (B, H, m, Dh + 1)
            return _causal_chunkwise(phi_q, phi_k[:, :, offset:], v[:, :, offset:], self.chunk_size, state)
        later = _causal_chunkwise(phi_q[:, :, -offset:], phi_k, v, self.chunk_size)  # (B, H, Tk, Dh)
        return torch.cat([torch.zeros_like(later[:, :, :1]).expand(-1, -1, -offset, -1), later], dim=2)  # (B, H, Tq, Dh)


def _demo() -> None:
    """FAVOR+ against exact softmax attention as the number of features grows (python performer.py)."""
    torch.manual_seed(0)
    d_model, heads, t = 32, 2, 16
    x = torch.randn(2, t, d_model, dtype=torch.float64) * 0.5
    errors = []
    for m in (16, 256, 4096):
        performer = PerformerAttention(d_model, heads, num_features=m).double().eval()
        if m == 16:
            state = performer.state_dict()
        else:
            performer.load_state_dict({**state, "projection": performer.projection})  # same weights, more features
        with torch.no_grad():
            out = performer(x, is_causal=True)
            q, k, v = (p(x).view(2, t, heads, -1).transpose(1, 2) for p in
                       (performer.q_proj, performer.k_proj, performer.v_proj))
            exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # the softmax attention it estimates
            exact = performer.out_proj(exact.transpose(1, 2).reshape(2, t, d_model))
            chunk_check = (out - performer(x, is_causal=True, need_weights=True)[0]).abs().max().item()
        errors.append((out - exact).abs().mean().item())
        assert chunk_check < 1e-10, chunk_check
    print(f"output shape {tuple(out.shape)}; causal, {heads} heads of {d_model // heads}")
    print("mean |performer - softmax attention| with m = 16, 256, 4096 features: "
          + ", ".join(f"{e:.4f}" for e in errors))
    assert errors[0] > errors[1] > errors[2], errors


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


def _check_matching(reference: torch.Tensor, reference_name: str, other: torch.Tensor, other_name: str,
                    dim: int, dim_name: str) -> None:
    """Raise unless `other` has the same size as `reference` along `dim` (no silent broadcast)."""
    if other.size(dim) != reference.size(dim):
        raise ValueError(
            f"{other_name} has {dim_name} {other.size(dim)} but {reference_name} has {reference.size(dim)}; "
            f"they must match (got {other_name} of shape {tuple(other.shape)} and {reference_name} of shape "
            f"{tuple(reference.shape)})"
        )


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


def _causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) boolean mask, True where query i may see key j, aligned to the bottom-right.

    With Tq < Tk the queries are the LAST Tq positions of the sequence (a KV cache holds the earlier ones),
    so query i sits at position i + (Tk - Tq) and sees keys j <= i + (Tk - Tq).
    """
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)  # (Tq, Tk)


if __name__ == "__main__":
    _demo()
