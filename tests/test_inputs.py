"""Inputs at the edges of what the ops accept: NumPy scalars wherever Python numbers go (every public function
and module taking numbers), a vocabulary of one."""

import numpy as np
import pytest
import torch

import duo_kernels


def test_numpy_scalars_are_accepted_where_python_numbers_are():
    logits = torch.randn(2, 3, 5)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    expected = duo_kernels.usdm_nelbo(logits, ids, ids, 0.5, -1.0, impl="reference")
    for alpha, dalpha in ((np.float32(0.5), np.float64(-1.0)), (np.float64(0.5), np.int64(-1))):
        got = duo_kernels.usdm_nelbo(logits, ids, ids, alpha, dalpha, impl="reference")
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="alpha_t must be a number or a tensor, got bool"):
        duo_kernels.usdm_nelbo(logits, ids, ids, np.bool_(True), -1.0, impl="reference")


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_a_vocabulary_of_one_names_the_logits(impl):
    logits = torch.zeros(1, 2, 1)
    x = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"logits\.shape\[-1\] must be in \[2, 2\^31\], got 1"):
        duo_kernels.ancestral_step(logits, x, 0.5, 0.9, impl=impl)


X0 = torch.tensor([[1, 4, 6]])
LOGITS = torch.linspace(-2.0, 2.0, 3 * 7).reshape(1, 3, 7)
WEIGHT = torch.linspace(-1.0, 1.0, 7 * 4).reshape(7, 4)
TS = torch.tensor([0.75, 0.5, 0.25], dtype=torch.float64)
MODES = ("pure-posterior", "constant-remdm-0.01", "pure-posterior")
R = duo_kernels.reference


def embedding(vocab_size, dim, impl):
    torch.manual_seed(0)
    return duo_kernels.nn.RelaxedEmbedding(vocab_size, dim, impl=impl).requires_grad_(False)


