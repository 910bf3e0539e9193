"""The forward processes of Duo in plain PyTorch: the Gaussian latent and its argmax (duo-math §1.2,
§5.3-5.4) and the uniform-state marginal (§3.1).

Every draw comes from the Philox streams of :mod:`duo_kernels.rng`. The per-token ops address them
the same way: with ``N = B * L`` tokens flattened row-major, token ``t`` reads block ``b`` of the
stream at counter ``b * N + t``, so the words of one token never depend on the batch shape beyond
``N`` and a per-token kernel finds them from its own index. Each docstring says which blocks and
words feed which quantity; the kernels reproduce those layouts exactly.
"""

from __future__ import annotations

import math

import torch

from duo_kernels import _validate
from duo_kernels.reference import rng as _rng
from duo_kernels.reference.transform import gaussian_params
from duo_kernels.rng import resolve_seed


def _block_words(seed: int, num_tokens: int, blocks, device) -> tuple[torch.Tensor, ...]:
    """Philox words ``w0..w3`` of token ``t`` in stream block ``b``: counter ``b * num_tokens + t``.

    ``blocks`` is an int (words of shape (num_tokens,)) or a sequence of ints (words of shape
    (len(blocks), num_tokens)).
    """
    block = torch.as_tensor(blocks, dtype=torch.int64, device=device).unsqueeze(-1)
    counters = block * num_tokens + torch.arange(num_tokens, dtype=torch.int64, device=device)
    return _rng.philox4x32(seed, counters)


def _log_snr(name: str, gamma, shape, device) -> torch.Tensor:
    """``gamma`` (§1.1, any finite real) broadcast to ``shape`` in float64."""
    gamma = _validate.per_token(name, gamma, tuple(shape), device=device)
    _validate.check_range(name, gamma, -math.inf, math.inf, lo_open=True, hi_open=True)
    return gamma


def _signal_level(name: str, alpha, shape, device) -> torch.Tensor:
    """A discrete signal level ``alpha`` in (0, 1] broadcast to ``shape`` in float64."""
    alpha = _validate.per_token(name, alpha, tuple(shape), device=device)
    _validate.check_range(name, alpha, 0.0, 1.0, lo_open=True, hi_open=False)
    return alpha


def _check_pair_order(gamma_t: torch.Tensor, gamma_s: torch.Tensor) -> None:
    if _validate.values_checked(gamma_s) and bool((gamma_s > gamma_t).any()):
        raise ValueError("gamma_s must be <= gamma_t (s is the earlier, less noisy time)")


def _check_tokens(x0, vocab_size) -> int:
    vocab_size = _validate.check_vocab_size(vocab_size)
    _validate.check_ids("x0", x0, vocab_size, ndim=2)
    return vocab_size


def _descending_order_statistics(log_u: torch.Tensor, count: int) -> torch.Tensor:
    """The k largest of ``count`` iid N(0, 1), descending, from k uniforms given as ``log_u`` (..., k).

    The largest of n uniforms is U^(1/n) and, given it, the next is that times U'^(1/(n-1)), ...
    (§4.4 step 1): ``C_j = sum_{i <= j} log(U_i) / (count - i)``, order statistic ``j`` is
    ``Phi^-1(exp(C_j)) = -Phi^-1(-expm1(C_j))``; the complement form keeps the ~1/count distance
    of ``exp(C_j)`` from 1 exact.
    """
    k = log_u.shape[-1]
    divisors = count - torch.arange(k, dtype=log_u.dtype, device=log_u.device)
    return -torch.special.ndtri(-torch.expm1(torch.cumsum(log_u / divisors, dim=-1)))


def _dense_latent(x0: torch.Tensor, gamma: torch.Tensor, vocab_size: int, seed: int) -> torch.Tensor:
    """The Gaussian latent ``w = a~ e_x + s~ eps`` (1.1) of every token, (B, L, V) float64.

    ``eps[t, v]`` is the float32 Philox normal of counter ``t * V + v`` (Box-Muller of words 0 and 1,
    as :func:`duo_kernels.reference.rng.normal`); the arithmetic is float64.
    """
    b, l = x0.shape
    eps = _rng.counter_stream(seed, b * l * vocab_size, _rng.float32_normal, device=x0.device).view(b, l, vocab_size)
    a_tilde, s_tilde = gaussian_params(gamma)
    w = s_tilde[..., None] * eps.to(torch.float64)
    return w.scatter_add_(-1, x0[..., None], a_tilde[..., None])


