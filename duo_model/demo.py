"""``duo demo``: the two claims of the Duo paper in miniature, on a laptop CPU.

Claim 1, the curriculum helps training: the same Duo model trained with the Gaussian-relaxation
curriculum and without it (``curriculum=none``), same steps, seed and data order; validation perplexity
of both against steps.

Claim 2, DCD makes few steps as good as many: the curriculum model distilled with DCD (``duo distill``,
the published schedule: dt doubling every round up to 1/32), then the base and the distilled model
sampled at 64, 16, 8 and 4 steps, ending with an ancestral step or the Greedy-Tail, each cell over
``sampling_seeds`` seeds (mean +- standard deviation). Samples are scored by Gen PPL under an
autoregressive judge trained on the same text (``duo train algo=ar``) and by unigram entropy. A lower
entropy alone also lowers Gen PPL, so the table adds an entropy-matched control: the base model sampled
with the top-p whose entropy matches the distilled 8-step samples', at 8 and at 64 steps. The
real-text row scores held-out text the same way. The output says, one line per claim, whether it held
in this run.

Every stage is a normal run folder under ``out_dir`` (``judge/``, ``duo/``, ``duo-none/``, ``dcd/``);
running the demo again reuses finished stages, resumes unfinished ones and reuses the samples files
already written for the same checkpoints and settings. It writes ``results.json``,
``results.md`` (the tables, the verdicts, a few samples), ``demo.png`` (both claims' curves, with
matplotlib) and every sample file. Each stage's wall-clock and CPU seconds are logged and saved.
``--quick`` shrinks everything to a smoke run (numbers meaningless); on a GPU the demo picks a larger
model.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from duo_model.checkpoint import latest, load_model, read_checkpoint
from duo_model.config import (ConfigError, at_least, corpus_spec, device_spec, matches, setting, tokenizer_spec,
                              validate, writable_path)
from duo_model.distill import DistillConfig, distill
from duo_model.eval import evaluate_checkpoint, EvalConfig, generative_perplexity, load_judge, unigram_entropy
from duo_model.ar_sample import generate_ar
from duo_model.sample import Recipe, decode, generate, write_samples

MODELS = {"duo": "Duo", "dcd": "Duo + DCD"}
ENDINGS = {"ancestral": "ancestral", "greedy": "Greedy-Tail"}
# The columns of the claim-2 table; a row is a dict with these keys (an AR row fits the same way).
COLUMNS = ("model", "sampler", "steps", "top_p", "gen_ppl", "gen_ppl_sd", "entropy", "entropy_sd", "val_ppl",
           "seconds_per_sample")
AR_MODEL = "AR (KV cache)"


@dataclass
class DemoConfig:
    """Every setting of ``duo demo`` (``key=value`` on the command line)."""

    out_dir: str = setting("", "run folder (default runs/demo, runs/demo-quick with --quick)",
                           check=writable_path(optional=True))
    corpus: str = setting("shakespeare", "training text (see `duo train --help`)", check=corpus_spec())
    tokenizer: str = setting("bytes", "tokenizer spec (see `duo train --help`); bytes: V = 259", check=tokenizer_spec())
    model: str = setting("", "DiT preset (default: demo on a CPU, tiny on a GPU)",
                         check=matches("|demo|tiny|small|medium", "demo, tiny, small or medium", "huge"))
    seq_len: int = setting(0, "tokens per sequence (0: 64 on a CPU, 256 on a GPU)", check=at_least(0))
    judge_steps: int = setting(0, "training steps of the AR judge (0 = the demo's choice)", group="Sizes",
                               check=at_least(0))
    train_steps: int = setting(0, "training steps of each Duo model (0 = the demo's choice)", check=at_least(0))
    distill_steps: int = setting(0, "DCD steps (0 = the demo's choice)", check=at_least(0))
    sample_steps: str = setting("64,16,8,4", "sampler step counts, comma-separated (must hold 8 for the verdicts)",
                                check=matches(r"\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*", "step counts >= 1 separated by commas",
                                              "64,x"))
    num_samples: int = setting(0, "samples per cell and seed (0 = the demo's choice)", check=at_least(0))
    sampling_seeds: int = setting(3, "sampling seeds per cell (mean +- standard deviation)", check=at_least(1))
    seed: int = setting(1, "seed of every training stage", group="Run", check=at_least(0))
    device: str = setting("auto", "auto (cuda if available), cpu, cuda, cuda:N", check=device_spec())
    num_threads: int = setting(1, "torch CPU threads of every stage (0 = torch's default, one per core); on the "
                               "busy 2-core development machine 1 thread trained the demo's model 15-20x faster "
                               "than 2 (oversubscription)", check=at_least(0))
    progress: bool = setting(True, "show progress bars")


def plan(cfg: DemoConfig, quick: bool, gpu: bool) -> dict:
    """The sizes of every stage: the configured ones, else the demo's choice for the mode."""
    if quick:
        sizes = dict(model="demo", seq_len=32, judge_steps=20, train_steps=24, distill_steps=12, num_samples=4,
                     batch_size=8, rounds=3, eval_batches=1)
    elif gpu:
        sizes = dict(model="tiny", seq_len=256, judge_steps=3000, train_steps=6000, distill_steps=1500,
                     num_samples=64, batch_size=64, rounds=3, eval_batches=20)
    else:
        sizes = dict(model="demo", seq_len=64, judge_steps=800, train_steps=800, distill_steps=300,
                     num_samples=32, batch_size=16, rounds=3, eval_batches=8)
    for key in ("model", "seq_len", "judge_steps", "train_steps", "distill_steps", "num_samples"):
        if getattr(cfg, key):
            sizes[key] = getattr(cfg, key)
    try:
        sizes["sample_steps"] = sorted({int(s) for s in cfg.sample_steps.split(",")}, reverse=True)
    except ValueError:
        raise ConfigError(f"sample_steps={cfg.sample_steps!r}: expected step counts separated by commas") from None
    if 8 not in sizes["sample_steps"]:
        raise ConfigError(f"sample_steps={cfg.sample_steps!r} must include 8: the claim-2 verdict compares at 8 steps")
    return sizes


