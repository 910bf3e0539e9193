"""The exact forward processes as fast ops (duo-math §1.2, §3.1, §5.3-5.4): ``gaussian_argmax``,
``gaussian_argmax_pair`` and ``usdm_forward``.

Each op has the signature of its twin in :mod:`duo_kernels.reference.forward_process` plus
``impl``, validates its arguments with the reference's own checks, and runs one of:

====================  ===========================================================================
``impl``              kernel
====================  ===========================================================================
``"cpu"``             C++ (``csrc/cpu/forward_process.cpp``), one token per iteration, 2 threads
``"cuda"``            CUDA (``csrc/cuda/forward_process.cu``), one thread per token
``"triton"``          Triton (:mod:`duo_kernels.triton.forward_process`), CUDA tensors or the
                      interpreter
``"reference"``       the PyTorch reference
====================  ===========================================================================

All of them draw the same Philox stream and do the per-token arithmetic in float64, so for one seed
they return the reference's ``z_t`` exactly (up to decisions within an ulp of their threshold). No
(B, L, V) memory, no host synchronization (value checks read CPU tensors only; see
:mod:`duo_kernels._validate`).

``"cpu"``, ``"cuda"`` and ``"triton"`` run through the ``torch.library`` ops
``duo_kernels::gaussian_argmax``, ``duo_kernels::gaussian_argmax_pair`` and
``duo_kernels::usdm_forward`` (validated arguments in, newly allocated ids out, the backend an ``str``
argument as in :mod:`duo_kernels.ops.nelbo`, the seed the int64 of its bits), with fake
implementations, so ``torch.compile(fullgraph=True)`` traces each as one node. Under compile give an
int ``seed``: ``seed=None`` reads a generator on the host, a graph break.
"""

from __future__ import annotations

import functools

import torch

from duo_kernels._dispatch import resolve_backend
from duo_kernels.reference import forward_process as _reference
from duo_kernels.reference.forward_process import _check_pair_order, _check_tokens, _log_snr, _signal_level
from duo_kernels.rng import resolve_seed, seed_from_int64, seed_to_int64


