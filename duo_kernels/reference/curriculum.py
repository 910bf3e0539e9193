"""The curriculum relaxations of Duo and Duo++ in plain PyTorch (duo-math §4).

- Duo's dense curriculum (§4.2): ``h_0 = softmax(w / tau) @ E`` over the full Gaussian latent ``w``
  (:func:`tempered_softmax_dense`, :func:`tempered_softmax_embedding`).
- Duo++'s efficient curriculum (§4.4): simulate only the k largest coordinates of ``w`` per token,
  with the rest folded into an analytic tail (:func:`tempered_softmax_topk`), and embed the k
  weighted rows (:func:`relaxed_embedding`).

Stream layouts are in each docstring; per-token blocks follow :mod:`duo_kernels.reference.forward_process`
(token ``t`` of ``N`` reads block ``b`` at counter ``b * N + t``).
"""

from __future__ import annotations

import math

import torch

from duo_kernels import _validate
from duo_kernels.reference import rng as _rng
from duo_kernels.reference.forward_process import (_block_words, _check_tokens, _dense_latent,
                                                   _descending_order_statistics, _log_snr)
from duo_kernels.reference.transform import gaussian_params
from duo_kernels.rng import resolve_seed


def _check_k(k, vocab_size: int, reference_compat: bool) -> int:
    if not _validate.is_int(k):
        raise ValueError(f"k must be an int, got {k!r}")
    lowest = 2 if reference_compat else 1
    if not lowest <= k <= vocab_size - 1:
        why = " (reference_compat needs k >= 2: its tail starts at o_{k-2})" if reference_compat else ""
        raise ValueError(f"k must be in [{lowest}, vocab_size - 1 = {vocab_size - 1}], got {k}{why}")
    return int(k)


def _check_embedding(weight) -> int:
    """An embedding matrix (V, d) of a float dtype; returns V."""
    _validate.check_tensor("weight", weight, dtypes=_validate.FLOAT_DTYPES, ndim=2)
    if weight.shape[0] < 2:
        raise ValueError(f"weight must have a row per token of a vocabulary of >= 2, got {tuple(weight.shape)}")
    return weight.shape[0]


def _partial_fisher_yates(picks: torch.Tensor) -> torch.Tensor:
    """An ordered tuple of distinct ints by k swaps of a virtual array ``A = [0, 1, ..., n)``.

    Step ``j`` swaps ``A[j]`` with ``A[picks[:, j]]`` (``j <= picks[:, j] < n``) and outputs the value
    it moved to position ``j``; with uniform picks the output is a uniform ordered k-tuple without
    repetition. The array is never stored: step ``m`` left value ``moved_val[:, m]`` at position
    ``picks[:, m]``, and a position reads its latest such record or else holds itself — k registers
    and O(k^2) compares per token in a kernel.

    Args:
        picks: (N, k) int64.

    Returns:
        (N, k) int64 in [0, n).
    """
    num, k = picks.shape
    out = torch.empty_like(picks)
    moved_val = torch.empty_like(picks)

    def value_at(pos: torch.Tensor, j: int) -> torch.Tensor:
        if j == 0:
            return pos
        hits = picks[:, :j] == pos[:, None]
        latest = torch.where(hits, torch.arange(j, device=picks.device), -1).max(dim=1, keepdim=True)
        recorded = moved_val[:, :j].gather(1, latest.indices.clamp(min=0)).squeeze(1)
        return torch.where(latest.values.squeeze(1) >= 0, recorded, pos)

    for j in range(k):
        out[:, j] = value_at(picks[:, j], j)
        moved_val[:, j] = value_at(torch.full((num,), j, dtype=picks.dtype, device=picks.device), j)
    return out


