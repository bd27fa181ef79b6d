"""Hard attention: each query picks ONE key, sampled during training, trained by straight-through Gumbel-softmax.

Papers: Kelvin Xu, Jimmy Ba, Ryan Kiros, Kyunghyun Cho, Aaron Courville, Ruslan Salakhutdinov,
Richard Zemel, Yoshua Bengio, "Show, Attend and Tell: Neural Image Caption Generation with Visual
Attention", 2015, arXiv:1502.03044 (stochastic "hard" attention). The estimator: Eric Jang,
Shixiang Gu, Ben Poole, "Categorical Reparameterization with Gumbel-Softmax", 2016,
arXiv:1611.01144, and Chris J. Maddison, Andriy Mnih, Yee Whye Teh, "The Concrete Distribution",
2016, arXiv:1611.00712.

Idea: soft attention returns a weighted average of all values; hard attention treats the softmax
weights as a categorical distribution over the keys and returns the value of ONE sampled key. The
sample is not differentiable, so Xu et al. trained it with a REINFORCE-style estimator. Here we use
the straight-through Gumbel-softmax estimator instead: the forward pass uses the exact sample
(Gumbel-max trick), the backward pass pretends the relaxed, differentiable Gumbel-softmax sample
was used. At eval time there is no noise: each query takes the value of its best-scoring key.
The score is the scaled dot product of multi-head attention, so the only change from it is the
hard choice (Xu et al. scored with a small network; the hard sampling does not depend on that).

Equations (page eq. (1)-(5)), per head:
    e_ij   = q_i . k_j / sqrt(Dh)
    z_i    = one_hot(argmax_j (e_ij + g_ij)),  g_ij ~ Gumbel(0, 1)   (a sample from softmax_j(e_ij))
    y_ij   = softmax_j((e_ij + g_ij) / temperature)                   (the relaxed sample)
    w_i    = z_i + y_i - stopgrad(y_i)        (forward: z_i; backward: d y_i)   training
    w_i    = one_hot(argmax_j e_ij)                                            eval
    out_i  = W_o [sum_j w_ij v_j]_heads

Complexity in sequence length T: time O(T^2 * d_model) and memory O(H * T^2), like standard
attention (the scores are computed for every pair before one is chosen).

Checked against: in eval, the output equals the value at the argmax key (an index gather);
the sample frequencies match softmax(e); as temperature -> 0 the relaxed sample y equals the hard
one z for the same noise (tests/test_hard_attention.py). It never reduces to soft attention.

Docs page: docs/mechanisms/hard_attention.md
"""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn


