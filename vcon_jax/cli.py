"""``vcon-jax`` (also ``python -m vcon_jax``): pretrain, compress and compare.

    vcon-jax compare                      # the main job: Fashion-MNIST CNN, prune 90 %,
                                          # post-shot / gradual / VCON / VCON+distill, 3 seeds
    vcon-jax compare --preset full        # every table of experiments/results (~1.5 h, 2 cores)
    vcon-jax compare --preset quick       # a 1-minute end-to-end check (CI)
    vcon-jax pretrain --dataset wordnet
    vcon-jax compress --method vcon --compression binarize --seed 1

Every option is validated before any work starts; a bad one exits with status 2 and one
line naming the option, the value and what is allowed. Runs checkpoint as they go and
resume when the same command is started again; finished runs are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from vcon_jax.experiment import config as config_lib

DEFAULT_WORKDIR = "workdir"


def _add_config_options(p: argparse.ArgumentParser) -> None:
  d = config_lib.Config()
  g = p.add_argument_group("data and model")
  g.add_argument("--dataset", default=None,
                 help="fashion_mnist (default), wordnet, or a prepared TFDS dataset such as "
                      "tfds:cifar10; sets the model defaults of that dataset")
  g.add_argument("--model", choices=config_lib.MODELS, default=None,
                 help="model (default: cnn for images, transformer for text)")
  g.add_argument("--model-kwargs", type=json.loads, default=None, metavar="JSON",
                 help='model constructor arguments as JSON, e.g. \'{"hidden": [128]}\'')
  g.add_argument("--data-dir", default=None, help="prepared TFDS data directory")
  g.add_argument("--source-dir", default=None,
                 help="raw files of a local dataset (default: the Debian package's)")
  g.add_argument("--max-len", type=int, default=None, help=f"text length ({d.max_len})")
  g.add_argument("--train-limit", type=int, default=None,
                 help="use only the first N training examples (0: all)")
  g.add_argument("--test-limit", type=int, default=None,
                 help="use only the first N test examples (0: all)")
  g = p.add_argument_group("training")
  g.add_argument("--batch-size", type=int, default=None, help=f"global batch ({d.batch_size})")
  g.add_argument("--pretrain-steps", type=int, default=None,
                 help=f"dense training steps ({d.pretrain_steps})")
  g.add_argument("--pretrain-lr", type=float, default=None,
                 help=f"dense peak learning rate ({d.pretrain_lr})")
  g.add_argument("--steps", type=int, default=None,
                 help=f"fine-tuning steps, equal for every method ({d.steps})")
  g.add_argument("--lr", type=float, default=None,
                 help=f"fine-tuning peak learning rate, AdamW + cosine decay ({d.lr})")
  g.add_argument("--eval-every", type=int, default=None,
                 help=f"steps between test evaluations ({d.eval_every})")
  g.add_argument("--eval-examples", type=int, default=None,
                 help=f"test examples per intermediate evaluation ({d.eval_examples})")
  g.add_argument("--checkpoint-every", type=int, default=None,
                 help=f"steps between checkpoints ({d.checkpoint_every})")
  g = p.add_argument_group("compression")
  g.add_argument("--compression", choices=config_lib.COMPRESSIONS, default=None,
                 help=f"what to compress to ({d.compression})")
  g.add_argument("--sparsity", type=float, default=None,
                 help=f"prune: fraction of weights removed, in [0, 1) ({d.sparsity})")
  g.add_argument("--bits", type=int, default=None, help=f"quantize: bit width ({d.bits})")
  g.add_argument("--rank", type=int, default=None, help=f"low-rank: rank ({d.rank})")
  g.add_argument("--transition", type=float, default=None,
                 help=f"VCON transition Q (and gradual ramp) as a fraction of --steps "
                      f"({d.transition})")
  g.add_argument("--beta-schedule", choices=config_lib.BETA_SCHEDULES, default=None,
                 help=f"shape of beta from 1 to 0 ({d.beta_schedule})")
  g.add_argument("--distill-weight", type=float, default=None,
                 help=f"vcon-distill: weight of the distillation term ({d.distill_weight})")
  g.add_argument("--update-every", type=int, default=None,
                 help=f"prune: mask refresh interval in steps ({d.update_every})")
  p.add_argument("--config", default=None,
                 help="JSON file of config keys (command-line options override it)")
  p.add_argument("--workdir", default=DEFAULT_WORKDIR,
                 help=f"where runs, checkpoints and logs go (default ./{DEFAULT_WORKDIR})")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop",
                 help="a step with a non-finite loss: stop the run naming the step, keeping "
                      "the last good checkpoint (default), or skip it and count it in the "
                      "metrics ('nonfinite_total')")


def build_config(args: argparse.Namespace, **extra) -> config_lib.Config:
  base = config_lib.load(args.config) if args.config else config_lib.Config()
  changes = {}
  dataset = args.dataset
  if dataset is not None and dataset != base.dataset:
    changes.update(dataset=dataset, **config_lib.DATASET_DEFAULTS.get(dataset, {}))
  for f in dataclasses.fields(config_lib.Config):
    value = getattr(args, f.name, None)
    if value is not None and f.name != "dataset":
      changes[f.name] = value
  changes.update({k: v for k, v in extra.items() if v is not None})
  cfg = dataclasses.replace(base, **changes)
  cfg = config_lib.validate(cfg)
  from vcon_jax import data  # pylint: disable=import-outside-toplevel
  data.dataset_info(cfg.dataset)  # unknown dataset names fail here, before any work
  return cfg


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="vcon-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  p = sub.add_parser("pretrain", help="train the dense model (cached)",
                     description="Trains the dense model and saves it with Orbax; a second "
                                 "call with the same options reuses it.")
  _add_config_options(p)
  p = sub.add_parser("compress", help="fine-tune the dense model into a compressed one",
                     description="Fine-tunes from the dense checkpoint with one method; "
                                 "checkpoints as it goes and resumes if restarted.")
  _add_config_options(p)
  p.add_argument("--method", choices=config_lib.METHODS, default=None,
                 help="post-shot, gradual, vcon (default) or vcon-distill")
  p.add_argument("--seed", type=int, default=None, help="seed of data order and dropout (0)")
  p = sub.add_parser("compare", help="the main job: every method across seeds, table, plots",
                     description="Dense pretraining, then every method for a compression "
                                 "across seeds; writes table.md, results.json and plots.")
  _add_config_options(p)
  p.add_argument("--preset", default="default", choices=("default", "quick", "single", "full"),
                 help="default: Fashion-MNIST CNN with --compression (< 10 min on 2 cores); "
                      "quick: a 1-minute end-to-end check; single: the config as given; "
                      "full: every suite of experiments/results (~1.5 h)")
  p.add_argument("--quick", action="store_true", help="same as --preset quick")
  p.add_argument("--seeds", type=int, default=None, help="number of seeds (preset's: 3)")
  p.add_argument("--methods", nargs="+", choices=config_lib.METHODS, default=None,
                 help="methods to run (default: all four)")
  p.add_argument("--out", default=None,
                 help="where table.md, results.json and plots go (default: WORKDIR/results)")
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    extra = {}
    if args.command == "compress":
      extra = {"method": args.method, "seed": args.seed}
    cfg = build_config(args, **extra)
    if args.command == "compare" and args.seeds is not None and args.seeds < 1:
      raise ValueError(f"--seeds={args.seeds} is not allowed: at least 1.")
    workdir = pathlib.Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
      raise ValueError(f"--workdir={str(workdir)!r} exists and is not a directory.")
  except ValueError as err:
    parser.exit(2, f"vcon-jax {args.command}: error: {err}\n")
  from vcon_jax.experiment import compare, runner  # pylint: disable=import-outside-toplevel
  from vcon_jax.experiment.io import RunLockedError  # pylint: disable=import-outside-toplevel
  progress = not args.no_progress
  try:
    if args.command == "pretrain":
      r = runner.pretrain(cfg, workdir / compare.data_key(cfg), progress=progress,
                          on_nonfinite=args.on_nonfinite)
      print(f"dense test accuracy {r['test_accuracy'] * 100:.2f} %")
    elif args.command == "compress":
      root = workdir / compare.data_key(cfg)
      r = runner.compress(cfg, root, progress=progress, on_nonfinite=args.on_nonfinite)
      print(f"{cfg.run_name()}: test accuracy of the compressed model "
            f"{r['test_accuracy'] * 100:.2f} % (at step 0: "
            f"{r['compressed_at_start'] * 100:.2f} %)")
      _print_summary(r)
    else:
      preset = "quick" if args.quick else args.preset
      out = pathlib.Path(args.out) if args.out else workdir / "results"
      compare.run(preset, cfg, workdir, out, seeds=args.seeds, methods=args.methods,
                  progress=progress, on_nonfinite=args.on_nonfinite)
  except (ValueError, FileNotFoundError, RunLockedError, FloatingPointError) as err:
    print(f"vcon-jax {args.command}: error: {err}", file=sys.stderr)
    return 1
  return 0


def _print_summary(result: dict) -> None:
  summary = result.get("summary")
  if not summary:
    return
  from vcon_jax.export import Summary  # pylint: disable=import-outside-toplevel
  print(Summary(summary["rows"], summary["totals"]).table())


if __name__ == "__main__":
  sys.exit(main())
