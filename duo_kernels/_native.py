"""Just-in-time build of the native kernels in ``csrc/`` (CPU always, CUDA when it can).

``load()`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja, pybind11) on first use
and imports the result. The build is cached under :func:`cache_dir`, keyed by the package, torch and
CUDA versions and the GPU architecture, and guarded by a file lock so that two processes (say, the
ranks of a ``torchrun`` job) never build into the same folder at once. The CUDA kernels are added
when torch has CUDA, a GPU is visible and ``nvcc`` is found; otherwise the module holds the CPU
kernels only.

Environment:

- ``DUO_KERNELS_CACHE``: the cache folder (default ``~/.cache/duo_kernels``);
- ``DUO_KERNELS_VERBOSE_BUILD=1``: show the compiler's output;
- ``DUO_KERNELS_NO_CUDA_BUILD=1``: build the CPU kernels only;
- ``DUO_KERNELS_NO_SIMD=1`` (read at run time): the C++ top-k kernel takes its scalar path instead of
  the AVX2 one (same results; for comparison and for debugging).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
from pathlib import Path

import torch

from duo_kernels._version import __version__


class NativeBuildError(RuntimeError):
    """The native kernels could not be built; the message names the missing tool and the fix."""


def source_dir() -> Path:
    """``csrc/`` beside the package (a source checkout) or inside it (an installed wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "bindings.cpp").exists():
            return candidate
    raise NativeBuildError(f"csrc/ not found next to {here}; reinstall duo-kernels")


def cache_dir() -> Path:
    return Path(os.environ.get("DUO_KERNELS_CACHE", Path.home() / ".cache" / "duo_kernels"))


def _want_cuda() -> bool:
    return (
        os.environ.get("DUO_KERNELS_NO_CUDA_BUILD") != "1"
        and torch.version.cuda is not None
        and torch.cuda.is_available()
    )


def build_key(with_cuda: bool) -> str:
    """Names the build folder: package, Python, torch, CUDA version and GPU architecture."""
    if with_cuda:
        major, minor = torch.cuda.get_device_capability()
        accel = f"cu{torch.version.cuda}-sm{major}{minor}"
    else:
        accel = "cpu"
    raw = f"duo{__version__}-py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{accel}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


def _find_nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _check_tools(with_cuda: bool) -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        hint = "apt-get install g++" if platform.system() == "Linux" else "install a C++17 compiler"
        raise NativeBuildError(f"no C++ compiler ({cxx!r} is not on PATH): {hint}, or set CXX")
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except RuntimeError:
        raise NativeBuildError("ninja is not installed: pip install ninja") from None
    if with_cuda and _find_nvcc() is None:
        raise NativeBuildError(
            "nvcc (the CUDA compiler) was not found: install the CUDA toolkit matching "
            f"torch's CUDA {torch.version.cuda} and put its bin/ on PATH or set CUDA_HOME"
        )


def _sources(with_cuda: bool) -> list[str]:
    src = source_dir()
    files = [src / "bindings.cpp", *sorted((src / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((src / "cuda").glob("*.cu"))
    return [str(f) for f in files]


def _build(with_cuda: bool):
    from filelock import FileLock
    from torch.utils.cpp_extension import load as cpp_load

    _check_tools(with_cuda)
    build_dir = cache_dir() / build_key(with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    src = source_dir()
    flags = ["-O3"]  # the C++ standard is torch's own choice for its headers
    defines = ["-DDUO_WITH_CUDA"] if with_cuda else []
    verbose = os.environ.get("DUO_KERNELS_VERBOSE_BUILD") == "1"
    with FileLock(str(build_dir / "build.lock")):
        # torch's own build baton ("lock") outlives a build that was killed, and a later build would
        # wait on it forever; under our file lock no other process is building here, so it is stale.
        (build_dir / "lock").unlink(missing_ok=True)
        try:
            return cpp_load(
                name=f"duo_kernels_native_{'cuda' if with_cuda else 'cpu'}",
                sources=_sources(with_cuda),
                extra_include_paths=[str(src), str(src / "include")],
                extra_cflags=flags + defines,
                extra_cuda_cflags=["-O3"] if with_cuda else None,
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                verbose=verbose,
            )
        except Exception as exc:
            hint = "" if verbose else " (set DUO_KERNELS_VERBOSE_BUILD=1 to see the compiler output)"
            raise NativeBuildError(f"building csrc/ in {build_dir} failed: {exc}{hint}") from exc


_builds: dict[bool, object] = {}


def _load(with_cuda: bool):
    """Build once per process; a failure is remembered too, so ops don't retry it on every call."""
    if with_cuda not in _builds:
        try:
            _builds[with_cuda] = _build(with_cuda)
        except NativeBuildError as exc:
            _builds[with_cuda] = exc
    result = _builds[with_cuda]
    if isinstance(result, NativeBuildError):
        raise result
    return result


def load(cuda: bool | None = None):
    """The native module, built on first use. ``cuda=None``: with CUDA kernels when possible."""
    with_cuda = _want_cuda() if cuda is None else cuda
    if with_cuda and not _want_cuda():
        raise NativeBuildError("the CUDA kernels need a CUDA build of torch and a visible GPU")
    try:
        return _load(with_cuda)
    except NativeBuildError:
        if cuda is None and with_cuda:
            return _load(False)  # CPU tensors still get their kernels; status(cuda=True) says why
        raise


def status(cuda: bool = False) -> tuple[bool, str]:
    """Whether the native CPU (or CUDA) kernels can run here, building them if needed, and if not why."""
    if cuda and not _want_cuda():
        if torch.version.cuda is None:
            return False, f"torch {torch.__version__} is a CPU-only build"
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        return False, "DUO_KERNELS_NO_CUDA_BUILD=1 is set"
    try:
        module = _load(True) if cuda else load()
    except NativeBuildError as exc:
        return False, str(exc)
    if cuda and not module.with_cuda:
        return False, "the native module was built without CUDA"
    return True, ""