def _topk_draws(x: torch.Tensor, a_tilde: torch.Tensor, s_tilde: torch.Tensor, vocab_size: int, k: int,
                seed: int):
    """The random part of :func:`tempered_softmax_topk` for N flattened tokens.

    Returns:
        w_x: (N,) float64, the clean coordinate ``a~ + s~ n``;
        others: (N, k) float64, the k largest of the V - 1 noise coordinates, descending;
        other_ids: (N, k) int64, their distinct ids in V \\ {x}, a uniform ordered k-tuple.
    """
    num = x.numel()
    w0, w1, w2, w3 = _block_words(seed, num, 0, x.device)
    w_x = a_tilde + s_tilde * _rng.box_muller(_rng.uniform53(w0, w1), _rng.uniform53(w2, w3), torch.float64)
    w0, w1, w2, w3 = _block_words(seed, num, range(1, k + 1), x.device)  # each (k, N)
    log_u = torch.log(_rng.uniform53(w0, w1)).T
    others = s_tilde[:, None] * _descending_order_statistics(log_u, vocab_size - 1)
    pool = vocab_size - 1 - torch.arange(k, device=x.device)[:, None]  # n - j
    picks = (torch.arange(k, device=x.device)[:, None] + _rng.randint_below(w2, w3, pool)).T
    ids = _partial_fisher_yates(picks)
    return w_x, others, ids + (ids >= x[:, None]).to(torch.int64)


