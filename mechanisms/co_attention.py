"""Co-attention over two sequences: parallel and alternating (Lu et al., hierarchical co-attention for VQA).

Paper: Jiasen Lu, Jianwei Yang, Dhruv Batra, Devi Parikh, "Hierarchical Question-Image Co-Attention for
Visual Question Answering", 2016, arXiv:1606.00061.

Idea: attention pools one sequence guided by a fixed query; co-attention pools TWO sequences (in the paper a
question Q of T words and an image V of N regions), each guided by the other. Parallel co-attention links
them through an affinity matrix C = tanh(Q^T W_b V) of every (word, region) pair and lets each side's
attention map see the other side through C; alternating co-attention summarises the question first, uses
that summary to attend to the image, and uses the attended image to attend to the question again.

Equations (page; rows are positions, so the paper's Q (d x T) is `first` (T, d) here):
  affinity        C = tanh(Q W_b V^T)                                          (T1, T2)     eq. (1)
  parallel        H_v = tanh(V W_v^T + C^T (Q W_q^T)),  H_q = tanh(Q W_q^T + C (V W_v^T))          eq. (2)
                  a_v = softmax(H_v w_hv),  a_q = softmax(H_q w_hq)                                 eq. (3)
                  v_hat = sum_n a_v[n] v_n,  q_hat = sum_t a_q[t] q_t                              eq. (4)
  alternating     x_hat = A(X; g):  H = tanh(X W_x^T + 1 (g W_g^T)),  a = softmax(H w_hx),
                  x_hat = sum_i a_i x_i                                                             eq. (5)
                  s = A(Q; 0),  v_hat = A(V; s),  q_hat = A(Q; v_hat)                                eq. (6)

Complexity in the lengths T1 (first) and T2 (second), width d, hidden size k: parallel O(T1 T2 d + (T1 + T2) d k)
time, O(T1 T2 + (T1 + T2) k) memory (the affinity matrix); alternating O((T1 + T2) d k) time and
O((T1 + T2) k) memory: three attention poolings, no pairwise matrix.

Reduces to / oracle: both modes against explicit loops over eq. (1)-(6); with W_b = 0 parallel co-attention
is two independent attention poolings (each sequence ignores the other); swapping the two inputs (and
their parameters, W_b -> W_b^T) swaps the two outputs (tests/test_co_attention.py).

Docs page: docs/mechanisms/co_attention.md
"""
from typing import Optional

import torch
import torch.nn as nn


