"""mechanisms/attention_distillation.py: MiniLM's loss against the KL divergence written out row by row.

Oracle: for every example, head and real query row, the teacher's and the student's softmax rows are
computed on their own (the padded keys dropped), KL(teacher || student) = sum p log(p / q) is summed in a
Python loop, and the mean is taken over heads and real rows. Paper-specific facts: zero exactly when the
two agree; any head widths (only the number of heads must match); and a small student trained on the
loss alone moves its attention toward a fixed teacher's.
"""
import math

import pytest
import torch

from mechanisms.attention_distillation import attention_distillation_loss

FP64_TOL = 1e-10
B, H, T = 2, 3, 5


def _heads(width, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, width, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
            for _ in range(3)]


def _kl_loop(student, teacher, kpm, value_relation):
    """The mean over heads and real rows of KL(teacher row || student row), one row at a time."""
    pairs = [((student[0], student[1]), (teacher[0], teacher[1]))]
    if value_relation:
        pairs.append(((student[2], student[2]), (teacher[2], teacher[2])))
    total = 0.0
    for (sx, sy), (tx, ty) in pairs:
        kl_sum, rows = 0.0, 0
        for b in range(B):
            keys = [j for j in range(T) if kpm[b, j]]
            for h in range(H):
                for i in keys:  # real query rows only
                    s = torch.stack([sx[b, h, i] @ sy[b, h, j] / math.sqrt(sx.size(-1)) for j in keys])
                    t = torch.stack([tx[b, h, i] @ ty[b, h, j] / math.sqrt(tx.size(-1)) for j in keys])
                    p = torch.exp(t) / torch.exp(t).sum()
                    q = torch.exp(s) / torch.exp(s).sum()
                    kl_sum += float((p * torch.log(p / q)).sum())
                    rows += 1
        total += kl_sum / rows
    return total


def test_zero_exactly_when_student_and_teacher_agree():
    teacher = _heads(8, seed=0)
    assert attention_distillation_loss(*teacher, *teacher).item() == 0.0
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, 3:] = False
    assert attention_distillation_loss(*teacher, *teacher, key_padding_mask=kpm).item() == 0.0
    # A wider student with the same relations: [q, 0] . [sqrt(2) k, 0] / sqrt(16) = q . k / sqrt(8), and
    # [2^(1/4) v, 0] . [2^(1/4) v, 0] / sqrt(16) = v . v / sqrt(8).
    q, k, v = teacher
    pad = torch.zeros(B, H, T, 8, dtype=torch.float64)
    wide = [torch.cat([q, pad], -1), torch.cat([math.sqrt(2) * k, pad], -1), torch.cat([2 ** 0.25 * v, pad], -1)]
    assert abs(attention_distillation_loss(*wide, *teacher).item()) < 1e-12
    assert attention_distillation_loss(*_heads(8, seed=1), *teacher).item() > 0.1


@pytest.mark.parametrize("value_relation", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_the_kl_written_out_row_by_row(value_relation, padded):
    student, teacher = _heads(4, seed=1), _heads(8, seed=2)  # different head widths
    kpm = torch.ones(B, T, dtype=torch.bool)
    if padded:
        kpm[0, -2:] = False
    expected = _kl_loop(student, teacher, kpm, value_relation)
    got = attention_distillation_loss(*student, *teacher, key_padding_mask=kpm if padded else None,
                                      value_relation=value_relation)
    assert abs(got.item() - expected) < FP64_TOL


def test_padded_tokens_have_no_influence_and_a_fully_padded_example_is_ignored():
    student, teacher = _heads(4, seed=1, requires_grad=True), _heads(8, seed=2)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[0, -2:] = False
    loss = attention_distillation_loss(*student, *teacher, key_padding_mask=kpm)
    moved = [t.detach().clone() for t in student]
    for t in moved + teacher:
        t.data[0, :, -2:] += 3.0  # change everything at the padded positions, student and teacher
    assert abs(attention_distillation_loss(*moved, *teacher, key_padding_mask=kpm).item() - loss.item()) < FP64_TOL
    loss.backward()
    assert all((t.grad[0, :, -2:] == 0).all() for t in student)
    # Batch element 1 without any real token: the loss is that of element 0 alone, finite, with finite grads.
    kpm[1] = False
    alone = attention_distillation_loss(*[t[:1] for t in student], *[t[:1] for t in teacher], key_padding_mask=kpm[:1])
    both = attention_distillation_loss(*student, *teacher, key_padding_mask=kpm)
    assert abs(both.item() - alone.item()) < FP64_TOL
    for t in student:
        t.grad = None
    both.backward()
    assert all(torch.isfinite(t.grad).all() for t in student)


def test_gradient_reaches_the_student_and_never_the_teacher():
    student, teacher = _heads(4, seed=1, requires_grad=True), _heads(8, seed=2, requires_grad=True)
    attention_distillation_loss(*student, *teacher).backward()
    assert all(t.grad is not None and t.grad.abs().max() > 0 for t in student)
    assert all(t.grad is None for t in teacher)


def test_every_argument_matters_and_bad_shapes_are_refused():
    student, teacher = _heads(4, seed=1), _heads(8, seed=2)
    both = attention_distillation_loss(*student, *teacher)
    attention_only = attention_distillation_loss(*student, *teacher, value_relation=False)
    assert both.item() > attention_only.item() + 1e-3, "value_relation"
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[0, 0] = False
    assert abs(attention_distillation_loss(*student, *teacher, key_padding_mask=kpm).item() - both.item()) > 1e-3
    with pytest.raises(ValueError, match="teacher_query"):
        attention_distillation_loss(*student, *[t[:, :2] for t in teacher])  # 2 teacher heads, 3 student heads
    with pytest.raises(ValueError, match="student_key"):
        attention_distillation_loss(student[0], student[1][..., :3], student[2], *teacher)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention_distillation_loss(*student, *teacher, key_padding_mask=torch.ones(B, T + 1, dtype=torch.bool))


def test_a_student_trained_with_it_moves_its_attention_toward_the_teacher():
    # MiniLM's claim in miniature: a student with heads 4 wide learns, from the loss alone, the attention of a
    # fixed random teacher with heads 16 wide. Measured on held-out sequences as the attention KL (L_AT).
    torch.manual_seed(0)
    d_model, heads, vocab, length = 16, 2, 20, 10
    embed, pos = torch.randn(vocab, d_model), 0.5 * torch.randn(length, d_model)
    teacher = [0.6 * torch.randn(d_model, heads * 16) for _ in range(3)]
    student = [torch.nn.Linear(d_model, heads * 4) for _ in range(3)]
    params = [p for m in student for p in m.parameters()]

    def split(x, width):
        return x.view(x.size(0), length, heads, width).transpose(1, 2)

    def losses(x, value_relation=True):
        t = [split(x @ w, 16) for w in teacher]
        s = [split(m(x), 4) for m in student]
        return attention_distillation_loss(*s, *t, value_relation=value_relation)

    held_out = embed[torch.randint(vocab, (128, length), generator=torch.Generator().manual_seed(1))] + pos
    with torch.no_grad():
        before = losses(held_out, value_relation=False).item()
    for _ in range(30):  # plain gradient descent, learning rate 1 (torch.optim's first step alone takes seconds)
        grads = torch.autograd.grad(losses(embed[torch.randint(vocab, (32, length))] + pos), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= g
    with torch.no_grad():
        after = losses(held_out, value_relation=False).item()
    assert after < 0.5 * before, (before, after)
