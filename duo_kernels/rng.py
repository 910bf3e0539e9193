"""One counter-based random number generator for every backend.

The contract
------------
**Generator.** Philox4x32-10 (Salmon et al., SC'11). The key is the 64-bit ``seed`` split into its low
and high 32-bit words; the counter block is ``(c_lo, c_hi, 0, 0)`` for a 64-bit counter ``c``. This
is exactly Triton's ``tl.randint4x(seed, offset)`` with an int64 ``offset``, so Triton kernels call it
directly; :mod:`duo_kernels.reference.rng` (PyTorch) and ``csrc/include/duo/philox.h`` (C++, CPU and
CUDA) reproduce it bit for bit. Each counter yields four uint32 words ``w0..w3``.

**Counters.** An op draws from ``counter = offset + index``, where ``offset`` is the op's stream offset
and ``index`` the element (or token) index; an op's docstring says which counters and words it uses.
Two draws with the same seed and counter are the same numbers, on every backend.

**Conversions** (the same in all backends):

- float32 uniform, one word: ``u = ((w >> 9) + 1/2) / 2^23``: the 2^23 odd multiples of 2^-24, strictly
  inside (0, 1) and symmetric about 1/2 (``1 - u`` is exact);
- float64 uniform, two words: ``m = (w_hi << 20) | (w_lo >> 12)`` (52 bits), ``u = (m + 1/2) / 2^52``:
  the odd multiples of 2^-53 in (0, 1);
- standard normal (Box-Muller): ``sqrt(-2 log u1) cos(2 pi u2)``, with ``cos(2 pi u)`` reduced exactly
  by quarter turns so that values near zero keep their relative precision; float32 normals take
  ``u1, u2`` as float32 uniforms of ``w0, w1``, float64 normals as float64 uniforms of ``(w0, w1)`` and
  ``(w2, w3)``. Transcendental functions differ by an ulp or so between libraries, so normals agree
  across backends to a few ulp while integers and uniforms agree bit for bit;
- integer in ``[0, high)``, two words: ``floor((w_hi 2^32 + w_lo) high / 2^64)`` (bias < high / 2^64),
  for ``1 <= high <= 2^31``; kernels that need a cheaper draw use one word, ``floor(w high / 2^32)``.

**Seeds.** ``seed`` is an int in [0, 2^64). An op given ``seed=None`` draws one from ``generator`` (or
from torch's default CPU generator), so ``torch.manual_seed`` makes runs reproducible. Drawing from a
CPU generator never synchronizes a GPU; a CUDA generator is read and advanced through its Philox
offset, also without a synchronization. A ``torch.library`` op takes a seed as the int64 of its bits
(:func:`seed_to_int64`, :func:`seed_from_int64`).

**Ops.** :func:`uniform`, :func:`normal` and :func:`randint` run their ``"cpu"``, ``"cuda"`` and
``"triton"`` kernels through the ``torch.library`` ops ``duo_kernels::rng_uniform``, ``rng_normal`` and
``rng_randint`` (fake implementations included), so ``torch.compile(fullgraph=True)`` traces them for
an int ``seed`` (``seed=None`` reads a generator on the host: a graph break).

Example::

    >>> from duo_kernels import rng
    >>> u = rng.uniform((2, 3), seed=0)                  # float32 in (0, 1)
    >>> z = rng.normal((4,), seed=0, offset=100, dtype=torch.float64)
    >>> ids = rng.randint((8,), high=50258, seed=7)
"""

from __future__ import annotations

import importlib
import math

import torch

from duo_kernels import _validate
from duo_kernels._dispatch import resolve_backend

SEED_LIMIT = 2**64
OFFSET_LIMIT = 2**63