def gumbel_noise(shape: Tuple[int, ...], generator: Optional[torch.Generator] = None,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Samples g ~ Gumbel(0, 1) as -log(-log(u)), u ~ Uniform(0, 1); pass a generator to reproduce them."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - torch.finfo(dtype).eps)))


def straight_through_gumbel(scores: torch.Tensor, temperature: float, mask: Optional[torch.Tensor] = None,
                            noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One categorical sample per row of `scores` (..., Tk): returns (hard one-hot z, relaxed sample y).

    `noise` (same shape as scores) fixes the Gumbel noise; otherwise it is drawn with `generator`.
    Masked keys (mask False) are never chosen; a row with no allowed key gives z = y = 0.
    The caller combines them as z + y - y.detach() (eq. (4)).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    # Do the noise arithmetic in float32 or wider: bf16 would round many perturbed scores into ties.
    work = torch.promote_types(scores.dtype, torch.float32)
    if noise is None:
        noise = gumbel_noise(tuple(scores.shape), generator=generator, device=scores.device, dtype=work)
    elif noise.shape != scores.shape:
        raise ValueError(f"noise must have the shape of the scores {tuple(scores.shape)}, got {tuple(noise.shape)}")
    perturbed = scores.to(work) + noise.to(work)  # (B, H, Tq, Tk)  eq. (2): e + g
    if mask is not None:
        mask = mask.expand_as(perturbed)  # (B, H, Tq, Tk)
        row_alive = mask.any(dim=-1, keepdim=True)  # (B, H, Tq, 1)
        perturbed = perturbed.masked_fill(~mask, float("-inf"))  # a masked key can never win
        perturbed = perturbed.masked_fill(~row_alive, 0.0)  # dead rows: finite, zeroed below
    index = perturbed.argmax(dim=-1, keepdim=True)  # (B, H, Tq, 1)  eq. (2): the Gumbel-max sample
    hard = torch.zeros_like(perturbed).scatter_(-1, index, 1.0)  # (B, H, Tq, Tk)  one-hot z
    soft = torch.softmax(perturbed / temperature, dim=-1)  # (B, H, Tq, Tk)  eq. (3): relaxed y
    if mask is not None:
        hard = hard.masked_fill(~mask, 0.0)
        soft = soft.masked_fill(~mask, 0.0)
    return hard.to(scores.dtype), soft.to(scores.dtype)


class HardAttention(nn.Module):
    """Multi-head attention in which every query takes the value of one key.

    Args:
        d_model: model width; split into num_heads heads of head_dim = d_model // num_heads.
        num_heads: number of heads; each head chooses its own key.
        temperature: temperature of the relaxed Gumbel-softmax sample (> 0). It shapes only the
            backward pass in training (the forward always uses the exact one-hot sample): small
            values give a gradient closer to the hard choice but with higher variance.
        bias: learned biases on the query, key, value and output projections.
    """

    def __init__(self, d_model: int, num_heads: int = 1, temperature: float = 1.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.temperature = float(temperature)
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)  # W_q
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)  # W_k
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)  # W_v
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # W_o

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False,
                noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Hard attention from query to key/value (self-attention when key and value are None).

        Args:
            query: (B, Tq, d_model). key: (B, Tk, d_model), defaults to query. value: defaults to key.
            mask: bool, True = may attend; (Tq, Tk) shared by every batch element and head, or 4 dims
                broadcastable to (B, H, Tq, Tk).
            key_padding_mask: bool (B, Tk), True = a real key; padding keys are never chosen.
            is_causal: query i may only choose keys j <= i + (Tk - Tq).
            need_weights: also return the one-hot weights actually used, (B, H, Tq, Tk).
            noise: Gumbel noise (B, H, Tq, Tk) for the training sample (tests, reproducibility);
                ignored in eval. generator: draws the noise when `noise` is None.

        Returns:
            (B, Tq, d_model), or (output, weights). Each weight row is one-hot (sums to 1);
            a head with no key to choose contributes zeros before W_o, so a query with no key in
            any head returns W_o's bias (zero with bias=False), never NaN.
        """
        key = query if key is None else key
        value = key if value is None else value
        _check_sequence(query, "query", self.d_model, "d_model")
        _check_sequence(key, "key", self.d_model, "d_model")
        _check_sequence(value, "value", self.d_model, "d_model")
        _check_matching(query, "query", key, "key", 0, "batch size")
        _check_matching(key, "key", value, "value", 0, "batch size")
        _check_matching(key, "key", value, "value", 1, "length")
        B, Tq, _ = query.shape
        Tk, H, Dh = key.shape[1], self.num_heads, self.head_dim
        _check_mask(mask, (B, H, Tq, Tk))
        _check_key_padding_mask(key_padding_mask, B, Tk)
        # is_causal is bottom-right aligned: with a KV cache, the last query is the last key.
        mask = _merge_masks(mask, key_padding_mask, is_causal, Tq, Tk, query.device)  # (Tq, Tk) or 4-D, or None

        q = self.q_proj(query).view(B, Tq, H, Dh).transpose(1, 2)  # (B, H, Tq, Dh)
        k = self.k_proj(key).view(B, Tk, H, Dh).transpose(1, 2)  # (B, H, Tk, Dh)
        v = self.v_proj(value).view(B, Tk, H, Dh).transpose(1, 2)  # (B, H, Tk, Dh)
        scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)  # (B, H, Tq, Tk)  eq. (1)

        if self.training:
            hard, soft = straight_through_gumbel(scores, self.temperature, mask, noise, generator)  # (B, H, Tq, Tk)
            # Straight-through, eq. (4): soft - soft.detach() is exactly 0 in the forward pass (so the
            # forward value is the one-hot sample), but its gradient is the gradient of the soft sample.
            weights = hard + (soft - soft.detach())  # (B, H, Tq, Tk)
        else:
            weights = self._argmax_weights(scores, mask)  # (B, H, Tq, Tk)  eq. (5)
        heads = weights @ v  # (B, H, Tq, Dh)  a one-hot row picks one value vector
        out = self.out_proj(heads.transpose(1, 2).reshape(B, Tq, H * Dh))  # (B, Tq, d_model)
        if need_weights:
            return out, weights.detach()
        return out

    @staticmethod
    def _argmax_weights(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Eval: the best-scoring allowed key, no noise, so the output is deterministic."""
        if mask is not None:
            mask = mask.expand_as(scores)  # (B, H, Tq, Tk)
            scores = scores.masked_fill(~mask, float("-inf"))
        index = scores.argmax(dim=-1, keepdim=True)  # (B, H, Tq, 1)  eq. (5)
        weights = torch.zeros_like(scores).scatter_(-1, index, 1.0)  # (B, H, Tq, Tk)
        if mask is not None:
            weights = weights.masked_fill(~mask, 0.0)  # a fully masked row chose a masked key: zero it
        return weights


