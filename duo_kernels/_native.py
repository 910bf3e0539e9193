"""Just-in-time build of the native kernels in ``csrc/`` (CPU always, CUDA when it can).

``load()`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja, pybind11) on first use
and imports the result. The build is cached under :func:`cache_dir`, in a folder named by
:func:`build_key`: the package, Python, torch and CUDA versions, the GPU architecture, and a hash of
every file under ``csrc/``, the compile flags and the compiler (so two checkouts or venvs with other
sources never share a folder). A file lock guards it, so that two processes (say, the ranks of a
``torchrun`` job) never build into the same folder at once; a process waiting for another's build says
so every 10 s and gives up after ``DUO_KERNELS_BUILD_WAIT`` seconds (default 900). Any problem with the
cache (not a folder, not writable, its lock held too long) is a :class:`NativeBuildError` naming the
path, so ``impl="auto"`` warns and falls back. The CUDA kernels are added when torch has CUDA, a GPU
is visible and ``nvcc`` is found; otherwise the module holds the CPU kernels only.

Environment:

- ``DUO_KERNELS_CACHE``: the cache folder (default ``~/.cache/duo_kernels``);
- ``DUO_KERNELS_BUILD_WAIT``: seconds to wait for another process's build (default 900);
- ``DUO_KERNELS_VERBOSE_BUILD=1``: show the compiler's output;
- ``DUO_KERNELS_NO_CUDA_BUILD=1``: build the CPU kernels only;
- ``DUO_KERNELS_NO_SIMD=1`` (read at run time): the C++ top-k kernel takes its scalar path instead of
  the AVX2 one (same results; for comparison and for debugging).
"""

from __future__ import annotations

import contextlib
import hashlib
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


CFLAGS = ["-O3"]  # the C++ standard is torch's own choice for its headers
CUDA_CFLAGS = ["-O3"]
WAIT_MESSAGE_EVERY = 10.0  # seconds between messages while another process builds


def _flags(with_cuda: bool) -> list[str]:
    return CFLAGS + (["-DDUO_WITH_CUDA"] if with_cuda else [])


def sources_hash(with_cuda: bool) -> str:
    """A hash of every file under ``csrc/`` (path and content), the compile flags and the compiler."""
    src = source_dir()
    digest = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    compiler = [os.environ.get("CXX", "c++"), *_flags(with_cuda), *(CUDA_CFLAGS if with_cuda else [])]
    digest.update("\0".join(compiler).encode())
    return digest.hexdigest()[:12]


def build_key(with_cuda: bool) -> str:
    """Names the build folder: package, Python, torch, CUDA version, GPU architecture, and
    :func:`sources_hash` (sources, flags, compiler)."""
    if with_cuda:
        major, minor = torch.cuda.get_device_capability()
        accel = f"cu{torch.version.cuda}-sm{major}{minor}"
    else:
        accel = "cpu"
    raw = (f"duo{__version__}-py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{accel}-"
           f"{sources_hash(with_cuda)}")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


def _build_dir(with_cuda: bool) -> Path:
    """The build folder, created; any problem with it is a NativeBuildError naming the path."""
    build_dir = cache_dir() / build_key(with_cuda)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        probe = build_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise NativeBuildError(f"the build cache {build_dir} cannot be used ({exc.strerror or exc}); set "
                               "DUO_KERNELS_CACHE to a writable folder") from None
    return build_dir


@contextlib.contextmanager
def _locked(build_dir: Path):
    """Hold the build folder's file lock; say every WAIT_MESSAGE_EVERY seconds that this process waits
    for another's build, and give up after DUO_KERNELS_BUILD_WAIT seconds."""
    from filelock import FileLock, Timeout

    path = build_dir / "build.lock"
    limit = float(os.environ.get("DUO_KERNELS_BUILD_WAIT", "900"))
    lock, waited = FileLock(str(path)), 0.0
    while True:
        try:
            lock.acquire(timeout=min(WAIT_MESSAGE_EVERY, max(limit - waited, 0.0)))
            break
        except Timeout:
            waited += WAIT_MESSAGE_EVERY
        except OSError as exc:
            raise NativeBuildError(f"the build lock {path} cannot be taken ({exc.strerror or exc}); set "
                                   "DUO_KERNELS_CACHE to a writable folder") from None
        if waited >= limit:
            raise NativeBuildError(f"another process has held the build lock {path} for over {limit:.0f} s; if "
                                   "no build is running, delete the file (or raise DUO_KERNELS_BUILD_WAIT)")
        print(f"duo_kernels: waiting for another process to finish building the native kernels in {build_dir} "
              f"({waited:.0f} s; lock {path})", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        lock.release()


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
    from torch.utils.cpp_extension import load as cpp_load

    _check_tools(with_cuda)
    build_dir = _build_dir(with_cuda)
    src = source_dir()
    verbose = os.environ.get("DUO_KERNELS_VERBOSE_BUILD") == "1"
    with _locked(build_dir):
        # torch's own build baton ("lock") outlives a build that was killed, and a later build would
        # wait on it forever; under our file lock no other process is building here, so it is stale.
        (build_dir / "lock").unlink(missing_ok=True)
        try:
            return cpp_load(
                name=f"duo_kernels_native_{'cuda' if with_cuda else 'cpu'}",
                sources=_sources(with_cuda),
                extra_include_paths=[str(src), str(src / "include")],
                extra_cflags=_flags(with_cuda),
                extra_cuda_cflags=CUDA_CFLAGS if with_cuda else None,
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
