"""The ``duo`` command: ``duo demo``, ``duo train``, ``duo distill``, ``duo sample`` and ``duo eval``.

Settings are ``key=value`` words after the command (``duo train lr=1e-3 max_steps=2000``), on top of
an optional ``--config FILE`` (JSON, or YAML with PyYAML) and the defaults; ``--help`` lists them
all. Errors in settings, data or checkpoints are printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from duo_model.config import ConfigError, build, describe

TRAIN_DESCRIPTION = """\
Train a Duo model (uniform-state discrete diffusion with the Gaussian-relaxation curriculum, then
the discrete NELBO; duo-math §4, §8) or, with algo=ar, an autoregressive baseline.

The defaults train a small DiT on the Shakespeare corpus on a CPU in minutes:

    duo train                                        # runs/duo: metrics.jsonl, checkpoints/
    duo train max_steps=300 out_dir=runs/first       # a short first run
    duo train --resume out_dir=runs/first max_steps=600   # continue it
    duo train algo=ar out_dir=runs/judge             # the autoregressive baseline
    duo train model=small tokenizer=gpt2 seq_len=1024 batch_size=512 micro_batch_size=32 \\
        corpus=hf:openwebtext curriculum=dense max_steps=1000000 curriculum_end=500000 warmup_steps=2500
    torchrun --nproc_per_node 8 -m duo_model.cli train model=small ...   # data parallel

Every line of metrics.jsonl is JSON: training lines (step, loss, lr, phase, tau, grad_norm,
tokens_per_s) and validation lines (step, val_nll, val_ppl: the true discrete NELBO of the EMA
weights). A checkpoint is written every save_every steps and at the end, atomically.
"""

EVAL_DESCRIPTION = """\
Validation perplexity of a checkpoint: for a Duo model the true discrete NELBO (log-linear schedule,
one time per sequence; duo-math §3.4), for an AR model the next-token cross-entropy. With --gen, the
generative perplexity of a samples file (from `duo sample`) under an autoregressive judge, and the
samples' unigram entropy (duo-math §6.5).

    duo eval runs/duo                                   # the run's latest checkpoint, its own corpus
    duo eval runs/duo/checkpoints/step-00001000 batches=10
    duo eval runs/duo corpus=text:my_plays/             # other text, the checkpoint's tokenizer
    duo eval --gen samples.json judge=runs/judge        # judge: a `duo train algo=ar` run
    duo eval --gen samples.json judge=hf:gpt2-large     # or a Hugging Face causal LM (transformers)
    duo eval checkpoint=hf:s-sahoo/duo corpus=text:owt_valid/   # a published Duo model (see `duo sample --help`)

Prints one JSON line: checkpoint, step, algo, corpus, split, val_nll, val_ppl, val_tokens; with
--gen: samples, steps, num_samples, gen_nll, gen_ppl, gen_tokens, judge, entropy.
"""

DISTILL_DESCRIPTION = """\
Distill a Duo model with Discrete Consistency Distillation (duo-math §5) so that it samples in few
steps: max_steps split into `rounds` rounds, the teacher refreshed and dt doubled every round, up to
final_dt in the last (the defaults: 5 rounds, dt = 1/512 ... 1/32, as published).

    duo distill init=runs/duo out_dir=runs/dcd                       # distill a `duo train` run
    duo distill init=runs/duo out_dir=runs/dcd max_steps=50000 batch_size=128 micro_batch_size=2 \\
        lr=6e-5 warmup_steps=500 init_weights=raw student_ema=carry teacher_dropout=true   # as published
    duo distill --resume init=runs/duo out_dir=runs/dcd max_steps=1000

Every line of metrics.jsonl is JSON: training lines (step, loss = the DCD KL, lr, dt, grad_norm,
tokens_per_s) and validation lines (step, dt, val_kl). Sample the result with `duo sample runs/dcd`.
"""

SAMPLE_DESCRIPTION = """\
Generate text with a Duo checkpoint (duo-math §6): ancestral or Psi-sampler steps, nucleus
filtering, and a final noise-removal step (the Greedy-Tail by default). On an autoregressive
(`duo train algo=ar`) checkpoint: one token per call with a KV cache, temperature, top_p or greedy.

    duo sample runs/dcd steps=8                          # 8 steps + the Greedy-Tail
    duo sample runs/duo steps=256 recipe=max-rescale     # Duo++'s Psi-sampler, eta = 0.05, top-p 0.9
    duo sample runs/duo steps=64 noise_removal=ancestral num_samples=64 out=runs/duo/samples-64.json
    duo sample runs/judge temperature=0.8 top_p=0.9      # an AR run

A published Duo model (GPT-2 tokenizer + [PAD]; samples decoded as the Duo code decodes them):

    duo sample checkpoint=hf:s-sahoo/duo-distilled steps=8        # downloads it once (huggingface_hub)
    duo sample checkpoint=hf:s-sahoo/duo steps=1024 recipe=max-rescale
    duo sample checkpoint=models/duo-distilled steps=8            # a snapshot folder: config.json + model.safetensors
    duo sample checkpoint=outputs/owt/duo/checkpoints/last.ckpt steps=8   # a Lightning .ckpt of the Duo code