def _masked_softmax(scores: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the last axis of (B, T) scores, padded positions (False) excluded; all-padded rows give 0."""
    if padding_mask is None:
        return torch.softmax(scores, dim=-1)  # (B, T)
    row_has_key = padding_mask.any(dim=-1, keepdim=True)  # (B, 1)
    allowed = padding_mask | ~row_has_key  # an empty row gets every position (finite), then is zeroed
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)  # (B, T)
    return weights.masked_fill(~row_has_key, 0.0)


class CoAttention(nn.Module):
    """Parallel or alternating co-attention between two sequences of the same width and any lengths.

    Args:
        d_model: width d of both sequences.
        hidden_dim: k, the width of the hidden attention maps H (the paper's k).
        mode: "parallel" (eq. (1)-(4)) or "alternating" (eq. (5)-(6)). They have different parameters.
        bias: whether the d -> k projections W_q, W_v (parallel) or W_x (alternating) have a bias. The score
            vectors w_h have none: a constant added to every score of a softmax changes nothing.

    forward(first, second, first_padding_mask=None, second_padding_mask=None, need_weights=False):
        first (B, T1, d_model): the paper's question Q (summarised first in alternating mode);
        second (B, T2, d_model): the paper's image V. Padding masks (B, T1) / (B, T2), True = a real token:
        padded positions get no attention and enter no affinity; an all-padded sequence gives a zero summary.
        Returns (first_summary, second_summary), each (B, d_model): q_hat and v_hat. With need_weights=True,
        ((first_summary, second_summary), (first_weights (B, T1), second_weights (B, T2))).
    """

    def __init__(self, d_model: int, hidden_dim: int, mode: str = "parallel", bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(hidden_dim, "hidden_dim")
        if mode not in ("parallel", "alternating"):
            raise ValueError(f"mode must be 'parallel' or 'alternating', got {mode!r}")
        self.d_model, self.hidden_dim, self.mode = d_model, hidden_dim, mode
        if mode == "parallel":
            self.W_b = nn.Parameter(torch.empty(d_model, d_model))  # eq. (1): bilinear affinity
            nn.init.xavier_uniform_(self.W_b)
            self.first_proj = nn.Linear(d_model, hidden_dim, bias=bias)  # W_q
            self.second_proj = nn.Linear(d_model, hidden_dim, bias=bias)  # W_v
        else:
            # Step 1, A(Q; 0): no guide, so no W_g.
            self.summary_proj = nn.Linear(d_model, hidden_dim, bias=bias)
            self.summary_score = nn.Linear(hidden_dim, 1, bias=False)
            # Step 2, A(V; s) and step 3, A(Q; v_hat): each has its W_x, W_g and w_hx.
            self.second_proj = nn.Linear(d_model, hidden_dim, bias=bias)
            self.second_guide = nn.Linear(d_model, hidden_dim, bias=False)  # the W_x bias already adds a constant
            self.first_proj = nn.Linear(d_model, hidden_dim, bias=bias)
            self.first_guide = nn.Linear(d_model, hidden_dim, bias=False)
        self.first_score = nn.Linear(hidden_dim, 1, bias=False)  # w_hq
        self.second_score = nn.Linear(hidden_dim, 1, bias=False)  # w_hv

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, hidden_dim={self.hidden_dim}, mode={self.mode!r}"

    def forward(self, first: torch.Tensor, second: torch.Tensor, first_padding_mask: Optional[torch.Tensor] = None,
                second_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False):
        _check_sequence(first, "first", self.d_model, "d_model")
        _check_sequence(second, "second", self.d_model, "d_model")
        _check_matching(first, "first", second, "second", 0, "batch size")
        batch, t1, _ = first.shape
        t2 = second.size(1)
        _check_padding(first_padding_mask, "first_padding_mask", batch, t1)
        _check_padding(second_padding_mask, "second_padding_mask", batch, t2)
        if self.mode == "parallel":
            a_first, a_second = self._parallel(first, second, first_padding_mask, second_padding_mask)
        else:
            a_first, a_second = self._alternating(first, second, first_padding_mask, second_padding_mask)
        first_summary = (a_first.unsqueeze(-1) * first).sum(1)  # (B, d_model)  eq. (4)
        second_summary = (a_second.unsqueeze(-1) * second).sum(1)  # (B, d_model)  eq. (4)
        summaries = (first_summary, second_summary)
        return (summaries, (a_first, a_second)) if need_weights else summaries

    def _parallel(self, first, second, first_mask, second_mask):
        """Eq. (1)-(3): both attention maps at once, linked by the affinity C."""
        affinity = torch.tanh(first @ self.W_b @ second.transpose(1, 2))  # (B, T1, T2)  eq. (1)
        # A padded position must not reach the other side through C: zero its row or column.
        if first_mask is not None:
            affinity = affinity.masked_fill(~first_mask[:, :, None], 0.0)  # (B, T1, T2)
        if second_mask is not None:
            affinity = affinity.masked_fill(~second_mask[:, None, :], 0.0)  # (B, T1, T2)
        first_k = self.first_proj(first)  # (B, T1, k): W_q q_t
        second_k = self.second_proj(second)  # (B, T2, k): W_v v_n
        # Each region's map adds the words' features, weighted by how much each word agrees with it, eq. (2).
        hidden_second = torch.tanh(second_k + affinity.transpose(1, 2) @ first_k)  # (B, T2, k)
        hidden_first = torch.tanh(first_k + affinity @ second_k)  # (B, T1, k)
        a_second = _masked_softmax(self.second_score(hidden_second).squeeze(-1), second_mask)  # (B, T2)  eq. (3)
        a_first = _masked_softmax(self.first_score(hidden_first).squeeze(-1), first_mask)  # (B, T1)  eq. (3)
        return a_first, a_second

    def _alternating(self, first, second, first_mask, second_mask):
        """Eq. (5)-(6): summarise `first`, attend to `second` with it, attend to `first` with the result."""
        hidden = torch.tanh(self.summary_proj(first))  # (B, T1, k): step 1, g = 0
        a_summary = _masked_softmax(self.summary_score(hidden).squeeze(-1), first_mask)  # (B, T1)
        summary = (a_summary.unsqueeze(-1) * first).sum(1)  # (B, d_model): s
        hidden = torch.tanh(self.second_proj(second) + self.second_guide(summary)[:, None, :])  # (B, T2, k)  eq. (5)
        a_second = _masked_softmax(self.second_score(hidden).squeeze(-1), second_mask)  # (B, T2)
        second_summary = (a_second.unsqueeze(-1) * second).sum(1)  # (B, d_model): v_hat, eq. (6)
        hidden = torch.tanh(self.first_proj(first) + self.first_guide(second_summary)[:, None, :])  # (B, T1, k)
        a_first = _masked_softmax(self.first_score(hidden).squeeze(-1), first_mask)  # (B, T1)  eq. (6)
        return a_first, a_second


def _check_padding(padding_mask: Optional[torch.Tensor], name: str, batch: int, length: int) -> None:
    """Raise unless `padding_mask` is None or a (B, T) bool tensor, True = a real token."""
    if padding_mask is None:
        return
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
        got = padding_mask.dtype if isinstance(padding_mask, torch.Tensor) else type(padding_mask).__name__
        raise TypeError(f"{name} must be a torch.bool tensor (True = a real token), got {got}")
    if tuple(padding_mask.shape) != (batch, length):
        raise ValueError(f"{name} has shape {tuple(padding_mask.shape)}, expected (B, T) = ({batch}, {length})")


def _demo() -> None:
    """Demo of `python mechanisms/co_attention.py`; the guard at the end of the file calls it."""
    torch.manual_seed(0)
    d_model, hidden_dim = 16, 8
    question, image = torch.randn(2, 5, d_model), torch.randn(2, 9, d_model)  # 5 words, 9 regions
    for mode in ("parallel", "alternating"):
        co = CoAttention(d_model, hidden_dim, mode=mode)
        (q_hat, v_hat), (a_q, a_v) = co(question, image, need_weights=True)
        other_image = torch.randn(2, 9, d_model)
        moved = (co(question, other_image)[0] - q_hat).abs().max().item()
        print(f"{mode:>11}: summaries {tuple(q_hat.shape)}, {tuple(v_hat.shape)}; weights {tuple(a_q.shape)}, "
              f"{tuple(a_v.shape)}; another image moves the question summary by {moved:.3f}")
        assert moved > 0, "the question's attention must depend on the image"
    # Checked fact: parallel co-attention with W_b = 0 is two independent attention poolings.
    co = CoAttention(d_model, hidden_dim)
    with torch.no_grad():
        co.W_b.zero_()
        q_hat, _ = co(question, image)
        alone = torch.softmax(co.first_score(torch.tanh(co.first_proj(question))).squeeze(-1), -1)
        diff = (q_hat - (alone.unsqueeze(-1) * question).sum(1)).abs().max().item()
    print(f"W_b = 0: max |question summary - attention pooling of the question alone| = {diff:.1e}")
    assert diff < 1e-6


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


if __name__ == "__main__":
    _demo()