def gaussian_argmax_dense(x0: torch.Tensor, gamma, vocab_size: int, *, seed: int | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """``z_t = argmax_j (a~ e_x + s~ eps)_j`` by the literal definition (1.4) (duo-math §1.1-1.2).

    Builds the whole (B, L, V) latent, so it is for small V and for testing :func:`gaussian_argmax`.

    Args:
        x0: clean token ids, (B, L) int64 in [0, V).
        gamma: log-SNR parameter (1.2), a number or (B,), (B, 1), (B, L); any float dtype, finite.
        vocab_size: V >= 2.
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.

    Returns:
        z_t: (B, L) int64.

    Stream: ``eps[t, v]``, for token ``t`` of the ``N = B L`` row-major tokens, is the float32 normal
    of counter ``t * V + v`` (Box-Muller of float32 uniforms of words 0 and 1); ``a~, s~`` and ``w``
    are float64.

    Example::

        >>> x0 = torch.tensor([[3, 1, 4]])
        >>> gaussian_argmax_dense(x0, -3.0, 10, seed=0).shape
        torch.Size([1, 3])
    """
    vocab_size = _check_tokens(x0, vocab_size)
    gamma = _log_snr("gamma", gamma, x0.shape, x0.device)
    seed = resolve_seed(seed, generator)
    return _dense_latent(x0, gamma, vocab_size, seed).argmax(dim=-1)


def _argmax_draws(x0: torch.Tensor, vocab_size: int, seed: int):
    """Per-token ``(n, M, j*)`` of §1.2 from block 0 (see :func:`gaussian_argmax`), each (B, L)."""
    x = x0.reshape(-1)
    w0, w1, w2, w3 = _block_words(seed, x.numel(), 0, x0.device)
    n = _rng.box_muller(_rng.uniform24(w0), _rng.uniform24(w1), torch.float64)
    log_u = torch.log(_rng.uniform24(w2).to(torch.float64))
    max_others = _descending_order_statistics(log_u[:, None], vocab_size - 1)[:, 0]
    j = _rng.randint32_below(w3, vocab_size - 1)
    j_star = j + (j >= x).to(torch.int64)  # skips x: uniform over V \ {x}
    return n.view_as(x0), max_others.view_as(x0), j_star.view_as(x0)


def _argmax_decision(x0, n, max_others, j_star, gamma) -> torch.Tensor:
    """``z = x`` iff ``n + mu > M`` with ``mu = a~/s~ = exp(-gamma/2)`` (§1.2), else ``j*``."""
    mu = torch.exp(-gamma / 2)
    return torch.where(n + mu > max_others, x0, j_star)


def gaussian_argmax(x0: torch.Tensor, gamma, vocab_size: int, *, seed: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """``z_t = argmax(a~ e_x + s~ eps)`` drawn exactly in O(1) per token (duo-math §1.2).

    The clean coordinate wins iff ``n + mu > M``, with ``n`` its own standard normal, ``M`` the
    maximum of the V - 1 other standard normals and ``mu = a~/s~ = exp(-gamma/2)``; otherwise the
    winner is uniform over V \\ {x}. Same law as :func:`gaussian_argmax_dense`, without the (B, L, V)
    latent; ``P(z_t = x) = alpha + (1 - alpha)/V`` with ``alpha = T(gamma)`` (1.5)-(1.6).

    Args:
        x0: clean token ids, (B, L) int64 in [0, V).
        gamma: log-SNR parameter (1.2), a number or (B,), (B, 1), (B, L); any float dtype, finite.
        vocab_size: V >= 2.
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.

    Returns:
        z_t: (B, L) int64.

    Stream (kernels reproduce it exactly): ``N = B L`` tokens flattened row-major; token ``t`` uses
    counter ``t`` (block 0) and its words ``w0..w3``:

    - ``n = box_muller(uniform24(w0), uniform24(w1))`` evaluated in float64;
    - ``M = -ndtri(-expm1(log(U) / (V - 1)))`` with ``U = uniform24(w2)`` in float64;
    - ``j = randint32_below(w3, V - 1)``, ``j* = j + (j >= x)``;
    - ``z_t = x if n + exp(-gamma/2) > M else j*``, all comparisons in float64.

    Example::

        >>> x0 = torch.zeros(2, 5, dtype=torch.int64)
        >>> z = gaussian_argmax(x0, torch.tensor([-4.0, 0.0]), 50258, seed=1)
        >>> z.shape, z.dtype
        (torch.Size([2, 5]), torch.int64)
    """
    vocab_size = _check_tokens(x0, vocab_size)
    gamma = _log_snr("gamma", gamma, x0.shape, x0.device)
    seed = resolve_seed(seed, generator)
    n, max_others, j_star = _argmax_draws(x0, vocab_size, seed)
    return _argmax_decision(x0, n, max_others, j_star, gamma)


def gaussian_argmax_pair(x0: torch.Tensor, gamma_t, gamma_s, vocab_size: int, *, seed: int | None = None,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_t, z_s)`` of the deterministic discrete trajectory: two argmaxes of one shared noise
    (duo-math §5.3-5.4), the pair DCD trains on.

    Both latents ``a~_u e_x + s~_u eps`` (u in {t, s}) share ``eps``; per token that means the same
    ``(n, M, j*)`` decides both, so ``z_u`` is ``x`` or ``j*`` and, because ``mu`` grows as gamma
    falls, ``z_t = x`` implies ``z_s = x`` (carry-over).

    Args:
        x0: clean token ids, (B, L) int64 in [0, V).
        gamma_t: log-SNR of the noisier time t, a number or (B,), (B, 1), (B, L); finite.
        gamma_s: log-SNR of the earlier time s, same shapes; ``gamma_s <= gamma_t`` (s <= t).
        vocab_size: V >= 2.
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.

    Returns:
        (z_t, z_s): two (B, L) int64 tensors.

    Stream: exactly that of :func:`gaussian_argmax` (block 0, counter ``t``); ``z_t`` equals
    ``gaussian_argmax(x0, gamma_t, V, seed=seed)`` and ``z_s`` equals
    ``gaussian_argmax(x0, gamma_s, V, seed=seed)``.

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
    n, max_others, j_star = _argmax_draws(x0, vocab_size, seed)
    return (_argmax_decision(x0, n, max_others, j_star, gamma_t),
            _argmax_decision(x0, n, max_others, j_star, gamma_s))


def usdm_forward(x0: torch.Tensor, alpha_t, vocab_size: int, *, seed: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``z_t ~ q_t(. | x) = Cat(alpha_t e_x + (1 - alpha_t)/V)`` (duo-math §3.1, eq. 3.1).

    As the reference ``q_xt``: with probability ``1 - alpha_t`` the token is replaced by a uniform id
    of [0, V) (which may be x itself).

    Args:
        x0: clean token ids, (B, L) int64 in [0, V).
        alpha_t: signal level in (0, 1], a number or (B,), (B, 1), (B, L).
        vocab_size: V >= 2.
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.

    Returns:
        z_t: (B, L) int64.

    Stream: token ``t`` of the ``N = B L`` row-major tokens uses counter ``t`` (block 0):
    ``u = uniform24(w0)`` (float32, compared in float64: replace iff ``u < 1 - alpha_t``) and the
    replacement ``randint32_below(w1, V)``.

    Example::

        >>> x0 = torch.arange(6).reshape(2, 3)
        >>> bool((usdm_forward(x0, 1.0, 6, seed=0) == x0).all())
        True
    """
    vocab_size = _check_tokens(x0, vocab_size)
    alpha_t = _signal_level("alpha_t", alpha_t, x0.shape, x0.device)
    seed = resolve_seed(seed, generator)
    w0, w1, _, _ = _block_words(seed, x0.numel(), 0, x0.device)
    move = _rng.uniform24(w0).to(torch.float64).view_as(x0) < 1 - alpha_t
    return torch.where(move, _rng.randint32_below(w1, vocab_size).view_as(x0), x0)
