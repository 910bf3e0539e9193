"""gamma_window: the gamma window of an alpha range, checked by a round trip through the exact transform."""

import pytest
import torch

from duo_kernels.reference import diffusion_transform, gamma_window


# ~60 transforms of 2 values per window: a second thread only adds scheduling on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("vocab_size", [2, 259, 2048, 50258, 10**6])
@pytest.mark.parametrize("alphas", [(0.95, 0.05), (0.9987, 0.0062), (0.5, 0.4999)])
def test_round_trip_through_the_exact_transform(vocab_size, alphas):
    gamma_min, gamma_max = gamma_window(vocab_size, *alphas)
    assert gamma_min < gamma_max
    alpha = diffusion_transform(torch.tensor([gamma_min, gamma_max], dtype=torch.float64), vocab_size)[0]
    assert alpha.tolist() == pytest.approx(list(alphas), abs=1e-13, rel=0)


def test_recovers_the_published_windows_for_gpt2():
    """The OWT curriculum window [-3.55, -1.85] and DCD's [-4, -1], from their alpha ranges at K = 50258."""
    for window in ((-3.55, -1.85), (-4.0, -1.0)):
        alphas = diffusion_transform(torch.tensor(window, dtype=torch.float64), 50258)[0].tolist()
        assert gamma_window(50258, *alphas) == pytest.approx(window, abs=1e-9)


def test_smaller_vocabularies_need_a_wider_window():
    """The same alpha range sits at higher gamma for small K (T depends on K)."""
    ends = [gamma_window(k)[1] for k in (259, 2048, 50258)]
    assert ends[0] > ends[1] > ends[2]


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha_max=0.05, alpha_min=0.95), "alpha_min < alpha_max"),
    (dict(alpha_max=1.0, alpha_min=0.05), "alpha_max < 1"),
    (dict(alpha_max=0.9, alpha_min=0.0), "0 < alpha_min"),
    (dict(alpha_max=float("nan"), alpha_min=0.1), "finite"),
])
def test_invalid_alpha_ranges_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gamma_window(259, **kwargs)


def test_invalid_vocab_size_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        gamma_window(1)
