"""Kernel scalars in the interpreter as the compiled kernel sees them.

Compiled, Triton passes a Python float argument as a float32 (unless the parameter is annotated
``tl.float64``) and a Python int as int32, int64 or uint64 by its value (or as annotated). The
interpreter would keep floats in float64 and store ints in 2^31..2^32 as uint32, hiding rounding and
overflow that a GPU shows. :func:`install` makes every interpreted launch pass each non-constexpr
scalar as a one-element value of the compiled type; ``conftest.py`` installs it for the whole suite.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np

_NUMPY = {"fp32": np.float32, "fp64": np.float64, "i32": np.int32, "i64": np.int64, "u32": np.uint32,
          "u64": np.uint64}


def compiled_type(value, annotation: str) -> str | None:
    """The Triton type a compiled launch gives the scalar ``value`` (None: not a numeric scalar)."""
    from triton.runtime.jit import mangle_type

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if annotation in _NUMPY:
        return annotation
    return mangle_type(value)


def as_compiled(value, annotation: str = ""):
    """``value`` as the kernel compiled for it would see it: a one-element tensor of the compiled type."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    ty = compiled_type(value, annotation)
    if ty is None or ty not in _NUMPY:
        return value
    dtype = tl.str_to_ty(ty, None)
    return tl.tensor(TensorHandle(np.array([value], dtype=_NUMPY[ty]), dtype), dtype)


@functools.cache
def _parameters(fn) -> tuple[list[str], dict[str, str]]:
    """A kernel's parameter names and their normalised annotations."""
    from triton.runtime.jit import _normalize_ty

    parameters = inspect.signature(fn).parameters
    return list(parameters), {name: _normalize_ty(p.annotation) for name, p in parameters.items()
                              if p.annotation is not inspect.Parameter.empty}


def install() -> None:
    """Patch the interpreter's launch to pass scalars with compiled semantics (idempotent)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    if getattr(original, "compiled_scalars", False):
        return

    def run(self, *args, grid, warmup, **kwargs):
        names, notes = _parameters(self.fn)

        def convert(name, value):
            note = notes.get(name, "")
            return value if note == "constexpr" else as_compiled(value, note)

        args = [convert(name, a) for name, a in zip(names, args)]
        kwargs = {k: convert(k, v) if k in names else v for k, v in kwargs.items()}
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    run.compiled_scalars = True
    InterpretedFunction.run = run
