"""``duo demo``: the Duo story in miniature, on a laptop CPU in about a quarter of an hour.

1. train an autoregressive judge (``duo train algo=ar``) and a Duo model with the curriculum
   (``duo train``) on the default corpus;
2. distill the Duo model with DCD (``duo distill``, duo-math §5);
3. sample both Duo models at 64, 16 and 8 steps, ending with an ancestral noise-removal step or the
   Greedy-Tail (``duo sample``), and score the samples: Gen PPL under the judge and unigram entropy
   (``duo eval --gen``, §6.5); validation perplexity of both (``duo eval``);
4. print the table and write, in the run folder: ``results.json``, ``results.md`` (the table and a
   few samples), ``gen_ppl.png`` (Gen PPL against steps, with matplotlib) and every sample file.

What the paper shows at scale (Duo, ICML 2025): distillation lowers Gen PPL at 8-16 steps by a large
factor, and the Greedy-Tail lowers it further (at some cost in entropy). A CPU-sized model trained
for minutes is far from converged, so expect the direction, not the paper's numbers.

Every stage is a normal run folder under ``out_dir`` (``judge/``, ``duo/``, ``dcd/``); running the
demo again reuses finished stages and resumes unfinished ones. ``--quick`` shrinks everything to a
smoke run of about a minute (numbers meaningless); on a GPU the demo picks a larger model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from duo_model.checkpoint import latest, load_model, read_checkpoint
from duo_model.config import (ConfigError, at_least, corpus_spec, device_spec, matches, setting, tokenizer_spec,
                              writable_path)
from duo_model.distill import DistillConfig, distill
from duo_model.eval import evaluate_checkpoint, EvalConfig, generative_perplexity, load_judge, unigram_entropy
from duo_model.sample import decode, generate, write_samples

ALPHA_END = 0.0062  # DCD's gamma window ends where T(gamma) = 0.0062, as [-4, -1] does for GPT-2's vocabulary


@dataclass
class DemoConfig:
    """Every setting of ``duo demo`` (``key=value`` on the command line)."""

    out_dir: str = setting("", "run folder (default runs/demo, runs/demo-quick with --quick)",
                           check=writable_path(optional=True))
    corpus: str = setting("shakespeare", "training text (see `duo train --help`)", check=corpus_spec())
    tokenizer: str = setting("bpe:2048", "tokenizer spec (see `duo train --help`)", check=tokenizer_spec())
    model: str = setting("", "DiT preset (default: demo on a CPU, tiny on a GPU)",
                         check=matches("|demo|tiny|small|medium", "demo, tiny, small or medium", "huge"))
    seq_len: int = setting(0, "tokens per sequence (0: 128 on a CPU, 256 on a GPU)", check=at_least(0))
    judge_steps: int = setting(0, "training steps of the AR judge (0 = the demo's choice)", group="Sizes",
                               check=at_least(0))
    train_steps: int = setting(0, "training steps of the Duo model (0 = the demo's choice)", check=at_least(0))
    distill_steps: int = setting(0, "DCD steps (0 = the demo's choice)", check=at_least(0))
    sample_steps: str = setting("64,16,8", "sampler step counts, comma-separated",
                                check=matches(r"\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*", "step counts >= 1 separated by commas",
                                              "64,x"))
    num_samples: int = setting(0, "samples per sampler setting (0 = the demo's choice)", check=at_least(0))
    seed: int = setting(1, "seed of every stage", group="Run", check=at_least(0))
    device: str = setting("auto", "auto (cuda if available), cpu, cuda, cuda:N", check=device_spec())
    num_threads: int = setting(0, "torch CPU threads (0 = torch's default)", check=at_least(0))
    progress: bool = setting(True, "show progress bars")


def plan(cfg: DemoConfig, quick: bool, gpu: bool) -> dict:
    """The sizes of every stage: the configured ones, else the demo's choice for the mode."""
    if quick:
        sizes = dict(model="demo", seq_len=64, judge_steps=30, train_steps=40, distill_steps=30, num_samples=8,
                     batch_size=16, rounds=3, eval_batches=2)
    elif gpu:
        sizes = dict(model="tiny", seq_len=256, judge_steps=3000, train_steps=6000, distill_steps=2000,
                     num_samples=64, batch_size=64, rounds=5, eval_batches=20)
    else:
        sizes = dict(model="demo", seq_len=128, judge_steps=300, train_steps=600, distill_steps=300,
                     num_samples=32, batch_size=16, rounds=3, eval_batches=8)
    for key in ("model", "seq_len", "judge_steps", "train_steps", "distill_steps", "num_samples"):
        if getattr(cfg, key):
            sizes[key] = getattr(cfg, key)
    try:
        sizes["sample_steps"] = [int(s) for s in cfg.sample_steps.split(",")]
    except ValueError:
        raise ConfigError(f"sample_steps={cfg.sample_steps!r}: expected step counts separated by commas") from None
    return sizes


