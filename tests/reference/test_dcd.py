import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from duo_kernels.reference.dcd import dcd_kl


def direct_kl(p_logits, q_logits):
    """KL(p || q) per token, written out in float64: sum_v p (log p - log q)."""
    log_p = torch.log_softmax(p_logits.double(), -1)
    log_q = torch.log_softmax(q_logits.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def random_pair(seed: int, batch: int, length: int, vocab_size: int, *, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(batch, length, vocab_size, generator=gen, dtype=torch.float64)
    teacher = scale * torch.randn(batch, length, vocab_size, generator=gen, dtype=torch.float64)
    return student, teacher


@pytest.mark.parametrize("vocab_size", [2, 37, 1000])
def test_both_directions_against_direct_formula(vocab_size):
    student, teacher = random_pair(0, 2, 5, vocab_size)
    reverse = dcd_kl(student, teacher)
    forward = dcd_kl(student, teacher, direction="forward")
    assert reverse.dtype == forward.dtype == torch.float32 and reverse.shape == (2, 5)
    torch.testing.assert_close(reverse, direct_kl(student, teacher).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(forward, direct_kl(teacher, student).float(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(reverse, forward)


@given(seed=st.integers(0, 2**31), vocab_size=st.sampled_from([2, 3, 37, 1000]), scale=st.floats(0.0, 50.0),
       direction=st.sampled_from(["reverse", "forward"]))
def test_non_negative_and_zero_at_equal_logits(seed, vocab_size, scale, direction):
    student, teacher = random_pair(seed, 2, 3, vocab_size, scale=scale)
    # Rounding may leave a nearly-zero KL a few ulp below 0 (seen: -3.4e-29).
    assert torch.all(dcd_kl(student, teacher, direction=direction) >= -1e-15)
    assert torch.all(dcd_kl(student, student.clone(), direction=direction).abs() <= 1e-12)
    # A shift of every logit does not change the distribution.
    assert torch.all(dcd_kl(student, student + 7.0, direction=direction).abs() <= 1e-12 * (1 + scale))


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_gradient_reaches_only_the_student(direction):
    """The student's gradient is duo-math §5.4's: reverse p_s ((log p_s - log p_t) - KL), forward p_s - p_t."""
    student, teacher = random_pair(1, 2, 3, 11)
    student.requires_grad_()
    teacher.requires_grad_()
    upstream = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    dcd_kl(student, teacher, direction=direction).backward(upstream)
    assert teacher.grad is None
    log_p_s = torch.log_softmax(student.detach(), -1)
    log_p_t = torch.log_softmax(teacher.detach(), -1)
    if direction == "reverse":
        kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1, keepdim=True)
        expected = log_p_s.exp() * (log_p_s - log_p_t - kl)
    else:
        expected = log_p_s.exp() - log_p_t.exp()
    torch.testing.assert_close(student.grad, upstream.double()[..., None] * expected, rtol=1e-10, atol=1e-12)


def test_gradcheck_through_the_student():
    student, teacher = random_pair(3, 1, 2, 5)
    student.requires_grad_()
    # The loss is float32; gradcheck the float64 gradient against the float64 direct formula instead.
    loss = dcd_kl(student, teacher, reduction="sum")
    (grad,) = torch.autograd.grad(loss, student)
    reference = student.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(direct_kl(reference, teacher).sum(), reference)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_logits(dtype):
    student, teacher = random_pair(4, 2, 3, 37)
    student, teacher = student.to(dtype), teacher.to(torch.float32)
    loss = dcd_kl(student, teacher)
    torch.testing.assert_close(loss, direct_kl(student, teacher).float(), rtol=0, atol=0)


def test_reduction_and_mask():
    student, teacher = random_pair(5, 3, 4, 13)
    per_token = dcd_kl(student, teacher)
    torch.testing.assert_close(dcd_kl(student, teacher, reduction="sum"), per_token.sum())
    torch.testing.assert_close(dcd_kl(student, teacher, reduction="mean"), per_token.mean())
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, True, False]])
    masked = dcd_kl(student, teacher, mask=mask)
    assert torch.all(masked[~mask] == 0)
    torch.testing.assert_close(masked[mask], per_token[mask], rtol=0, atol=0)
    mean = dcd_kl(student, teacher, reduction="mean", mask=mask)
    torch.testing.assert_close(mean, per_token[mask].sum() / mask.sum())
    weights = mask * 0.5
    torch.testing.assert_close(dcd_kl(student, teacher, reduction="mean", mask=weights), per_token[mask].mean())


def test_non_finite_logits():
    student, teacher = random_pair(6, 2, 3, 7)
    clean = dcd_kl(student, teacher)
    student[0, 0, 2] = math.nan
    teacher[1, 1, 0] = math.inf
    student[1, 2, 3] = -math.inf  # a zero probability of the student: finite KL in both directions
    loss = dcd_kl(student, teacher)
    assert torch.isnan(loss[0, 0]) and torch.isnan(loss[1, 1])
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[0, 0] = keep[1, 1] = keep[1, 2] = False
    torch.testing.assert_close(loss[keep], clean[keep], rtol=0, atol=0)
    assert torch.isfinite(loss[1, 2])
    # The teacher giving zero probability where the student does not: infinite reverse KL.
    teacher[0, 2, 1] = -math.inf
    assert dcd_kl(student, teacher)[0, 2] == math.inf


def test_minus_inf_student_logit_has_a_clean_gradient():
    """At a -inf student logit the gradient is the limit of §5.4's: 0 (reverse), -p_t (forward)."""
    student, teacher = random_pair(7, 1, 2, 5)
    student[0, 0, 1] = -math.inf
    student.requires_grad_()
    (grad,) = torch.autograd.grad(dcd_kl(student, teacher, reduction="sum"), student)
    assert torch.all(torch.isfinite(grad)) and grad[0, 0, 1] == 0
    (grad,) = torch.autograd.grad(dcd_kl(student, teacher, direction="forward", reduction="sum"), student)
    expected = torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_masked_non_finite_rows_give_zero_loss_and_gradient():
    student, teacher = random_pair(8, 2, 3, 7)
    student[0, 1] = math.nan
    teacher[1, 2, 3] = math.inf
    student.requires_grad_()
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = False
    loss = dcd_kl(student, teacher, reduction="sum", mask=mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.all(torch.isfinite(student.grad)) and torch.all(student.grad[~mask] == 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(student_logits=torch.zeros(2, 3, 6, dtype=torch.int64)), "student_logits"),
    (dict(student_logits=torch.zeros(2, 6)), "student_logits"),
    (dict(teacher_logits=torch.zeros(2, 3, 1)), "teacher_logits"),
    (dict(teacher_logits=torch.zeros(2, 3, 5)), "teacher_logits"),
    (dict(teacher_logits="logits"), "teacher_logits"),
    (dict(teacher_logits=torch.zeros(2, 3, 6, device="meta")), "teacher_logits"),
    (dict(direction="kl-bwd"), "direction"),
    (dict(reduction="batchmean"), "reduction"),
    (dict(mask=torch.ones(3, 2, dtype=torch.bool)), "mask"),
    (dict(mask=torch.ones(2, 3, dtype=torch.int32)), "mask"),
    (dict(mask=torch.full((2, 3), -0.5)), "mask"),
])
def test_bad_arguments(kwargs, match):
    args = dict(student_logits=torch.zeros(2, 3, 6), teacher_logits=torch.zeros(2, 3, 6))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dcd_kl(**args)
