"""The project's CPU performance targets, measured in one run on this machine:

    python benchmarks/cpu_targets.py [--repeats N] [--threads 1 2] [--smoke]

Every baseline is the published code's hot path, transcribed in ``benchmarks/cases.py`` (not our
float64 oracle ``duo_kernels.reference``, a correctness tool several times slower than it):

- exact forward process at B = 4, L = 256, V = 50258: ``gaussian_argmax(impl="cpu")`` (the C++
  kernel) against the published curriculum's ``torch.randn`` (B, L, V) latent + argmax
  (``cases._torch_latent_argmax``), target >= 100x; one torch thread;
- top-k relaxation, k = 8, tau = 1e-3, at B = 4, L = 256 and B = 32, L = 1024:
  ``tempered_softmax_topk(impl="cpu")`` (exact and compat mode) against Duo++'s own sampler
  (``cases.published_tempered_softmax_topk``: float64 torch ops, torch's generator), target >= 10x,
  at each ``--threads`` count (1 and 2 by default).

Each pair is timed alternately (published call, native call, ...), median over ``--repeats`` rounds
(a quarter of them at B = 32, 3 for the dense latent). Both the wall clock and the process CPU time
of each call are recorded; the table shows both medians and both ratios. On the shared 2-core
development machine other jobs swing wall-clock medians between runs (CPU time is steadier at one
thread; at two it sums both threads' work), so the load average is printed with the table and only
the ratios of one run are compared. ``--smoke`` shrinks everything to check that the script runs.
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
from benchmarks.cases import _torch_latent_argmax, published_tempered_softmax_topk  # noqa: E402
from duo_kernels import reference  # noqa: E402

VOCAB = 50258
GAMMA = -2.7  # inside the OWT window [-3.55, -1.85]
TAU = 1e-3
K = 8


def _ms(fn) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def compare(name: str, shape, vocab_size: int, published_fn, native_fn, rounds: int, target: str) -> str:
    """Alternate published and native calls; one markdown row with both medians and their ratios."""
    x0 = torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(0))
    native_fn(x0)  # warm-up: builds or loads the native module
    published_fn(x0)
    published_ms, native_ms = [], []
    for _ in range(rounds):
        published_ms.append(_ms(lambda: published_fn(x0)))
        native_ms.append(_ms(lambda: native_fn(x0)))
    (pub_wall, pub_cpu), (nat_wall, nat_cpu) = ([statistics.median(t) for t in zip(*ms)]
                                                for ms in (published_ms, native_ms))
    b, l = shape
    return (f"| {name} | B={b} L={l} | {torch.get_num_threads()} | {nat_wall:.3g} ({nat_cpu:.3g}) | "
            f"{pub_wall:.4g} ({pub_cpu:.4g}) | **{pub_wall / nat_wall:.1f}×** ({pub_cpu / nat_cpu:.1f}×) | "
            f"{target} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="rounds per top-k pair at B=4 (a quarter at "
                        "B=32; 3 for the dense latent)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts of the top-k rows")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 round: check that the script runs")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
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
    print(f"{platform.machine()}, torch {torch.__version__}, commit {commit or 'unknown'}, {datetime.date.today()}, "
          f"load average {load}; gamma = {GAMMA}, tau = {TAU}, V = {vocab}")
    print("| op | shape | threads | native ms wall (CPU) | published ms wall (CPU) | speed-up wall (CPU) | target |")
    print("|---|---|---|---|---|---|---|")
    torch.set_num_threads(1)
    print(compare("exact forward process: `gaussian_argmax` vs `torch.randn` latent + argmax", shape, vocab,
                  lambda x0: _torch_latent_argmax(x0, [torch.tensor([GAMMA], dtype=torch.float64)], vocab),
                  lambda x0: duo_kernels.gaussian_argmax(x0, GAMMA, vocab, seed=0, impl="cpu"),
                  dense_rounds, "≥ 100×"))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in (shape, large):
            a_tilde, s_tilde = reference.gaussian_params(torch.full((size[0],), GAMMA, dtype=torch.float64))
            published = lambda x0, a=a_tilde, s=s_tilde: published_tempered_softmax_topk(  # noqa: E731
                x0, a, s, vocab, K, 1.0 / TAU)
            for mode, compat in (("exact", False), ("compat", True)):
                print(compare(f"top-k relaxation k={K} ({mode} mode) vs Duo++'s sampler", size, vocab, published,
                              lambda x0, c=compat: duo_kernels.tempered_softmax_topk(
                                  x0, GAMMA, vocab, K, TAU, reference_compat=c, seed=0, impl="cpu"),
                              rounds if size == shape else max(1, rounds // 4), "≥ 10×"))
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"
    print(f"load average after the run: {load}")


if __name__ == "__main__":
    main()