def _demo() -> None:
    """The demo; the guard at the very end of the file calls it, once the shared helpers exist."""
    torch.manual_seed(0)
    B, T, d_model, H = 2, 6, 8, 2
    attn = HardAttention(d_model, num_heads=H)
    x = torch.randn(B, T, d_model)
    attn.train()
    out, weights = attn(x, need_weights=True)
    print("training output shape:", tuple(out.shape), " one-hot rows:", bool((weights.sum(-1) == 1).all()))

    # Checked fact: in eval, each head returns exactly the value vector of its best-scoring key.
    attn.eval()
    with torch.no_grad():
        out = attn(x)
        q = attn.q_proj(x).view(B, T, H, -1).transpose(1, 2)  # (B, H, T, Dh)
        k = attn.k_proj(x).view(B, T, H, -1).transpose(1, 2)  # (B, H, T, Dh)
        v = attn.v_proj(x).view(B, T, H, -1).transpose(1, 2)  # (B, H, T, Dh)
        best = (q @ k.transpose(-2, -1)).argmax(dim=-1)  # (B, H, T); the 1/sqrt(Dh) scale cannot change it
        picked = torch.stack([v[b, h, best[b, h]] for b in range(B) for h in range(H)])  # (B*H, T, Dh)
        picked = picked.view(B, H, T, -1)  # (B, H, T, Dh)
        expected = attn.out_proj(picked.transpose(1, 2).reshape(B, T, d_model))  # (B, T, d_model)
    diff = (out - expected).abs().max().item()
    print(f"eval: max |output - W_o(value at argmax key)| = {diff:.2e}")
    assert diff < 1e-5


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


def _check_mask(mask: Optional[torch.Tensor], expected: Tuple[int, int, int, int]) -> None:
    """Raise unless `mask` is None or a boolean tensor that broadcasts to `expected` = (B, H, Tq, Tk).

    Two forms are accepted, so that no shape is ever read two ways: 2-D (Tq, Tk), shared by every batch
    element and head, and 4-D (B, H, Tq, Tk) where any dimension may be 1. A 1-D or 3-D mask is refused:
    (B, Tk) or (B, Tq, Tk) would broadcast against the wrong dimensions without any error. Padding goes
    in `key_padding_mask` (B, Tk) instead.
    """
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a torch.bool tensor (True = may attend), got {got}; "
                        f"convert a 0/1 mask with mask.bool()")
    batch, heads, tq, tk = expected
    if mask.dim() == 2:
        fits = mask.size(0) in (1, tq) and mask.size(1) in (1, tk)
    elif mask.dim() == 4:
        fits = all(got in (1, want) for got, want in zip(mask.shape, expected))
    else:
        fits = False
    if not fits:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected (Tq, Tk) = ({tq}, {tk}) or a 4-D shape broadcastable "
            f"to (B, H, Tq, Tk) = {tuple(expected)} (each dimension 1 or equal); for padding pass "
            f"key_padding_mask of shape (B, Tk) = ({batch}, {tk}) instead"
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


def _merge_masks(mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], is_causal: bool,
                 tq: int, tk: int, device: torch.device) -> Optional[torch.Tensor]:
    """AND together `mask`, `key_padding_mask` and the causal mask; None when there is nothing to mask.

    The result is (Tq, Tk) when only a 2-D mask and/or `is_causal` are given, otherwise 4-D and
    broadcastable to (B, H, Tq, Tk). All inputs must already have passed their checks.
    """
    merged = mask
    if is_causal:
        causal = _causal_mask(tq, tk, device)  # (Tq, Tk)
        merged = causal if merged is None else merged & causal
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk): one row of real keys per batch element
        merged = padding if merged is None else merged & padding
    return merged


if __name__ == "__main__":
    _demo()
