"""The reference: every Duo equation of duo-math in plain PyTorch, float64 where it matters.

It is the oracle every kernel is tested against and the fallback every machine can run. Each public
function cites its duo-math section; the fast ops in :mod:`duo_kernels` keep the same names,
signatures and Philox streams.
"""

from duo_kernels.reference.curriculum import (relaxed_embedding, tempered_softmax_dense,
                                              tempered_softmax_embedding, tempered_softmax_topk)
from duo_kernels.reference.dcd import dcd_kl
from duo_kernels.reference.forward_process import (gaussian_argmax, gaussian_argmax_dense, gaussian_argmax_pair,
                                                   usdm_forward)
from duo_kernels.reference.nelbo import usdm_nelbo
from duo_kernels.reference.sampling import (ancestral_step, greedy_tail, psi_kappas, sample_categorical,
                                            sampling_timesteps, usdm_posterior)
from duo_kernels.reference.transform import (cosine_schedule, diffusion_transform, diffusion_transform_t,
                                             gamma_window, gaussian_params, loglinear_schedule)

__all__ = [
    "gaussian_params", "diffusion_transform", "diffusion_transform_t", "gamma_window", "loglinear_schedule", "cosine_schedule",
    "gaussian_argmax_dense", "gaussian_argmax", "gaussian_argmax_pair", "usdm_forward",
    "usdm_posterior", "usdm_nelbo", "dcd_kl",
    "tempered_softmax_topk", "relaxed_embedding", "tempered_softmax_dense", "tempered_softmax_embedding",
    "ancestral_step", "greedy_tail", "sample_categorical", "psi_kappas", "sampling_timesteps",
]