def _log_truncated_mean_exp(c: torch.Tensor, s_tilde: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """``log E[exp(Y / tau) | Y < c]`` for ``Y ~ N(0, s~^2)`` (duo-math §4.4 step 5), float64.

    With ``a = c / s~`` and ``b = s~ / tau`` the closed form is ``b^2/2 + log Phi(a - b) - log Phi(a)``.
    For ``a < b`` its first two terms cancel (each ~6e4 at tau = 1e-3, ~7e6 at 1e-4); writing
    ``log Phi(y) = log(erfcx(-y / sqrt 2) / 2) - y^2/2`` cancels the squares analytically:
    ``b^2/2 + log Phi(a - b) = a (b - a/2) + log(erfcx((b - a) / sqrt 2) / 2)``, exact to rounding.
    """
    a = c / s_tilde
    b = s_tilde * inv_tau
    below = a < b
    cancelled = a * (b - a / 2) + torch.log(torch.special.erfcx((b - a).clamp(min=0) / math.sqrt(2)) / 2)
    direct = b * b / 2 + torch.special.log_ndtr((a - b).clamp(min=0))
    return torch.where(below, cancelled, direct) - torch.special.log_ndtr(a)


def _exact_slots(x, w_x, others, other_ids, vocab_size: int):
    """Exact visible set: the k largest of all V coordinates, sorted descending.

    The draws know k + 1 values: ``w_x`` and the k largest others ``o_0 > ... > o_{k-1}``. The
    visible set is the top k of these; the one left over (``o_{k-1}`` if ``w_x`` entered, else
    ``w_x``) is a known hidden coordinate; the remaining V - k - 1 others are iid N(0, s~^2) below
    ``o_{k-1}`` in both cases. Slot 0 is the argmax: ``z_t = ids[:, 0]``.

    Returns (scores, ids, hidden, truncation point, tail count, z_t).
    """
    k = others.shape[1]
    rank = (others > w_x[:, None]).sum(dim=1, keepdim=True)  # slot of w_x; k when not visible
    slot = torch.arange(k, device=x.device)
    source = slot - (slot > rank).to(torch.int64)  # o_j moves one slot down below w_x
    is_clean = slot == rank
    scores = torch.where(is_clean, w_x[:, None], others.gather(1, source))
    ids = torch.where(is_clean, x[:, None], other_ids.gather(1, source))
    hidden = torch.where(rank[:, 0] < k, others[:, -1], w_x)
    tail_count = torch.full_like(w_x, vocab_size - k - 1)
    return scores, ids, hidden, others[:, -1], tail_count, ids[:, 0]


def _reference_slots(x, w_x, others, other_ids, vocab_size: int):
    """The published sampler's steps 3, 4 and 9 (duo-math §4.4): a clean coordinate above ``o_{k-1}``
    overwrites the last slot, the tail then starts at ``o_{k-2}`` with V - k members, and ``z_t = x``."""
    k = others.shape[1]
    visible = w_x > others[:, -1]
    scores = torch.cat([others[:, :-1], torch.where(visible, w_x, others[:, -1])[:, None]], dim=1)
    ids = torch.cat([other_ids[:, :-1], torch.where(visible, x, other_ids[:, -1])[:, None]], dim=1)
    hidden = torch.where(visible, -math.inf, w_x)
    truncation = torch.where(visible, others[:, k - 2], others[:, -1])
    tail_count = torch.where(visible, vocab_size - k, vocab_size - k - 1).to(torch.float64)
    return scores, ids, hidden, truncation, tail_count, torch.where(visible, x, ids[:, 0])


def tempered_softmax_topk(x0: torch.Tensor, gamma, vocab_size: int, k: int, tau: float, *,
                          reference_compat: bool = False, seed: int | None = None,
                          generator: torch.Generator | None = None):
    """Duo++'s sparse tempered softmax: the k largest coordinates of ``softmax(w / tau)`` with their
    token ids, and the discrete latent ``z_t = argmax w`` (duo-math §4.4), in O(k^2) per token.

    ``w = a~ e_x + s~ eps`` (1.1) is never built: the clean coordinate ``w_x = a~ + s~ n`` and the k
    largest ``o_0 > ... > o_{k-1}`` of the V - 1 noise coordinates are drawn directly, the noise
    coordinates get distinct uniformly random ids in V \\ {x}, and the unseen coordinates enter the
    softmax normaliser through the analytic mean of ``exp(Y / tau)`` for ``Y ~ N(0, s~^2)`` truncated
    below the smallest drawn noise value.

    Exact mode (default): the visible slots hold the k largest of all V coordinates, sorted
    descending (so slot 0 is the argmax) — the top k of the k + 1 drawn values. The normaliser is
    ``sum(exp(visible / tau)) + exp(hidden / tau) + (V - k - 1) E[exp(Y / tau) | Y < o_{k-1}]``,
    where ``hidden`` is the drawn value left out (``o_{k-1}`` if ``w_x`` entered the top k, else
    ``w_x``) and the V - k - 1 undrawn noise coordinates are exactly the ones below ``o_{k-1}``: this
    is ``E[Z | drawn values]`` for the true normaliser Z. ``z_t = x`` iff ``w_x > o_0``, else the id
    of ``o_0``; in both cases ``z_t = ids[..., 0]``, and ``P(z_t = x) = alpha + (1 - alpha)/V`` with
    ``alpha = T(gamma)`` (1.5). With ``k = V - 1`` there is no tail and the weights are the exact
    softmax.

    ``reference_compat=True`` reproduces the published code's steps 3, 4 and 9: a clean coordinate
    above ``o_{k-1}`` overwrites the last slot (slots 0..k-2 stay the noise order statistics), the
    tail then starts at ``o_{k-2}`` with V - k members (else at ``o_{k-1}`` with V - k - 1 plus
    ``w_x``), and ``z_t = x`` whenever ``w_x`` is in the top k (duo-math §11.3-4; inflates
    ``P(z_t = x)``, Appendix A.5). It needs ``k >= 2``. The ids stay uniformly assigned in both modes
    (the reference's Floyd ordering bias, step 8, is not reproduced).

    The weights are not renormalised, as in the reference: each is (an estimate of) the dense
    ``softmax(w / tau)`` probability of its coordinate, so ``relaxed_embedding`` equals the dense
    ``h_0`` minus the unseen coordinates' share (~4e-5 at k = 2, tau = 1e-3, Appendix A.4).
    Renormalising would instead move that share onto the visible rows, and at k = 1 would make every
    weight 1, i.e. a hard embedding with no relaxation left.

    Args:
        x0: clean token ids, (B, L) int64 in [0, V).
        gamma: log-SNR parameter (1.2), a number or (B,), (B, 1), (B, L); finite.
        vocab_size: V >= 2.
        k: number of visible coordinates, in [1, V - 1] ([2, V - 1] with ``reference_compat``).
        tau: softmax temperature > 0 (the paper runs use 1e-3).
        reference_compat: reproduce the published sampler's rule (default False).
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.

    Returns:
        ids: (B, L, k) int64, distinct per token; the slot of the clean coordinate (if visible) holds x.
        weights: (B, L, k) float32 in [0, 1], summing to at most 1; computed in float64.
        z_t: (B, L) int64.

    Stream (the same in both modes): ``N = B L`` tokens flattened row-major; token ``t`` reads block
    ``b`` at counter ``b * N + t``:

    - block 0: ``n = box_muller(uniform53(w0, w1), uniform53(w2, w3))`` (a float64 normal),
      ``w_x = a~ + s~ n``;
    - block ``1 + j``, ``j = 0..k-1``: ``U_j = uniform53(w0, w1)`` gives the order statistic
      ``o_j = -s~ ndtri(-expm1(sum_{i <= j} log(U_i) / (V - 1 - i)))``; ``r_j = j +
      randint_below(w2, w3, V - 1 - j)`` is step ``j`` of a partial Fisher-Yates shuffle of the
      virtual array ``[0, V - 1)`` (swap positions j and r_j; the value moved to position j is the
      pool index of ``o_j``), and the id is ``pool + (pool >= x)``.

    The draws of ``k`` are a prefix of those of ``k + 1``; in exact mode ``z_t`` does not depend on k.

    Example::

        >>> x0 = torch.tensor([[17, 4, 9]])
        >>> ids, weights, z_t = tempered_softmax_topk(x0, -3.0, 50258, k=2, tau=1e-3, seed=0)
        >>> ids.shape, weights.dtype, bool((z_t == ids[..., 0]).all())
        (torch.Size([1, 3, 2]), torch.float32, True)
    """
    vocab_size = _check_tokens(x0, vocab_size)
    k = _check_k(k, vocab_size, reference_compat)
    inv_tau = 1.0 / _validate.check_positive_number("tau", tau)
    gamma = _log_snr("gamma", gamma, x0.shape, x0.device)
    seed = resolve_seed(seed, generator)

    x = x0.reshape(-1)
    a_tilde, s_tilde = gaussian_params(gamma.reshape(-1))
    w_x, others, other_ids = _topk_draws(x, a_tilde, s_tilde, vocab_size, k, seed)
    slots = _reference_slots if reference_compat else _exact_slots
    scores, ids, hidden, truncation, tail_count, z_t = slots(x, w_x, others, other_ids, vocab_size)

    log_tail = torch.where(tail_count > 0,
                           torch.log(tail_count) + _log_truncated_mean_exp(truncation, s_tilde, inv_tau),
                           -math.inf)
    log_z = torch.logsumexp(torch.cat([scores * inv_tau, (hidden * inv_tau)[:, None], log_tail[:, None]], 1),
                            dim=1, keepdim=True)
    weights = torch.exp(scores * inv_tau - log_z)
    b, l = x0.shape
    return ids.view(b, l, k), weights.to(torch.float32).view(b, l, k), z_t.view(b, l)


def relaxed_embedding(weight: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``h_0 = sum_j weights[..., j] * E[ids[..., j]]``: the embedding of a top-k relaxation
    (duo-math §4.4, "model consumption"; the reference's ``embedding_bag(mode='sum')``).

    Args:
        weight: the embedding matrix E, (V, d), any float dtype.
        ids: (B, L, k) int64 in [0, V).
        weights: (B, L, k), any float dtype.

    Returns:
        h_0: (B, L, d) float32 (float64 if ``weight`` or ``weights`` is float64); differentiable with
        respect to ``weight`` and ``weights``.

    Example::

        >>> E = torch.eye(4)
        >>> h = relaxed_embedding(E, torch.tensor([[[2, 0]]]), torch.tensor([[[0.75, 0.25]]]))
        >>> h.tolist()
        [[[0.25, 0.0, 0.75, 0.0]]]
    """
    _validate.check_ids("ids", ids, _check_embedding(weight), ndim=3)
    _validate.check_tensor("weights", weights, dtypes=_validate.FLOAT_DTYPES, ndim=3)
    if weights.shape != ids.shape:
        raise ValueError(f"weights must have the shape of ids {tuple(ids.shape)}, got {tuple(weights.shape)}")
    _validate.check_same_device(weight=weight, ids=ids, weights=weights)
    dtype = torch.promote_types(torch.promote_types(weight.dtype, weights.dtype), torch.float32)
    return torch.einsum("blk,blkd->bld", weights.to(dtype), weight.to(dtype)[ids])


def _dense_softmax(x0, gamma, vocab_size: int, tau, seed, generator):
    """Validated float64 ``(softmax(w / tau), argmax w)`` of :func:`tempered_softmax_dense`."""
    inv_tau = 1.0 / _validate.check_positive_number("tau", tau)
    gamma = _log_snr("gamma", gamma, x0.shape, x0.device)
    seed = resolve_seed(seed, generator)
    w = _dense_latent(x0, gamma, vocab_size, seed)
    return torch.softmax(w * inv_tau, dim=-1), w.argmax(dim=-1)


def tempered_softmax_dense(x0: torch.Tensor, gamma, vocab_size: int, tau: float, *, seed: int | None = None,
                           generator: torch.Generator | None = None):
    """Duo's dense curriculum input ``softmax(w / tau)`` and ``z_t = argmax w`` (duo-math §4.2).

    Args:
        x0: clean token ids, (B, L) int64 in [0, V).
        gamma: log-SNR parameter (1.2), a number or (B,), (B, 1), (B, L); finite.
        vocab_size: V >= 2.
        tau: softmax temperature > 0.
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.

    Returns:
        probs: (B, L, V) float32 (computed in float64).
        z_t: (B, L) int64.

    Stream: that of :func:`duo_kernels.reference.forward_process.gaussian_argmax_dense` (``eps[t, v]``
    is the float32 normal of counter ``t * V + v``), so ``z_t`` equals ``gaussian_argmax_dense``'s
    for the same seed.

    Example::

        >>> probs, z_t = tempered_softmax_dense(torch.tensor([[1, 2]]), -3.0, 8, 0.1, seed=0)
        >>> probs.shape, bool((probs.argmax(-1) == z_t).all())
        (torch.Size([1, 2, 8]), True)
    """
    vocab_size = _check_tokens(x0, vocab_size)
    probs, z_t = _dense_softmax(x0, gamma, vocab_size, tau, seed, generator)
    return probs.to(torch.float32), z_t


def tempered_softmax_embedding(x0: torch.Tensor, gamma, tau: float, weight: torch.Tensor, *,
                               seed: int | None = None, generator: torch.Generator | None = None):
    """Duo's dense soft embedding ``h_0 = softmax(w / tau) @ E`` and ``z_t = argmax w`` (duo-math §4.2, 4.1).

    Args:
        x0: clean token ids, (B, L) int64 in [0, V).
        gamma: log-SNR parameter (1.2), a number or (B,), (B, 1), (B, L); finite.
        tau: softmax temperature > 0.
        weight: the embedding matrix E, (V, d), any float dtype; V = ``weight.shape[0]`` >= 2.
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.

    Returns:
        h_0: (B, L, d) float32 (float64 if ``weight`` is float64); differentiable with respect to
        ``weight`` (``dE = softmax(w / tau)^T dh_0``).
        z_t: (B, L) int64.

    Stream: that of :func:`tempered_softmax_dense`.

    Example::

        >>> E = torch.randn(8, 4, requires_grad=True)
        >>> h, z_t = tempered_softmax_embedding(torch.tensor([[1, 2]]), -3.0, 1e-3, E, seed=0)
        >>> h.sum().backward(); E.grad.shape
        torch.Size([8, 4])
    """
    vocab_size = _check_tokens(x0, _check_embedding(weight))
    _validate.check_same_device(x0=x0, weight=weight)
    probs, z_t = _dense_softmax(x0, gamma, vocab_size, tau, seed, generator)
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return probs.to(dtype) @ weight.to(dtype), z_t