def resolve_seed(seed: int | None = None, generator: torch.Generator | None = None) -> int:
    """The 64-bit Philox seed of an op: ``seed`` itself, or one drawn from ``generator``.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> a = resolve_seed()
        >>> _ = torch.manual_seed(0)
        >>> a == resolve_seed()
        True
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if seed is not None:
        if not _validate.is_int(seed):
            raise ValueError(f"seed must be an int in [0, 2^64) or None, got {seed!r}")
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2^64), got {seed}")
        return int(seed)
    gen = generator if generator is not None else torch.default_generator
    if gen.device.type == "cpu":
        hi, lo = torch.randint(0, 2**32, (2,), generator=gen, dtype=torch.int64).tolist()
        return (hi << 32) | lo
    # A device generator: read its Philox (seed, offset) on the host and advance it, without a sync.
    offset = gen.get_offset()
    gen.set_offset(offset + 4)
    return _mix64(gen.initial_seed() ^ _mix64(offset + 1))


def seed_to_int64(seed: int) -> int:
    """A seed in [0, 2^64) as the int64 of the same bits, for a ``torch.library`` op's ``int`` argument
    (schemas carry int64); :func:`seed_from_int64` inverts it.

    Example::

        >>> seed_to_int64(2**64 - 1), seed_from_int64(seed_to_int64(2**64 - 1)) == 2**64 - 1
        (-1, True)
    """
    return seed - SEED_LIMIT if seed >= 2**63 else seed


def seed_from_int64(value: int) -> int:
    """The seed in [0, 2^64) whose bits the int64 ``value`` holds (the inverse of :func:`seed_to_int64`)."""
    return value % SEED_LIMIT


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit ints that spreads nearby inputs apart."""
    x &= 2**64 - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return x ^ (x >> 31)


def check_offset(offset) -> int:
    if not _validate.is_int(offset):
        raise ValueError(f"offset must be an int in [0, 2^63), got {offset!r}")
    if not 0 <= offset < OFFSET_LIMIT:
        raise ValueError(f"offset must be in [0, 2^63), got {offset}")
    return int(offset)


def _check_shape(shape) -> tuple[int, ...]:
    if _validate.is_int(shape):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    for d in shape:
        if not _validate.is_int(d):
            raise ValueError(f"shape must hold ints, got {shape!r}")
        if d < 0:
            raise ValueError(f"shape must have non-negative dims, got {shape!r}")
    return tuple(int(d) for d in shape)


def _prepare(shape, seed, generator, offset, numel_factor=1):
    shape = _check_shape(shape)
    offset = check_offset(offset)
    seed = resolve_seed(seed, generator)
    if offset + math.prod(shape) * numel_factor > OFFSET_LIMIT:
        raise ValueError(f"offset + number of elements must stay below 2^63, got offset {offset}")
    return shape, seed, offset