# every public function or module taking Python numbers: (name, call, the scalar arguments' Python values).
# The values are exact in float32, so that np.float32 gives the same number.
SCALAR_CALLS = [
    ("gaussian_argmax", lambda impl, gamma, vocab_size, seed: duo_kernels.gaussian_argmax(
        X0, gamma, vocab_size, seed=seed, impl=impl), dict(gamma=-1.5, vocab_size=7, seed=3)),
    ("gaussian_argmax_pair", lambda impl, gamma_t, gamma_s, vocab_size, seed: duo_kernels.gaussian_argmax_pair(
        X0, gamma_t, gamma_s, vocab_size, seed=seed, impl=impl), dict(gamma_t=0.5, gamma_s=-1.5, vocab_size=7, seed=3)),
    ("usdm_forward", lambda impl, alpha_t, vocab_size, seed: duo_kernels.usdm_forward(
        X0, alpha_t, vocab_size, seed=seed, impl=impl), dict(alpha_t=0.5, vocab_size=7, seed=3)),
    ("tempered_softmax_topk", lambda impl, gamma, vocab_size, k, tau, seed: duo_kernels.tempered_softmax_topk(
        X0, gamma, vocab_size, k, tau, seed=seed, impl=impl), dict(gamma=-1.5, vocab_size=7, k=3, tau=0.25, seed=3)),
    ("tempered_softmax_topk_embedding", lambda impl, gamma, k, tau, seed: duo_kernels.tempered_softmax_topk_embedding(
        X0, gamma, 7, k, tau, WEIGHT, seed=seed, impl=impl), dict(gamma=-1.5, k=3, tau=0.25, seed=3)),
    ("tempered_softmax_embedding", lambda impl, gamma, tau, seed: duo_kernels.tempered_softmax_embedding(
        X0, gamma, tau, WEIGHT, seed=seed, impl=impl), dict(gamma=-1.5, tau=0.25, seed=3)),
    ("usdm_nelbo", lambda impl, alpha_t, dalpha_t: duo_kernels.usdm_nelbo(
        LOGITS, X0, X0, alpha_t, dalpha_t, impl=impl), dict(alpha_t=0.5, dalpha_t=-1.0)),
    ("linear_usdm_nelbo", lambda impl, alpha_t, dalpha_t: duo_kernels.linear_usdm_nelbo(
        LOGITS[..., :4], WEIGHT, None, X0, X0, alpha_t, dalpha_t, impl=impl), dict(alpha_t=0.5, dalpha_t=-1.0)),
    ("ancestral_step", lambda impl, alpha_t, alpha_s, kappa, top_p, seed: duo_kernels.ancestral_step(
        LOGITS, X0, alpha_t, alpha_s, kappa=kappa, top_p=top_p, seed=seed, impl=impl),
     dict(alpha_t=0.5, alpha_s=0.75, kappa=0.5, top_p=0.75, seed=3)),
    ("psi_kappas", lambda impl, high_frac, middle_frac, noise_eps: duo_kernels.psi_kappas(
        MODES, TS, high_frac=high_frac, middle_frac=middle_frac, noise_eps=noise_eps),
     dict(high_frac=0.25, middle_frac=0.5, noise_eps=2**-10)),
    ("sampling_timesteps", lambda impl, steps, eps, high_frac, middle_frac: duo_kernels.sampling_timesteps(
        "linear-constant-linear-0.5", steps, eps, high_frac=high_frac, middle_frac=middle_frac),
     dict(steps=8, eps=2**-10, high_frac=0.25, middle_frac=0.5)),
    ("rng.uniform", lambda impl, shape, seed, offset: duo_kernels.rng.uniform(shape, seed, offset, impl=impl),
     dict(shape=5, seed=3, offset=2)),
    ("rng.normal", lambda impl, shape, seed, offset: duo_kernels.rng.normal(shape, seed, offset, impl=impl),
     dict(shape=5, seed=3, offset=2)),
    ("rng.randint", lambda impl, shape, high, seed, offset: duo_kernels.rng.randint(
        shape, high, seed, offset, impl=impl), dict(shape=5, high=9, seed=3, offset=2)),
    ("nn.RelaxedEmbedding", lambda impl, vocab_size, dim, gamma, k, tau, seed: embedding(
        vocab_size, dim, impl).topk_curriculum(X0, gamma, k, tau, seed=seed),
     dict(vocab_size=7, dim=4, gamma=-1.5, k=3, tau=0.25, seed=3)),
    ("nn.RelaxedEmbedding.dense_curriculum", lambda impl, gamma, tau, seed: embedding(7, 4, impl).dense_curriculum(
        X0, gamma, tau, seed=seed),
     dict(gamma=-1.5, tau=0.25, seed=3)),
    ("reference.gaussian_params", lambda impl, gamma: R.gaussian_params(gamma), dict(gamma=-1.5)),
    ("reference.diffusion_transform", lambda impl, gamma, vocab_size: R.diffusion_transform(gamma, vocab_size),
     dict(gamma=-1.5, vocab_size=7)),
    ("reference.diffusion_transform_t", lambda impl, t, gamma_min, gamma_max, vocab_size: R.diffusion_transform_t(
        t, gamma_min, gamma_max, vocab_size), dict(t=0.5, gamma_min=-3.5, gamma_max=2.5, vocab_size=7)),
    ("reference.loglinear_schedule", lambda impl, t, eps: R.loglinear_schedule(t, eps), dict(t=0.5, eps=2**-10)),
    ("reference.cosine_schedule", lambda impl, t, eps: R.cosine_schedule(t, eps), dict(t=0.5, eps=2**-10)),
    ("reference.gaussian_argmax_dense", lambda impl, gamma, vocab_size, seed: R.gaussian_argmax_dense(
        X0, gamma, vocab_size, seed=seed), dict(gamma=-1.5, vocab_size=7, seed=3)),
    ("reference.tempered_softmax_dense", lambda impl, gamma, vocab_size, tau, seed: R.tempered_softmax_dense(
        X0, gamma, vocab_size, tau, seed=seed), dict(gamma=-1.5, vocab_size=7, tau=0.25, seed=3)),
    ("reference.usdm_posterior", lambda impl, alpha_t, alpha_s: R.usdm_posterior(
        torch.softmax(LOGITS.double(), -1), X0, alpha_t, alpha_s), dict(alpha_t=0.5, alpha_s=0.75)),
    ("reference.sample_categorical", lambda impl, seed: R.sample_categorical(torch.softmax(LOGITS.double(), -1),
                                                                             seed=seed), dict(seed=3)),
]


def numpy_scalar(value):
    """The same number as a NumPy scalar of another type than Python's (np.float64 is a float)."""
    return np.int64(value) if isinstance(value, int) else np.float32(value)


def _with_impls():
    """Each call with impl "reference" and "cpu", once for the functions without backends."""
    for name, call, values in SCALAR_CALLS:
        no_backends = name.startswith("reference.") or name in ("psi_kappas", "sampling_timesteps")
        for impl in ("reference",) if no_backends else ("reference", "cpu"):
            yield pytest.param(name, call, values, impl, id=f"{name}-{impl}")


@pytest.mark.parametrize("name, call, values, impl", list(_with_impls()))
def test_every_scalar_argument_takes_numpy_scalars_and_rejects_bools(name, call, values, impl):
    """The same result with each scalar argument as a NumPy scalar; bools and strings still rejected."""
    expected = call(impl, **values)
    for arg, value in values.items():
        got = call(impl, **{**values, arg: numpy_scalar(value)})
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda m: f"{name}({arg}=numpy): {m}")
        for bad in (True, np.bool_(False), "1"):
            with pytest.raises(ValueError, match=arg if arg != "shape" else "shape"):
                call(impl, **{**values, arg: bad})
