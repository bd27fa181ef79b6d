"""Gated attention: multi-head attention whose output is multiplied by a sigmoid gate computed from the query.

Papers: Zihan Qiu, Zekun Wang, Bo Zheng, Zeyu Huang, Kaiyue Wen, Songlin Yang, Rui Men, Le Yu, Fei Huang,
Suozhi Huang, Dayiheng Liu, Jingren Zhou, Junyang Lin, "Gated Attention for Large Language Models:
Non-linearity, Sparsity, and Attention-Sink-Free", 2025, arXiv:2505.06708; the same gate appears in
AlphaFold2's attention (Jumper et al., "Highly accurate protein structure prediction with AlphaFold",
Nature 2021, supplementary Algorithm 7).

Idea: softmax weights sum to one, so a head cannot say "nothing here" except by parking its weight on some
token whose value is harmless (the "attention sink", usually the first token). A gate sigma(X_q W_g + b_g),
computed from the query token itself and multiplied into each head's output before the output projection,
lets a head switch itself off for one query. Qiu et al. found this gate (position G1, after the scaled
dot-product attention) the most effective of thirty variants: it puts a non-linearity between W^V and W^O
and its scores are sparse. gate="elementwise" has one gate per output channel (H * Dh per token, as in
AlphaFold2); gate="headwise" one scalar per head (H per token).

Equation:  head_h = softmax(Q_h K_h^T / sqrt(Dh) + log M) V_h,
           G = sigmoid(X_q W_g + b_g)        (Tq x H*Dh elementwise, Tq x H headwise),
           out = Concat(head_1 * G_1, ..., head_H * G_H) W^O + b^O.

Complexity in sequence length (Tq queries, Tk keys, width d = d_model): time O(Tq * Tk * d) as multi-head
attention, plus O(Tq * d^2) (elementwise) or O(Tq * d * H) (headwise) for the gate; memory O(H * Tq * Tk)
on the explicit path, O((Tq + Tk) * d) on the fused path.

Reduces to / oracle: with the gate fixed to 1 (W_g = 0, b_g -> +inf) it is multi-head attention, equal to
torch.nn.MultiheadAttention with copied weights; with the gate fixed to 0 it returns b^O; for any weights
it equals the formula above written out in the test
(tests/test_gated_attention.py::test_gate_fixed_to_one_is_torch_multihead_attention,
::test_gate_fixed_to_zero_returns_the_output_bias, ::test_matches_the_formula_written_out).

Docs page: docs/mechanisms/gated_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

_GATES = ("elementwise", "headwise")


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
            dropout_p: float, need_weights: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scaled dot-product attention on (B, H, T, Dh) tensors; returns (output, weights or None).

    `mask` is the merged boolean mask (True = may attend), already including the causal part. The fused
    kernel runs when the weights are not wanted, the explicit formula when they are: one answer.
    """
    scale = 1.0 / math.sqrt(query.size(-1))
    row_has_key = None
    if mask is not None:
        # A query row with no key to attend would be softmax over all -inf = NaN. Give such rows every key
        # (any finite answer will do), then overwrite their output with zeros.
        row_has_key = mask.any(dim=-1, keepdim=True)  # (B, H, Tq, 1) or (Tq, 1)
        mask = mask | ~row_has_key  # same shape as mask
    if not need_weights:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                             scale=scale)  # (B, H, Tq, Dh)
        weights = None
    else:
        scores = (query @ key.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)  eq. (2)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: no weight
        weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk); each row sums to 1
        # Dropout drops whole query-key links, then rescales by 1 / (1 - p) so the expectation is unchanged.
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
        out = dropped @ value  # (B, H, Tq, Dh)  eq. (2)
    if row_has_key is not None:
        out = out.masked_fill(~row_has_key, 0.0)  # a query that may see nothing returns zeros
        if weights is not None:
            weights = weights.masked_fill(~row_has_key, 0.0)
    return out, weights


