"""The ``duo`` command: ``duo train`` and ``duo eval``.

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
one time per sequence; duo-math §3.4), for an AR model the next-token cross-entropy.

    duo eval runs/duo                                   # the run's latest checkpoint, its own corpus
    duo eval runs/duo/checkpoints/step-00001000 batches=10
    duo eval runs/duo corpus=text:my_plays/             # other text, the checkpoint's tokenizer

Prints one JSON line: checkpoint, step, algo, corpus, split, val_nll, val_ppl, val_tokens.
"""


def _parser(prog: str, description: str, cls, checkpoint: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (key=value; defaults shown):\n" + describe(cls))
    if checkpoint:
        parser.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--config", metavar="FILE", help="JSON (or YAML) file of settings; key=value words win")
    parser.add_argument("settings", nargs="*", metavar="key=value", help="a setting (see the list below)")
    return parser


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
    from duo_model.eval import EvalConfig, evaluate_checkpoint

    parser = _parser("duo eval", EVAL_DESCRIPTION, EvalConfig, checkpoint=True)
    args = parser.parse_args(argv)
    cfg = build(EvalConfig, args.config, args.settings, command="eval")
    print(json.dumps(evaluate_checkpoint(args.checkpoint, cfg)))
    return 0


COMMANDS = {"train": _train, "eval": _eval}
USAGE = """usage: duo {train,eval} [--help] [--config FILE] [key=value ...]

  duo train   train a Duo model (or algo=ar, the autoregressive baseline)
  duo eval    validation perplexity of a checkpoint

`duo train --help` lists every setting."""


def main(argv: list[str] | None = None) -> int:
    from duo_model.checkpoint import CheckpointError
    from duo_model.data import DataError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(USAGE, file=sys.stdout if asked else sys.stderr)
        if argv and not asked:
            print(f"\nduo: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if asked else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"duo {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