def _check_float_dtype(dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def _native_fill(name: str, shape, dtype, device, *args) -> torch.Tensor:
    from duo_kernels import _native

    out = torch.empty(shape, dtype=dtype, device=device)
    getattr(_native.load(), f"rng_{name}")(out, *args)
    return out


def _native_uniform(shape, seed, offset, dtype, device):
    return _native_fill("uniform", shape, dtype, device, seed, offset)


def _native_normal(shape, seed, offset, dtype, device):
    return _native_fill("normal", shape, dtype, device, seed, offset)


def _native_randint(shape, high, seed, offset, device):
    return _native_fill("randint", shape, torch.int64, device, high, seed, offset)


def _lazy(module: str, name: str):
    """``module.name``, imported at the first call (the reference package imports this module)."""
    def run(*args):
        return getattr(importlib.import_module(module), name)(*args)

    return run


def _kernels(name: str, native) -> dict:
    return {"reference": _lazy("duo_kernels.reference.rng", name), "cpu": native, "cuda": native,
            "triton": _lazy("duo_kernels.triton.rng", name)}


_UNIFORM = _kernels("uniform", _native_uniform)
_NORMAL = _kernels("normal", _native_normal)
_RANDINT = _kernels("randint", _native_randint)


# ---- torch.library ops ("cpu", "cuda", "triton"; "reference" is plain PyTorch) ----------------------------

@torch.library.custom_op("duo_kernels::rng_uniform", mutates_args=())
def _uniform_op(shape: list[int], seed: int, offset: int, dtype: torch.dtype, device: torch.device,
                backend: str) -> torch.Tensor:
    return _UNIFORM[backend](tuple(shape), seed_from_int64(seed), offset, dtype, device)


@torch.library.custom_op("duo_kernels::rng_normal", mutates_args=())
def _normal_op(shape: list[int], seed: int, offset: int, dtype: torch.dtype, device: torch.device,
               backend: str) -> torch.Tensor:
    return _NORMAL[backend](tuple(shape), seed_from_int64(seed), offset, dtype, device)


@_uniform_op.register_fake
@_normal_op.register_fake
def _(shape, seed, offset, dtype, device, backend):
    return torch.empty(shape, dtype=dtype, device=device)


@torch.library.custom_op("duo_kernels::rng_randint", mutates_args=())
def _randint_op(shape: list[int], high: int, seed: int, offset: int, device: torch.device,
                backend: str) -> torch.Tensor:
    return _RANDINT[backend](tuple(shape), high, seed_from_int64(seed), offset, device)


@_randint_op.register_fake
def _(shape, high, seed, offset, device, backend):
    return torch.empty(shape, dtype=torch.int64, device=device)


def uniform(shape, seed: int | None = None, offset: int = 0, dtype: torch.dtype = torch.float32, *,
            generator: torch.Generator | None = None, device=None, impl: str = "auto") -> torch.Tensor:
    """Uniform numbers in the open interval (0, 1); element ``i`` uses counter ``offset + i``.

    Args:
        shape: output shape.
        seed, generator: see :func:`resolve_seed`.
        offset: stream offset, in [0, 2^63).
        dtype: ``torch.float32`` (word 0, a 2^-23 grid) or ``torch.float64`` (words 0-1, a 2^-52 grid).
        device: output device (default CPU).
        impl: backend (:mod:`duo_kernels._dispatch`).

    Example::

        >>> uniform((3,), seed=1).shape
        torch.Size([3])
    """
    shape, seed, offset = _prepare(shape, seed, generator, offset)
    _check_float_dtype(dtype)
    device = torch.device(device or "cpu")
    backend = resolve_backend("rng.uniform", impl, str(device), _UNIFORM)
    if backend == "reference":
        return _UNIFORM[backend](shape, seed, offset, dtype, device)
    return _uniform_op(list(shape), seed_to_int64(seed), offset, dtype, device, backend)


def normal(shape, seed: int | None = None, offset: int = 0, dtype: torch.dtype = torch.float32, *,
           generator: torch.Generator | None = None, device=None, impl: str = "auto") -> torch.Tensor:
    """Standard normal numbers (Box-Muller); element ``i`` uses counter ``offset + i``.

    float32 uses words 0 and 1, float64 all four words. Arguments as :func:`uniform`.

    Example::

        >>> normal((2, 2), seed=3, dtype=torch.float64).dtype
        torch.float64
    """
    shape, seed, offset = _prepare(shape, seed, generator, offset)
    _check_float_dtype(dtype)
    device = torch.device(device or "cpu")
    backend = resolve_backend("rng.normal", impl, str(device), _NORMAL)
    if backend == "reference":
        return _NORMAL[backend](shape, seed, offset, dtype, device)
    return _normal_op(list(shape), seed_to_int64(seed), offset, dtype, device, backend)


def randint(shape, high: int, seed: int | None = None, offset: int = 0, *,
            generator: torch.Generator | None = None, device=None, impl: str = "auto") -> torch.Tensor:
    """Uniform int64 in ``[0, high)``, ``1 <= high <= 2^31``; element ``i`` uses counter ``offset + i``.

    Example::

        >>> int(randint((1000,), high=10, seed=0).max()) < 10
        True
    """
    if not _validate.is_int(high) or not 1 <= high <= 2**31:
        raise ValueError(f"high must be an int in [1, 2^31], got {high!r}")
    high = int(high)
    shape, seed, offset = _prepare(shape, seed, generator, offset)
    device = torch.device(device or "cpu")
    backend = resolve_backend("rng.randint", impl, str(device), _RANDINT)
    if backend == "reference":
        return _RANDINT[backend](shape, high, seed, offset, device)
    return _randint_op(list(shape), high, seed_to_int64(seed), offset, device, backend)
