"""Attention distillation: MiniLM's self-attention distribution transfer and value-relation transfer.

Paper: Wenhui Wang, Furu Wei, Li Dong, Hangbo Bao, Nan Yang, Ming Zhou, "MiniLM: Deep Self-Attention
Distillation for Task-Agnostic Compression of Pre-Trained Transformers", 2020, arXiv:2002.10957.

Idea: to compress a large transformer (the teacher) into a small one (the student), make the student's
last self-attention layer behave like the teacher's: the same attention distributions softmax(QK^T/sqrt(dk))
row by row, and the same "value relation" softmax(VV^T/sqrt(dv)), both compared with the KL divergence.
Both are T x T matrices per head, so the student may have narrower heads (and fewer layers) than the
teacher; only the number of heads must match. This is a loss on attention, not an attention module.

Equation:  A = softmax(Q K^T / sqrt(dk)),  VR = softmax(V V^T / sqrt(dv))   (per head, rows over keys)
           L_AT = 1/(H |x|) sum_h sum_t KL(A^T_{h,t} || A^S_{h,t}),
           L_VR = 1/(H |x|) sum_h sum_t KL(VR^T_{h,t} || VR^S_{h,t}),    loss = L_AT + L_VR.

Complexity: time O(H T^2 (dk + dv)) for the four relation matrices, memory O(H T^2).

Reduces to / oracle: zero exactly when student and teacher tensors agree; the KL against an explicit loop
over heads and rows (tests/test_attention_distillation.py::test_matches_the_kl_written_out_row_by_row);
a tiny student trained with it moves its attention toward the teacher's
(tests/test_attention_distillation.py::test_a_student_trained_with_it_moves_its_attention_toward_the_teacher).

Docs page: docs/mechanisms/attention_distillation.md
"""
import math
from typing import Optional

import torch


def _log_relation(x: torch.Tensor, y: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """log softmax(x y^T / sqrt(d)) over the keys, eq. (1) and (2); padded keys get log 0 = -inf."""
    scores = x @ y.transpose(-2, -1) / math.sqrt(x.size(-1))  # (B, H, T, T)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))  # (B, H, T, T)
    return torch.log_softmax(scores, dim=-1)  # (B, H, T, T): rows are log-distributions over the keys


def _mean_row_kl(teacher_log: torch.Tensor, student_log: torch.Tensor, key_mask: Optional[torch.Tensor],
                 query_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """KL(teacher row || student row) averaged over heads and real query rows, eq. (3)."""
    if key_mask is not None:
        # Padded keys have p = 0 in both rows and contribute 0 log 0 = 0; zero them explicitly so that
        # -inf - (-inf) never reaches the sum.
        teacher_log = teacher_log.masked_fill(~key_mask, 0.0)  # (B, H, T, T)
        student_log = student_log.masked_fill(~key_mask, 0.0)  # (B, H, T, T)
    p = teacher_log.exp()  # (B, H, T, T)
    if key_mask is not None:
        p = p.masked_fill(~key_mask, 0.0)  # (B, H, T, T)
    kl = (p * (teacher_log - student_log)).sum(dim=-1)  # (B, H, T): one KL per head and query row
    if query_mask is None:
        return kl.mean()
    rows = query_mask[:, None, :].expand_as(kl)  # (B, H, T): real query tokens only, |x| of eq. (3)
    return (kl * rows).sum() / rows.sum().clamp_min(1)


def attention_distillation_loss(student_query: torch.Tensor, student_key: torch.Tensor,
                                student_value: torch.Tensor, teacher_query: torch.Tensor,
                                teacher_key: torch.Tensor, teacher_value: torch.Tensor,
                                key_padding_mask: Optional[torch.Tensor] = None,
                                value_relation: bool = True) -> torch.Tensor:
    """MiniLM's loss L_AT + L_VR, eq. (5), between one student and one teacher self-attention layer.

    student_query/key/value: (B, H, T, Ds), the student's per-head projections (any head width Ds).
    teacher_query/key/value: (B, H, T, Dt), the teacher's (same B, H and T; any head width Dt). The teacher
        is treated as fixed: no gradient flows into its tensors.
    key_padding_mask: bool (B, T), True = a real token; padded keys are left out of every softmax and
        padded query rows out of the average.
    value_relation: add the value-relation term L_VR (MiniLM uses both).
    Returns a scalar: the mean over heads and real query rows of the KL divergences.
    """
    tensors = {"student_query": student_query, "student_key": student_key, "student_value": student_value,
               "teacher_query": teacher_query, "teacher_key": teacher_key, "teacher_value": teacher_value}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must have shape (B, H, T, head_dim), got {got}")
        if tensor.shape[:3] != student_query.shape[:3]:
            raise ValueError(f"{name} has (B, H, T) = {tuple(tensor.shape[:3])} but student_query has "
                             f"{tuple(student_query.shape[:3])}; student and teacher need the same batch, number of "
                             f"heads and length (head widths may differ)")
    for prefix in ("student", "teacher"):
        if tensors[f"{prefix}_query"].size(-1) != tensors[f"{prefix}_key"].size(-1):
            raise ValueError(f"{prefix}_query and {prefix}_key must have the same head width, got "
                             f"{tensors[prefix + '_query'].size(-1)} and {tensors[prefix + '_key'].size(-1)}")
    batch, _, length, _ = student_query.shape
    _check_key_padding_mask(key_padding_mask, batch, length)

    key_mask = None
    if key_padding_mask is not None:
        key_mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, T)
        # An example with no real token has no real key either; let its rows see every key (they are
        # dropped from the average anyway) so that no softmax runs over nothing.
        key_mask = key_mask | ~key_padding_mask.any(dim=-1)[:, None, None, None]  # (B, 1, 1, T)
    teacher_query, teacher_key, teacher_value = teacher_query.detach(), teacher_key.detach(), teacher_value.detach()
    # eq. (1) and (3): the attention distributions, row by row.
    loss = _mean_row_kl(_log_relation(teacher_query, teacher_key, key_mask),
                        _log_relation(student_query, student_key, key_mask), key_mask, key_padding_mask)
    if value_relation:
        # eq. (2) and (4): the values' scaled dot products with each other, as a distribution per row.
        loss = loss + _mean_row_kl(_log_relation(teacher_value, teacher_value, key_mask),
                                   _log_relation(student_value, student_value, key_mask), key_mask, key_padding_mask)
    return loss  # eq. (5)


def _demo() -> None:
    torch.manual_seed(0)
    batch, heads, length = 2, 4, 7
    teacher = [torch.randn(batch, heads, length, 16) for _ in range(3)]  # teacher heads of width 16
    student = [torch.randn(batch, heads, length, 8, requires_grad=True) for _ in range(3)]  # width 8
    loss = attention_distillation_loss(*student, *teacher)
    loss.backward()
    same = attention_distillation_loss(*teacher, *teacher)
    # The checked fact: the loss is exactly zero when student and teacher agree, and positive otherwise.
    assert same.item() == 0.0 and loss.item() > 0
    print(f"student (width 8) vs teacher (width 16), {heads} heads, T = {length}: loss {loss.item():.4f}; "
          f"teacher vs itself: {same.item():.1f}; gradient reaches the student: "
          f"{all(t.grad is not None for t in student)}")


# =====================================================================================================
# Input checks and mask helpers, identical letter for letter in every mechanism file that uses them
# (tests/test_shared_helpers.py compares the copies). Fix one copy, fix them all.
# =====================================================================================================


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