def gamma_end(vocab_size: int) -> float:
    """gamma with T(gamma) = ALPHA_END for this vocabulary (bisection; T decreases in gamma)."""
    from duo_model import ops

    lo, hi = -4.0, 8.0
    for _ in range(60):
        mid = (lo + hi) / 2
        alpha = float(ops.diffusion_transform(torch.tensor(mid, dtype=torch.float64), vocab_size)[0])
        lo, hi = (mid, hi) if alpha > ALPHA_END else (lo, mid)
    return (lo + hi) / 2


def _stage(log, name: str, run_dir: Path, steps: int, start) -> None:
    """Run a training stage unless its run folder already holds its last step; resume a partial one."""
    done = latest(run_dir)
    if done is not None and read_checkpoint(done)["state"]["step"] >= steps:
        log(f"[{name}] reusing {done}")
        return
    log(f"[{name}] {'resuming' if done else 'training'} in {run_dir} ({steps} steps)")
    t0 = time.perf_counter()
    start(resume=done is not None)
    log(f"[{name}] done in {time.perf_counter() - t0:.0f} s")


def run_demo(cfg: DemoConfig, quick: bool = False) -> dict:
    """Run every stage (module docstring); returns the results (also written to results.json)."""
    from duo_model.train import TrainConfig, train

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    sizes = plan(cfg, quick, device.type == "cuda")
    out = Path(cfg.out_dir or ("runs/demo-quick" if quick else "runs/demo"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"duo demo [{time.perf_counter() - started:5.0f} s] {text}", flush=True)

    log(f"{'quick ' if quick else ''}demo in {out} on {device}: DiT-{sizes['model']}, L={sizes['seq_len']}, "
        f"{cfg.corpus}, {cfg.tokenizer}")
    common = dict(corpus=cfg.corpus, tokenizer=cfg.tokenizer, seq_len=sizes["seq_len"], model=sizes["model"],
                  batch_size=sizes["batch_size"], seed=cfg.seed, device=str(device), progress=cfg.progress,
                  eval_batches=sizes["eval_batches"], log_every=10)
    judge_cfg = TrainConfig(**common, algo="ar", out_dir=str(out / "judge"), max_steps=sizes["judge_steps"],
                            lr=1e-3, warmup_steps=sizes["judge_steps"] // 10, eval_every=0, save_every=0)
    duo_cfg = TrainConfig(**common, algo="duo", out_dir=str(out / "duo"), max_steps=sizes["train_steps"],
                          lr=1e-3, warmup_steps=sizes["train_steps"] // 10, curriculum="topk",
                          curriculum_end=sizes["train_steps"] // 2, eval_every=0, save_every=0)
    _stage(log, "judge: AR baseline", out / "judge", judge_cfg.max_steps, lambda resume: train(judge_cfg, resume))
    _stage(log, "Duo: curriculum then discrete NELBO", out / "duo", duo_cfg.max_steps,
           lambda resume: train(duo_cfg, resume))

    _, info = load_model(out / "duo")
    vocab_size = info["tokenizer"].vocab_size
    rounds = sizes["rounds"]
    dcd_cfg = DistillConfig(init=str(out / "duo"), out_dir=str(out / "dcd"), max_steps=sizes["distill_steps"],
                            update_teacher_every=math.ceil(sizes["distill_steps"] / rounds), T=2 ** (rounds + 1),
                            gamma_max=gamma_end(vocab_size), lr=3e-4, warmup_steps=10,
                            batch_size=sizes["batch_size"], seed=cfg.seed, device=str(device), progress=cfg.progress,
                            eval_batches=sizes["eval_batches"], eval_every=0, save_every=0)
    _stage(log, "DCD distillation", out / "dcd", dcd_cfg.max_steps, lambda resume: distill(dcd_cfg, resume))

    judge = load_judge(str(out / "judge"), device)
    rows = []
    for label, run in (("Duo", out / "duo"), ("Duo + DCD", out / "dcd")):
        val = evaluate_checkpoint(str(run), EvalConfig(batches=sizes["eval_batches"], batch_size=sizes["batch_size"],
                                                       seed=cfg.seed, device=str(device)))
        model, info = load_model(run, device=device)
        for steps in sizes["sample_steps"]:
            for noise_removal in ("ancestral", "greedy"):
                ids, stats = generate(model, num_samples=sizes["num_samples"], seq_len=sizes["seq_len"], steps=steps,
                                      noise_removal=noise_removal, seed=cfg.seed, batch_size=sizes["batch_size"],
                                      device=device)
                texts = decode(info["tokenizer"], ids)
                gen = generative_perplexity(texts, judge, batch_size=sizes["batch_size"])
                row = {"model": label, "steps": steps, "noise_removal": noise_removal, "val_ppl": val["val_ppl"],
                       "gen_ppl": gen["gen_ppl"], "entropy": unigram_entropy(ids), "tokens_per_s": stats["tokens_per_s"]}
                rows.append(row)
                name = f"{'dcd' if 'DCD' in label else 'duo'}-{steps}-{noise_removal}"
                write_samples(out / "samples" / f"{name}.json", {**row, "checkpoint": str(info["path"])}, ids, texts,
                              info["tokenizer"].to_json())
                log(f"{label:10s} {steps:3d} steps, {noise_removal:9s}: Gen PPL {row['gen_ppl']:9.2f}, "
                    f"entropy {row['entropy']:.3f}")
    judge_val = evaluate_checkpoint(str(out / "judge"), EvalConfig(batches=sizes["eval_batches"],
                                                                   batch_size=sizes["batch_size"], device=str(device)))
    data_entropy = _data_entropy(out / "duo", sizes, device)
    results = {"sizes": sizes, "device": str(device), "seconds": time.perf_counter() - started,
               "judge_val_ppl": judge_val["val_ppl"], "data_entropy": data_entropy, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown_table(results)
    (out / "results.md").write_text(table + "\n\n" + _sample_excerpts(out, sizes["sample_steps"]))
    plot = _plot(results, out / "gen_ppl.png")
    print("\n" + table)
    log(f"results in {out}: results.md, results.json, samples/" + (", gen_ppl.png" if plot else
                                                                  " (no plot: `pip install matplotlib`)"))
    return results


def _data_entropy(run: Path, sizes: dict, device) -> float:
    """Unigram entropy of validation sequences: what a perfect sampler's samples would show."""
    from duo_model.data import prepare_data

    model, info = load_model(run)
    saved = info["config"]["train"]
    data = prepare_data(corpus=saved["corpus"], tokenizer=info["tokenizer"], seq_len=saved["seq_len"],
                        val_fraction=saved["val_fraction"], cache=saved["cache_dir"] or None)
    return unigram_entropy(data.validation[:sizes["num_samples"]])


def markdown_table(results: dict) -> str:
    """The demo's table: one row per model and step count, Gen PPL and entropy for both endings."""
    lines = [f"Judge (AR) validation PPL {results['judge_val_ppl']:.2f}; unigram entropy of real text "
             f"{results['data_entropy']:.3f} nats; {results['sizes']['num_samples']} samples of "
             f"{results['sizes']['seq_len']} tokens per cell.", "",
             "| model | val PPL | steps | Gen PPL (ancestral) | entropy | Gen PPL (Greedy-Tail) | entropy |",
             "|---|---|---|---|---|---|---|"]
    rows = {(r["model"], r["steps"], r["noise_removal"]): r for r in results["rows"]}
    for model, steps, _ in [k for k in rows if k[2] == "ancestral"]:
        a, g = rows[(model, steps, "ancestral")], rows[(model, steps, "greedy")]
        lines.append(f"| {model} | {a['val_ppl']:.2f} | {steps} | {a['gen_ppl']:.2f} | {a['entropy']:.3f} | "
                     f"{g['gen_ppl']:.2f} | {g['entropy']:.3f} |")
    return "\n".join(lines)


def _sample_excerpts(out: Path, step_counts: list[int]) -> str:
    parts = ["## Samples (first of each file, 400 characters)", ""]
    for model in ("duo", "dcd"):
        for steps in (max(step_counts), min(step_counts)):
            record = json.loads((out / "samples" / f"{model}-{steps}-greedy.json").read_text())
            text = record["samples"][0]["text"][:400].replace("\n", " / ")
            parts += [f"**{model}, {steps} steps, Greedy-Tail**: {text}", ""]
    return "\n".join(parts)


def _plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in ("Duo", "Duo + DCD"):
        for noise_removal, style in (("ancestral", "-o"), ("greedy", "--s")):
            rows = sorted((r for r in results["rows"] if r["model"] == model and r["noise_removal"] == noise_removal),
                          key=lambda r: r["steps"])
            ax.plot([r["steps"] for r in rows], [r["gen_ppl"] for r in rows], style,
                    label=f"{model}, {'Greedy-Tail' if noise_removal == 'greedy' else 'ancestral'}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("Gen PPL (AR judge)")
    ax.set_title("duo demo: generative perplexity vs steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
