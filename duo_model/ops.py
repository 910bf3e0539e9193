"""The one place where duo_model gets its Duo ops: the fused ones of :mod:`duo_kernels` where they
have landed, the plain-PyTorch ones of :mod:`duo_kernels.reference` otherwise.

The fast ops keep the reference's names and signatures (they add ``impl="auto"``), so every module of
duo_model calls ``ops.<name>(...)`` and switches to a fused kernel as soon as ``duo_kernels`` exports
one, with no change here. The lookup is a plain ``getattr``: ``duo_kernels.<name>`` if it exists, else
``duo_kernels.reference.<name>``. Two ops have no reference twin and are composed here from the
others: ``linear_usdm_nelbo`` (the output projection, then ``usdm_nelbo``: the logits exist in memory
only on this fallback path) and the ``RelaxedEmbedding`` module.

:func:`use` switches every op to the reference and back (``"reference"`` / ``"auto"``); the end-to-end
benchmark times one training step both ways in the same process. :func:`sources` says which op
comes from where (``duo train`` prints it).

Example::

    >>> from duo_model import ops
    >>> sorted(ops.sources())[:3]
    ['RelaxedEmbedding', 'ancestral_step', 'dcd_kl']
    >>> ops.use("reference"); ops.sources()["usdm_nelbo"]
    'duo_kernels.reference'
    >>> ops.use("auto")
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import duo_kernels
from duo_kernels import reference

# Ops with a reference twin of the same name and signature.
_FUNCTIONS = ("usdm_nelbo", "usdm_forward", "tempered_softmax_topk", "relaxed_embedding",
              "tempered_softmax_embedding", "diffusion_transform", "diffusion_transform_t", "loglinear_schedule",
              "gaussian_argmax_pair", "dcd_kl", "ancestral_step", "greedy_tail", "sampling_timesteps", "psi_kappas")

_sources: dict[str, str] = {}


def _reference_linear_usdm_nelbo(hidden, weight, bias, z_t, x0, alpha_t, dalpha_t, *, reduction="none",
                                 mask=None):
    """``usdm_nelbo(F.linear(hidden, weight, bias), ...)``: the signature of the fused
    ``duo_kernels.linear_usdm_nelbo`` (hidden (B, L, d), weight (V, d), bias (V,) or None), with the
    (B, L, V) logits in memory."""
    return usdm_nelbo(F.linear(hidden, weight, bias), z_t, x0, alpha_t, dalpha_t, reduction=reduction, mask=mask)


class _ReferenceRelaxedEmbedding(nn.Module):
    """The embedding E (V, d) of the DiT (duo-math §7), for token ids or a top-k relaxation.

    ``forward(ids)`` with ids (B, L) int64 is a row lookup; ``forward((ids, weights))`` with ids and
    weights (B, L, k) is ``relaxed_embedding(E, ids, weights)``. Output (B, L, d) float32 (E's dtype
    if wider). E is initialised U(-1/sqrt(d), 1/sqrt(d)) (kaiming_uniform with a = sqrt(5)).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        if isinstance(x, tuple):
            ids, weights = x
            return relaxed_embedding(self.weight, ids, weights)
        return F.embedding(x, self.weight)


def _fast_module(name: str):
    fast_nn = getattr(duo_kernels, "nn", None)
    return getattr(fast_nn, name, None)


def use(impl: str = "auto") -> None:
    """Bind every op of this module: ``"auto"`` takes ``duo_kernels``'s fused op where it exists (which
    then picks its own backend, see ``DUO_KERNELS_IMPL``), ``"reference"`` takes the reference."""
    if impl not in ("auto", "reference"):
        raise ValueError(f"impl must be 'auto' or 'reference', got {impl!r}")
    table = globals()
    for name in _FUNCTIONS:
        fast = getattr(duo_kernels, name, None) if impl == "auto" else None
        table[name] = fast or getattr(reference, name)
        _sources[name] = "duo_kernels" if fast else "duo_kernels.reference"
    fast = getattr(duo_kernels, "linear_usdm_nelbo", None) if impl == "auto" else None
    table["linear_usdm_nelbo"] = fast or _reference_linear_usdm_nelbo
    _sources["linear_usdm_nelbo"] = "duo_kernels" if fast else "duo_model.ops (F.linear + usdm_nelbo)"
    fast = _fast_module("RelaxedEmbedding") if impl == "auto" else None
    table["RelaxedEmbedding"] = fast or _ReferenceRelaxedEmbedding
    _sources["RelaxedEmbedding"] = "duo_kernels.nn" if fast else "duo_model.ops (reference)"


def sources() -> dict[str, str]:
    """``{op name: where it comes from}`` for the current binding."""
    return dict(_sources)


# Bound by use(); listed for readers and linters.
usdm_nelbo = usdm_forward = tempered_softmax_topk = relaxed_embedding = None
tempered_softmax_embedding = diffusion_transform = diffusion_transform_t = loglinear_schedule = None
gaussian_argmax_pair = dcd_kl = ancestral_step = greedy_tail = sampling_timesteps = psi_kappas = None
linear_usdm_nelbo = None
RelaxedEmbedding = None
use("auto")
