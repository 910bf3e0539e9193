"""Triton test kernels; imported lazily (inside tests), after conftest.py has set TRITON_INTERPRET."""

import triton
import triton.language as tl

from duo_kernels.triton.sampling import exponential53


@triton.jit
def exponential53_kernel(p_w0, p_w1, p_e, n, BLOCK: tl.constexpr):
    """e[i] = exponential53(w0[i], w1[i]) for int64 tensors holding uint32 words."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    w0 = tl.load(p_w0 + o, mask=m, other=0).to(tl.uint32)
    w1 = tl.load(p_w1 + o, mask=m, other=0).to(tl.uint32)
    tl.store(p_e + o, exponential53(w0, w1), mask=m)
