"""The loss of Discrete Consistency Distillation (duo-math §5.1, §5.4).

The student sees ``z_t``, the teacher (the previous round's weights, no gradient) sees ``z_s`` of the same
deterministic trajectory, ``s < t``; the student is pulled towards the teacher's prediction of the clean
token by a per-token KL divergence between their categorical distributions over the vocabulary.
"""

from __future__ import annotations

import torch

from duo_kernels import _validate
from duo_kernels._losses import _check_logits, _check_reduction, _reduce, _token_weights
from duo_kernels.reference.nelbo import _drop_masked_rows

DIRECTIONS = ("reverse", "forward")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension from log-probabilities, with 0 log 0 = 0 where p is 0."""
    # where() before the product: p (log p - log q) at a -inf log p is 0 * -inf = NaN, in the value and
    # in the gradient.
    log_ratio = torch.where(torch.isneginf(log_p), 0.0, log_p - log_q)
    return (log_p.exp() * log_ratio).sum(-1)


def dcd_kl(student_logits, teacher_logits, *, direction: str = "reverse", reduction: str = "none",
           mask=None) -> torch.Tensor:
    """Per-token KL divergence between the student's and the teacher's predictions (duo-math §5.1, §5.4).

    With ``log p_s = log_softmax(student_logits)`` and ``log p_t = log_softmax(teacher_logits)``:

    * ``direction="reverse"`` (Duo's default, 'kl-bwd'): ``KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)``;
    * ``direction="forward"`` ('kl-fwd'): ``KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)``.

    Computed in float64 and returned as float32. The teacher is detached: the gradient reaches
    ``student_logits`` only. A -inf logit is a zero probability (0 log 0 = 0); a row with a NaN or +inf
    logit gives NaN in that token only; a masked token gives exactly 0 (and a 0 gradient).

    Args:
        student_logits: (B, L, V) float16/bfloat16/float32/float64, V >= 2.
        teacher_logits: same shape, any of those dtypes, on the same device.
        direction: "reverse" (default) or "forward".
        reduction: "none" (default) -> (B, L); "sum" -> (); "mean" -> () the sum divided by the number of
            unmasked tokens (the sum of the mask's weights).
        mask: None (default) or (B, L) bool or float weights >= 0 multiplying the per-token loss.

    Returns:
        float32 loss, (B, L) or ().

    Example:
        >>> student = torch.tensor([[[0.0, 0.0]]], requires_grad=True)
        >>> teacher = torch.tensor([[[0.0, 2.0]]])
        >>> loss = dcd_kl(student, teacher, reduction="sum")
        >>> round(float(loss), 6)  # 0.5 log(0.5/0.119203) + 0.5 log(0.5/0.880797)
        0.433781
        >>> loss.backward(); student.grad.shape
        torch.Size([1, 1, 2])
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)},"
                         f" got {tuple(teacher_logits.shape)}")
    _validate.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, mask=mask)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    _check_reduction(reduction)
    weights = _token_weights(mask, (student_logits.shape[0], student_logits.shape[1]))

    log_p_student = torch.log_softmax(_drop_masked_rows(student_logits.to(torch.float64), weights), dim=-1)
    log_p_teacher = torch.log_softmax(_drop_masked_rows(teacher_logits.detach().to(torch.float64), weights), dim=-1)
    if direction == "reverse":
        loss = _kl(log_p_student, log_p_teacher)
    else:
        loss = _kl(log_p_teacher, log_p_student)
    return _reduce(loss, weights, reduction)
