"""duo_kernels.nn: the loss modules forward to their functions and hold no state."""

import torch

import duo_kernels
from duo_kernels.nn import DCDKLLoss, LinearUSDMNELBOLoss, USDMNELBOLoss


def _ids(vocab_size, shape, seed):
    return torch.randint(vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_usdm_nelbo_loss():
    logits = torch.randn(2, 4, 37, requires_grad=True)
    x0, z_t = _ids(37, (2, 4), 0), _ids(37, (2, 4), 1)
    mask = torch.rand(2, 4) > 0.3
    loss_fn = USDMNELBOLoss(impl="cpu")
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}
    assert repr(loss_fn) == "USDMNELBOLoss(reduction='mean', impl='cpu')"
    loss = loss_fn(logits, z_t, x0, 0.4, -1.0, mask=mask)
    expected = duo_kernels.usdm_nelbo(logits, z_t, x0, 0.4, -1.0, reduction="mean", mask=mask, impl="cpu")
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    loss.backward()
    assert logits.grad.shape == logits.shape
    per_token = USDMNELBOLoss(reduction="none", impl="reference")(logits, z_t, x0, 0.4, -1.0)
    assert per_token.shape == (2, 4)


def test_linear_usdm_nelbo_loss():
    head = torch.nn.Linear(8, 37)
    hidden = torch.randn(2, 16, 8, requires_grad=True)
    x0, z_t = _ids(37, (2, 16), 2), _ids(37, (2, 16), 3)
    loss_fn = LinearUSDMNELBOLoss(reduction="sum", impl="cpu")
    assert list(loss_fn.parameters()) == []
    loss = loss_fn(hidden, head.weight, head.bias, z_t, x0, 0.4, -1.0)
    expected = duo_kernels.linear_usdm_nelbo(hidden, head.weight, head.bias, z_t, x0, 0.4, -1.0, reduction="sum",
                                             impl="cpu")
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    loss.backward()
    assert head.weight.grad.shape == head.weight.shape and hidden.grad.shape == hidden.shape


def test_dcd_kl_loss():
    student = torch.randn(2, 4, 37, requires_grad=True)
    teacher = torch.randn(2, 4, 37)
    loss_fn = DCDKLLoss(direction="forward", impl="cpu")
    assert repr(loss_fn) == "DCDKLLoss(direction='forward', reduction='mean', impl='cpu')"
    loss = loss_fn(student, teacher)
    expected = duo_kernels.dcd_kl(student, teacher, direction="forward", reduction="mean", impl="cpu")
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    loss.backward()
    assert student.grad.shape == student.shape
