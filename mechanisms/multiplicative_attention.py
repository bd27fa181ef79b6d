"""Multiplicative attention (Luong attention): dot, general and concat scores; global and local-p alignment.

Paper: Minh-Thang Luong, Hieu Pham, Christopher D. Manning, "Effective Approaches to
Attention-based Neural Machine Translation", 2015, arXiv:1508.04025.

Idea: score a query h_t (the decoder state) against every key h_s (an encoder state) with a cheap
product instead of Bahdanau's small network: the plain dot product, a "general" bilinear form
through a learned matrix, or a "concat" network like Bahdanau's. Global attention takes a softmax
over all keys. Local-p attention first predicts a source position p_t from the query, keeps only
the keys within D of it, and multiplies their softmax weights by a Gaussian centred on p_t, so each
query looks at a small neighbourhood that it chooses itself.

Equations (page eq. (1)-(7)):
    dot:      score(h_t, h_s) = h_t^T h_s
    general:  score(h_t, h_s) = (W_a h_t + b_a)^T h_s
    concat:   score(h_t, h_s) = v_a^T tanh(W_q h_t + W_k h_s + b_a)
    global:   a_t(s) = softmax_s(score(h_t, h_s))                            c_t = sum_s a_t(s) value_s
    local-p:  p_t = S * sigmoid(v_p^T tanh(W_p h_t))
              a_t(s) = softmax_{s : |s - p_t| <= D}(score) * exp(-(s - p_t)^2 / (2 sigma^2)),  sigma = D / 2

Complexity in the query length Tq and key length Tk: dot / general time O(Tq * Tk * D), memory
O(Tq * Tk); concat memory O(Tq * Tk * Hd) (one hidden vector per pair). Local-p here computes the
scores for all keys and then masks outside the window, so it costs the same as global; the paper's
saving (only 2D + 1 keys per query) would need a gather of the window.

Reduces to / checked against: dot equals scaled dot-product attention with scale 1; general with
W_a = I and no bias equals dot; local-p with a huge window D (and so a huge sigma) equals global;
concat equals an explicit loop over (batch, query, key) (tests/test_multiplicative_attention.py).

Docs page: docs/mechanisms/multiplicative_attention.md
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

_SCORES = ("dot", "general", "concat")
_ALIGNMENTS = ("global", "local-p")


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


class LuongAttention(nn.Module):
    """Luong attention with a choice of score function and of alignment.

    Args:
        query_dim: width Dq of the queries h_t.
        key_dim: width Dk of the keys h_s; defaults to query_dim. "dot" needs key_dim == query_dim.
        score: "dot" (no parameters), "general" (W_a: Dq -> Dk) or "concat" (W_q, W_k, v_a).
        hidden_dim: hidden width Hd of the "concat" score (default query_dim); only for "concat".
        alignment: "global" (all keys) or "local-p" (predicted position, Gaussian-weighted window).
        window: the half-width D of the local-p window, a positive int; only for "local-p".
            sigma = D / 2 as in the paper.
        bias: add a learned bias b_a to the "general" or "concat" score (the paper has none);
            not allowed with "dot", which has no parameters to attach it to.
    """

    def __init__(self, query_dim: int, key_dim: Optional[int] = None, score: str = "dot",
                 hidden_dim: Optional[int] = None, alignment: str = "global",
                 window: Optional[int] = None, bias: bool = False) -> None:
        super().__init__()
        key_dim = query_dim if key_dim is None else key_dim
        _check_positive_int(query_dim, "query_dim")
        _check_positive_int(key_dim, "key_dim")
        if score not in _SCORES:
            raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
        if alignment not in _ALIGNMENTS:
            raise ValueError(f"alignment must be one of {_ALIGNMENTS}, got {alignment!r}")
        if score == "dot" and key_dim != query_dim:
            raise ValueError(
                f"score='dot' needs key_dim == query_dim = {query_dim}, got key_dim={key_dim}; "
                "use score='general' or 'concat' for different widths"
            )
        if score == "dot" and bias:
            raise ValueError("bias=True needs score='general' or 'concat'; score='dot' has no parameters")
        if score != "concat" and hidden_dim is not None:
            raise ValueError(f"hidden_dim is only used by score='concat', got hidden_dim={hidden_dim} "
                             f"with score={score!r}")
        if alignment == "local-p":
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ValueError(f"window (the half-width D) must be a positive int for "
                                 f"alignment='local-p', got {window!r}")
        elif window is not None:
            raise ValueError(f"window is only used by alignment='local-p', got window={window} "
                             f"with alignment={alignment!r}")
        hidden_dim = query_dim if hidden_dim is None else hidden_dim
        if score == "concat":
            _check_positive_int(hidden_dim, "hidden_dim")

        self.query_dim, self.key_dim, self.score, self.alignment = query_dim, key_dim, score, alignment
        self.window = window
        if score == "general":
            # W_a maps the query into key space. The bias sits on the query side on purpose: on the
            # key side, (W_a h_s + b)^T h_t would add h_t^T b, the same to every key of the row,
            # and the softmax would cancel it. Here b^T h_s differs per key, so it can matter.
            self.query_proj = nn.Linear(query_dim, key_dim, bias=bias)  # W_a, b_a
        elif score == "concat":
            # W_a [h_t; h_s] is W_q h_t + W_k h_s: splitting it lets us project each side once
            # and pair them up by broadcasting instead of concatenating Tq * Tk vectors.
            self.query_proj = nn.Linear(query_dim, hidden_dim, bias=bias)  # W_q (left half of W_a), b_a
            self.key_proj = nn.Linear(key_dim, hidden_dim, bias=False)  # W_k (right half of W_a)
            self.score_proj = nn.Linear(hidden_dim, 1, bias=False)  # v_a
        if alignment == "local-p":
            # The position predictor of eq. (6); the paper does not give its hidden width, we use Dq.
            self.position_proj = nn.Linear(query_dim, query_dim, bias=False)  # W_p
            self.position_score = nn.Linear(query_dim, 1, bias=False)  # v_p

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                need_weights: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from every query to the keys.

        Args:
            query: (B, Tq, Dq).
            key: (B, Tk, Dk).
            value: (B, Tk, Dv); defaults to `key` (Luong mixes the encoder states themselves).
            mask: bool, True = may attend; (Tq, Tk) shared by the whole batch, or 4 dims
                broadcastable to (B, 1, Tq, Tk).
            key_padding_mask: bool (B, Tk), True = a real key (source token); ANDed with `mask`.
                For local-p, S in eq. (6) is the number of keys the row may attend to under both
                (with padding only: the true source length of a right-padded batch).
            need_weights: also return the weights that multiply the values.

        Returns:
            context (B, Tq, Dv), or (context, weights) with weights (B, 1, Tq, Tk). With global
            alignment each row of weights sums to 1; with local-p the softmax inside the window
            sums to 1 and the Gaussian then shrinks it, so the returned rows sum to less than 1
            (eq. (7)). Rows with no key to attend to get zero context and zero weights.
        """
        if value is None:
            value = key
        self._check_inputs(query, key, value)
        B, Tq, _ = query.shape
        Tk = key.shape[1]
        _check_mask(mask, (B, 1, Tq, Tk))
        _check_key_padding_mask(key_padding_mask, B, Tk)
        mask = _merge_masks(mask, key_padding_mask, False, Tq, Tk, query.device)  # (Tq, Tk) or 4-D, or None

        if self.alignment == "global" and self.score != "concat" and not need_weights:
            return self._fused_global(query, key, value, mask)

        scores = self._scores(query, key)  # (B, 1, Tq, Tk)
        if self.alignment == "global":
            weights = _masked_softmax(scores, mask)  # (B, 1, Tq, Tk)  eq. (4)
        else:
            weights = self._local_p_weights(query, scores, mask)  # (B, 1, Tq, Tk)  eq. (7)
        context = weights.squeeze(1) @ value  # (B, Tq, Dv)  eq. (5)
        if need_weights:
            return context, weights
        return context

    def _scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The raw alignment scores of eq. (1)-(3), one per (query, key) pair, as (B, 1, Tq, Tk)."""
        if self.score == "dot":
            scores = query @ key.transpose(1, 2)  # (B, Tq, Tk)  eq. (1), no 1/sqrt(d) scaling
        elif self.score == "general":
            scores = self.query_proj(query) @ key.transpose(1, 2)  # (B, Tq, Tk)  eq. (2)
        else:
            q = self.query_proj(query)  # (B, Tq, Hd)
            k = self.key_proj(key)  # (B, Tk, Hd)
            hidden = torch.tanh(q.unsqueeze(2) + k.unsqueeze(1))  # (B, Tq, Tk, Hd)  eq. (3)
            scores = self.score_proj(hidden).squeeze(-1)  # (B, Tq, Tk)  eq. (3)
        return scores.unsqueeze(1)  # (B, 1, Tq, Tk)

    def _fused_global(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Global dot / general attention through PyTorch's fused kernel (scale 1: Luong does not scale).

        Same math as eq. (1)/(2), (4), (5). A row with every key masked would be 0/0 inside the
        kernel on some backends, so such rows are let through to all keys and zeroed afterwards.
        """
        q = query if self.score == "dot" else self.query_proj(query)  # (B, Tq, Dk)
        q, k, v = q.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)  # (B, 1, T, D): one head
        row_alive = None
        if mask is not None:
            row_alive = mask.any(dim=-1, keepdim=True)  # (Tq|1, 1) or (B|1, 1, Tq|1, 1)
            mask = mask | ~row_alive
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # (B, 1, Tq, Dv)
        if row_alive is not None:
            context = context.masked_fill(~row_alive, 0.0)
        return context.squeeze(1)  # (B, Tq, Dv)

    def _local_p_weights(self, query: torch.Tensor, scores: torch.Tensor,
                         mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Local-p alignment: predict p_t, softmax inside [p_t - D, p_t + D], times a Gaussian."""
        B, _, Tq, Tk = scores.shape
        # Positions in float32 or wider: bf16 cannot even count to 300 exactly.
        pos_dtype = torch.promote_types(scores.dtype, torch.float32)
        if mask is None:
            source_len = torch.full((B, 1, Tq, 1), float(Tk), dtype=pos_dtype, device=scores.device)  # (B, 1, Tq, 1)
        else:
            # S of eq. (6) per row: the number of keys this row may attend to.
            source_len = mask.expand(B, 1, Tq, Tk).sum(dim=-1, keepdim=True).to(pos_dtype)  # (B, 1, Tq, 1)
        gate = self.position_score(torch.tanh(self.position_proj(query)))  # (B, Tq, 1)  eq. (6)
        p = source_len * torch.sigmoid(gate.to(pos_dtype)).unsqueeze(1)  # (B, 1, Tq, 1)  eq. (6)
        s = torch.arange(Tk, device=scores.device, dtype=pos_dtype)  # (Tk,)  source positions 0..Tk-1
        distance = s - p  # (B, 1, Tq, Tk)
        allowed = distance.abs() <= self.window  # (B, 1, Tq, Tk)  the window of eq. (7)
        if mask is not None:
            allowed = allowed & mask
        align = _masked_softmax(scores, allowed)  # (B, 1, Tq, Tk)  softmax over the window only
        sigma = self.window / 2.0
        gaussian = torch.exp(-distance.pow(2) / (2.0 * sigma * sigma))  # (B, 1, Tq, Tk)  eq. (7)
        return (align * gaussian).to(scores.dtype)  # (B, 1, Tq, Tk)  eq. (7)

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
    B, Tq, Tk, D = 2, 3, 7, 8
    h_t, h_s = torch.randn(B, Tq, D), torch.randn(B, Tk, D)
    for score in _SCORES:
        for alignment in _ALIGNMENTS:
            attn = LuongAttention(D, score=score, alignment=alignment,
                                  window=2 if alignment == "local-p" else None)
            context, weights = attn(h_t, h_s, need_weights=True)
            print(f"{score:8s} {alignment:8s} context {tuple(context.shape)}  weights {tuple(weights.shape)}"
                  f"  row sums {weights.sum(-1).min().item():.3f}..{weights.sum(-1).max().item():.3f}")

    # Checked fact: global dot attention is softmax(h_t h_s^T) h_s, written out here with no scaling.
    dot = LuongAttention(D, score="dot")
    expected = torch.softmax(h_t @ h_s.transpose(1, 2), dim=-1) @ h_s  # (B, Tq, D)
    diff = (dot(h_t, h_s) - expected).abs().max().item()
    print(f"max |dot attention - softmax(h_t h_s^T) h_s| = {diff:.2e}")
    assert diff < 1e-5


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
