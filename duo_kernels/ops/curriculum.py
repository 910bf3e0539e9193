"""Duo++'s efficient curriculum as a fast op (duo-math §4.4): ``tempered_softmax_topk``.

Same signature as :func:`duo_kernels.reference.tempered_softmax_topk` plus ``impl``; same Philox
stream, exact ``z_t`` rule by default and ``reference_compat=True`` for the published one.

====================  ===========================================================================
``impl``              kernel
====================  ===========================================================================
``"cpu"``             C++ (``csrc/cpu/curriculum.cpp``), 4 tokens at a time in AVX2 where the CPU
                      has it (``csrc/cpu/topk_avx2.h``), else one token per iteration; any k
``"cuda"``            CUDA (``csrc/cuda/curriculum.cu``), one thread per token, k <= 128
``"triton"``          Triton (:mod:`duo_kernels.triton.curriculum`), a tile of tokens x slots per
                      program, k <= 128
``"reference"``       the PyTorch reference (any k)
====================  ===========================================================================

Every per-token quantity (order statistics, clean coordinate, tail, log-normaliser) is float64 in
every kernel, so ids and ``z_t`` equal the reference's for the same seed (up to comparisons within
an ulp) and the float32 weights agree to their rounding. The tail uses the cancelled closed form of
the reference (``erfcx``), exact to rounding at any temperature. With ``impl="auto"`` on a GPU,
k > 128 runs the reference.

Under ``torch.compile``, ``"cpu"``, ``"cuda"`` and ``"triton"`` run through the ``torch.library`` op
``duo_kernels::tempered_softmax_topk`` with a fake implementation, as the ops of
:mod:`duo_kernels.ops.forward_process` (int ``seed`` under ``torch.compile(fullgraph=True)``); eager
calls run the same kernel directly, without the dispatcher's per-call cost (the op's outputs have
no autograd history, so nothing else differs).
"""

from __future__ import annotations

import torch

from duo_kernels import _validate
from duo_kernels._dispatch import check_impl, resolve_backend
from duo_kernels.reference import curriculum as _reference
from duo_kernels.reference.curriculum import _check_k
from duo_kernels.ops.forward_process import _native, _on_device
from duo_kernels.reference.forward_process import _check_tokens, _log_snr
from duo_kernels.rng import resolve_seed, seed_from_int64, seed_to_int64

# The GPU kernels keep a token's k order statistics and shuffle records in registers / local memory.
MAX_DEVICE_K = 128
# The smallest temperature: every backend scales the drawn coordinates (|w| < 10) by 1 / tau in float64,
# which must stay finite.
MIN_TAU = 1e-300


def _native_topk(x0, gamma, vocab_size, k, tau, reference_compat, seed):
    b, l = x0.shape
    ids = torch.empty((b, l, k), dtype=torch.int64, device=x0.device)
    weights = torch.empty((b, l, k), dtype=torch.float32, device=x0.device)
    z_t = torch.empty_like(x0)
    bad = _native().tempered_softmax_topk(ids, weights, z_t, x0, gamma, vocab_size, k, 1.0 / tau, reference_compat,
                                          seed)
    return ids, weights, z_t, bad


def _triton_topk(x0, gamma, vocab_size, k, tau, reference_compat, seed):
    from duo_kernels.triton import curriculum

    return curriculum.tempered_softmax_topk(x0, gamma, vocab_size, k, 1.0 / tau, reference_compat, seed)


def _reference_topk(x0, gamma, vocab_size, k, tau, reference_compat, seed):
    return _reference.tempered_softmax_topk(x0, gamma, vocab_size, k, tau, reference_compat=reference_compat,
                                            seed=seed)


_TOPK = {"reference": _reference_topk, "cpu": _native_topk, "cuda": _native_topk, "triton": _triton_topk}
_TOPK_LARGE_K = {"reference": _reference_topk, "cpu": _native_topk}


