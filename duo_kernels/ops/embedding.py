"""The curriculum's embedding layer as fast ops: ``relaxed_embedding`` (Duo++'s top-k soft input),
``tempered_softmax_topk_embedding`` (the top-k sampler composed with it) and
``tempered_softmax_embedding`` (Duo's dense curriculum, never storing the (B, L, V) latent).

Backends (``impl=``):

| op | "triton" | "cpu" (plain PyTorch, no build) | "reference" |
|---|---|---|---|
| relaxed_embedding | gather fwd; dweights; dE by atomics or, ``deterministic=True``, by a row-sorted segment sum | ``F.embedding_bag`` under autograd (its backward is deterministic) | einsum over gathered rows |
| tempered_softmax_embedding | one pass over the vocabulary per token block with Philox-generated scores and online softmax; bwd recomputes P (deterministic) | the reference chunked over tokens, P recomputed in bwd | dense (B, L, V) float64 latent and softmax |

Gradients flow to ``weight`` (and to ``weights`` for ``relaxed_embedding``); token ids, ``gamma`` and
``tau`` are not differentiable. Kernel design and numerics: :mod:`duo_kernels.triton.curriculum_embedding`.
The Triton launches are ``torch.library`` ops, and ``tempered_softmax_topk_embedding`` calls the
``duo_kernels::tempered_softmax_topk`` op (:mod:`duo_kernels.ops.curriculum`), so
``torch.compile(fullgraph=True)`` traces ``relaxed_embedding`` and ``tempered_softmax_topk_embedding``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from duo_kernels import _validate, reference
from duo_kernels._dispatch import dispatch, pure_torch, resolve_backend
from duo_kernels.reference import rng as _rng
from duo_kernels.reference.curriculum import _check_embedding
from duo_kernels.reference.forward_process import _check_tokens, _log_snr
from duo_kernels.reference.transform import gaussian_params
from duo_kernels.ops.curriculum import tempered_softmax_topk as _topk
from duo_kernels.rng import resolve_seed, seed_from_int64, seed_to_int64

# Elements of the (tokens, V) temporaries of the dense CPU path, per chunk of tokens (several such).
_CPU_CHUNK = 1 << 22


def _triton_kernels():
    from duo_kernels.triton import curriculum_embedding  # imports triton: only when that backend runs

    return curriculum_embedding


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (the reference's promotion)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---- relaxed_embedding ----------------------------------------------------------------------------------

@pure_torch
def _relaxed_cpu(weight, ids, weights):
    # Plain autograd through embedding_bag: torch's CPU backward sums each row of dE in a fixed order
    # (bitwise reproducible) and is ~2x faster than an index_add_ of weights * dh.
    dtype = _compute_dtype(weight, weights)
    b, l, k = ids.shape
    h = F.embedding_bag(ids.reshape(-1, k), weight.to(dtype), per_sample_weights=weights.reshape(-1, k).to(dtype),
                        mode="sum")
    return h.view(b, l, weight.shape[1])


# The Triton launches are torch.library custom ops with fake (meta) implementations, so that
# torch.compile traces through the autograd.Functions below without looking into the kernels.
@torch.library.custom_op("duo_kernels::relaxed_embedding_forward", mutates_args=())
def _relaxed_forward_op(weight: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return _triton_kernels().relaxed_embedding_forward(weight, ids, weights)


@_relaxed_forward_op.register_fake
def _(weight, ids, weights):
    return weight.new_empty(ids.shape[0], weight.shape[1], dtype=_compute_dtype(weight, weights))


@torch.library.custom_op("duo_kernels::relaxed_embedding_backward", mutates_args=())
def _relaxed_backward_op(dh: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                         need_weight: bool, need_weights: bool,
                         deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dE (V, d), dweights (N, k)) in the accumulation dtype; a gradient not needed is an empty tensor."""
    d_weight, d_weights = _triton_kernels().relaxed_embedding_backward(dh, weight, ids, weights, need_weight,
                                                                       need_weights, deterministic)
    empty = dh.new_empty(0, dtype=_compute_dtype(weight, weights))
    return (empty if d_weight is None else d_weight), (empty.clone() if d_weights is None else d_weights)