def _on_device(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A validated per-token scalar view on the kernels' device (a CPU number stays a CPU 0-dim
    tensor through the reference's checks)."""
    return value if value.device == device else value.to(device)


@functools.cache
def _native():
    """The native module, looked up once (dispatch has checked that it builds)."""
    from duo_kernels import _native

    return _native.load()


def _triton():
    from duo_kernels.triton import forward_process

    return forward_process


# Every kernel takes validated arguments: x0 (B, L) int64 contiguous, float64 (B, L) views, an int seed.
def _native_argmax(x0, gamma, vocab_size, seed):
    z_t = torch.empty_like(x0)
    _native().gaussian_argmax(z_t, x0, gamma, vocab_size, seed)
    return z_t


def _native_pair(x0, gamma_t, gamma_s, vocab_size, seed):
    z_t, z_s = torch.empty_like(x0), torch.empty_like(x0)
    _native().gaussian_argmax_pair(z_t, z_s, x0, gamma_t, gamma_s, vocab_size, seed)
    return z_t, z_s


def _native_usdm(x0, alpha, vocab_size, seed):
    z_t = torch.empty_like(x0)
    _native().usdm_forward(z_t, x0, alpha, vocab_size, seed)
    return z_t


_ARGMAX = {
    "reference": lambda x0, gamma, vocab_size, seed: _reference.gaussian_argmax(x0, gamma, vocab_size, seed=seed),
    "cpu": _native_argmax,
    "cuda": _native_argmax,
    "triton": lambda *args: _triton().gaussian_argmax(*args),
}
_PAIR = {
    "reference": lambda x0, gamma_t, gamma_s, vocab_size, seed: _reference.gaussian_argmax_pair(
        x0, gamma_t, gamma_s, vocab_size, seed=seed),
    "cpu": _native_pair,
    "cuda": _native_pair,
    "triton": lambda *args: _triton().gaussian_argmax_pair(*args),
}
_USDM = {
    "reference": lambda x0, alpha, vocab_size, seed: _reference.usdm_forward(x0, alpha, vocab_size, seed=seed),
    "cpu": _native_usdm,
    "cuda": _native_usdm,
    "triton": lambda *args: _triton().usdm_forward(*args),
}


# ---- torch.library ops ("cpu", "cuda", "triton"; "reference" is plain PyTorch) ----------------------------
# The seed travels as the int64 of its bits (duo_kernels.rng.seed_to_int64); the inputs are validated.

@torch.library.custom_op("duo_kernels::gaussian_argmax", mutates_args=())
def _gaussian_argmax_op(x0: torch.Tensor, gamma: torch.Tensor, vocab_size: int, seed: int,
                        backend: str) -> torch.Tensor:
    """z_t (B, L) int64."""
    return _ARGMAX[backend](x0, gamma, vocab_size, seed_from_int64(seed))


@_gaussian_argmax_op.register_fake
def _(x0, gamma, vocab_size, seed, backend):
    return x0.new_empty(x0.shape)


@torch.library.custom_op("duo_kernels::gaussian_argmax_pair", mutates_args=())
def _gaussian_argmax_pair_op(x0: torch.Tensor, gamma_t: torch.Tensor, gamma_s: torch.Tensor, vocab_size: int,
                             seed: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, z_s), two (B, L) int64."""
    return _PAIR[backend](x0, gamma_t, gamma_s, vocab_size, seed_from_int64(seed))


@_gaussian_argmax_pair_op.register_fake
def _(x0, gamma_t, gamma_s, vocab_size, seed, backend):
    return x0.new_empty(x0.shape), x0.new_empty(x0.shape)


@torch.library.custom_op("duo_kernels::usdm_forward", mutates_args=())
def _usdm_forward_op(x0: torch.Tensor, alpha_t: torch.Tensor, vocab_size: int, seed: int,
                     backend: str) -> torch.Tensor:
    """z_t (B, L) int64."""
    return _USDM[backend](x0, alpha_t, vocab_size, seed_from_int64(seed))


@_usdm_forward_op.register_fake
def _(x0, alpha_t, vocab_size, seed, backend):
    return x0.new_empty(x0.shape)


def gaussian_argmax(x0: torch.Tensor, gamma, vocab_size: int, *, seed: int | None = None,
                    generator: torch.Generator | None = None, impl: str = "auto") -> torch.Tensor:
    """``z_t = argmax(a~ e_x + s~ eps)`` drawn exactly in O(1) per token (duo-math §1.2).

    The fast twin of :func:`duo_kernels.reference.gaussian_argmax`: same arguments, same law
    ``P(z_t = x) = alpha + (1 - alpha)/V`` with ``alpha = T(gamma)``, same Philox stream (token ``t``
    of the row-major ``B L`` tokens uses counter ``t``), so the same seed gives the same ``z_t``.

    Args:
        x0: clean token ids, (B, L) int64 in [0, V).
        gamma: log-SNR parameter (1.2), a number or (B,), (B, 1), (B, L); any float dtype, finite.
        vocab_size: V >= 2.
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.
        impl: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``
            (:mod:`duo_kernels._dispatch`).

    Returns:
        z_t: (B, L) int64 on x0's device.

    Example::

        >>> from duo_kernels import reference
        >>> x0 = torch.zeros(2, 5, dtype=torch.int64)
        >>> gamma = torch.tensor([-4.0, 0.0])
        >>> torch.equal(gaussian_argmax(x0, gamma, 50258, seed=1), reference.gaussian_argmax(x0, gamma, 50258, seed=1))
        True
    """
    vocab_size = _check_tokens(x0, vocab_size)
    gamma = _log_snr("gamma", gamma, x0.shape, x0.device)
    seed = resolve_seed(seed, generator)
    backend = resolve_backend("gaussian_argmax", impl, str(x0.device), _ARGMAX)
    if backend == "reference":
        return _ARGMAX["reference"](x0, gamma, vocab_size, seed)
    return _gaussian_argmax_op(x0.contiguous(), _on_device(gamma, x0.device), vocab_size, seed_to_int64(seed),
                               backend)


def gaussian_argmax_pair(x0: torch.Tensor, gamma_t, gamma_s, vocab_size: int, *, seed: int | None = None,
                         generator: torch.Generator | None = None,
                         impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_t, z_s)``: two argmaxes of one shared Gaussian noise, the DCD pair (duo-math §5.3-5.4).

    The fast twin of :func:`duo_kernels.reference.gaussian_argmax_pair`: per token one ``(n, M, j*)``
    decides both, so ``z_t = x`` implies ``z_s = x`` and a token flips at most once; ``z_t`` equals
    ``gaussian_argmax(x0, gamma_t, V, seed=seed)`` and ``z_s`` the same with ``gamma_s``.

    Args:
        x0: clean token ids, (B, L) int64 in [0, V).
        gamma_t: log-SNR of the noisier time t, a number or (B,), (B, 1), (B, L); finite.
        gamma_s: log-SNR of the earlier time s, same shapes; ``gamma_s <= gamma_t``.
        vocab_size: V >= 2.
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.
        impl: backend (:mod:`duo_kernels._dispatch`).

    Returns:
        (z_t, z_s): two (B, L) int64 tensors.

    Example::

        >>> x0 = torch.tensor([[5, 6, 7, 8]])
        >>> z_t, z_s = gaussian_argmax_pair(x0, -2.0, -3.0, 100, seed=2)
        >>> bool(((z_t != x0) | (z_s == x0)).all())
        True
    """
    vocab_size = _check_tokens(x0, vocab_size)
    gamma_t = _log_snr("gamma_t", gamma_t, x0.shape, x0.device)
    gamma_s = _log_snr("gamma_s", gamma_s, x0.shape, x0.device)
    _check_pair_order(gamma_t, gamma_s)
    seed = resolve_seed(seed, generator)
    backend = resolve_backend("gaussian_argmax_pair", impl, str(x0.device), _PAIR)
    if backend == "reference":
        return _PAIR["reference"](x0, gamma_t, gamma_s, vocab_size, seed)
    return _gaussian_argmax_pair_op(x0.contiguous(), _on_device(gamma_t, x0.device), _on_device(gamma_s, x0.device),
                                    vocab_size, seed_to_int64(seed), backend)


def usdm_forward(x0: torch.Tensor, alpha_t, vocab_size: int, *, seed: int | None = None,
                 generator: torch.Generator | None = None, impl: str = "auto") -> torch.Tensor:
    """``z_t ~ Cat(alpha_t e_x + (1 - alpha_t)/V)`` (duo-math §3.1, eq. 3.1), as the reference ``q_xt``.

    The fast twin of :func:`duo_kernels.reference.usdm_forward` (same stream: token ``t`` uses
    counter ``t``; replace x iff ``uniform24(w0) < 1 - alpha_t``, by ``randint32_below(w1, V)``).

    Args:
        x0: clean token ids, (B, L) int64 in [0, V).
        alpha_t: signal level in (0, 1], a number or (B,), (B, 1), (B, L).
        vocab_size: V >= 2.
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.
        impl: backend (:mod:`duo_kernels._dispatch`).

    Returns:
        z_t: (B, L) int64.

    Example::

        >>> x0 = torch.arange(6).reshape(2, 3)
        >>> bool((usdm_forward(x0, 1.0, 6, seed=0) == x0).all())
        True
    """
    vocab_size = _check_tokens(x0, vocab_size)
    alpha_t = _signal_level("alpha_t", alpha_t, x0.shape, x0.device)
    seed = resolve_seed(seed, generator)
    backend = resolve_backend("usdm_forward", impl, str(x0.device), _USDM)
    if backend == "reference":
        return _USDM["reference"](x0, alpha_t, vocab_size, seed)
    return _usdm_forward_op(x0.contiguous(), _on_device(alpha_t, x0.device), vocab_size, seed_to_int64(seed), backend)
