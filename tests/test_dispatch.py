import pytest
import torch

from duo_kernels import _dispatch


def reference(x):
    return x + 1


def cpu(x):
    return x + 2


KERNELS = {"reference": reference, "cpu": cpu}


def test_auto_prefers_the_native_cpu_kernel():
    backend, fn = _dispatch.dispatch("op", "auto", torch.device("cpu"), KERNELS)
    assert (backend, fn) == ("cpu", cpu)


def test_explicit_backend_and_env_override(monkeypatch):
    assert _dispatch.dispatch("op", "reference", torch.device("cpu"), KERNELS)[0] == "reference"
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    assert _dispatch.dispatch("op", "auto", torch.device("cpu"), KERNELS)[0] == "reference"
    # an explicit impl wins over the environment
    assert _dispatch.dispatch("op", "cpu", torch.device("cpu"), KERNELS)[0] == "cpu"
    monkeypatch.setenv(_dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        _dispatch.dispatch("op", "auto", torch.device("cpu"), KERNELS)


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        _dispatch.dispatch("op", "gpu", torch.device("cpu"), KERNELS)


def test_missing_kernel_is_not_implemented():
    with pytest.raises(NotImplementedError, match="op has no 'triton' kernel"):
        _dispatch.dispatch("op", "triton", torch.device("cpu"), KERNELS)


def test_backend_on_the_wrong_device_says_why():
    with pytest.raises(RuntimeError, match="runs on cpu tensors"):
        _dispatch.dispatch("op", "cpu", torch.device("meta"), KERNELS)


def test_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    # (the variable itself stays set: triton must never be imported without it in this process)
    monkeypatch.setattr(_dispatch, "triton_interpreted", lambda: False)
    ok, why = _dispatch.backend_status("triton", torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET=1" in why
    monkeypatch.setattr(_dispatch, "triton_interpreted", lambda: True)
    assert _dispatch.backend_status("triton", torch.device("cpu")) == (True, "")


def test_auto_skips_an_unbuildable_backend_with_a_warning(monkeypatch):
    monkeypatch.setattr(_dispatch, "backend_status", lambda b, d: (b == "reference", "no compiler"))
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no compiler"):
        assert _dispatch.dispatch("op", "auto", torch.device("cpu"), KERNELS)[0] == "reference"


def test_pure_torch_cpu_kernel_needs_no_build(monkeypatch):
    from duo_kernels import _native

    monkeypatch.setattr(_native, "status", lambda cuda=False: (False, "no compiler"))
    chunked = _dispatch.pure_torch(lambda x: x + 3)
    kernels = {"reference": reference, "cpu": chunked}
    assert _dispatch.dispatch("op", "cpu", torch.device("cpu"), kernels) == ("cpu", chunked)
    with pytest.raises(RuntimeError, match="no compiler"):
        _dispatch.dispatch("op", "cpu", torch.device("cpu"), KERNELS)


def test_triton_interpret_set_after_the_import_is_named(monkeypatch):
    """Triton defines its kernels for the GPU unless TRITON_INTERPRET=1 is set when they are imported;
    setting it later is named, instead of failing inside Triton."""
    monkeypatch.setattr(_dispatch, "_INTERPRETED_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = _dispatch.backend_status("triton", torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET=1 was set after duo_kernels was imported" in why
    with pytest.raises(RuntimeError, match="set it before the import"):
        _dispatch.dispatch("op", "triton", torch.device("cpu"), {**KERNELS, "triton": reference})