@_relaxed_backward_op.register_fake
def _(dh, weight, ids, weights, need_weight, need_weights, deterministic):
    dtype = _compute_dtype(weight, weights)
    return (dh.new_empty(weight.shape if need_weight else (0,), dtype=dtype),
            dh.new_empty(ids.shape if need_weights else (0,), dtype=dtype))


def _relaxed_triton(weight, ids, weights, deterministic):
    return _RelaxedEmbedding.apply(weight, ids, weights, deterministic)


class _RelaxedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, ids, weights, deterministic):
        b, l, k = ids.shape
        ids2, weights2 = ids.reshape(-1, k).contiguous(), weights.reshape(-1, k).contiguous()
        weight_rows = weight if weight.stride(-1) == 1 else weight.contiguous()
        h = _relaxed_forward_op(weight_rows, ids2, weights2)
        ctx.save_for_backward(weight_rows, ids2, weights2)
        ctx.deterministic = deterministic
        ctx.weight_dtype, ctx.weights_dtype, ctx.weights_shape = weight.dtype, weights.dtype, weights.shape
        return h.view(b, l, weight.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        weight, ids, weights = ctx.saved_tensors
        need_weight, _, need_weights = ctx.needs_input_grad[:3]
        d_weight, d_weights = _relaxed_backward_op(dh.reshape(-1, dh.shape[-1]).contiguous(), weight, ids, weights,
                                                   need_weight, need_weights, ctx.deterministic)
        d_weight = d_weight.to(ctx.weight_dtype) if need_weight else None
        d_weights = d_weights.to(ctx.weights_dtype).view(ctx.weights_shape) if need_weights else None
        return d_weight, None, d_weights, None


_RELAXED = {"triton": _relaxed_triton, "cpu": _relaxed_cpu, "reference": reference.relaxed_embedding}


def _check_relaxed(weight, ids, weights, deterministic) -> None:
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {deterministic!r}")
    vocab_size = _check_embedding(weight)
    _validate.check_tensor("ids", ids, dtypes=(torch.int64,), ndim=3)
    if ids.shape[-1] == 0:
        raise ValueError(f"ids must hold k >= 1 slots per token, got shape {tuple(ids.shape)}")
    _validate.check_tensor("weights", weights, dtypes=_validate.FLOAT_DTYPES, ndim=3)
    if weights.shape != ids.shape:
        raise ValueError(f"weights must have the shape of ids {tuple(ids.shape)}, got {tuple(weights.shape)}")
    _validate.check_same_device(weight=weight, ids=ids, weights=weights)
    _validate.check_ids("ids", ids, vocab_size, ndim=3)


def relaxed_embedding(weight: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, *,
                      deterministic: bool = False, impl: str = "auto") -> torch.Tensor:
    """``h_0[b, l] = sum_j weights[b, l, j] * E[ids[b, l, j]]``, accumulated in fp32: the embedding of a
    top-k relaxation (duo-math §4.4 "model consumption"; the reference's ``embedding_bag(mode='sum')``).

    Args:
        weight: the embedding matrix E, (V, d), float16/bfloat16/float32/float64.
        ids: (B, L, k) int64 in [0, V).
        weights: (B, L, k), any float dtype.
        deterministic: make dE bitwise reproducible on the Triton backend (row-sorted segment sums
            instead of atomics; costs a sort of the B L k ids). The CPU and reference paths are always
            deterministic.
        impl: backend, see :mod:`duo_kernels.ops.embedding`.

    Returns:
        h_0: (B, L, d) float32 (float64 if ``weight`` or ``weights`` is float64); differentiable with
        respect to ``weight`` (``dE[v] = sum of weights * dh over the slots holding v``) and ``weights``
        (``dweights[b, l, j] = <dh[b, l], E[ids[b, l, j]]>``).

    Example::

        >>> E = torch.eye(4, requires_grad=True)
        >>> h = relaxed_embedding(E, torch.tensor([[[2, 0]]]), torch.tensor([[[0.75, 0.25]]]))
        >>> h.tolist()
        [[[0.25, 0.0, 0.75, 0.0]]]
        >>> h.sum().backward(); E.grad[:, 0].tolist()
        [0.25, 0.0, 0.75, 0.0]
    """
    _check_relaxed(weight, ids, weights, deterministic)
    backend = resolve_backend("relaxed_embedding", impl, str(weight.device), _RELAXED)
    if backend == "triton":
        return _relaxed_triton(weight, ids, weights, deterministic)
    return _RELAXED[backend](weight, ids, weights)


def tempered_softmax_topk_embedding(x0: torch.Tensor, gamma, vocab_size: int, k: int, tau: float,
                                    weight: torch.Tensor, *, reference_compat: bool = False,
                                    seed: int | None = None, generator: torch.Generator | None = None,
                                    deterministic: bool = False, impl: str = "auto"):
    """Duo++'s efficient curriculum input in one call: ``tempered_softmax_topk`` then ``relaxed_embedding``
    (duo-math §4.4). Same stream and ``z_t`` as ``tempered_softmax_topk`` with the same seed.

    Args:
        x0, gamma, vocab_size, k, tau, reference_compat, seed, generator: as
            :func:`duo_kernels.reference.tempered_softmax_topk`.
        weight: the embedding matrix E, (vocab_size, d), any float dtype, on x0's device.
        deterministic, impl: as :func:`relaxed_embedding`.

    Returns:
        h_0: (B, L, d) float32, differentiable with respect to ``weight``.
        z_t: (B, L) int64.

    Example::

        >>> E = torch.randn(100, 8, requires_grad=True)
        >>> h, z_t = tempered_softmax_topk_embedding(torch.tensor([[3, 7]]), -3.0, 100, 2, 1e-3, E, seed=0)
        >>> h.shape, z_t.shape
        (torch.Size([1, 2, 8]), torch.Size([1, 2]))
    """
    vocab_size = _validate.check_vocab_size(vocab_size)
    rows = _check_embedding(weight)
    if rows != vocab_size:
        raise ValueError(f"weight must have vocab_size = {vocab_size} rows, got shape {tuple(weight.shape)}")
    _validate.check_tensor("x0", x0)
    _validate.check_same_device(x0=x0, weight=weight)
    ids, weights, z_t = _topk(x0, gamma, vocab_size, k, tau, reference_compat=reference_compat, seed=seed,
                              generator=generator, impl=impl)
    return relaxed_embedding(weight, ids, weights, deterministic=deterministic, impl=impl), z_t


# ---- tempered_softmax_embedding (dense) ----------------------------------------------------------------

def _dense_chunk(x, a_tilde, s_tilde, inv_tau, seed, vocab_size, t0, t1):
    """The reference's (softmax(w / tau), argmax w) of tokens [t0, t1), float64, from the same stream."""
    n = t1 - t0
    eps = _rng.counter_stream(seed, n * vocab_size, _rng.float32_normal, offset=t0 * vocab_size,
                              device=x.device).view(n, vocab_size)
    w = s_tilde[t0:t1, None] * eps.to(torch.float64)
    w.scatter_add_(1, x[t0:t1, None], a_tilde[t0:t1, None])
    return torch.softmax(w * inv_tau, dim=-1), w.argmax(dim=-1)


def _dense_token_chunks(n: int, vocab_size: int):
    step = max(1, _CPU_CHUNK // 4 // vocab_size)  # the reference Philox holds several int64 copies
    return [(t0, min(n, t0 + step)) for t0 in range(0, n, step)]


@pure_torch
def _dense_forward_cpu(x, a_tilde, s_tilde, tau, weight, seed):
    dtype = _compute_dtype(weight)
    n, (v, d) = x.numel(), weight.shape
    weight = weight.to(dtype)
    h = torch.empty(n, d, dtype=dtype)
    z = torch.empty(n, dtype=torch.int64)
    for t0, t1 in _dense_token_chunks(n, v):
        probs, z[t0:t1] = _dense_chunk(x, a_tilde, s_tilde, 1.0 / tau, seed, v, t0, t1)
        h[t0:t1] = probs.to(dtype) @ weight
    return h, z, (a_tilde, s_tilde)


def _dense_backward_cpu(dh, x, saved, vocab_size, tau, seed):
    a_tilde, s_tilde = saved
    d_weight = torch.zeros(vocab_size, dh.shape[1], dtype=dh.dtype)
    for t0, t1 in _dense_token_chunks(x.numel(), vocab_size):
        probs, _ = _dense_chunk(x, a_tilde, s_tilde, 1.0 / tau, seed, vocab_size, t0, t1)
        d_weight.addmm_(probs.to(dh.dtype).T, dh[t0:t1])
    return d_weight


@torch.library.custom_op("duo_kernels::tempered_softmax_embedding_forward", mutates_args=())
def _dense_forward_op(x: torch.Tensor, a_tilde: torch.Tensor, s_tilde: torch.Tensor, weight: torch.Tensor,
                      tau: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h (N, d) fp32, z_t (N,) int64, c (N,) fp32, statistics (3, N) fp32) for N flattened tokens."""
    h, z, (c, stats) = _triton_kernels().dense_forward(x, a_tilde, s_tilde, tau, weight, seed_from_int64(seed))
    return h, z, c, stats


@_dense_forward_op.register_fake
def _(x, a_tilde, s_tilde, weight, tau, seed):
    n = x.shape[0]
    return (weight.new_empty(n, weight.shape[1], dtype=torch.float32), x.new_empty(n),
            weight.new_empty(n, dtype=torch.float32), weight.new_empty(3, n, dtype=torch.float32))


@torch.library.custom_op("duo_kernels::tempered_softmax_embedding_backward", mutates_args=())
def _dense_backward_op(dh: torch.Tensor, x: torch.Tensor, c: torch.Tensor, stats: torch.Tensor, vocab_size: int,
                       seed: int) -> torch.Tensor:
    return _triton_kernels().dense_backward(dh, x, (c, stats), vocab_size, seed_from_int64(seed))


@_dense_backward_op.register_fake
def _(dh, x, c, stats, vocab_size, seed):
    return dh.new_empty(vocab_size, dh.shape[1], dtype=torch.float32)


def _dense_forward_triton(x, a_tilde, s_tilde, tau, weight, seed):
    h, z, c, stats = _dense_forward_op(x, a_tilde, s_tilde, weight, tau, seed_to_int64(seed))
    return h, z, (c, stats)


def _dense_backward_triton(dh, x, saved, vocab_size, tau, seed):
    return _dense_backward_op(dh, x, *saved, vocab_size, seed_to_int64(seed))


_DENSE_BACKWARD = {"cpu": _dense_backward_cpu, "triton": _dense_backward_triton}


class _TemperedSoftmaxEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, x0, a_tilde, s_tilde, tau, seed, backend, forward):
        b, l = x0.shape
        x = x0.reshape(-1).contiguous()
        weight_rows = weight if weight.stride(-1) == 1 else weight.contiguous()
        h, z, saved = forward(x, a_tilde.reshape(-1).contiguous(), s_tilde.reshape(-1).contiguous(), tau,
                              weight_rows, seed)
        ctx.save_for_backward(x, *saved)
        ctx.vocab_size, ctx.tau, ctx.seed, ctx.backend, ctx.weight_dtype = weight.shape[0], tau, seed, backend, weight.dtype
        ctx.mark_non_differentiable(z)
        return h.view(b, l, weight.shape[1]), z.view(b, l)

    @staticmethod
    @once_differentiable
    def backward(ctx, dh, _dz):
        x, *saved = ctx.saved_tensors
        dh = dh.reshape(-1, dh.shape[-1]).contiguous()
        d_weight = _DENSE_BACKWARD[ctx.backend](dh, x, tuple(saved), ctx.vocab_size, ctx.tau, ctx.seed)
        return d_weight.to(ctx.weight_dtype), None, None, None, None, None, None, None


def tempered_softmax_embedding(x0: torch.Tensor, gamma, tau: float, weight: torch.Tensor, *,
                               seed: int | None = None, generator: torch.Generator | None = None,
                               impl: str = "auto"):
    """Duo's dense soft embedding ``h_0 = softmax(w / tau) @ E`` and ``z_t = argmax w`` (duo-math §4.2,
    4.1), without a (B, L, V) tensor: on Triton the scores are generated tile by tile from the Philox
    stream, softmax-ed online and multiplied into E ("flash attention with generated scores",
    §4.5); backward regenerates them to form ``dE = P^T dh``. The CPU path runs the reference a few
    tokens at a time (V elements of latent per token, bounded chunks).

    Same stream as :func:`duo_kernels.reference.tempered_softmax_embedding` (``eps[t, v]`` is the
    float32 normal of counter ``t V + v``): for the same seed ``z_t`` is the reference's exactly
    (barring exact ties) and ``h_0`` agrees to fp32 rounding.

    Args:
        x0: clean token ids, (B, L) int64 in [0, V).
        gamma: log-SNR parameter (1.2), a number or (B,), (B, 1), (B, L); finite.
        tau: softmax temperature > 0 (the paper runs use 1e-3).
        weight: the embedding matrix E, (V, d); V = ``weight.shape[0]`` >= 2. float16/bfloat16/float32
            on every backend (loaded as fp32); float64 on "cpu" and "reference" ("auto" picks one).
        seed, generator: see :func:`duo_kernels.rng.resolve_seed`.
        impl: backend, see :mod:`duo_kernels.ops.embedding`. On Triton the P @ E tiles use fp32 FMA
            ("ieee") unless ``torch.set_float32_matmul_precision("high")`` allows TF32.

    Returns:
        h_0: (B, L, d) float32 (float64 for a float64 ``weight``); differentiable with respect to ``weight``.
        z_t: (B, L) int64.

    Example::

        >>> E = torch.randn(50, 8, requires_grad=True)
        >>> h, z_t = tempered_softmax_embedding(torch.tensor([[1, 2, 3]]), -3.0, 1e-3, E, seed=0)
        >>> ref_h, ref_z = reference.tempered_softmax_embedding(torch.tensor([[1, 2, 3]]), -3.0, 1e-3, E, seed=0)
        >>> bool((z_t == ref_z).all()), bool(torch.allclose(h, ref_h, atol=1e-6))
        (True, True)
        >>> h.sum().backward(); E.grad.shape
        torch.Size([50, 8])
    """
    vocab_size = _check_tokens(x0, _check_embedding(weight))
    _validate.check_same_device(x0=x0, weight=weight)
    tau = _validate.check_positive_number("tau", tau)
    gamma = _log_snr("gamma", gamma, x0.shape, x0.device)
    seed = resolve_seed(seed, generator)
    kernels = {"triton": _dense_forward_triton, "cpu": _dense_forward_cpu,
               "reference": reference.tempered_softmax_embedding}
    if weight.dtype == torch.float64:
        if impl == "triton":
            raise NotImplementedError("tempered_softmax_embedding: impl='triton' computes in float32 and weight is "
                                      "float64; pass a float32 weight or use impl='cpu' / 'reference'")
        del kernels["triton"]
    backend, forward = dispatch("tempered_softmax_embedding", impl, weight.device, kernels)
    if backend == "reference":
        return reference.tempered_softmax_embedding(x0, gamma, tau, weight, seed=seed)
    a_tilde, s_tilde = gaussian_params(gamma)
    return _TemperedSoftmaxEmbedding.apply(weight, x0, a_tilde, s_tilde, tau, seed, backend, forward)
