"""Thin ``torch.nn.Module`` wrappers of the fused ops: each holds only its options and calls the
function of the same name (:mod:`duo_kernels.ops`), like ``torch.nn.CrossEntropyLoss`` does
``F.cross_entropy``."""

from __future__ import annotations

import torch

from duo_kernels.ops.dcd import dcd_kl
from duo_kernels.ops.nelbo import linear_usdm_nelbo, usdm_nelbo


class USDMNELBOLoss(torch.nn.Module):
    """:func:`duo_kernels.usdm_nelbo` as a module: ``loss_fn(logits, z_t, x0, alpha_t, dalpha_t, mask=None)``.

    Args:
        reduction: "none", "sum" or "mean" (default; the mean over unmasked tokens).
        impl: backend, "auto" (default), "triton", "cpu" or "reference".

    Example:
        >>> loss_fn = USDMNELBOLoss()
        >>> logits = torch.randn(2, 4, 37, requires_grad=True)
        >>> x0 = torch.randint(37, (2, 4))
        >>> loss_fn(logits, x0, x0, 0.5, -1.0).backward()
    """

    def __init__(self, reduction: str = "mean", impl: str = "auto"):
        super().__init__()
        self.reduction, self.impl = reduction, impl

    def forward(self, logits, z_t, x0, alpha_t, dalpha_t, mask=None):
        return usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, reduction=self.reduction, mask=mask, impl=self.impl)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, impl={self.impl!r}"


class LinearUSDMNELBOLoss(torch.nn.Module):
    """:func:`duo_kernels.linear_usdm_nelbo` as a module, taking the output head's parameters per call:
    ``loss_fn(hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, mask=None)`` (the head stays in the
    model, so weight tying and optimizers see it as usual).

    Args:
        reduction: "none", "sum" or "mean" (default).
        impl: backend, "auto" (default), "triton", "cpu" or "reference".

    Example:
        >>> head = torch.nn.Linear(8, 37)
        >>> hidden = torch.randn(2, 16, 8)
        >>> x0 = torch.randint(37, (2, 16))
        >>> LinearUSDMNELBOLoss()(hidden, head.weight, head.bias, x0, x0, 0.5, -1.0).backward()
    """

    def __init__(self, reduction: str = "mean", impl: str = "auto"):
        super().__init__()
        self.reduction, self.impl = reduction, impl

    def forward(self, hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, mask=None):
        return linear_usdm_nelbo(hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, reduction=self.reduction,
                                 mask=mask, impl=self.impl)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, impl={self.impl!r}"


class DCDKLLoss(torch.nn.Module):
    """:func:`duo_kernels.dcd_kl` as a module: ``loss_fn(student_logits, teacher_logits, mask=None)``.

    Args:
        direction: "reverse" (default, KL(student || teacher)) or "forward".
        reduction: "none", "sum" or "mean" (default).
        impl: backend, "auto" (default), "triton", "cpu" or "reference".

    Example:
        >>> student = torch.randn(2, 4, 37, requires_grad=True)
        >>> DCDKLLoss()(student, torch.randn(2, 4, 37)).backward()
    """

    def __init__(self, direction: str = "reverse", reduction: str = "mean", impl: str = "auto"):
        super().__init__()
        self.direction, self.reduction, self.impl = direction, reduction, impl

    def forward(self, student_logits, teacher_logits, mask=None):
        return dcd_kl(student_logits, teacher_logits, direction=self.direction, reduction=self.reduction, mask=mask,
                      impl=self.impl)

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}, reduction={self.reduction!r}, impl={self.impl!r}"
