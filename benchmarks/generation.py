"""Generation latency and throughput: Duo at few steps against an autoregressive DiT with a KV cache.

    python benchmarks/generation.py [--cpu] [--duo RUN --ar RUN --judge RUN] [--out DIR]

For one backbone size and sequence length L, at batch 1 (latency) and batch 32 (throughput), times one
batch of L tokens from

- **AR**: the causal DiT with a KV cache (``duo_model.ar_sample.generate_ar``): L - 1 calls of one token;
- **Duo, fused step**: ``duo_model.sample.generate`` at 1024 / 256 / 64 / 16 / 8 / 4 steps, ending with
  an ancestral noise-removal step or the Greedy-Tail (steps + 1 calls);
- **Duo, published step**: the same loop and ancestral ending with the published sampler's float64
  dense step (``benchmarks.cases.published_ancestral_step``) in place of the fused one.

Each cell is run once, then, if that took under a second, timed as the median of ``--repeats`` more
runs (a longer first run is the cell's time). A cell that fails (out of memory, say) gets its error in
its row and the run goes on. Wall time per batch, tokens/s, and AR time / cell time (> 1: faster than AR),
in wall time and in process CPU time (on one thread, the work done: robust to other jobs on a shared
machine). With trained runs (``--duo`` and ``--ar``, same DiT size, and ``--judge``, an AR
run) each sampler setting's Gen PPL and unigram entropy (``duo eval --gen``'s) are measured on the
batch-32 samples; without them the weights are random and only time is measured.

Sizes: on a GPU DiT-small, V = 50258, L = 1024, bf16 autocast; ``--cpu``: DiT-demo, V = 2048,
L = 128 and 512, fp32, and cells above ``--max-token-calls`` (steps x B x L; default 2^18) are skipped
and marked so, which keeps the run to minutes on 2 cores; ``--smoke``: a tiny DiT in seconds (a test
that the script works). Writes ``generation.md`` (environment, table, AR / Duo-8 latency ratios and the
crossover step count), ``generation.json`` and ``generation.png`` (Gen PPL, or time, against latency,
AR as reference lines) into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.cases import published_sampler  # noqa: E402
from duo_model.ar_sample import generate_ar  # noqa: E402
from duo_model.dit import DiT, DiTConfig  # noqa: E402
from duo_model.sample import generate  # noqa: E402

STEPS = (1024, 256, 64, 16, 8, 4)
BATCHES = (1, 32)
SIZES = {  # (preset, overrides, vocabulary, lengths)
    "gpu": ("small", {}, 50258, (1024,)),
    "cpu": ("demo", {}, 2048, (128, 512)),
    "smoke": ("demo", dict(d_model=32, n_blocks=2, n_heads=2, cond_dim=32), 64, (16,)),
}
SAMPLERS = (("Duo fused", "ancestral"), ("Duo fused", "greedy"), ("Duo published", "ancestral"))


def environment(device: torch.device) -> dict:
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")] if cpuinfo.exists() else [platform.processor()]
        machine = f"{names[0] if names else platform.machine()} ({len(names)} cores)"
    return {"machine": machine, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "commit": commit or "unknown", "date": str(datetime.date.today()), "load_average_start": load_average()}


def load_average() -> str:
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else "n/a"


def random_models(preset: str, overrides: dict, vocab_size: int, device) -> tuple[DiT, DiT]:
    """A Duo DiT and a causal DiT of the same size, every weight random (the zero-initialised adaLN and
    head layers too, so that the logits are not uniform)."""
    models = []
    for causal in (False, True):
        torch.manual_seed(0)
        model = DiT(DiTConfig.preset(preset, vocab_size, dropout=0.0, causal=causal, **overrides))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        models.append(model.to(device).eval())
    return models[0], models[1]


def trained_models(args, device):
    from duo_model.checkpoint import load_model
    from duo_model.eval import load_judge

    duo, duo_info = load_model(args.duo, device=device)
    ar, ar_info = load_model(args.ar, device=device)
    for name, info, algo in ((args.duo, duo_info, "duo"), (args.ar, ar_info, "ar")):
        if info["config"]["train"]["algo"] != algo:
            raise SystemExit(f"{name} is an algo={info['config']['train']['algo']} run; expected algo={algo}")
    sizes = [{k: v for k, v in m.config.to_dict().items() if k not in ("causal", "dropout")} for m in (duo, ar)]
    if sizes[0] != sizes[1]:
        raise SystemExit(f"--duo and --ar must have the same DiT size and vocabulary: {sizes[0]} vs {sizes[1]}")
    judge = load_judge(args.judge, device) if args.judge else None
    return duo, ar, duo_info, judge


def run_sampler(kind: str, ending: str, steps: int, models, batch: int, seq_len: int, device, bos_id: int):
    duo, ar = models
    common = dict(num_samples=batch, seq_len=seq_len, seed=0, batch_size=batch, device=device)
    if kind == "AR":
        return generate_ar(ar, bos_id=bos_id, **common)
    with published_sampler(kind == "Duo published"):
        return generate(duo, steps=steps, noise_removal=ending, **common)


def time_cell(kind, ending, steps, models, batch, seq_len, device, bos_id, repeats):
    """(median wall seconds per batch, median process CPU seconds, the ids of the last run): a first run,
    then, where it took under a second, the median of ``repeats`` more."""
    def measure():
        cpu = time.process_time()
        ids, stats = run_sampler(kind, ending, steps, models, batch, seq_len, device, bos_id)
        return stats["seconds"], time.process_time() - cpu, ids

    runs = [measure()]
    if runs[0][0] < 1.0:
        runs = [measure() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[-1][2]


def quality(ids: torch.Tensor, tokenizer, judge) -> dict:
    from duo_model.eval import generative_perplexity, unigram_entropy
    from duo_model.sample import decode

    gen = generative_perplexity(decode(tokenizer, ids), judge, batch_size=8)
    return {"gen_ppl": gen["gen_ppl"], "entropy": unigram_entropy(ids)}


def crossover(cells: list[dict], ar_time: float, key: str) -> tuple[int | None, float | None]:
    """(largest measured step count at which Duo beats AR, the step count where a least-squares line
    through its times, time = a + b (steps + 1), meets AR's), in the time ``key`` of the cells."""
    points = [(c["calls"], c[key]) for c in cells if c["seconds"] is not None]
    faster = [c["steps"] for c in cells if c["seconds"] is not None and c[key] < ar_time]
    if len(points) < 2:
        return max(faster, default=None), None
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    intercept = my - slope * mx
    fitted = (ar_time - intercept) / slope - 1 if slope > 0 else None
    return max(faster, default=None), fitted


def run(args) -> dict:
    mode = "smoke" if args.smoke else ("cpu" if args.cpu or not torch.cuda.is_available() else "gpu")
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    preset, overrides, vocab_size, lengths = SIZES[mode]
    steps_grid = args.steps or ((8, 4) if mode == "smoke" else STEPS)
    batches = args.batches or ((1, 2) if mode == "smoke" else BATCHES)
    max_token_calls = args.max_token_calls if args.max_token_calls is not None else (
        2**18 if mode == "cpu" else None)
    tokenizer = judge = None
    bos_id = 0
    if args.duo or args.ar:
        if not (args.duo and args.ar):
            raise SystemExit("give both --duo and --ar (and --judge for Gen PPL)")
        duo, ar, info, judge = trained_models(args, device)
        tokenizer, bos_id = info["tokenizer"], info["tokenizer"].bos_id
        lengths = (args.seq_len or info["config"]["train"]["seq_len"],)
        preset = f"d={duo.config.d_model}, {duo.config.n_blocks} blocks"
        vocab_size = duo.config.vocab_size
    else:
        duo, ar = random_models(preset, overrides, vocab_size, device)
        if args.seq_len:
            lengths = (args.seq_len,)
    env = environment(device)
    env.update(mode=mode, model=preset, vocab_size=vocab_size, precision="bf16 autocast" if mode == "gpu" else "fp32",
               max_token_calls=max_token_calls)
    for kind, ending, steps in (("AR", "", 0), ("Duo fused", "greedy", 1)):  # load kernels, settle allocators
        run_sampler(kind, ending, steps, (duo, ar), 1, 8, device, bos_id)
    cells = []
    for seq_len in lengths:
        for batch in batches:
            settings = [("AR", "", seq_len - 1)] + [(kind, ending, s) for kind, ending in SAMPLERS for s in steps_grid]
            for kind, ending, steps in settings:
                calls = steps if kind == "AR" else steps + 1
                cell = {"L": seq_len, "B": batch, "sampler": kind, "ending": ending,
                        "steps": None if kind == "AR" else steps, "calls": calls, "seconds": None}
                if kind != "AR" and max_token_calls and steps * batch * seq_len > max_token_calls:
                    cell["skipped"] = f"steps x B x L > {max_token_calls}"
                else:
                    try:
                        seconds, cpu_seconds, ids = time_cell(kind, ending, steps, (duo, ar), batch, seq_len, device,
                                                              bos_id, args.repeats)
                    except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. the published step's fp64 at B=32
                        cell["skipped"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    else:
                        cell.update(seconds=seconds, cpu_seconds=cpu_seconds, tokens_per_s=batch * seq_len / seconds)
                        if judge is not None and batch == max(batches):
                            cell.update(quality(ids, tokenizer, judge))
                cells.append(cell)
                print(json.dumps(cell), flush=True)
    env["load_average_end"] = load_average()
    return {"environment": env, "cells": cells, "summary": summarize(cells)}


def summarize(cells: list[dict]) -> list[dict]:
    """Per (L, B), in wall and in CPU time: AR / Duo-8 (fused, Greedy-Tail) and the crossover."""
    out = []
    for seq_len, batch in sorted({(c["L"], c["B"]) for c in cells}):
        group = [c for c in cells if c["L"] == seq_len and c["B"] == batch]
        ar = next(c for c in group if c["sampler"] == "AR")
        if ar["seconds"] is None:
            continue
        greedy = [c for c in group if c["sampler"] == "Duo fused" and c["ending"] == "greedy"]
        eight = next((c for c in greedy if c["steps"] == 8 and c["seconds"] is not None), None)
        row = {"L": seq_len, "B": batch, "ar_seconds": ar["seconds"]}
        for key, label in (("seconds", "wall"), ("cpu_seconds", "cpu")):
            faster, fitted = crossover(greedy, ar[key], key)
            row.update({f"ar_over_duo8_{label}": ar[key] / eight[key] if eight else None,
                        f"largest_faster_steps_{label}": faster, f"crossover_steps_fit_{label}": fitted})
        out.append(row)
    return out


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"{env['machine']}, torch {env['torch']}, {env['torch_threads']} torch threads, {env['precision']}, "
             f"commit {env['commit']}, {env['date']}, load average {env['load_average_start']} (start) / "
             f"{env['load_average_end']} (end); DiT-{env['model']}, V = {env['vocab_size']}.", "",
             "| L | B | sampler | steps | calls | ms / batch | tokens/s | AR / this (wall) | CPU ms | AR / this (CPU) "
             "| Gen PPL | entropy |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ar = {(c["L"], c["B"]): c for c in result["cells"] if c["sampler"] == "AR"}
    for c in result["cells"]:
        name = c["sampler"] if c["sampler"] == "AR" else (
            f"{c['sampler']}, {'Greedy-Tail' if c['ending'] == 'greedy' else 'ancestral'}")
        steps = "—" if c["steps"] is None else c["steps"]
        if c["seconds"] is None:
            lines.append(f"| {c['L']} | {c['B']} | {name} | {steps} | {c['calls']} | skipped ({c['skipped']}) "
                         "| | | | | | |")
            continue
        ppl = f"{c['gen_ppl']:.2f} | {c['entropy']:.3f}" if "gen_ppl" in c else "— | —"
        base = ar[(c["L"], c["B"])]
        ratios = [f"{base[key] / c[key]:.3g}×" if base["seconds"] else "n/a" for key in ("seconds", "cpu_seconds")]
        lines.append(f"| {c['L']} | {c['B']} | {name} | {steps} | {c['calls']} | {_number(1e3 * c['seconds'])} | "
                     f"{_number(c['tokens_per_s'])} | {ratios[0]} | {_number(1e3 * c['cpu_seconds'])} | {ratios[1]} "
                     f"| {ppl} |")
    lines += ["", "Duo fused + Greedy-Tail against AR, wall time (process CPU time):", "",
              "| L | B | AR ms | AR / Duo-8 | largest measured steps faster than AR | crossover steps (line fit) |",
              "|---|---|---|---|---|---|"]

    def both(row, name, fmt):
        return " (".join(fmt(row[f"{name}_{label}"]) for label in ("wall", "cpu")) + ")"

    for s in result["summary"]:
        lines.append(f"| {s['L']} | {s['B']} | {_number(1e3 * s['ar_seconds'])} | "
                     f"{both(s, 'ar_over_duo8', lambda v: 'n/a' if v is None else f'{v:.3g}×')} | "
                     f"{both(s, 'largest_faster_steps', lambda v: str(v or 'none'))} | "
                     f"{both(s, 'crossover_steps_fit', lambda v: 'n/a' if v is None else f'{v:.0f}')} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cells = [c for c in result["cells"] if c["seconds"] is not None]
    with_quality = any("gen_ppl" in c for c in cells)
    groups = sorted({(c["L"], c["B"]) for c in cells})
    if with_quality:  # Gen PPL (from the batch-32 samples) against the batch-1 latency of the same setting
        groups = sorted({(L, min(c["B"] for c in cells)) for L, _ in groups})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (seq_len, batch) in zip(axes[0], groups):
        group = [c for c in cells if c["L"] == seq_len and c["B"] == batch]
        ppl = {(c["sampler"], c["ending"], c["steps"]): c["gen_ppl"] for c in cells
               if c["L"] == seq_len and "gen_ppl" in c}
        ar = next((c for c in group if c["sampler"] == "AR"), None)
        for kind, ending in SAMPLERS:
            rows = sorted((c for c in group if c["sampler"] == kind and c["ending"] == ending),
                          key=lambda c: c["steps"])
            ys = [ppl.get((kind, ending, c["steps"])) if with_quality else c["steps"] for c in rows]
            keep = [(1e3 * c["seconds"], y, c["steps"]) for c, y in zip(rows, ys) if y is not None]
            if keep:
                ax.plot([k[0] for k in keep], [k[1] for k in keep], "-o", ms=4,
                        label=f"{kind}, {'Greedy-Tail' if ending == 'greedy' else 'ancestral'}")
        if ar is not None:
            ax.axvline(1e3 * ar["seconds"], color="k", ls="--", lw=1, label="AR with KV cache (latency)")
        if with_quality and ppl.get(("AR", "", None)) is not None:
            ax.axhline(ppl[("AR", "", None)], color="k", ls=":", lw=1, label="AR Gen PPL")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"ms per batch of {batch} (L = {seq_len})")
        ax.set_ylabel("Gen PPL" if with_quality else "sampling steps")
        ax.legend(fontsize=7)
    fig.suptitle("Duo vs AR: " + ("Gen PPL against latency" if with_quality else "steps against time per batch"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="DiT-demo, L = 128 and 512, on the CPU")
    parser.add_argument("--smoke", action="store_true", help="a tiny DiT in seconds: check that the script runs")
    parser.add_argument("--duo", help="a Duo run (or checkpoint) to time and score instead of random weights")
    parser.add_argument("--ar", help="an AR run (`duo train algo=ar`) of the same DiT size as --duo")
    parser.add_argument("--judge", help="an AR run that scores the samples (Gen PPL)")
    parser.add_argument("--seq-len", type=int, default=0, help="one sequence length instead of the mode's")
    parser.add_argument("--steps", type=_ints, default=None, help="Duo step counts, e.g. 16,8,4 (default: "
                        "1024,256,64,16,8,4)")
    parser.add_argument("--batches", type=_ints, default=None, help="batch sizes, e.g. 1 (default: 1,32)")
    parser.add_argument("--max-token-calls", type=int, default=None,
                        help="skip Duo cells with steps x B x L above this (default: 2^18 with --cpu, none else)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave torch's)")
    parser.add_argument("--out", default="runs/generation", help="output folder")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "generation.md").write_text(table + "\n")
    plotted = plot(result, out / "generation.png")
    print("\n" + table + f"\n\nwrote {out}/generation.md, generation.json" + (", generation.png" if plotted else ""))
    return result


if __name__ == "__main__":
    main()