Writes a JSON file (settings, tokens/s and each sample's text and ids; score it with
`duo eval --gen`) and prints its summary as one JSON line.
"""

DEMO_DESCRIPTION = """\
The Duo story in miniature: train an AR judge and a Duo model with the curriculum, distill the Duo
model with DCD, sample both at 64, 16 and 8 steps (ancestral and Greedy-Tail endings), and print
validation PPL, Gen PPL and entropy; writes results.md, results.json, gen_ppl.png and the samples
in the run folder. About 15 minutes on a 2-core CPU; --quick: about a minute (numbers meaningless).

    duo demo                      # runs/demo
    duo demo --quick              # runs/demo-quick
    duo demo train_steps=2000 out_dir=runs/demo-long
"""


CHECKPOINT_HELP = "a run folder (its latest checkpoint) or a checkpoint folder"


def _parser(prog: str, description: str, cls, positional: str | None = None,
            optional: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (key=value; defaults shown):\n" + describe(cls))
    if positional:
        parser.add_argument("path", help=positional, nargs="?" if optional else None)
    parser.add_argument("--config", metavar="FILE", help="JSON (or YAML) file of settings; key=value words win")
    parser.add_argument("settings", nargs="*", metavar="key=value", help="a setting (see the list below)")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if getattr(args, "path", None) and "=" in args.path:  # no positional: argparse took the first key=value
        args.settings.insert(0, args.path)
        args.path = None
    return args


def _train(argv: list[str]) -> int:
    from duo_model.train import TrainConfig, train

    parser = _parser("duo train", TRAIN_DESCRIPTION, TrainConfig)
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its latest checkpoint")
    args = parser.parse_args(argv)
    cfg = build(TrainConfig, args.config, args.settings, command="train")
    result = train(cfg, resume=args.resume)
    if result.get("val_ppl") is not None:
        print(f"done: step {result['step']}, loss {result.get('loss', float('nan')):.4f}, "
              f"validation perplexity {result['val_ppl']:.3f} (EMA weights); run folder {cfg.out_dir}")
    return 0


def _eval(argv: list[str]) -> int:
    from duo_model.eval import EvalConfig, evaluate_checkpoint, evaluate_samples

    parser = _parser("duo eval", EVAL_DESCRIPTION, EvalConfig,
                     CHECKPOINT_HELP + " (or checkpoint=); with --gen, a samples file of `duo sample`", optional=True)
    parser.add_argument("--gen", action="store_true", help="score a samples file (the positional argument) with judge=")
    args = _parse(parser, argv)
    if args.gen and not args.path:
        parser.error("--gen needs the samples file")
    cfg = build(EvalConfig, args.config, args.settings, command="eval")
    evaluate = evaluate_samples if args.gen else evaluate_checkpoint
    print(json.dumps(evaluate(args.path, cfg)))
    return 0


def _distill(argv: list[str]) -> int:
    from duo_model.distill import DistillConfig, distill

    parser = _parser("duo distill", DISTILL_DESCRIPTION, DistillConfig)
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its latest checkpoint")
    args = parser.parse_args(argv)
    cfg = build(DistillConfig, args.config, args.settings, command="distill")
    result = distill(cfg, resume=args.resume)
    print(f"done: step {result['step']}, dt {result.get('dt', float('nan')):.4f}, validation KL "
          f"{result.get('val_kl', float('nan')):.4f} (EMA student vs teacher); run folder {cfg.out_dir}")
    return 0


def _sample(argv: list[str]) -> int:
    from duo_model.ar_sample import check_settings, checkpoint_algo, sample_ar_checkpoint
    from duo_model.sample import SampleConfig, sample_checkpoint

    parser = _parser("duo sample", SAMPLE_DESCRIPTION, SampleConfig, CHECKPOINT_HELP + " (or checkpoint=)",
                     optional=True)
    args = _parse(parser, argv)
    cfg = build(SampleConfig, args.config, args.settings, command="sample")
    algo = checkpoint_algo(args.path) if args.path else "duo"  # checkpoint= names a published Duo model
    check_settings(cfg, algo)
    print(json.dumps((sample_ar_checkpoint if algo == "ar" else sample_checkpoint)(args.path, cfg)))
    return 0


def _demo(argv: list[str]) -> int:
    from duo_model.demo import DemoConfig, run_demo

    parser = _parser("duo demo", DEMO_DESCRIPTION, DemoConfig)
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    args = parser.parse_args(argv)
    run_demo(build(DemoConfig, args.config, args.settings, command="demo"), quick=args.quick)
    return 0


COMMANDS = {"demo": _demo, "train": _train, "distill": _distill, "sample": _sample, "eval": _eval}
USAGE = """usage: duo {demo,train,distill,sample,eval} [--help] [--config FILE] [key=value ...]

  duo demo      the whole story on a laptop: train, distill, sample, evaluate
  duo train     train a Duo model (or algo=ar, the autoregressive baseline)
  duo distill   distill a Duo model for few-step sampling (DCD)
  duo sample    generate text with a Duo (or AR) checkpoint
  duo eval      validation perplexity of a checkpoint, or (--gen) Gen PPL of samples

`duo <command> --help` lists every setting."""


def _one_line(exc: BaseException) -> str:
    """The error as one line: an OSError as its reason and path, anything else as its text."""
    if isinstance(exc, OSError) and exc.strerror:
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        text = f"{exc.strerror}: {paths}" if paths else exc.strerror
    else:
        text = str(exc)
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    from duo_model.checkpoint import CheckpointError
    from duo_model.data import DataError
    from duo_model.runtime import RunError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(USAGE, file=sys.stdout if asked else sys.stderr)
        if argv and not asked:
            print(f"\nduo: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if asked else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, DataError, CheckpointError, RunError, OSError) as exc:
        print(f"duo {argv[0]}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
