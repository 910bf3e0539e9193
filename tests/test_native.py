import glob
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from duo_kernels import _native


def test_build_key_names_versions():
    key = _native.build_key(False)
    assert "torch" in key and "-cpu-" in key and _native.__version__ in key
    assert key.endswith(_native.sources_hash(False))


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


def _cuda_include() -> str | None:
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"))
    if nvcc:
        candidates.insert(0, str(Path(nvcc).resolve().parent.parent))
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return str(Path(root) / "include")
    return None


@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA toolkit headers on this machine")
def test_bindings_cuda_branch_compiles(tmp_path):
    """bindings.cpp's DUO_WITH_CUDA branch, syntax-checked against torch's headers even where torch
    is a CPU build (which lacks one generated c10 header: an empty stand-in is enough to parse)."""
    from torch.utils.cpp_extension import include_paths

    (tmp_path / "c10" / "cuda" / "impl").mkdir(parents=True)
    (tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("")
    src = _native.source_dir()
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-w", "-DDUO_WITH_CUDA", "-DTORCH_EXTENSION_NAME=duo_check",
           *(f"-I{p}" for p in include_paths()), f"-I{tmp_path}", f"-I{_cuda_include()}", f"-I{src}",
           f"-I{src / 'include'}", f"-I{sysconfig.get_paths()['include']}", str(src / "bindings.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_build_key_hashes_the_sources_and_flags(tmp_path, monkeypatch):
    """Two checkouts with other sources (or other flags) never share a build folder."""
    shutil.copytree(_native.source_dir(), tmp_path / "csrc")
    monkeypatch.setattr(_native, "source_dir", lambda: tmp_path / "csrc")
    key = _native.build_key(False)
    header = tmp_path / "csrc" / "include" / "duo" / "common.h"
    header.write_text(header.read_text() + "\n// changed\n")
    changed = _native.build_key(False)
    monkeypatch.setattr(_native, "CFLAGS", ["-O2"])
    assert len({key, changed, _native.build_key(False)}) == 3


def _fresh_native(monkeypatch, cache) -> None:
    monkeypatch.setenv("DUO_KERNELS_CACHE", str(cache))
    monkeypatch.setattr(_native, "_builds", {})


@pytest.mark.parametrize("problem", ["a file", "read-only"])
def test_an_unusable_cache_is_a_build_error_and_auto_falls_back(problem, tmp_path, monkeypatch):
    import torch

    import duo_kernels
    from duo_kernels import _dispatch

    cache = tmp_path / "cache"
    if problem == "a file":
        cache.write_text("")
    else:
        cache.mkdir()
        real_write_bytes = Path.write_bytes

        def read_only(self, data):
            if str(self).startswith(str(cache)):
                raise OSError(30, "Read-only file system", str(self))
            return real_write_bytes(self, data)
        monkeypatch.setattr(Path, "write_bytes", read_only)
    _fresh_native(monkeypatch, cache)
    with pytest.raises(_native.NativeBuildError, match=f"the build cache {cache}"):
        _native.load(cuda=False)
    monkeypatch.setattr(_dispatch, "_warned", set())
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.warns(RuntimeWarning, match=f"impl='auto' skips 'cpu': the build cache {cache}"):
        out = duo_kernels.gaussian_argmax(ids, torch.full((2,), -1.0), 7, seed=0)
    assert out.shape == (2, 3)


def test_waiting_for_another_build_says_so_and_gives_up(tmp_path, monkeypatch, capsys):
    import fcntl

    _fresh_native(monkeypatch, tmp_path)
    monkeypatch.setattr(_native, "WAIT_MESSAGE_EVERY", 0.2)
    monkeypatch.setenv("DUO_KERNELS_BUILD_WAIT", "0.5")
    build_dir = _native._build_dir(False)
    with open(build_dir / "build.lock", "a") as held:  # another process's build (flock is per open file)
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(_native.NativeBuildError, match=f"held the build lock {build_dir / 'build.lock'}"):
            _native.load(cuda=False)
    messages = capsys.readouterr().err.strip().splitlines()
    assert len(messages) >= 2 and all("waiting for another process" in m for m in messages), messages
