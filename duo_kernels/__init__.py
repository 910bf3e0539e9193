"""duo-kernels: fused kernels for uniform-state discrete diffusion (Duo, Duo++).

Every public op takes ``impl="auto"`` (see :mod:`duo_kernels._dispatch`) and has a plain-PyTorch twin
of the same name and signature in :mod:`duo_kernels.reference`.
"""

from duo_kernels._version import __version__
from duo_kernels import rng
from duo_kernels.ops.nelbo import usdm_nelbo, linear_usdm_nelbo
from duo_kernels.ops.dcd import dcd_kl
from duo_kernels import nn

__all__ = ["__version__", "rng", "usdm_nelbo", "linear_usdm_nelbo", "dcd_kl", "nn"]
