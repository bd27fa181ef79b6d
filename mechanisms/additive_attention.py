"""Additive attention (Bahdanau attention).

Paper: Dzmitry Bahdanau, Kyunghyun Cho, Yoshua Bengio, "Neural Machine Translation by Jointly
Learning to Align and Translate", 2014, arXiv:1409.0473.

Idea: instead of a dot product, a small one-hidden-layer network scores how well a query (the
decoder state s_i) matches each key (an encoder state h_j). The query and key are projected into a
shared hidden space, added, squashed by tanh and read out by a vector v. A softmax over the keys
turns the scores into weights, and the context is the weighted average of the values. Because the
query and key are projected separately, their widths may differ.

Equation (page eq. (1)-(3)):
    e_ij  = v^T tanh(W_q s_i + W_k h_j + b)
    a_ij  = softmax_j(e_ij)          (over the keys the mask allows)
    c_i   = sum_j a_ij * value_j

Complexity in the sequence lengths Tq (queries) and Tk (keys), hidden width Hd:
time O(Tq * Tk * Hd); memory O(Tq * Tk * Hd) because every (query, key) pair gets its own
hidden vector before v reads it out (the price of a non-bilinear score).

Reduces to / checked against: an explicit Python loop over (batch, query, key) of the paper's
formula in float64 (tests/test_additive_attention.py). There is no fused PyTorch kernel for this
score, so there is only the explicit path.

Docs page: docs/mechanisms/additive_attention.md
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn


def _masked_softmax(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the last dim that gives masked keys weight 0 and fully masked rows all zeros.

    A plain softmax over a row of -inf is 0/0 = NaN. We first give such rows finite scores (so
    neither the forward nor the backward pass ever sees a NaN), then zero their weights.
    """
    if mask is None:
        return torch.softmax(scores, dim=-1)
    mask = mask.expand_as(scores)  # (B, 1, Tq, Tk)
    row_alive = mask.any(dim=-1, keepdim=True)  # (B, 1, Tq, 1)
    scores = scores.masked_fill(~mask, float("-inf"))
    scores = scores.masked_fill(~row_alive, 0.0)  # dead rows: finite, uniform, zeroed below
    weights = torch.softmax(scores, dim=-1)
    return weights.masked_fill(~mask, 0.0)


