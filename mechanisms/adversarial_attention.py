"""Adversarial attention: multi-head attention whose scores can be pushed, during training, by the worst
perturbation of a given size (adversarial training for attention, "Attention AT").

Paper: Shunsuke Kitada, Hitoshi Iyatomi, "Attention Meets Perturbations: Robust and Interpretable Attention
with Adversarial Training", 2021 (IEEE Access), arXiv:2009.12064.

Idea: attention weights are known to be fragile: small changes to the scores can change a prediction.
Adversarial training (Goodfellow et al. 2015) makes a model robust by training it also on the worst small
perturbation of its input; Attention AT perturbs the attention SCORES instead. A first pass measures the
gradient g of the loss with respect to the pre-softmax scores; the perturbation epsilon * g / ||g|| (per
example) is the direction that raises the loss fastest; a second pass with the perturbed scores gives an
adversarial loss that is added to the clean one. In eval() the perturbation is ignored.

Equation:  s = Q K^T / sqrt(Dh),   r_adv = epsilon * g / ||g||_2,  g = dL/ds (one norm per example),
           head = softmax(s + r_adv + log M) V  (training only),   L_total = L(s) + lambda * L(s + r_adv).

Complexity: as multi-head attention, time O(H Tq Tk Dh) and memory O(H Tq Tk) per pass; adversarial
training costs a second forward and backward pass.

Reduces to / oracle: epsilon = 0, no perturbation, or eval() is multi-head attention, torch.nn.Multihead
Attention with copied weights (tests/test_adversarial_attention.py::test_without_perturbation_it_is_torch_
multihead_attention); the perturbed scores against the formula written out (test_perturbed_scores_follow_
the_formula); the loss rises by epsilon * ||g|| to first order (test_the_perturbation_raises_the_loss_to_
first_order).

Docs page: docs/mechanisms/adversarial_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdversarialAttention(nn.Module):
    """Multi-head attention that accepts an additive perturbation of its scores in training mode.

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H; head_dim = d_model // num_heads.
        epsilon: size (L2 norm per example) of the adversarial perturbation made by adversarial_perturbation().
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the four projections have a bias.
    """

    def __init__(self, d_model: int, num_heads: int, epsilon: float = 1.0, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not 0.0 <= epsilon < math.inf:
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.epsilon = float(epsilon)
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def adversarial_perturbation(self, score_grad: torch.Tensor) -> torch.Tensor:
        """The worst perturbation of size epsilon to first order, eq. (3): epsilon * g / ||g|| per example.

        score_grad: (B, H, Tq, Tk), the gradient of the training loss with respect to this layer's scores,
        i.e. the .grad of a zero `score_perturbation` passed to a first forward pass. Masked entries have
        zero gradient and get zero perturbation. An example whose gradient is zero gets zero perturbation.
        """
        if not isinstance(score_grad, torch.Tensor) or score_grad.dim() != 4 or score_grad.size(1) != self.num_heads:
            got = tuple(score_grad.shape) if isinstance(score_grad, torch.Tensor) else type(score_grad).__name__
            raise ValueError(f"score_grad must have shape (B, H, Tq, Tk) with H = {self.num_heads}, got {got}")
        norm = score_grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # (B, 1, 1, 1): one norm per example
        return self.epsilon * score_grad / norm.clamp_min(1e-12)  # (B, H, Tq, Tk)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False,
                score_perturbation: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from `query` to `key`/`value` (both default to `query`: self-attention).

        mask: bool, True = may attend, (Tq, Tk) or 4-D broadcastable to (B, H, Tq, Tk); key_padding_mask:
        bool (B, Tk), True = a real token; is_causal: bottom-right aligned.
        score_perturbation: optional (B, H, Tq, Tk) tensor added to the scores before the softmax, in
        training mode only (eval() ignores it): a zero tensor with requires_grad=True to measure the
        gradient, then adversarial_perturbation(that gradient) for the adversarial pass.
        Returns (B, Tq, d_model), or (output, weights (B, H, Tq, Tk) taken before dropout).
        """
        key = query if key is None else key
        value = key if value is None else value
        _check_sequence(query, "query", self.d_model, "d_model")
        _check_sequence(key, "key", self.d_model, "d_model")
        _check_sequence(value, "value", self.d_model, "d_model")
        _check_matching(query, "query", key, "key", 0, "batch size")
        _check_matching(key, "key", value, "value", 0, "batch size")
        _check_matching(key, "key", value, "value", 1, "length")
        batch, tq, _ = query.shape
        tk = key.size(1)
        _check_mask(mask, (batch, self.num_heads, tq, tk))
        _check_key_padding_mask(key_padding_mask, batch, tk)
        if score_perturbation is not None and tuple(score_perturbation.shape) != (batch, self.num_heads, tq, tk):
            raise ValueError(f"score_perturbation has shape {tuple(score_perturbation.shape)}, expected "
                             f"(B, H, Tq, Tk) = ({batch}, {self.num_heads}, {tq}, {tk})")
        perturbation = score_perturbation if self.training else None  # adversarial training only: off in eval()

        q = self.q_proj(query).view(batch, tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, Dh)
        k = self.k_proj(key).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)
        v = self.v_proj(value).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)
        merged = _merge_masks(mask, key_padding_mask, is_causal, tq, tk, query.device)  # (Tq, Tk) or 4-D
        row_has_key = None
        if merged is not None:
            # A query row with no key to attend would be softmax over all -inf = NaN. Give such rows every key
            # (any finite answer will do), then overwrite their output with zeros.
            row_has_key = merged.any(dim=-1, keepdim=True)  # (..., Tq, 1)
            merged = merged | ~row_has_key  # same shape as merged
        dropout_p = self.dropout if self.training else 0.0  # dropout is off in eval()

        if not need_weights and perturbation is None:
            # The fused kernel computes eq. (1) and (2) with r = 0.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=merged, dropout_p=dropout_p)  # (B, H, Tq, Dh)
            weights = None
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, Tq, Tk)  eq. (1)
            if perturbation is not None:
                # eq. (2): the perturbation moves the scores, before the mask (a masked score stays -inf) and
                # before the softmax (the weights stay a distribution).
                scores = scores + perturbation  # (B, H, Tq, Tk)
            if merged is not None:
                scores = scores.masked_fill(~merged, float("-inf"))  # exp(-inf) = 0: no weight
            weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)  eq. (2)
            dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
            out = dropped @ v  # (B, H, Tq, Dh)
        if row_has_key is not None:
            out = out.masked_fill(~row_has_key, 0.0)  # a query that may see nothing returns zeros
            if weights is not None:
                weights = weights.masked_fill(~row_has_key, 0.0)
        out = out.transpose(1, 2).reshape(batch, tq, self.d_model)  # (B, Tq, d_model): concatenate the heads
        out = self.out_proj(out)  # (B, Tq, d_model)
        return (out, weights) if need_weights else out


