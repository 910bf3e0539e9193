import shutil
import subprocess

import pytest

from duo_kernels import _native


def test_build_key_names_versions():
    key = _native.build_key(False)
    assert "torch" in key and key.endswith("-cpu") and _native.__version__ in key


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(_native.NativeBuildError, match="no-such-compiler-xyz.*apt-get install g\\+\\+"):
        _native._check_tools(with_cuda=False)


def test_missing_nvcc_is_named(monkeypatch):
    monkeypatch.setattr(_native, "_find_nvcc", lambda: None)
    with pytest.raises(_native.NativeBuildError, match="nvcc"):
        _native._check_tools(with_cuda=True)


def test_cpu_module_builds_and_loads():
    ok, why = _native.status(cuda=False)
    assert ok, why
    assert _native.load(cuda=False).with_cuda is False


CUDA_SOURCES = sorted((_native.source_dir() / "cuda").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[s.name for s in CUDA_SOURCES])
def test_cuda_sources_compile_for_sm90(source, tmp_path):
    """The CUDA kernels include no torch headers, so nvcc checks them even where torch has no CUDA."""
    cmd = ["nvcc", "-arch=sm_90", "-std=c++17", "-O2", "-I", str(_native.source_dir() / "include"),
           "-c", str(source), "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