class AdditiveAttention(nn.Module):
    """Bahdanau attention: score(s_i, h_j) = v^T tanh(W_q s_i + W_k h_j + b).

    Args:
        query_dim: width Dq of the queries s_i (e.g. the decoder state).
        key_dim: width Dk of the keys h_j (e.g. the encoder states); may differ from query_dim.
        hidden_dim: width Hd of the hidden space where the query and key are added.
        bias: if True, a learned bias b inside the tanh (the paper's formula has none).
        dropout: dropout probability on the attention weights (training only).
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        for name, val in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden_dim", hidden_dim)):
            _check_positive_int(val, name)
        _check_dropout(dropout)
        self.query_dim = query_dim
        self.key_dim = key_dim
        self.hidden_dim = hidden_dim
        # W_q carries the single bias b: a second bias on W_k would just add to it (b_q + b_k is
        # one free vector), so one bias is the whole freedom the formula has.
        self.query_proj = nn.Linear(query_dim, hidden_dim, bias=bias)  # W_q (and b)
        self.key_proj = nn.Linear(key_dim, hidden_dim, bias=False)  # W_k
        # v reads a score out of the hidden vector. No bias here: a constant added to every score
        # of a row cancels in the softmax, so it could never be learned.
        self.score_proj = nn.Linear(hidden_dim, 1, bias=False)  # v
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                need_weights: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from every query to every key.

        Args:
            query: (B, Tq, Dq).
            key: (B, Tk, Dk).
            value: (B, Tk, Dv); defaults to `key` (Bahdanau's context is a mix of encoder states).
            mask: bool, True = may attend; (Tq, Tk) shared by the whole batch, or 4 dims
                broadcastable to (B, 1, Tq, Tk).
            key_padding_mask: bool (B, Tk), True = a real key (e.g. a real source token); padding
                keys get weight 0. Combined with `mask` by a logical AND.
            need_weights: also return the attention weights (taken before dropout).

        Returns:
            context (B, Tq, Dv), or (context, weights) with weights (B, 1, Tq, Tk).
            A query whose keys are all masked gets a zero context and zero weights.
        """
        if value is None:
            value = key
        self._check_inputs(query, key, value)
        B, Tq, _ = query.shape
        Tk = key.shape[1]
        _check_mask(mask, (B, 1, Tq, Tk))
        _check_key_padding_mask(key_padding_mask, B, Tk)
        mask = _merge_masks(mask, key_padding_mask, False, Tq, Tk, query.device)  # (Tq, Tk) or 4-D, or None

        # Project each side once, then pair them up by broadcasting: this is what lets any Tq meet
        # any Tk without a Python loop over the pairs.
        q = self.query_proj(query)  # (B, Tq, Hd)   W_q s_i + b
        k = self.key_proj(key)  # (B, Tk, Hd)   W_k h_j
        hidden = torch.tanh(q.unsqueeze(2) + k.unsqueeze(1))  # (B, Tq, Tk, Hd)  eq. (1)
        scores = self.score_proj(hidden).squeeze(-1)  # (B, Tq, Tk)    eq. (1): v^T tanh(...)
        scores = scores.unsqueeze(1)  # (B, 1, Tq, Tk)  one "head", the project's weights shape

        weights = _masked_softmax(scores, mask)  # (B, 1, Tq, Tk)  eq. (2)
        context = self.dropout(weights).squeeze(1) @ value  # (B, Tq, Dv)  eq. (3)
        if need_weights:
            return context, weights
        return context

    def _check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        _check_sequence(query, "query", self.query_dim, "query_dim")
        _check_sequence(key, "key", self.key_dim, "key_dim")
        if not isinstance(value, torch.Tensor) or value.dim() != 3:  # any width Dv: the values are only averaged
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"value must have 3 dims (B, Tk, Dv), got {got}")
        _check_matching(query, "query", key, "key", 0, "batch size")
        _check_matching(key, "key", value, "value", 0, "batch size")
        _check_matching(key, "key", value, "value", 1, "length")


def _demo() -> None:
    """The demo; the guard at the very end of the file calls it, once the shared helpers exist."""
    torch.manual_seed(0)
    B, Tq, Tk, Dq, Dk, Hd = 2, 3, 5, 6, 4, 8
    attn = AdditiveAttention(query_dim=Dq, key_dim=Dk, hidden_dim=Hd).double()
    s, h = torch.randn(B, Tq, Dq, dtype=torch.float64), torch.randn(B, Tk, Dk, dtype=torch.float64)
    padding = torch.ones(B, Tk, dtype=torch.bool)  # (B, Tk): True = a real source token
    padding[1, 3:] = False  # the second sequence has only 3 real keys
    context, weights = attn(s, h, key_padding_mask=padding, need_weights=True)
    print("context shape:", tuple(context.shape), " weights shape:", tuple(weights.shape))

    # Checked fact: the paper's formula, one (batch, query, key) triple at a time.
    W_q, b, W_k, v = attn.query_proj.weight, attn.query_proj.bias, attn.key_proj.weight, attn.score_proj.weight[0]
    worst = 0.0
    with torch.no_grad():
        for bi in range(B):
            for i in range(Tq):
                allowed = [j for j in range(Tk) if padding[bi, j]]
                e = torch.stack([v @ torch.tanh(W_q @ s[bi, i] + b + W_k @ h[bi, j]) for j in allowed])  # (n,)
                a = torch.exp(e - e.max()) / torch.exp(e - e.max()).sum()
                c = sum(a[n] * h[bi, j] for n, j in enumerate(allowed))
                worst = max(worst, (c - context[bi, i]).abs().max().item())
    print(f"max |context - explicit loop of the paper's formula| = {worst:.2e}")
    assert worst < 1e-12


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
