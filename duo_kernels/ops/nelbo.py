"""The USDM NELBO as fused ops: ``usdm_nelbo`` on logits and ``linear_usdm_nelbo`` on hidden states.

Backends (``impl=``), with the memory each needs beyond inputs and outputs:

- ``"triton"``: :mod:`duo_kernels.triton.nelbo`, one program per row; the forward passes over the row
  twice, the backward once and writes d logits once. O(B·L).
- ``"cpu"``: the same per-row math in PyTorch over chunks of rows (fp32 math, fp64 row scalars).
  O(B·L + chunk·V), no native build.
- ``"reference"``: :mod:`duo_kernels.reference.nelbo`, float64 and dense: several (B, L, V) float64
  tensors.

The derivation (the stable ``log1p`` form of eq. 3.5, the cancellation-free form for small alpha_t,
and the gradient 3.6) is in the docstring of :mod:`duo_kernels.triton.nelbo`. The ``"triton"`` and ``"cpu"`` paths are ``torch.library`` custom ops
(``duo_kernels::usdm_nelbo``, ``duo_kernels::linear_usdm_nelbo`` and their ``_backward`` ops) with fake
implementations and registered autograd, so ``torch.compile(fullgraph=True)`` traces them as single
nodes. The backend is an ``str`` argument of the op, resolved from ``impl`` before the op is called
(once per trace under ``torch.compile``, where ``DUO_KERNELS_IMPL`` is read at trace time): one op per
function instead of one per backend, and the backend shows in the graph. ``"reference"`` is plain
PyTorch and is traced as such.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from duo_kernels import _losses, _validate
from duo_kernels._dispatch import pure_torch, resolve_backend as _resolve_backend
from duo_kernels.reference import nelbo as _ref

# Rows per chunk of the "cpu" path: 2^18 fp32 elements (1 MiB, cache-sized) per temporary, a handful of
# them. Measured with 1 thread on 2 cores shared with other jobs, B·L = 256, V = 50258, bf16, fwd+bwd:
# 255 ms at 2^18, 445 ms at 2^20, 634 ms at 2^22 (the float64 reference: 1399 ms).
CPU_CHUNK_ELEMENTS = 2**18
# linear_usdm_nelbo: at least LINEAR_MIN_CHUNKS token chunks (so a chunk's logits are at most 1/16 of
# B·L·V) and at most LINEAR_CHUNK_ELEMENTS logits per chunk (1335 tokens at V = 50257: 128 MiB of bf16
# logits plus as much of their gradient).
LINEAR_MIN_CHUNKS = 16
LINEAR_CHUNK_ELEMENTS = 2**26

Tensor = torch.Tensor


# ---- the chunked PyTorch backend ("cpu") -----------------------------------------------------------

def _rows(t: Tensor, start: int, stop: int) -> Tensor:
    """Rows [start, stop) of a (B, L, V) tensor as (stop - start, V): a view when (B, L) flattens,
    else a copy of just those rows."""
    b, l, v = t.shape
    try:
        return t.view(b * l, v)[start:stop]
    except RuntimeError:
        parts = []
        while start < stop:
            seq, pos = divmod(start, l)
            take = min(l - pos, stop - start)
            parts.append(t[seq, pos:pos + take])
            start += take
        return torch.cat(parts)


def row_chunks(n: int, vocab_size: int, elements: int = CPU_CHUNK_ELEMENTS):
    """(start, stop) row ranges of at most ``elements // vocab_size`` rows (at least 1)."""
    rows = max(1, elements // vocab_size)
    return [(start, min(n, start + rows)) for start in range(0, n, rows)]


def nelbo_row_constants(vocab_size: int, alpha: Tensor, dalpha: Tensor, z_t: Tensor, x0: Tensor):
    """float64 per-row scalars of the fused form: 1 - a, r = K a/(1 - a), coeff = alpha'/(K a), kappa,
    ne = [z_t != x0], c2 = eq kappa + ne."""
    k = float(vocab_size)
    one_minus_a = 1.0 - alpha
    r = k * alpha / one_minus_a
    coeff = dalpha / (k * alpha)
    kappa = 1.0 / (1.0 + r)
    ne = (z_t != x0).to(torch.float64)
    c2 = ne + (1.0 - ne) * kappa
    return one_minus_a, r, coeff, kappa, ne, c2


def nelbo_gradient_row_scalars(k: float, one_minus_a: Tensor, r: Tensor, coeff: Tensor, c2: Tensor, ne: Tensor,
                               dalpha: Tensor, log_p_i: Tensor, log_p_m: Tensor, row_sum: Tensor):
    """float64 per-row scalars of d loss / d l_k = scale ((x1 + x2 p_k) p_k/(1 + t_k) - y p_k + [k = i] s_i
    + [k = m] s_m), from ``log p_i``, ``log p_m`` and the forward's row sum (W for r < 1, U for r >= 1):
    (3.6) for r >= 1, its cancellation-free form for r < 1 (see :mod:`duo_kernels.triton.nelbo`)."""
    small = r < 1.0
    p_i, p_m = torch.exp(log_p_i), torch.exp(log_p_m)
    # r >= 1: scale = coeff, x1 = c2 r, x2 = 0, y = c2 U + s_i + s_m
    t_i, t_m = r * p_i, r * p_m
    big_si = t_i / (1.0 + t_i) * (k / (one_minus_a * (1.0 + t_i)) - c2 * k - ne * r)
    big_sm = ne * r * t_m / (1.0 + t_m)
    # r < 1: s_i, s_m and y over r^2; scale = coeff r^2 = alpha' r/(1 - a)
    rs = torch.where(small, r, 0.5)
    t_i, t_m = rs * p_i, rs * p_m
    small_si = torch.where(ne == 0, p_i * (1.0 + rs - k * torch.expm1(log_p_i)) / ((1.0 + t_i) ** 2 * (1.0 + rs)),
                           -(k + rs) * (p_i / (1.0 + t_i)) ** 2)
    small_sm = ne * p_m / (1.0 + t_m)
    scale = torch.where(small, dalpha / one_minus_a * rs, coeff)
    x1 = torch.where(small, 0.0, c2 * r)
    x2 = torch.where(small, -c2, 0.0)
    s_i = torch.where(small, small_si, big_si)
    s_m = torch.where(small, small_sm, big_sm)
    y = torch.where(small, s_i + s_m - c2 * row_sum, c2 * row_sum + s_i + s_m)
    return scale, x1, x2, y, s_i, s_m


def _cpu_rows(logits: Tensor, keep: Tensor | None, start: int, stop: int) -> Tensor:
    """fp32 rows (possibly the caller's own tensor: never modify in place); a masked row is replaced by
    zeros (finite), so that NaN in it cannot leak."""
    x = _rows(logits, start, stop).to(torch.float32)
    if keep is not None:
        x = torch.where(keep[start:stop, None], x, 0.0)
    return x


def _log1p_minus_over_square_fp32(t: Tensor) -> Tensor:
    """(t - log(1 + t))/t^2 of fp32 t >= 0: its series (to t^11) below 0.25, where the difference would
    cancel; relative error under 3e-6. (Over t^2, so that tiny t cannot underflow.)"""
    small = t.clamp_max(0.25)
    series = torch.zeros_like(t)
    for n in range(13, 2, -1):
        series = small * ((-1.0) ** n / n + series)
    direct = (t - torch.log1p(t)) / (t * t).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(t < 0.25, 0.5 + series, direct)


def _cpu_forward(logits: Tensor, z_t: Tensor, x0: Tensor, alpha_t: Tensor, dalpha_t: Tensor,
                 keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`duo_kernels.triton.nelbo.usdm_nelbo_forward`."""
    b, l, vocab_size = logits.shape
    k = float(vocab_size)
    loss = torch.empty(b * l, dtype=torch.float32, device=logits.device)
    stats = torch.empty(b * l, 3, dtype=torch.float32, device=logits.device)
    for start, stop in row_chunks(b * l, vocab_size):
        x = _cpu_rows(logits, keep, start, stop)
        z, m = z_t[start:stop], x0[start:stop]
        one_minus_a, r, _, _, ne, _ = nelbo_row_constants(vocab_size, alpha_t[start:stop], dalpha_t[start:stop], z, m)
        # amax propagates NaN; +inf is as bad (inf - inf in exp).
        row_max = x.amax(-1)
        row_max = torch.where(row_max == torch.inf, torch.nan, row_max)
        shift = torch.where(row_max == -torch.inf, 0.0, row_max)
        t = torch.exp(x - shift[:, None])
        log_s = torch.log(t.sum(-1, dtype=torch.float64))
        # t_j = r p_j = (r / S) exp(l_j - max)
        p = t.mul_(torch.exp(-log_s).to(torch.float32)[:, None])  # softmax
        t = p * r.to(torch.float32)[:, None]  # t_j = r p_j
        # G = sum_j t_j - log(1 + t_j) = r^2 sum_j p_j^2 (t_j - log(1 + t_j))/t_j^2: no underflow at tiny r
        big_g = r * r * (p * p * _log1p_minus_over_square_fp32(t)).sum(-1, dtype=torch.float64)
        s_l = torch.log1p(t).sum(-1, dtype=torch.float64)
        # the backward's row sum: W = sum_j p_j^2/(1 + t_j) for r < 1, U = sum_j t_j/(1 + t_j) for r >= 1
        # (in place: the last use of t)
        s_u = torch.where(r[:, None] < 1.0, p, r.to(torch.float32)[:, None]).mul_(p).div_(t.add_(1.0)).sum(
            -1, dtype=torch.float64)

        def log_p(ids):
            return (x.gather(-1, ids[:, None])[:, 0] - row_max).to(torch.float64) - log_s

        # = coeff * bracket, without overflow at a subnormal alpha
        chunk_loss = dalpha_t[start:stop] / one_minus_a * _ref.nelbo_bracket_over_r(
            k, r, big_g, s_l, log_p(z), log_p(m), ne == 0)
        if keep is not None:
            chunk_loss = torch.where(keep[start:stop], chunk_loss, 0.0)
        loss[start:stop] = chunk_loss
        stats[start:stop] = torch.stack([row_max, log_s.float(), s_u.float()], -1)
    return loss, stats


def _cpu_backward(grad_loss: Tensor, logits: Tensor, z_t: Tensor, x0: Tensor, alpha_t: Tensor, dalpha_t: Tensor,
                  keep: Tensor | None, stats: Tensor) -> Tensor:
    """Same contract as :func:`duo_kernels.triton.nelbo.usdm_nelbo_backward`."""
    b, l, vocab_size = logits.shape
    k = float(vocab_size)
    dlogits = torch.empty((b, l, vocab_size), dtype=logits.dtype, device=logits.device)
    flat = dlogits.view(b * l, vocab_size)
    for start, stop in row_chunks(b * l, vocab_size):
        x = _cpu_rows(logits, keep, start, stop)
        z, m = z_t[start:stop], x0[start:stop]
        one_minus_a, r, coeff, kappa, ne, c2 = nelbo_row_constants(
            vocab_size, alpha_t[start:stop], dalpha_t[start:stop], z, m)
        row_max, log_s, s_u = stats[start:stop].unbind(-1)

        def log_p(ids):
            return (x.gather(-1, ids[:, None])[:, 0] - row_max).to(torch.float64) - log_s.to(torch.float64)

        log_p_i, log_p_m = log_p(z), log_p(m)
        p = torch.exp((x - row_max[:, None]) - log_s[:, None])
        del x
        scale, x1, x2, y, s_i, s_m = nelbo_gradient_row_scalars(
            k, one_minus_a, r, coeff, c2, ne, dalpha_t[start:stop], log_p_i, log_p_m, s_u.to(torch.float64))
        scale = grad_loss[start:stop].to(torch.float64) * scale
        if keep is not None:
            scale = torch.where(keep[start:stop], scale, 0.0)
        x1, x2, y, s_i, s_m = ((scale * v).float()[:, None] for v in (x1, x2, y, s_i, s_m))
        # d = (x1 + x2 p) p/(1 + t) - y p + sparse terms, in two (chunk, V) buffers
        d = torch.div(p, (p * r.to(torch.float32)[:, None]).add_(1.0))
        w = torch.mul(p, x2).add_(x1)
        d.mul_(w).sub_(torch.mul(p, y, out=w))
        d.scatter_add_(-1, z[:, None], s_i)
        d.scatter_add_(-1, m[:, None], s_m)
        if keep is not None:
            d = torch.where(keep[start:stop, None], d, 0.0)
        flat[start:stop] = d
    return dlogits


def _triton_rows():
    from duo_kernels.triton import nelbo as triton_nelbo

    return triton_nelbo.usdm_nelbo_forward, triton_nelbo.usdm_nelbo_backward


def row_kernels(backend: str) -> tuple[Callable, Callable]:
    """(forward, backward) per-row functions of a fused backend ("triton" or "cpu")."""
    if backend == "triton":
        return _triton_rows()
    if backend == "cpu":
        return _cpu_forward, _cpu_backward
    raise ValueError(f"no fused NELBO rows for backend {backend!r}")


# ---- backend choice ----------------------------------------------------------------------------------

def _reference_linear_usdm_nelbo(hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, *, reduction="none", mask=None):
    """Logits then loss: ``F.linear`` and the reference NELBO (what a model without fused ops runs)."""
    return _ref.usdm_nelbo(F.linear(hidden, weight, bias), z_t, x0, alpha_t, dalpha_t, reduction=reduction,
                           mask=mask)


_KERNELS = {"triton": _triton_rows, "cpu": pure_torch(_cpu_forward), "reference": _ref.usdm_nelbo}


def resolve_backend(op: str, impl: str, device: str) -> str:
    """The backend (``"triton"``, ``"cpu"`` or ``"reference"``) that runs ``op`` for ``impl`` on ``device``
    (:func:`duo_kernels._dispatch.resolve_backend`). Every fused loss has these three backends, and "cpu"
    is plain PyTorch (no native build)."""
    return _resolve_backend(op, impl, device, _KERNELS)


# ---- torch.library ops --------------------------------------------------------------------------------

@torch.library.custom_op("duo_kernels::usdm_nelbo", mutates_args=())
def _usdm_nelbo_op(logits: Tensor, z_t: Tensor, x0: Tensor, alpha_t: Tensor, dalpha_t: Tensor,
                   keep: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """(B, L) float32 loss and (B, L, 3) float32 row stats; per-row inputs are contiguous (B, L)."""
    b, l, _ = logits.shape
    forward, _ = row_kernels(backend)
    loss, stats = forward(_unit_stride(logits), z_t.view(-1), x0.view(-1), alpha_t.view(-1), dalpha_t.view(-1),
                          None if keep is None else keep.view(-1))
    return loss.view(b, l), stats.view(b, l, 3)


@_usdm_nelbo_op.register_fake
def _(logits, z_t, x0, alpha_t, dalpha_t, keep, backend):
    b, l, _ = logits.shape
    return logits.new_empty((b, l), dtype=torch.float32), logits.new_empty((b, l, 3), dtype=torch.float32)


@torch.library.custom_op("duo_kernels::usdm_nelbo_backward", mutates_args=())
def _usdm_nelbo_backward_op(grad_loss: Tensor, logits: Tensor, z_t: Tensor, x0: Tensor, alpha_t: Tensor,
                            dalpha_t: Tensor, keep: Optional[Tensor], stats: Tensor, backend: str) -> Tensor:
    """d loss / d logits, (B, L, V) in the logits' dtype, for a (B, L) upstream gradient."""
    _, backward = row_kernels(backend)
    return backward(grad_loss.to(torch.float32).contiguous().view(-1), _unit_stride(logits), z_t.view(-1),
                    x0.view(-1), alpha_t.view(-1), dalpha_t.view(-1), None if keep is None else keep.view(-1),
                    stats.view(-1, 3))


@_usdm_nelbo_backward_op.register_fake
def _(grad_loss, logits, z_t, x0, alpha_t, dalpha_t, keep, stats, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _usdm_nelbo_setup_context(ctx, inputs, output):
    logits, z_t, x0, alpha_t, dalpha_t, keep, backend = inputs
    ctx.save_for_backward(logits, z_t, x0, alpha_t, dalpha_t, keep, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _usdm_nelbo_backward(ctx, grad_loss, _grad_stats):
    logits, z_t, x0, alpha_t, dalpha_t, keep, stats = ctx.saved_tensors
    dlogits = _usdm_nelbo_backward_op(grad_loss, logits, z_t, x0, alpha_t, dalpha_t, keep, stats, ctx.backend)
    return dlogits, None, None, None, None, None, None


_usdm_nelbo_op.register_autograd(_usdm_nelbo_backward, setup_context=_usdm_nelbo_setup_context)


def linear_chunk_rows(n: int, vocab_size: int) -> int:
    """Tokens per chunk of :func:`linear_usdm_nelbo`: at most n / LINEAR_MIN_CHUNKS and
    LINEAR_CHUNK_ELEMENTS / V, at least 1."""
    return max(1, min(n // LINEAR_MIN_CHUNKS, LINEAR_CHUNK_ELEMENTS // vocab_size))


@torch.library.custom_op("duo_kernels::linear_usdm_nelbo", mutates_args=())
def _linear_usdm_nelbo_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], z_t: Tensor, x0: Tensor,
                          alpha_t: Tensor, dalpha_t: Tensor, keep: Optional[Tensor],
                          backend: str) -> tuple[Tensor, Tensor]:
    """(B, L) float32 loss and (B, L, 3) row stats of ``hidden @ weight.T + bias``, one token chunk of
    logits at a time."""
    b, l, d = hidden.shape
    n, vocab_size = b * l, weight.shape[0]
    forward, _ = row_kernels(backend)
    rows = hidden.reshape(n, d)
    flat = [t.view(-1) for t in (z_t, x0, alpha_t, dalpha_t)]
    keep = None if keep is None else keep.view(-1)
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    stats = torch.empty(n, 3, dtype=torch.float32, device=hidden.device)
    step = linear_chunk_rows(n, vocab_size)
    for start in range(0, n, step):
        stop = min(n, start + step)
        logits = F.linear(rows[start:stop], weight, bias)[None]
        loss[start:stop], stats[start:stop] = forward(
            logits, *(t[start:stop] for t in flat), None if keep is None else keep[start:stop])
    return loss.view(b, l), stats.view(b, l, 3)


@_linear_usdm_nelbo_op.register_fake
def _(hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, keep, backend):
    b, l, _ = hidden.shape
    return hidden.new_empty((b, l), dtype=torch.float32), hidden.new_empty((b, l, 3), dtype=torch.float32)


@torch.library.custom_op("duo_kernels::linear_usdm_nelbo_backward", mutates_args=())
def _linear_usdm_nelbo_backward_op(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                   z_t: Tensor, x0: Tensor, alpha_t: Tensor, dalpha_t: Tensor,
                                   keep: Optional[Tensor], stats: Tensor, backend: str,
                                   need_weight_grads: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden, d weight, d bias) in the parameters' dtypes; recomputes each chunk's logits. d weight
    and d bias accumulate over chunks in fp32; with ``need_weight_grads=False`` they are empty."""
    b, l, d = hidden.shape
    n, vocab_size = b * l, weight.shape[0]
    _, backward = row_kernels(backend)
    rows = hidden.reshape(n, d)
    flat = [t.view(-1) for t in (z_t, x0, alpha_t, dalpha_t)]
    keep = None if keep is None else keep.view(-1)
    grad_loss = grad_loss.to(torch.float32).contiguous().view(-1)
    stats = stats.view(n, 3)
    dhidden = torch.empty((n, d), dtype=hidden.dtype, device=hidden.device)
    # bf16/fp16 chunk products accumulate in fp32
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    dweight = torch.zeros(weight.shape if need_weight_grads else (0,), dtype=acc, device=weight.device)
    dbias = torch.zeros((vocab_size,) if need_weight_grads and bias is not None else (0,), dtype=acc,
                        device=weight.device)
    step = linear_chunk_rows(n, vocab_size)
    for start in range(0, n, step):
        stop = min(n, start + step)
        logits = F.linear(rows[start:stop], weight, bias)[None]
        dlogits = backward(grad_loss[start:stop], logits, *(t[start:stop] for t in flat),
                           None if keep is None else keep[start:stop], stats[start:stop])[0]
        del logits
        torch.mm(dlogits, weight, out=dhidden[start:stop])
        if need_weight_grads:
            if dweight.dtype == dlogits.dtype:
                dweight.addmm_(dlogits.t(), rows[start:stop])
            else:
                dweight += torch.mm(dlogits.t(), rows[start:stop])
            if bias is not None:
                dbias += dlogits.sum(0, dtype=acc)
    return (dhidden.view(b, l, d), dweight.to(weight.dtype),
            dbias.to(bias.dtype if bias is not None else weight.dtype))


@_linear_usdm_nelbo_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, keep, stats, backend, need_weight_grads):
    dweight = torch.empty(weight.shape if need_weight_grads else (0,), dtype=weight.dtype, device=weight.device)
    has_bias = need_weight_grads and bias is not None
    dbias = torch.empty((weight.shape[0],) if has_bias else (0,), dtype=weight.dtype if bias is None else bias.dtype,
                        device=weight.device)
    return torch.empty_like(hidden), dweight, dbias


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, keep, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, keep, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _linear_backward(ctx, grad_loss, _grad_stats):
    hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, keep, stats = ctx.saved_tensors
    need_weight_grads = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
    dhidden, dweight, dbias = _linear_usdm_nelbo_backward_op(
        grad_loss, hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, keep, stats, ctx.backend, need_weight_grads)
    return (dhidden, dweight if ctx.needs_input_grad[1] else None,
            dbias if bias is not None and ctx.needs_input_grad[2] else None, None, None, None, None, None, None)


_linear_usdm_nelbo_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def _unit_stride(logits: Tensor) -> Tensor:
    """The kernels need unit stride along V (any strides along B and L); others are copied once."""
    return logits if logits.stride(-1) == 1 else logits.contiguous()


# ---- public functions -----------------------------------------------------------------------------------

def _schedule(alpha_t, dalpha_t, shape: tuple[int, int], device) -> tuple[Tensor, Tensor]:
    """alpha_t, dalpha_t as contiguous float64 (B, L), checked."""
    alpha = _validate.per_token("alpha_t", alpha_t, shape, device=device)
    _losses._check_alpha_t(alpha)
    dalpha = _validate.per_token("dalpha_t", dalpha_t, shape, device=device)
    _losses._check_dalpha_t(dalpha)
    return alpha.contiguous(), dalpha.contiguous()


def usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, *, reduction: str = "none", mask=None,
               impl: str = "auto") -> Tensor:
    """Per-token NELBO of uniform-state diffusion from logits (duo-math §3.3, eq. 3.5), fused.

    Same loss and arguments as :func:`duo_kernels.reference.usdm_nelbo`; forward and backward read the
    logits row by row and never allocate a (B, L, V) temporary (the gradient is written once, in the
    logits' dtype). Math in fp32 with fp64 per-row scalars; the loss matches the float64 reference to
    4e-7 relative at V = 50258 (see :mod:`duo_kernels.triton.nelbo`). fp64 logits are rounded to fp32
    (``impl="reference"`` computes in fp64).

    Args:
        logits: (B, L, V) float16/bfloat16/float32/float64, V >= 2; any strides.
        z_t: (B, L) int64 noisy tokens in [0, V).
        x0: (B, L) int64 clean tokens in [0, V).
        alpha_t: number or tensor of shape (), (B,), (B, 1) or (B, L); every value in (0, 1).
        dalpha_t: d alpha_t / dt, same shapes as alpha_t; finite and <= 0.
        reduction: "none" (default) -> (B, L); "sum" -> (); "mean" -> () the sum divided by the sum of
            the mask's weights.
        mask: None (default) or (B, L) bool or float weights >= 0 multiplying the per-token loss; a token
            of weight 0 gives exactly 0 loss and 0 gradient, whatever its logits.
        impl: "auto" (default), "triton", "cpu" or "reference" (:mod:`duo_kernels._dispatch`).

    Returns:
        float32 loss, (B, L) or (). A row with a NaN or +inf logit gives NaN in that token only. The
        gradient reaches the logits only (the schedule is data: no gradient to alpha_t, dalpha_t).

    Example (duo-math Appendix A.3, K = 8):
        >>> logits = torch.tensor([[[-1.978243, -0.735573, 2.575851, 0.387949,
        ...                          1.840462, 1.154208, -1.272927, 1.083904]]], requires_grad=True)
        >>> x0 = z_t = torch.tensor([[3]])
        >>> loss = usdm_nelbo(logits, z_t, x0, 0.4, -1.3, impl="cpu")
        >>> round(float(loss), 5)
        2.45373
        >>> loss.sum().backward(); logits.grad.shape
        torch.Size([1, 1, 8])
    """
    vocab_size = _losses._check_logits("logits", logits)
    backend = resolve_backend("usdm_nelbo", impl, str(logits.device))
    if backend == "reference":
        return _ref.usdm_nelbo(logits, z_t, x0, alpha_t, dalpha_t, reduction=reduction, mask=mask)
    shape = (logits.shape[0], logits.shape[1])
    _losses._check_token_ids("z_t", z_t, shape, vocab_size)
    _losses._check_token_ids("x0", x0, shape, vocab_size)
    device = _validate.check_same_device(logits=logits, z_t=z_t, x0=x0, mask=mask)
    _losses._check_reduction(reduction)
    alpha, dalpha = _schedule(alpha_t, dalpha_t, shape, device)
    weights = _losses._token_weights(mask, shape)
    keep = None if weights is None else weights != 0
    loss, _ = _usdm_nelbo_op(logits, z_t.contiguous(), x0.contiguous(), alpha, dalpha, keep, backend)
    return _losses._reduce(loss, weights, reduction)


def linear_usdm_nelbo(hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, *, reduction: str = "none", mask=None,
                      impl: str = "auto") -> Tensor:
    """The output projection and the USDM NELBO fused: ``usdm_nelbo(hidden @ weight.T + bias, ...)``
    without the (B, L, V) logits.

    Tokens are processed in chunks (:func:`linear_chunk_rows`: at most 1/16 of the tokens and 2^26
    logits per chunk); the backward recomputes each chunk's logits, so the memory beyond inputs and
    outputs is O(chunk·V + V·d) (one chunk of logits and of their gradient, and an fp32 accumulator for
    d weight) instead of (B, L, V) logits and their gradient. The GEMMs run in the inputs' dtype (as
    ``F.linear``), the loss as :func:`usdm_nelbo`. Under ``torch.autocast`` the projection's inputs are
    cast to the autocast dtype, as ``F.linear`` would be.

    Args:
        hidden: (B, L, d) float16/bfloat16/float32/float64.
        weight: (V, d) of hidden's dtype, V >= 2 (the output embedding).
        bias: None or (V,) of hidden's dtype.
        z_t, x0, alpha_t, dalpha_t, reduction, mask: as :func:`usdm_nelbo`.
        impl: "auto" (default), "triton", "cpu" or "reference" (``F.linear`` then the reference loss).

    Returns:
        float32 loss, (B, L) or (); gradients reach hidden, weight and bias (not alpha_t, dalpha_t).

    Example:
        >>> hidden = torch.randn(2, 16, 8, requires_grad=True)
        >>> head = torch.nn.Linear(8, 37)
        >>> x0 = torch.randint(37, (2, 16))
        >>> loss = linear_usdm_nelbo(hidden, head.weight, head.bias, x0, x0, 0.5, -1.0, reduction="mean")
        >>> loss.backward(); head.weight.grad.shape
        torch.Size([37, 8])
    """
    _validate.check_tensor("hidden", hidden, dtypes=_validate.FLOAT_DTYPES, ndim=3)
    backend = resolve_backend("linear_usdm_nelbo", impl, str(hidden.device))
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype) if isinstance(weight, Tensor) else weight
        bias = bias.to(dtype) if isinstance(bias, Tensor) else bias
    _validate.check_tensor("weight", weight, dtypes=(hidden.dtype,), ndim=2)
    vocab_size, dim = weight.shape
    if vocab_size < 2:
        raise ValueError(f"weight must have at least 2 rows (the vocabulary), got shape {tuple(weight.shape)}")
    if dim != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) (hidden's last dimension), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        _validate.check_tensor("bias", bias, dtypes=(hidden.dtype,), ndim=1)
        if bias.shape[0] != vocab_size:
            raise ValueError(f"bias must have shape ({vocab_size},), got {tuple(bias.shape)}")
    if backend == "reference":
        return _reference_linear_usdm_nelbo(hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, reduction=reduction,
                                            mask=mask)
    shape = (hidden.shape[0], hidden.shape[1])
    _losses._check_token_ids("z_t", z_t, shape, vocab_size)
    _losses._check_token_ids("x0", x0, shape, vocab_size)
    device = _validate.check_same_device(hidden=hidden, weight=weight, bias=bias, z_t=z_t, x0=x0, mask=mask)
    _losses._check_reduction(reduction)
    alpha, dalpha = _schedule(alpha_t, dalpha_t, shape, device)
    weights = _losses._token_weights(mask, shape)
    keep = None if weights is None else weights != 0
    loss, _ = _linear_usdm_nelbo_op(hidden, weight, bias, z_t.contiguous(), x0.contiguous(), alpha, dalpha, keep,
                                    backend)
    return _losses._reduce(loss, weights, reduction)