class GatedAttention(nn.Module):
    """Multi-head attention with a sigmoid output gate per head (headwise) or per channel (elementwise).

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H; head_dim = d_model // num_heads.
        gate: "elementwise" (one gate per channel of each head, H * Dh per token; AlphaFold2, Qiu et al.'s
            best variant) or "headwise" (one scalar gate per head, H per token; Qiu et al.'s cheap variant).
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the projections (query, key, value, gate, output) have a bias.
    """

    def __init__(self, d_model: int, num_heads: int, gate: str = "elementwise", dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_dropout(dropout)
        if gate not in _GATES:
            raise ValueError(f"gate must be one of {_GATES}, got {gate!r}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.gate = gate
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        # eq. (3): the gate reads the QUERY token, so it can differ from query to query (Qiu et al. show a
        # gate that does not depend on the query works much worse). Elementwise: one logit per output
        # channel; headwise: one per head, shared by the head's Dh channels.
        self.gate_proj = nn.Linear(d_model, d_model if gate == "elementwise" else num_heads, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def gate_scores(self, query: torch.Tensor) -> torch.Tensor:
        """The gate G of eq. (3) for a (B, Tq, d_model) query: (B, H, Tq, Dh) elementwise, (B, H, Tq, 1) headwise."""
        _check_sequence(query, "query", self.d_model, "d_model")
        batch, tq, _ = query.shape
        width = self.head_dim if self.gate == "elementwise" else 1
        logits = self.gate_proj(query).view(batch, tq, self.num_heads, width)  # (B, Tq, H, Dh or 1)
        return torch.sigmoid(logits).transpose(1, 2)  # (B, H, Tq, Dh or 1)  eq. (3)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from `query` to `key`/`value` (both default to `query`: self-attention), then gate.

        mask: bool, True = may attend, (Tq, Tk) or broadcastable 4-D (B, H, Tq, Tk).
        key_padding_mask: bool (B, Tk), True = a real token.
        is_causal: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned, as a KV cache needs).
        Returns (B, Tq, d_model), or (output, weights (B, H, Tq, Tk) taken before dropout) with need_weights.
        The weights are the softmax weights; the gate acts after them (gate_scores returns it).
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
        merged = _merge_masks(mask, key_padding_mask, is_causal, tq, tk, query.device)  # eq. (4)

        q = self.q_proj(query).view(batch, tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, Dh)  eq. (1)
        k = self.k_proj(key).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)  eq. (1)
        v = self.v_proj(value).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)  eq. (1)

        dropout_p = self.dropout if self.training else 0.0  # dropout is off in eval()
        out, weights = _attend(q, k, v, merged, dropout_p, need_weights)  # (B, H, Tq, Dh)  eq. (2)
        # eq. (5): each head's output times its gate. A gate near 0 switches the head off for this query, which
        # softmax alone cannot do: its weights always sum to 1 over the visible keys.
        out = out * self.gate_scores(query)  # (B, H, Tq, Dh); a (B, H, Tq, 1) headwise gate broadcasts over Dh
        out = out.transpose(1, 2).reshape(batch, tq, self.d_model)  # (B, Tq, d_model): concatenate the heads
        out = self.out_proj(out)  # (B, Tq, d_model)  eq. (6)
        return (out, weights) if need_weights else out


def _demo() -> None:
    """The demo `python mechanisms/gated_attention.py` runs (called at the end of the file, after the helpers)."""
    torch.manual_seed(0)
    d_model, num_heads, batch, seq = 32, 4, 2, 10
    attn = GatedAttention(d_model, num_heads, gate="elementwise").eval()
    x = torch.randn(batch, seq, d_model)
    out = attn(x, is_causal=True)  # the fused path
    # Oracle inline: the formula written out, head by head, with the causal mask j <= i.
    with torch.no_grad():
        q = attn.q_proj(x).view(batch, seq, num_heads, -1).transpose(1, 2)  # (B, H, T, Dh)
        k = attn.k_proj(x).view(batch, seq, num_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).view(batch, seq, num_heads, -1).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d_model // num_heads)
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        heads = torch.softmax(scores, dim=-1) @ v  # (B, H, T, Dh)
        gate = torch.sigmoid(attn.gate_proj(x))  # (B, T, d_model): one gate per channel
        expected = attn.out_proj(heads.transpose(1, 2).reshape(batch, seq, d_model) * gate)
        diff = (out - expected).abs().max().item()
    print(f"output shape {tuple(out.shape)}; mean gate {gate.mean().item():.3f}")
    print(f"max |GatedAttention - explicit formula| = {diff:.2e}")
    assert diff < 1e-5, diff


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
