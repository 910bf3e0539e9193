"""Thin ``nn.Module`` wrappers of the public ops: the relaxed embedding layer, and loss modules that
hold only their options and call the function of the same name, like ``torch.nn.CrossEntropyLoss``
does ``F.cross_entropy``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from duo_kernels import _validate
from duo_kernels._dispatch import check_impl
from duo_kernels.ops.dcd import dcd_kl
from duo_kernels.ops.embedding import (relaxed_embedding, tempered_softmax_embedding,
                                       tempered_softmax_topk_embedding)
from duo_kernels.ops.nelbo import linear_usdm_nelbo, usdm_nelbo


class RelaxedEmbedding(nn.Module):
    """The Duo backbone's embedding layer (duo-math §7): one matrix E (vocab_size, dim) read three ways.

    - ``forward(ids)``: hard tokens, ids (B, L) int64 -> ``E[ids]`` (B, L, dim) in E's dtype
      (the discrete phase, validation, sampling);
    - ``forward(ids, weights)`` or ``forward((ids, weights))``: a top-k relaxation, ids and weights
      (B, L, k) -> ``sum_j weights_j E[ids_j]`` (B, L, dim) float32 (:func:`duo_kernels.relaxed_embedding`,
      the output of ``tempered_softmax_topk``);
    - ``dense_curriculum(x0, gamma, tau, seed=...)`` -> ``(h, z_t)``: Duo's dense curriculum
      ``softmax(w / tau) @ E`` with ``z_t = argmax w`` (:func:`duo_kernels.tempered_softmax_embedding`);
      ``topk_curriculum(x0, gamma, k, tau, seed=...)`` -> ``(h, z_t)``: Duo++'s sampler and embedding in
      one call (:func:`duo_kernels.tempered_softmax_topk_embedding`).

    E is initialised as the reference's ``EmbeddingLayer``: ``kaiming_uniform_(a=sqrt(5))``, i.e.
    ``U(-1/sqrt(dim), 1/sqrt(dim))``.

    Args:
        vocab_size: number of rows V >= 2.
        dim: embedding width d.
        deterministic: bitwise-reproducible dE for the relaxed path (see :func:`duo_kernels.relaxed_embedding`).
        impl: backend for every op this module calls.
        device, dtype: of E.

    Example::

        >>> emb = RelaxedEmbedding(100, 8)
        >>> x0 = torch.tensor([[3, 7, 7]])
        >>> emb(x0).shape                                              # hard ids
        torch.Size([1, 3, 8])
        >>> ids, w = torch.tensor([[[3, 9]] * 3]), torch.tensor([[[0.9, 0.1]] * 3])
        >>> emb(ids, w).shape                                          # top-k relaxation
        torch.Size([1, 3, 8])
        >>> h, z_t = emb.dense_curriculum(x0, gamma=-3.0, tau=1e-3, seed=0)   # dense curriculum
        >>> h.shape, z_t.shape
        (torch.Size([1, 3, 8]), torch.Size([1, 3]))
        >>> h, z_t = emb.topk_curriculum(x0, gamma=-3.0, k=2, tau=1e-3, seed=0)
        >>> h.sum().backward(); emb.weight.grad.shape
        torch.Size([100, 8])
    """

    def __init__(self, vocab_size: int, dim: int, *, deterministic: bool = False, impl: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        vocab_size = _validate.check_vocab_size(vocab_size)
        if not _validate.is_int(dim) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        dim = int(dim)
        if not isinstance(deterministic, bool):
            raise ValueError(f"deterministic must be a bool, got {deterministic!r}")
        check_impl(impl)
        self.vocab_size, self.dim = vocab_size, dim
        self.deterministic, self.impl = deterministic, impl
        self.weight = nn.Parameter(torch.empty(vocab_size, dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, ids, weights: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(ids, (tuple, list)):
            if weights is not None or len(ids) != 2:
                raise ValueError("pass either ids, (ids, weights) as one tuple, or ids and weights")
            ids, weights = ids
        if weights is None:
            _validate.check_ids("ids", ids, self.vocab_size, ndim=None)
            _validate.check_same_device(ids=ids, weight=self.weight)
            return F.embedding(ids, self.weight)
        return relaxed_embedding(self.weight, ids, weights, deterministic=self.deterministic, impl=self.impl)

    def dense_curriculum(self, x0: torch.Tensor, gamma, tau: float, *, seed: int | None = None,
                         generator: torch.Generator | None = None):
        """``(h_0, z_t)`` of Duo's dense curriculum: :func:`duo_kernels.tempered_softmax_embedding` on E."""
        return tempered_softmax_embedding(x0, gamma, tau, self.weight, seed=seed, generator=generator,
                                          impl=self.impl)

    def topk_curriculum(self, x0: torch.Tensor, gamma, k: int, tau: float, *, reference_compat: bool = False,
                        seed: int | None = None, generator: torch.Generator | None = None):
        """``(h_0, z_t)`` of Duo++'s efficient curriculum: :func:`duo_kernels.tempered_softmax_topk_embedding`."""
        return tempered_softmax_topk_embedding(x0, gamma, self.vocab_size, k, tau, self.weight,
                                               reference_compat=reference_compat, seed=seed, generator=generator,
                                               deterministic=self.deterministic, impl=self.impl)

    def extra_repr(self) -> str:
        extra = "" if self.impl == "auto" else f", impl={self.impl!r}"
        extra += ", deterministic=True" if self.deterministic else ""
        return f"{self.vocab_size}, {self.dim}{extra}"


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
