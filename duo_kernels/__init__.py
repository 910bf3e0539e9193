"""duo-kernels: fused kernels for uniform-state discrete diffusion (Duo, Duo++).

Every public op takes ``impl="auto"`` (see :mod:`duo_kernels._dispatch`) and has a plain-PyTorch twin
of the same name and signature in :mod:`duo_kernels.reference`.
"""

from duo_kernels._version import __version__
from duo_kernels import rng
from duo_kernels.ops.curriculum import tempered_softmax_topk
from duo_kernels.ops.dcd import dcd_kl
from duo_kernels.ops.embedding import (relaxed_embedding, tempered_softmax_embedding,
                                       tempered_softmax_topk_embedding)
from duo_kernels.ops.forward_process import gaussian_argmax, gaussian_argmax_pair, usdm_forward
from duo_kernels.ops.nelbo import linear_usdm_nelbo, usdm_nelbo
from duo_kernels.ops.sampling import ancestral_step, greedy_tail
# Host-side schedule math of the sampler loop (duo-math §6.4): the reference's, re-exported.
from duo_kernels.reference.sampling import psi_kappas, sampling_timesteps
from duo_kernels import nn  # noqa: E402  (the modules wrap the ops above)

__all__ = ["__version__", "rng", "nn",
           "gaussian_argmax", "gaussian_argmax_pair", "usdm_forward",
           "tempered_softmax_topk", "relaxed_embedding", "tempered_softmax_topk_embedding", "tempered_softmax_embedding",
           "usdm_nelbo", "linear_usdm_nelbo", "dcd_kl",
           "ancestral_step", "greedy_tail", "psi_kappas", "sampling_timesteps"]