# The "cpu", "cuda" and "triton" kernels run as one torch.library op (the seed as the int64 of its bits,
# duo_kernels.rng.seed_to_int64); "reference" is plain PyTorch.
@torch.library.custom_op("duo_kernels::tempered_softmax_topk", mutates_args=())
def _topk_op(x0: torch.Tensor, gamma: torch.Tensor, vocab_size: int, k: int, tau: float, reference_compat: bool,
             seed: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, L, k) int64, weights (B, L, k) float32, z_t (B, L) int64) from validated arguments."""
    return _TOPK[backend](x0, gamma, vocab_size, k, tau, reference_compat, seed_from_int64(seed))[:3]


@_topk_op.register_fake
def _(x0, gamma, vocab_size, k, tau, reference_compat, seed, backend):
    b, l = x0.shape
    return x0.new_empty((b, l, k)), x0.new_empty((b, l, k), dtype=torch.float32), x0.new_empty((b, l))


def tempered_softmax_topk(x0: torch.Tensor, gamma, vocab_size: int, k: int, tau: float, *,
                          reference_compat: bool = False, seed: int | None = None,
                          generator: torch.Generator | None = None, impl: str = "auto"):
    """Duo++'s sparse tempered softmax: the k largest coordinates of ``softmax(w / tau)`` with their
    token ids, and ``z_t = argmax w`` (duo-math §4.4), in O(k^2) per token and no (B, L, V) memory.

    The fast twin of :func:`duo_kernels.reference.tempered_softmax_topk`, whose docstring gives the
    law, the two modes and the stream; for one seed every backend returns the same ids and ``z_t``
    and weights equal to float32 rounding.

    Args:
        x0: clean token ids, (B, L) int64 in [0, V).
        gamma: log-SNR parameter (1.2), a number or (B,), (B, 1), (B, L); finite.
        vocab_size: V >= 2.
        k: number of visible coordinates, in [1, V - 1] ([2, V - 1] with ``reference_compat``);
            ``impl="cuda"`` and ``"triton"`` take k <= 128.
        tau: softmax temperature in [MIN_TAU, inf), MIN_TAU = 1e-300 (the paper runs use 1e-3, then
            1e-10).
        reference_compat: reproduce the published sampler's rule (default False).
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.
        impl: backend (:mod:`duo_kernels._dispatch`).

    Returns:
        ids: (B, L, k) int64, distinct per token; the slot of the clean coordinate (if visible) holds x.
        weights: (B, L, k) float32 in [0, 1], summing to at most 1; constants for autograd (no gradient
            to ``gamma``) except with ``impl="reference"``, whose PyTorch math autograd follows.
        z_t: (B, L) int64.

    Example::

        >>> from duo_kernels import reference
        >>> x0 = torch.tensor([[17, 4, 9]])
        >>> ids, weights, z_t = tempered_softmax_topk(x0, -3.0, 50258, k=2, tau=1e-3, seed=0)
        >>> ref = reference.tempered_softmax_topk(x0, -3.0, 50258, k=2, tau=1e-3, seed=0)
        >>> torch.equal(ids, ref[0]) and torch.equal(z_t, ref[2]) and torch.allclose(weights, ref[1])
        True
    """
    vocab_size = _validate.check_vocab_size(vocab_size)
    _validate.check_tensor("x0", x0, dtypes=(torch.int64,), ndim=2)
    k = _check_k(k, vocab_size, reference_compat)
    tau = _validate.check_positive_number("tau", tau)
    if tau < MIN_TAU:
        raise ValueError(f"tau must be >= {MIN_TAU} (the coordinates scaled by 1 / tau must stay finite), got {tau}")
    gamma = _validate.per_token("gamma", gamma, tuple(x0.shape), device=x0.device)
    seed = resolve_seed(seed, generator)
    kernels = _TOPK
    if k > MAX_DEVICE_K:
        backend = check_impl(impl)
        if backend in ("cuda", "triton"):
            raise NotImplementedError(f"tempered_softmax_topk: impl={backend!r} supports k <= {MAX_DEVICE_K}, got "
                                      f"k = {k}; use impl='reference' (or impl='cpu' for CPU tensors)")
        kernels = _TOPK_LARGE_K
    backend = resolve_backend("tempered_softmax_topk", impl, str(x0.device), kernels)
    args = (x0.contiguous(), _on_device(gamma, x0.device).detach(), vocab_size, k, tau, bool(reference_compat))
    if backend == "cpu" and not torch.compiler.is_compiling():
        # Eager CPU calls run the kernel without the op dispatcher, whose per-call cost (~0.1-0.3 ms)
        # matches the kernel's at B·L = 1024, and the kernel checks the ids and gammas it reads: on a
        # bad value the validators below raise their errors (the outputs carry no autograd history).
        *out, bad = _native_topk(*args, seed)
        if not bad:
            return tuple(out)
    _check_tokens(x0, vocab_size)
    _log_snr("gamma", gamma, x0.shape, x0.device)
    if backend == "reference":
        return _reference_topk(x0, gamma, vocab_size, k, tau, bool(reference_compat), seed)
    if torch.compiler.is_compiling():
        return _topk_op(*args, seed_to_int64(seed), backend)
    return _TOPK[backend](*args, seed)[:3]
