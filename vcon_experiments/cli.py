"""``vcon-jax`` (also ``python -m vcon_experiments``): pretrain, compress and compare.

    vcon-jax compare                      # the main job: Fashion-MNIST ViT, 4 epochs, prune
                                          # 90 %: dense and post-shot / gradual / VCON /
                                          # VCON+distill, 3 seeds
    vcon-jax compare --preset map         # experiments/results/map (126 min, 2 cores, 4 shards)
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

from vcon_experiments import config as config_lib
from vcon_experiments import method_registry, presets

DEFAULT_WORKDIR = "workdir"


#: The ``Config`` fields only ``compress`` takes: ``compare`` runs every method and seed of
#: its preset, and the dense model of ``pretrain`` is shared by all of them.
_PER_RUN = ("method", "seed")
#: ``argparse`` types of the field annotations (``None``: a string).
_TYPES = {"str": None, "str | None": None, "int": int, "float": float, "dict": json.loads}


def _add_flag(p, name: str) -> None:
  """Adds ``--name`` (underscores as dashes) for ``Config`` field ``name`` to ``p``: its
  help, choices and metavar as the field declares them, its type from the annotation."""
  field, info = config_lib.FIELDS[name], config_lib.INFO[name]
  kwargs = {"default": None,
            "help": info.help.replace("{default}", f"{getattr(config_lib.Config(), name)}")}
  if field.type == "bool":
    kwargs.update(action="store_const", const=True)
  elif _TYPES[field.type] is not None:
    kwargs["type"] = _TYPES[field.type]
  if info.choices is not None:
    kwargs["choices"] = info.choices
  if info.metavar is not None:
    kwargs["metavar"] = info.metavar
  p.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def _add_config_options(p: argparse.ArgumentParser) -> None:
  """A flag per ``Config`` field but the per-run ones, in an option group per section."""
  for section in config_lib.SECTIONS.values():
    names = [n for n in section.fields if n not in _PER_RUN]
    if names:
      group = p.add_argument_group(section.name, section.about)
      for name in names:
        _add_flag(group, name)
  p.add_argument("--config", default=None,
                 help="JSON file of config keys (command-line options override it)")
  p.add_argument("--workdir", default=DEFAULT_WORKDIR,
                 help=f"where runs, checkpoints and logs go (default ./{DEFAULT_WORKDIR})")
  p.add_argument("--no-progress", action="store_true", help="no progress output (bars on a terminal, a line per tenth of a run in a log file)")
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
  for name in config_lib.FIELDS:
    value = getattr(args, name, None)
    if value is not None and name != "dataset":
      changes[name] = value
  changes.update({k: v for k, v in extra.items() if v is not None})
  cfg = dataclasses.replace(base, **changes)
  cfg = config_lib.validate(cfg)
  from vcon_experiments import data  # pylint: disable=import-outside-toplevel
  data.dataset_info(cfg.dataset)  # unknown dataset names fail here, before any work
  _check_model_kwargs(cfg)
  return cfg


def _check_model_kwargs(cfg: config_lib.Config) -> None:
  """Unknown model arguments fail here, naming the valid ones, before anything is written."""
  import inspect  # pylint: disable=import-outside-toplevel
  from vcon_experiments import model_registry  # pylint: disable=import-outside-toplevel
  params = inspect.signature(model_registry.REGISTRY[cfg.model].load().__init__).parameters
  valid = [n for n in params if n not in ("self", "rngs")]
  for key in cfg.model_kwargs:
    if key not in valid:
      hint = config_lib._did_you_mean(key, valid)  # pylint: disable=protected-access
      raise ValueError(f"--model-kwargs: {cfg.model} takes no argument {key!r}"
                       f"{f' ({hint})' if hint else ''}; valid: {', '.join(valid)}.")


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
  for name in _PER_RUN:
    _add_flag(p, name)
  p = sub.add_parser("compare", help="the main job: every method across seeds, table, plots",
                     description="Dense pretraining, then every method for a compression "
                                 "across seeds; writes table.md, results.json and plots.")
  _add_config_options(p)
  p.add_argument("--preset", default="default", choices=presets.names(),
                 help="default: the Fashion-MNIST ViT, same-task, 4 epochs, with "
                      "--compression (prune 90 %%), dense and every method; quick: a "
                      "1-minute end-to-end check; single: the config as given; full: the "
                      "v0.1 sub-epoch suites; map: budget x severity x regime on "
                      "Fashion-MNIST ViT and WordNet (experiments/results/map). Each is "
                      "a file in vcon_experiments/presets/ whose __doc__ gives its "
                      "command, time and expected result")
  p.add_argument("--shard", default=None, metavar="I/N",
                 help="run only every N-th run starting at the I-th (start N processes, "
                      "I = 0..N-1, to share the cores; then one --collect for the report)")
  p.add_argument("--collect", action="store_true",
                 help="run nothing; report the finished runs of the preset")
  p.add_argument("--quick", action="store_true", help="same as --preset quick")
  p.add_argument("--seeds", type=int, default=None, help="number of seeds (preset's: 3)")
  p.add_argument("--methods", nargs="+", choices=tuple(method_registry.REGISTRY),
                 default=None, help="methods to run (default: the preset's)")
  p.add_argument("--out", default=None,
                 help="where table.md, results.json and plots go (default: WORKDIR/results)")
  p = sub.add_parser("generate", help="sample text from an exported compressed LM",
                     description="Loads the compact export (model.npz) of a model=lm run "
                                 "through load_compressed into the LM and prints what it "
                                 "writes after the prompt, one byte per step against a "
                                 "key / value cache.")
  p.add_argument("run", metavar="RUN_DIR",
                 help="directory of a finished model=lm compression run")
  p.add_argument("--prompt", default="", help="text to continue (default: none)")
  p.add_argument("--bytes", type=int, default=None,
                 help="bytes to write (default: the model's window minus the prompt)")
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  return parser


def _generate(args) -> int:
  from vcon_experiments import generate  # pylint: disable=import-outside-toplevel
  try:
    cfg, model = generate.load_cached(args.run)
    n = args.bytes if args.bytes is not None else max(
        0, cfg.max_len - len(args.prompt.encode()) - 1)
    text = generate.generate_cached(model, cfg.max_len, args.prompt, n,
                                    temperature=args.temperature, seed=args.seed)
  except (ValueError, FileNotFoundError) as err:
    print(f"vcon-jax generate: error: {err}", file=sys.stderr)
    return 1
  print(args.prompt + text.decode("utf-8", errors="replace"))
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args, unknown = parser.parse_known_args(argv)
  if unknown:
    parser.exit(2, f"vcon-jax: error: unrecognized argument {unknown[0]!r}"
                   f"{_option_hint(parser, unknown[0])}; see vcon-jax "
                   f"{args.command} --help.\n")
  _quiet_orbax()
  if args.command == "generate":
    return _generate(args)
  try:
    extra = {}
    if args.command == "compress":
      extra = {"method": args.method, "seed": args.seed}
    cfg = build_config(args, **extra)
    if args.command == "compare" and args.seeds is not None and args.seeds < 1:
      raise ValueError(f"--seeds={args.seeds} is not allowed: at least 1.")
    shard = _shard(getattr(args, "shard", None))
    if getattr(args, "quick", False) and args.preset not in ("default", "quick"):
      raise ValueError(f"--quick and --preset {args.preset} contradict each other; give one.")
    if not getattr(args, "collect", False):
      from vcon_experiments import data  # pylint: disable=import-outside-toplevel
      data.check_available(cfg.dataset, data_dir=cfg.data_dir, source_dir=cfg.source_dir)
    workdir = pathlib.Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
      raise ValueError(f"--workdir={str(workdir)!r} exists and is not a directory.")
  except (ValueError, FileNotFoundError) as err:
    parser.exit(2, f"vcon-jax {args.command}: error: {err}\n")
  from vcon_experiments import compare, pretrain, report, runner, tasks  # pylint: disable=import-outside-toplevel
  from vcon_experiments.io import RunLockedError  # pylint: disable=import-outside-toplevel
  progress = not args.no_progress
  try:
    if args.command == "pretrain":
      r = pretrain.pretrain(cfg, workdir / compare.data_key(cfg), progress=progress,
                            on_nonfinite=args.on_nonfinite)
      key = tasks.metric_key(cfg)
      print(f"dense test {key[5:]} {report.METRICS[key].show(r[key])}")
    elif args.command == "compress":
      root = workdir / compare.data_key(cfg)
      r = runner.train_and_evaluate(cfg, root, progress=progress,
                                    on_nonfinite=args.on_nonfinite)
      key = tasks.metric_key(cfg)
      print(f"{cfg.run_name()}: test {key[5:]} of the compressed model "
            f"{report.METRICS[key].show(r[key])} (at step 0: "
            f"{report.METRICS[key].show(r['compressed_at_start'])})")
      _print_summary(r)
    else:
      preset = "quick" if args.quick else args.preset
      out = pathlib.Path(args.out) if args.out else workdir / "results"
      compare.run(preset, cfg, workdir, out, seeds=args.seeds, methods=args.methods,
                  progress=progress, on_nonfinite=args.on_nonfinite,
                  shard=shard, collect=args.collect)
  except (ValueError, FileNotFoundError, RunLockedError, FloatingPointError) as err:
    print(f"vcon-jax {args.command}: error: {err}", file=sys.stderr)
    return 1
  return 0


def _option_hint(parser: argparse.ArgumentParser, arg: str) -> str:
  if not arg.startswith("--"):
    return ""
  options = set()
  for action in parser._actions:  # pylint: disable=protected-access
    for sub in (getattr(action, "choices", None) or {}).values():
      if isinstance(sub, argparse.ArgumentParser):
        for a in sub._actions:  # pylint: disable=protected-access
          options.update(o for o in a.option_strings if o.startswith("--"))
  hint = config_lib._did_you_mean(arg.split("=")[0], sorted(options))  # pylint: disable=protected-access
  return f" ({hint})" if hint else ""


def _quiet_orbax() -> None:
  """Orbax logs 'Metadata file does not exist' through absl on every restore: not news."""
  try:
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


def _shard(text: str | None) -> tuple[int, int]:
  if text is None:
    return 0, 1
  try:
    i, n = (int(v) for v in text.split("/"))
  except ValueError:
    i, n = -1, 0
  if not 0 <= i < n:
    raise ValueError(f"--shard={text!r} is not allowed: I/N with 0 <= I < N, e.g. 0/2.")
  return i, n


def _print_summary(result: dict) -> None:
  summary = result.get("summary")
  if not summary:
    return
  from vcon_jax import Summary  # pylint: disable=import-outside-toplevel
  print(Summary(summary["rows"], summary["totals"]).table())


if __name__ == "__main__":
  sys.exit(main())
