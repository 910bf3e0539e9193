"""duo_model: a thin DiT, trainer, distiller and sampler built on duo_kernels."""