def _demo() -> None:
    torch.manual_seed(0)
    batch, seq, d_model, num_heads = 2, 6, 16, 2
    layer = AdversarialAttention(d_model, num_heads, epsilon=0.5).train()
    x, target = torch.randn(batch, seq, d_model), torch.randn(batch, seq, d_model)

    def loss_of(out):
        return F.mse_loss(out, target)

    # 1. clean pass with a zero perturbation that records the gradient of the loss w.r.t. the scores
    zero = torch.zeros(batch, num_heads, seq, seq, requires_grad=True)
    clean = loss_of(layer(x, is_causal=True, score_perturbation=zero))
    (score_grad,) = torch.autograd.grad(clean, zero, retain_graph=True)
    # 2. adversarial pass; 3. the training loss of the paper, clean + lambda * adversarial (lambda = 1)
    adversarial = loss_of(layer(x, is_causal=True, score_perturbation=layer.adversarial_perturbation(score_grad)))
    total = clean + 1.0 * adversarial
    total.backward()
    # The checked fact: the adversarial loss is higher, by about epsilon * ||g|| to first order.
    rise, first_order = (adversarial - clean).item(), layer.epsilon * score_grad.flatten(1).norm(dim=1).sum().item()
    assert adversarial > clean
    print(f"output shape {tuple(layer(x).shape)}; clean loss {clean.item():.4f}, adversarial loss "
          f"{adversarial.item():.4f} (rise {rise:.4f}; first-order estimate {first_order:.4f})")


# =====================================================================================================
# Input checks and mask helpers, identical letter for letter in every mechanism file that uses them
# (tests/test_shared_helpers.py compares the copies). Fix one copy, fix them all.
# =====================================================================================================


def _check_dropout(dropout: float, name: str = "dropout") -> None:
    """Raise unless `dropout` is a probability in [0, 1)."""
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {dropout!r}")


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