def stage_configs(cfg: DemoConfig, sizes: dict, out: Path, device: torch.device) -> dict:
    """The config of every training stage: ``judge``, ``duo`` (curriculum), ``duo-none``, ``dcd``."""
    from duo_model.train import TrainConfig

    common = dict(corpus=cfg.corpus, tokenizer=cfg.tokenizer, seq_len=sizes["seq_len"], model=sizes["model"],
                  batch_size=sizes["batch_size"], seed=cfg.seed, device=str(device), progress=cfg.progress,
                  eval_batches=sizes["eval_batches"], log_every=10, num_threads=cfg.num_threads, save_every=0)
    steps = sizes["train_steps"]
    duo = dict(common, algo="duo", max_steps=steps, lr=1e-3, warmup_steps=steps // 10, eval_every=max(1, steps // 8))
    return {
        "judge": TrainConfig(**common, algo="ar", out_dir=str(out / "judge"), max_steps=sizes["judge_steps"], lr=1e-3,
                             warmup_steps=sizes["judge_steps"] // 10, eval_every=0),
        "duo": TrainConfig(**duo, out_dir=str(out / "duo"), curriculum="topk", curriculum_end=steps // 2),
        "duo-none": TrainConfig(**duo, out_dir=str(out / "duo-none"), curriculum="none"),
        "dcd": DistillConfig(init=str(out / "duo"), out_dir=str(out / "dcd"), max_steps=sizes["distill_steps"],
                             rounds=sizes["rounds"], final_dt=1 / 32, lr=3e-4, warmup_steps=10,
                             batch_size=sizes["batch_size"], seed=cfg.seed, device=str(device), progress=cfg.progress,
                             eval_batches=sizes["eval_batches"], eval_every=0, save_every=0,
                             num_threads=cfg.num_threads),
    }


class Timer:
    """Wall-clock and CPU seconds of each named stage (CPU seconds of this process: on a busy machine
    they stay close to what an idle one takes, the wall-clock ones do not)."""

    def __init__(self, log):
        self.log, self.stages = log, {}

    def __call__(self, name: str, work):
        wall, cpu = time.perf_counter(), time.process_time()
        result = work()
        self.stages[name] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        self.log(f"[{name}] {self.stages[name]['wall_s']:.0f} s wall, {self.stages[name]['cpu_s']:.0f} s CPU")
        return result


def _train_stage(log, name: str, stage_cfg, resume_fn) -> None:
    """Run a training stage unless its run folder already holds its last step; resume a partial one."""
    run_dir = Path(stage_cfg.out_dir)
    done = latest(run_dir)
    if done is not None and read_checkpoint(done)["state"]["step"] >= stage_cfg.max_steps:
        log(f"[{name}] reusing {done}")
        return
    log(f"[{name}] {'resuming' if done else 'training'} in {run_dir} ({stage_cfg.max_steps} steps)")
    resume_fn(stage_cfg, resume=done is not None)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_demo(cfg: DemoConfig, quick: bool = False) -> dict:
    """Run every stage (module docstring); returns the results (also written to results.json)."""
    from duo_model.train import set_threads, train

    validate(cfg)
    set_threads(cfg.num_threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    sizes = plan(cfg, quick, device.type == "cuda")
    out = Path(cfg.out_dir or ("runs/demo-quick" if quick else "runs/demo"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"duo demo [{time.perf_counter() - started:5.0f} s] {text}", flush=True)

    log(f"{'quick ' if quick else ''}demo in {out} on {device}: DiT-{sizes['model']}, L={sizes['seq_len']}, "
        f"{cfg.corpus}, {cfg.tokenizer}, {torch.get_num_threads()} torch thread(s)")
    timer = Timer(log)
    stages = stage_configs(cfg, sizes, out, device)
    for name, title in (("judge", "judge: AR baseline"), ("duo", "Duo with the curriculum"),
                        ("duo-none", "Duo without the curriculum"), ("dcd", "DCD distillation")):
        fn = distill if name == "dcd" else train
        timer(name, lambda: _train_stage(log, title, stages[name], fn))

    judge = load_judge(str(out / "judge"), device)
    val = {name: evaluate_checkpoint(str(out / name), EvalConfig(batches=sizes["eval_batches"],
                                                                 batch_size=sizes["batch_size"], seed=cfg.seed,
                                                                 device=str(device)))["val_ppl"]
           for name in ("duo", "duo-none", "dcd", "judge")}
    curves = {name: _val_curve(out / name) for name in ("duo", "duo-none")}

    sampler = Sampler(out, sizes, cfg, judge, device, log)
    rows = timer("sampling", lambda: [sampler.cell(name, steps, ending, val_ppl=val[name])
                                      for name in MODELS for steps in sizes["sample_steps"] for ending in ENDINGS])
    target = next(r for r in rows if r["model"] == MODELS["dcd"] and r["steps"] == 8 and r["sampler"] == "ancestral")
    controls = timer("entropy-matched control", lambda: sampler.matched_control(
        target["entropy"], sorted({8, max(sizes["sample_steps"])}), val["duo"]))
    ar = timer("AR sampling", lambda: sampler.ar_cell(val["judge"]))
    reference = timer("real-text reference", lambda: _reference_row(out / "duo", sizes, judge))
    results = {"sizes": sizes, "device": str(device), "threads": torch.get_num_threads(),
               "sampling_seeds": cfg.sampling_seeds,
               "judge_val_ppl": val["judge"], "val_ppl": val, "curves": curves,
               "rows": rows + controls + [ar, reference]}
    results["verdicts"] = verdicts(results)
    results["stages"] = timer.stages
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = markdown_report(results)
    (out / "results.md").write_text(text + "\n\n" + _sample_excerpts(out, sizes["sample_steps"]))
    plot = _plot(results, out / "demo.png")
    print("\n" + text + "\n")
    log(f"results in {out}: results.md, results.json, samples/" + (", demo.png" if plot else
                                                                  " (no plot: `pip install matplotlib`)"))
    return results


def _val_curve(run: Path) -> list[dict]:
    """The validation lines of a training run: ``[{"step", "val_ppl"}, ...]``."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "val_ppl": r["val_ppl"]} for r in lines if "val_ppl" in r]


class Sampler:
    """Samples a model over ``sampling_seeds`` seeds and scores them (Gen PPL, entropy): one table row."""

    def __init__(self, out: Path, sizes: dict, cfg: DemoConfig, judge, device, log):
        self.out, self.sizes, self.judge, self.device, self.log = out, sizes, judge, device, log
        self.seeds = range(cfg.sampling_seeds)
        self.models = {name: load_model(out / name, device=device) for name in MODELS}

    def _scores(self, name: str, steps: int, ending: str, top_p: float, seed: int) -> tuple[float, float, float]:
        """Gen PPL, entropy and seconds per sample of one sampling seed, from its samples file if an earlier
        run of the demo wrote it for the same checkpoint and settings (so a stopped demo resumes), else
        sampled now. ``name`` ``"judge"``: the AR judge's own samples (``steps``: its network calls)."""
        model, info = self.models[name]
        tag = "" if top_p == 1.0 else f"-top{top_p:.4f}"
        path = self.out / "samples" / f"{name}-{steps}-{ending}{tag}-seed{seed}.json"
        key = {"model": MODELS.get(name, AR_MODEL), "steps": steps, "noise_removal": ending, "top_p": top_p,
               "seed": seed, "checkpoint": str(info["path"]), "num_samples": self.sizes["num_samples"],
               "seq_len": self.sizes["seq_len"]}
        try:
            record = json.loads(path.read_text())
            if all(record.get(k) == v for k, v in key.items()):
                return record["gen_ppl"], record["entropy"], record["seconds_per_sample"]
        except (OSError, json.JSONDecodeError, KeyError):
            pass  # none yet, or cut short by a kill: sample again
        if name == "judge":  # BOS, then seq_len - 1 tokens: the judge's own window, scored without the BOS
            ids, stats = generate_ar(model, num_samples=self.sizes["num_samples"], seq_len=self.sizes["seq_len"],
                                     bos_id=info["tokenizer"].bos_id, top_p=top_p, seed=seed,
                                     batch_size=self.sizes["num_samples"], device=self.device)
            ids = ids[:, 1:]
        else:
            ids, stats = generate(model, num_samples=self.sizes["num_samples"], seq_len=self.sizes["seq_len"],
                                  steps=steps, recipe=Recipe(top_p=top_p), noise_removal=ending, seed=seed,
                                  batch_size=self.sizes["num_samples"], device=self.device)
        texts = decode(info["tokenizer"], ids)
        gen_ppl, entropy = generative_perplexity(texts, self.judge, batch_size=32)["gen_ppl"], unigram_entropy(ids)
        write_samples(path, {**key, "gen_ppl": gen_ppl, "entropy": entropy, **stats}, ids, texts,
                      info["tokenizer"].to_json())
        return gen_ppl, entropy, stats["seconds_per_sample"]

    def cell(self, name: str, steps: int, ending: str, *, top_p: float = 1.0, val_ppl: float | None = None) -> dict:
        scores = [self._scores(name, steps, ending, top_p, seed) for seed in self.seeds]
        gen_ppl, gen_ppl_sd = _mean_sd([s[0] for s in scores])
        entropy, entropy_sd = _mean_sd([s[1] for s in scores])
        row = dict(model=MODELS.get(name, AR_MODEL), sampler=ending, steps=steps, top_p=top_p, gen_ppl=gen_ppl,
                   gen_ppl_sd=gen_ppl_sd, entropy=entropy, entropy_sd=entropy_sd, val_ppl=val_ppl,
                   seconds_per_sample=statistics.median(s[2] for s in scores))
        self.log(f"{row['model']:10s} {steps:3d} steps, {ENDINGS.get(ending, ending):11s} top-p {top_p:.3f}: Gen PPL "
                 f"{gen_ppl:8.2f} +- {gen_ppl_sd:.2f}, entropy {entropy:.3f} +- {entropy_sd:.3f}, "
                 f"{row['seconds_per_sample'] * 1e3:.2f} ms per sample")
        return row

    def ar_cell(self, val_ppl: float) -> dict:
        """The AR judge sampling itself (KV cache, temperature 1): one token per network call. Its Gen
        PPL is scored by the same model, which favours it; the row is there for the time per sample."""
        if "judge" not in self.models:
            self.models["judge"] = load_model(self.out / "judge", device=self.device)
        return self.cell("judge", self.sizes["seq_len"] - 1, "next token", val_ppl=val_ppl)

    def matched_control(self, target_entropy: float, step_counts: list[int], val_ppl: float) -> list[dict]:
        """The base model, ancestral, at each step count with the top-p whose entropy (seed 0) is
        closest to ``target_entropy``: bisection on p in [0.5, 1] (entropy grows with p)."""
        rows = []
        for steps in step_counts:
            lo, hi, best = 0.5, 1.0, (float("inf"), 1.0)
            for _ in range(5):
                p = (lo + hi) / 2
                entropy = self._scores("duo", steps, "ancestral", p, seed=0)[1]
                best = min(best, (abs(entropy - target_entropy), p))
                lo, hi = (p, hi) if entropy < target_entropy else (lo, p)
            rows.append(self.cell("duo", steps, "ancestral", top_p=best[1], val_ppl=val_ppl))
            rows[-1]["model"] = f"{MODELS['duo']}, entropy-matched"
        return rows


def _reference_row(run: Path, sizes: dict, judge) -> dict:
    """Held-out text scored like the samples: Gen PPL under the judge and unigram entropy, over as many
    sequences of the same length as a cell holds per seed."""
    from duo_model.data import prepare_data

    _, info = load_model(run)
    saved = info["config"]["train"]
    data = prepare_data(corpus=saved["corpus"], tokenizer=info["tokenizer"], seq_len=saved["seq_len"],
                        val_fraction=saved["val_fraction"], cache=saved["cache_dir"] or None)
    ids = data.validation[:sizes["num_samples"]]
    gen_ppl = generative_perplexity(decode(info["tokenizer"], ids), judge, batch_size=32)["gen_ppl"]
    return dict(model="real text (validation)", sampler="-", steps=None, top_p=None, gen_ppl=gen_ppl, gen_ppl_sd=None,
                entropy=unigram_entropy(ids), entropy_sd=None, val_ppl=None, seconds_per_sample=None)


def _find(rows: list[dict], model: str, steps: int, sampler: str = "ancestral") -> dict | None:
    return next((r for r in rows if r["model"] == model and r["steps"] == steps and r["sampler"] == sampler), None)


def verdicts(results: dict) -> dict:
    """One line per claim: whether it held in this run, with the numbers it rests on.

    Claim 1 holds if the curriculum run ends with the lower validation perplexity. Claim 2 holds if the
    distilled model's 8-step ancestral Gen PPL is below the base model's at 8 steps with entropy matched
    and at most the base model's at its most steps with entropy matched, plus one standard deviation
    of the two (the seeds' spread)."""
    val = results["val_ppl"]
    held = val["duo"] < val["duo-none"]
    claim1 = (f"Claim 1 (curriculum helps training): {'HELD' if held else 'DID NOT HOLD'} in this run (one training "
              f"seed): final val PPL {val['duo']:.3f} with the curriculum vs {val['duo-none']:.3f} without "
              f"({val['duo'] / val['duo-none'] - 1:+.1%}).")
    rows = results["rows"]
    most = max(results["sizes"]["sample_steps"])
    dcd = _find(rows, MODELS["dcd"], 8)
    matched = {s: _find(rows, f"{MODELS['duo']}, entropy-matched", s) for s in (8, most)}
    if dcd is None or None in matched.values():
        return {"curriculum": claim1, "dcd": "Claim 2 (DCD): not measured (needs 8 steps in sample_steps)"}
    many = matched[most]
    ok = dcd["gen_ppl"] < matched[8]["gen_ppl"] and dcd["gen_ppl"] <= many["gen_ppl"] + max(dcd["gen_ppl_sd"],
                                                                                             many["gen_ppl_sd"])
    claim2 = (f"Claim 2 (DCD makes 8 steps as good as many): {'HELD' if ok else 'DID NOT HOLD'} in this run: "
              f"distilled 8 steps Gen PPL {dcd['gen_ppl']:.2f} (entropy {dcd['entropy']:.3f}) vs the base at "
              f"matched entropy: 8 steps {matched[8]['gen_ppl']:.2f}, {most} steps {many['gen_ppl']:.2f} "
              f"(ancestral, means over {results['sampling_seeds']} sampling seeds).")
    return {"curriculum": claim1, "dcd": claim2, **speed_verdict(rows)}


def speed_verdict(rows: list[dict]) -> dict:
    """``{"speed": line}``: the most steps at which the distilled model (ancestral) samples faster than the
    AR model with its KV cache, and its Gen PPL there against AR's; empty without an AR row."""
    ar = next((r for r in rows if r["model"] == AR_MODEL), None)
    dcd = sorted((r for r in rows if r["model"] == MODELS["dcd"] and r["sampler"] == "ancestral"),
                 key=lambda r: r["steps"])
    if ar is None or not dcd:
        return {}
    faster = [r for r in dcd if r["seconds_per_sample"] < ar["seconds_per_sample"]]
    head = (f"Speed: AR with a KV cache takes {ar['seconds_per_sample'] * 1e3:.2f} ms per sample ({ar['steps']} "
            f"network calls), Gen PPL {ar['gen_ppl']:.2f} under itself; ")
    if not faster:
        return {"speed": head + f"the distilled model is slower at every step count measured (fewest: "
                                f"{dcd[0]['steps']} steps, {dcd[0]['seconds_per_sample'] * 1e3:.2f} ms)."}
    best = faster[-1]
    return {"speed": head + f"the distilled model is faster up to {best['steps']} steps "
                            f"({best['seconds_per_sample'] * 1e3:.2f} ms, Gen PPL {best['gen_ppl']:.2f})."}


def _pm(mean, sd, digits: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


def markdown_report(results: dict) -> str:
    """The demo's report: the claim-1 table (val PPL against steps), the claim-2 table (one row per
    model, sampler and step count; columns ``COLUMNS``), the verdicts and the stage timings."""
    sizes = results["sizes"]
    curves = results["curves"]
    steps = [p["step"] for p in curves["duo"]]
    lines = ["### Claim 1: the curriculum helps training (validation PPL against training steps)", "",
             "| run | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, label in (("duo", "Duo, curriculum"), ("duo-none", "Duo, no curriculum")):
        by_step = {p["step"]: p["val_ppl"] for p in curves[name]}
        lines.append(f"| {label} | " + " | ".join(f"{by_step[s]:.2f}" if s in by_step else "-" for s in steps) + " |")
    lines += ["", "### Claim 2: DCD makes few steps as good as many (samples scored by the AR judge)", "",
              f"Judge (AR) validation PPL {results['judge_val_ppl']:.2f}; {sizes['num_samples']} samples of "
              f"{sizes['seq_len']} tokens per cell and seed; mean ± standard deviation over the sampling seeds.", "",
              "| model | val PPL | sampler | steps | top-p | Gen PPL | entropy | ms per sample |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        steps = "-" if r["steps"] is None else r["steps"]
        top_p = "-" if r["top_p"] is None else f"{r['top_p']:.3f}"
        lines.append(f"| {r['model']} | {_pm(r['val_ppl'], None, 2)} | {ENDINGS.get(r['sampler'], r['sampler'])} | "
                     f"{steps} | {top_p} | {_pm(r['gen_ppl'], r['gen_ppl_sd'], 2)} | "
                     f"{_pm(r['entropy'], r['entropy_sd'], 3)} | "
                     f"{_pm(None if r.get('seconds_per_sample') is None else r['seconds_per_sample'] * 1e3, None, 2)} |")
    lines += ["", results["verdicts"]["curriculum"], "", results["verdicts"]["dcd"]]
    if "speed" in results["verdicts"]:
        lines += ["", results["verdicts"]["speed"]]
    if "stages" in results:
        lines += ["", "Stage timings: " + ", ".join(f"{k} {v['wall_s']:.0f} s wall / {v['cpu_s']:.0f} s CPU"
                                                    for k, v in results["stages"].items())]
    return "\n".join(lines)


def _sample_excerpts(out: Path, step_counts: list[int]) -> str:
    parts = ["## Samples (seed 0, first of each file, 300 characters)", ""]
    for name in MODELS:
        for steps in (max(step_counts), 8):
            record = json.loads((out / "samples" / f"{name}-{steps}-ancestral-seed0.json").read_text())
            text = record["samples"][0]["text"][:300].replace("\n", " / ")
            parts += [f"**{MODELS[name]}, {steps} steps, ancestral**: {text}", ""]
    return "\n".join(parts)


def _plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    for name, label in (("duo", "curriculum"), ("duo-none", "no curriculum")):
        curve = results["curves"][name]
        ax1.plot([p["step"] for p in curve], [p["val_ppl"] for p in curve], "-o", label=label)
    ax1.set_xlabel("training steps")
    ax1.set_ylabel("validation PPL")
    ax1.set_title("claim 1: the curriculum")
    ax1.legend()
    rows = results["rows"]
    for name in MODELS:
        for ending, style in (("ancestral", "-o"), ("greedy", "--s")):
            cells = sorted((r for r in rows if r["model"] == MODELS[name] and r["sampler"] == ending),
                           key=lambda r: r["steps"])
            ax2.errorbar([r["steps"] for r in cells], [r["gen_ppl"] for r in cells],
                         yerr=[r["gen_ppl_sd"] for r in cells], fmt=style, capsize=3,
                         label=f"{MODELS[name]}, {ENDINGS[ending]}")
    control = [r for r in rows if r["model"].endswith("entropy-matched")]
    ax2.errorbar([r["steps"] for r in control], [r["gen_ppl"] for r in control], yerr=[r["gen_ppl_sd"] for r in control],
                 fmt="k*", markersize=10, capsize=3, label="Duo, top-p matched to DCD's 8-step entropy")
    reference = next(r for r in rows if r["steps"] is None)
    ax2.axhline(reference["gen_ppl"], color="grey", linestyle=":", label="real text")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("sampling steps")
    ax2.set_ylabel("Gen PPL (AR judge)")
    ax2.set_title("claim 2: DCD")
    ax2.legend(fontsize=7)
    for name in MODELS:
        cells = sorted((r for r in rows if r["model"] == MODELS[name] and r["sampler"] == "ancestral"),
                       key=lambda r: r["steps"])
        ax3.plot([r["seconds_per_sample"] * 1e3 for r in cells], [r["gen_ppl"] for r in cells], "-o",
                 label=f"{MODELS[name]}, ancestral")
        for r in cells:
            ax3.annotate(str(r["steps"]), (r["seconds_per_sample"] * 1e3, r["gen_ppl"]), fontsize=7)
    ar = next((r for r in rows if r["model"] == AR_MODEL), None)
    if ar is not None:
        ax3.plot([ar["seconds_per_sample"] * 1e3], [ar["gen_ppl"]], "r^", markersize=10,
                 label=f"AR, KV cache ({ar['steps']} calls)")
        ax3.axvline(ar["seconds_per_sample"] * 1e3, color="r", linestyle=":", linewidth=1)
    ax3.set_xscale("log")
    ax3.set_xlabel("ms per sample")
    ax3.set_ylabel("Gen PPL (AR judge)")
    ax3.set_title("speed against quality (labels: steps)")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
