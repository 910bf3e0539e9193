"""duo_model: a thin DiT, trainer, distiller and sampler built on duo_kernels.

``duo_model.load_published(source)`` loads a published Duo model (:mod:`duo_model.published`).
"""


def __getattr__(name):
    if name == "load_published":  # imported on first use: `import duo_model` stays free of torch
        from duo_model.published import load_published

        return load_published
    raise AttributeError(f"module 'duo_model' has no attribute {name!r}")
