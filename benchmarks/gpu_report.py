"""One prepared command for a GPU machine: time every registered case against its reference.

    python benchmarks/gpu_report.py --out DIR [--cases SUBSTRING ...] [--repeats N] [--cpu-smoke]

Prints the environment, builds the native kernels, measures the device-to-device copy bandwidth,
then, for each case of ``benchmarks/cases.py`` (those whose name contains one of ``--cases``), times
the fused op and the reference path in the same run: warm-up, then the median of ``--repeats`` calls
with CUDA events around each. Peak extra memory is the most allocated during one call beyond what
was allocated before it (the inputs), outputs included. The floor is ``bytes_moved`` over the copy
bandwidth. A case that raises (out of memory, say) gets its error in its row and the run goes on.

Writes ``DIR/report.json`` (environment + rows) and ``DIR/report.md`` after every case, so that a run
cut short still leaves its finished rows, and ``DIR/report.png`` (speed-ups, log scale) at the end;
the markdown table is printed last.

``--cpu-smoke`` runs the same code on CPU at ``SMOKE_SHAPE`` with ``time.perf_counter`` and no
memory figures, 3 repeats by default: a test that the script works, not a benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

# The GPU machine runs a bare copy of the checkout (nothing pip-installed): put the repository root
# first on the path so that `benchmarks` and `duo_kernels` import from this tree.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.cases import CASES, SMOKE_SHAPE, Case, Shape  # noqa: E402
from duo_kernels import _native  # noqa: E402
from duo_kernels._version import __version__  # noqa: E402

GIB = 2**30
WARMUP = 3  # the first call compiles Triton kernels; the next two settle the caching allocator
GPU_REPEATS = 20
SMOKE_REPEATS = 3
GPU_COPY_BYTES = GIB  # per buffer: ≫ L2 (50 MB on H100/H200), so the copy measures HBM
SMOKE_COPY_BYTES = 16 * 2**20

COLUMNS = ["op", "shape", "fused ms", "ref ms", "speed-up", "fused peak GiB", "ref peak GiB", "floor ms",
           "× floor", "target"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Return freed blocks to the device, so that one case's cache does not crowd the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median milliseconds of one ``fn()`` call after ``WARMUP`` calls: CUDA events around each call on
    a GPU (each call waited for, so a call's launch overhead counts), ``time.perf_counter`` on CPU."""
    for _ in range(WARMUP):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_gib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """The most memory one ``fn()`` call allocates beyond what was live before it (outputs included);
    ``None`` on CPU, where torch's allocations are not tracked."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak / GIB


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.rand(nbytes // 4, device=device)  # random data: zeros can run faster than real data
    dst = torch.empty_like(src)
    ms = time_ms(functools.partial(dst.copy_, src), device, repeats)
    nbytes_moved = 2 * src.nbytes
    del src, dst
    release(device)
    return nbytes_moved / (ms * 1e-3)


def describe(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line[:300]}"


def run_case(case: Case, shape: Shape, device: torch.device, repeats: int, bandwidth: float) -> dict:
    """One report row; errors are recorded in ``row["error"]``, never raised."""
    row: dict[str, Any] = {
        "name": case.name, "family": case.family, "backward": case.backward, "shape": shape,
        "target": case.target, "bytes_moved": None, "floor_ms": None, "fused_ms": None, "ref_ms": None,
        "fused_peak_gib": None, "ref_peak_gib": None, "speedup": None, "x_floor": None, "error": None,
    }
    errors = []
    try:
        row["bytes_moved"] = case.bytes_moved(shape)
        row["floor_ms"] = row["bytes_moved"] / bandwidth * 1e3
        inputs = case.make_inputs(shape, device)
    except Exception as exc:
        row["error"] = f"inputs: {describe(exc)}"
        release(device)
        return row
    for path, op in (("fused", case.fused), ("ref", case.reference)):
        call = functools.partial(op, inputs)
        try:
            row[f"{path}_ms"] = time_ms(call, device, repeats)
            row[f"{path}_peak_gib"] = peak_extra_gib(call, device)
        except Exception as exc:  # out of memory, a missing backend, a kernel bug: record, go on
            errors.append(f"{path}: {describe(exc)}")
        release(device)
    del inputs, call
    release(device)
    if row["fused_ms"] and row["ref_ms"]:
        row["speedup"] = row["ref_ms"] / row["fused_ms"]
    if row["fused_ms"] and row["floor_ms"]:
        row["x_floor"] = row["fused_ms"] / row["floor_ms"]
    row["error"] = "; ".join(errors) or None
    return row


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:
        return f"not importable ({exc})"
    return triton.__version__


def environment(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    else:
        name = f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "duo_kernels": __version__,
        "git": _git_commit(),
    }


def build_native() -> str:
    """Build (or load from the cache) the native kernels, so that no case pays for the build."""
    t0 = time.perf_counter()
    try:
        module = _native.load()
    except _native.NativeBuildError as exc:
        return f"not available, impl='auto' uses other backends: {exc}"
    cuda = "with CUDA" if module.with_cuda else "CPU only"
    return f"built ({cuda}) in {time.perf_counter() - t0:.1f} s"


def _env_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _num(x: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [
            r["name"] + (" fwd+bwd" if r["backward"] else ""),
            " ".join(f"{k}={v}" for k, v in r["shape"].items()),
            _num(r["fused_ms"], ".3g"), _num(r["ref_ms"], ".3g"), _num(r["speedup"], ".3g", "×"),
            _num(r["fused_peak_gib"], ".3g"), _num(r["ref_peak_gib"], ".3g"),
            _num(r["floor_ms"], ".3g"), _num(r["x_floor"], ".3g", "×"), r["target"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['name']}: {r['error']}" for r in rows if r["error"]]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines)


def markdown_report(env: dict, rows: list[dict]) -> str:
    head = [f"- {key}: {_env_value(value)}" for key, value in env.items()]
    return "\n".join(["# duo-kernels benchmark report", "", *head, "", markdown_table(rows), ""])


def write_report(out: Path, env: dict, rows: list[dict]) -> None:
    (out / "report.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(env, rows))


def plot(path: Path, env: dict, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["speedup"]]
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.4 * max(1, len(done))))
    if done:
        labels = [r["name"] + (" fwd+bwd" if r["backward"] else "") for r in done]
        speedups = [r["speedup"] for r in done]
        # Bars grow from 1× (right: faster than the reference, left: slower), so length reads as ratio.
        bars = ax.barh(labels, [s - 1.0 for s in speedups], left=1.0,
                       color=["tab:blue" if s >= 1.0 else "tab:red" for s in speedups])
        ax.bar_label(bars, labels=[f"{s:.3g}×" for s in speedups], padding=3)
        ax.set_xscale("log")
        ax.set_xlim(min(speedups + [1.0]) / 4, max(speedups + [1.0]) * 4)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.invert_yaxis()  # registry order, top to bottom
    else:
        ax.text(0.5, 0.5, "no case finished", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("speed-up over the reference (reference ms / fused ms)")
    ax.set_title(f"{env['device']}, {env['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json/.md/.png")
    parser.add_argument("--cases", nargs="+", default=[], metavar="SUBSTRING",
                        help="run only the cases whose name contains one of these")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed calls per path (default {GPU_REPEATS}; {SMOKE_REPEATS} with --cpu-smoke)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run on CPU at SMOKE_SHAPE: proves the script works, measures nothing")
    args = parser.parse_args(argv)

    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.cpu_smoke:
        device, repeats, copy_bytes = torch.device("cpu"), args.repeats or SMOKE_REPEATS, SMOKE_COPY_BYTES
    elif torch.cuda.is_available():
        device, repeats, copy_bytes = torch.device("cuda"), args.repeats or GPU_REPEATS, GPU_COPY_BYTES
    else:
        parser.error("no CUDA device is visible: run this on a GPU machine, or pass --cpu-smoke")
    cases = [c for c in CASES if not args.cases or any(s in c.name for s in args.cases)]
    if not cases:
        parser.error(f"no case name contains any of {args.cases}; cases: {[c.name for c in CASES]}")
    args.out.mkdir(parents=True, exist_ok=True)

    env = environment(device)
    env["native"] = build_native()
    env["copy_bandwidth_GBps"] = copy_bandwidth(device, copy_bytes, repeats) / 1e9
    env["repeats"] = repeats
    for key, value in env.items():
        print(f"{key:<20} {_env_value(value)}", flush=True)

    rows: list[dict] = []
    for case in cases:
        shape = {**case.shape, **SMOKE_SHAPE} if args.cpu_smoke else dict(case.shape)
        print(f"timing {case.name} ...", flush=True)
        rows.append(run_case(case, shape, device, repeats, env["copy_bandwidth_GBps"] * 1e9))
        write_report(args.out, env, rows)
    plot(args.out / "report.png", env, rows)
    print()
    print(markdown_table(rows))
    print(f"\nwrote {args.out / 'report.json'}, report.md, report.png")


if __name__ == "__main__":
    main()
