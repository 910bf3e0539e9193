"""The CPU targets of PERF-TARGETS.md, measured in one run on this machine:

    python benchmarks/cpu_targets.py [--repeats N] [--smoke]

- exact forward process at B = 4, L = 256, V = 50258: ``gaussian_argmax(impl="cpu")`` (the C++
  kernel) against ``reference.gaussian_argmax_dense`` (the (B, L, V) latent and its argmax), target
  >= 100x;
- top-k relaxation, k = 8, same shape, tau = 1e-3: ``tempered_softmax_topk(impl="cpu")`` (exact and
  compat mode) against ``reference.tempered_softmax_topk(reference_compat=True)`` (the Duo++
  algorithm in float64 PyTorch), target >= 10x; and, for scale, the same at B = 32, L = 1024.

Each pair is timed alternately (reference call, fused call, ...), median over ``--repeats`` rounds
(3 for the dense latent, which takes tens of seconds). Both sides run on one torch thread and are
timed in process CPU time (``time.process_time``), the work each call does: on the shared
development machine other jobs keep both cores busy, so wall-clock medians swing several-fold
between runs, and 2 OpenMP threads made the reference's many small parallel ops 10-30x slower from
run to run (the dense latent took 350 s instead of ~20 s). Wall-clock medians are printed beside.
One thread is the conservative choice: the native kernels split tokens over cores perfectly, the
reference's small ops do not. Prints a markdown table. ``--smoke`` shrinks everything to check that
the script runs.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import duo_kernels  # noqa: E402
from duo_kernels import reference  # noqa: E402

VOCAB = 50258
GAMMA = -2.7  # inside the OWT window [-3.55, -1.85]
TAU = 1e-3
K = 8


def _ms(fn) -> tuple[float, float]:
    """(process CPU ms, wall ms) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return (time.process_time() - c0) * 1e3, (time.perf_counter() - t0) * 1e3


def compare(name: str, shape, vocab_size: int, reference_fn, fused_fn, rounds: int, target: str) -> str:
    """Alternate reference and fused calls; one markdown row with both medians and their ratio."""
    x0 = torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(0))
    fused_fn(x0)  # warm-up: builds or loads the native module
    ref_ms, fused_ms = [], []
    for _ in range(rounds):
        ref_ms.append(_ms(lambda: reference_fn(x0)))
        fused_ms.append(_ms(lambda: fused_fn(x0)))
    (ref, ref_wall), (fused, fused_wall) = ([statistics.median(t) for t in zip(*ms)] for ms in (ref_ms, fused_ms))
    b, l = shape
    return (f"| {name} | B={b} L={l} V={vocab_size} | {fused:.3g} ({fused_wall:.3g}) | {ref:.4g} ({ref_wall:.4g}) | "
            f"{ref / fused:.1f}× ({ref_wall / fused_wall:.1f}×) | {target} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="rounds per top-k pair at B=4 (a third at "
                        "B=32; 3 for the dense latent)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 round: check that the script runs")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> None:
    shape, large, vocab, rounds, dense_rounds = (4, 256), (32, 1024), VOCAB, args.repeats, 3
    if args.smoke:
        shape, large, vocab, rounds, dense_rounds = (1, 4), (1, 8), 1000, 1, 1

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"
    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"commit {commit or 'unknown'}, {datetime.date.today()}, load average {load}")
    print("| op | shape | native CPU ms (wall) | reference CPU ms (wall) | speed-up CPU (wall) | target |")
    print("|---|---|---|---|---|---|")
    print(compare("exact forward process (gaussian_argmax) vs dense latent + argmax", shape, vocab,
                  lambda x0: reference.gaussian_argmax_dense(x0, GAMMA, vocab, seed=0),
                  lambda x0: duo_kernels.gaussian_argmax(x0, GAMMA, vocab, seed=0, impl="cpu"),
                  dense_rounds, "≥ 100×"))
    compat_reference = lambda x0: reference.tempered_softmax_topk(  # noqa: E731
        x0, GAMMA, vocab, K, TAU, reference_compat=True, seed=0)
    for size in (shape, large):
        for mode, compat in (("exact", False), ("compat", True)):
            print(compare(f"top-k relaxation k={K} ({mode} mode) vs Duo++-style reference", size, vocab,
                          compat_reference,
                          lambda x0, c=compat: duo_kernels.tempered_softmax_topk(
                              x0, GAMMA, vocab, K, TAU, reference_compat=c, seed=0, impl="cpu"),
                          rounds if size == shape else max(1, rounds // 3), "≥ 10×"))


if __name__ == "__main__":
    main()
