"""Experiment configuration: one validated dataclass in six sections, run names.

A config's fields come in sections (:data:`SECTIONS`): the data, the model, its dense
pretraining, the fine-tuning every method shares, the compression and the method. Each
field is declared once, in its section, with what the suite needs to know of it: its
``vcon-jax`` flag's help, its allowed values (:func:`validate` checks every field before
any work starts) and whether ``to_dict`` leaves it out at its default. The command line
(:mod:`vcon_experiments.cli`) is generated from these declarations.

A config is saved as ``config.json`` beside each run's results, and a run directory
refuses a different config. The models, compressions and methods, and how run names and
tables name a compression's severity, come from their registries
(:mod:`vcon_experiments.model_registry`, :mod:`vcon_experiments.compressions`,
:mod:`vcon_experiments.method_registry`), which import nothing of this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
from collections.abc import Mapping
from typing import Any

from vcon_experiments import compressions, method_registry, model_registry
from vcon_experiments.compressions import pattern_of

_INT, _NUMBER = "an integer", "a number"


@dataclasses.dataclass(frozen=True)
class Range:
  """The numbers a field allows: ``kind`` (an integer, or any number) in ``[lo, hi]``,
  either end open as asked (``hi`` None: no upper end)."""

  kind: str
  lo: float
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False

  def check(self, name: str, value: Any) -> None:
    types = int if self.kind == _INT else (int, float)
    if isinstance(value, bool) or not isinstance(value, types):
      _fail(name, value, self.kind)
    lo, hi = self.lo, self.hi
    if (value < lo or (self.lo_open and value == lo) or
        (hi is not None and (value > hi or (self.hi_open and value == hi)))):
      _fail(name, value, f"{self.kind} in {'(' if self.lo_open else '['}{lo}, "
                         f"{hi if hi is not None else 'inf'}{')' if self.hi_open else ']'}")


def _integer(lo: int, hi: int | None = None) -> Range:
  return Range(_INT, lo, hi)


def _number(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Range:
  return Range(_NUMBER, lo, hi, lo_open, hi_open)


@dataclasses.dataclass(frozen=True)
class FieldInfo:
  """What the suite knows of a config field besides its type and default.

  Attributes:
    section: the name of its section (and of its flag's option group).
    help: its ``vcon-jax`` flag's help; ``{default}`` stands for the default.
    choices: the values allowed, where they are a fixed set (the flag's choices).
    range: the numbers allowed, for a numeric field.
    metavar: its flag's metavar, where the field's name would not do.
    omit_default: left out of :meth:`Config.to_dict` at its default: a field added
      after runs were stored, whose configs (and so directories) stay valid.
  """

  section: str
  help: str
  choices: tuple[str, ...] | None = None
  range: Range | None = None
  metavar: str | None = None
  omit_default: bool = False


@dataclasses.dataclass(frozen=True)
class Section:
  """A section of :class:`Config`: its name and what its fields hold (the title and
  description of its flags' option group)."""

  name: str
  about: str

  @property
  def fields(self) -> tuple[str, ...]:
    """The names of its fields, in order."""
    return tuple(n for n, info in INFO.items() if info.section == self.name)

  # pylint: disable=redefined-builtin
  def field(self, default: Any = dataclasses.MISSING, *, help: str,
            factory: Any = dataclasses.MISSING, choices=None, range: Range | None = None,
            metavar: str | None = None, omit_default: bool = False) -> Any:
    """A field of this section (``factory``: a default made per instance; ``choices``:
    any iterable of the allowed values, a registry among them)."""
    info = FieldInfo(self.name, help, tuple(choices) if choices is not None else None,
                     range, metavar, omit_default)
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={"info": info})
  # pylint: enable=redefined-builtin


DATA = Section("data", "what is read, and in which batches")
MODEL = Section("model", "the network and its constructor arguments")
PRETRAINING = Section("pretraining", "the dense model every compression run starts from")
FINE_TUNING = Section("fine-tuning", "the budget and optimiser every method shares")
COMPRESSION = Section("compression", "what the model is compressed to")
METHOD = Section("method", "how it gets there")


def _method_help() -> str:
  """``--method``'s help: every registered method and what it does."""
  return ("; ".join(f"{name}: {m.label}" for name, m in method_registry.REGISTRY.items())
          + " (default: {default})")


@dataclasses.dataclass(frozen=True)
class Config:
  """One experiment: data, model, dense pretraining and one compression run.

  Data (what is read, and in which batches):
    dataset: ``fashion_mnist``, ``wordnet`` or a prepared TFDS name (``tfds:cifar10``).
    data_dir: prepared TFDS data (default ``$VCON_JAX_DATA_DIR`` or ~/.cache/vcon_jax).
    source_dir: raw files of a local dataset (default: the Debian package's directory).
    max_len: token length of text inputs (byte tokenizer).
    train_limit, test_limit: use only the first N examples (0: all).
    batch_size: global batch of pretraining and fine-tuning (split over the 'data' mesh
      axis).

  Model (the network and its constructor arguments):
    model: ``mlp``, ``cnn``, ``vit``, ``transformer`` (text classifier) or ``lm`` (a
      Gemma-style causal LM of a text data set's texts, scored in test bits per byte;
      ``same-task`` only: pretrained on the training texts, compressed on them).
    model_kwargs: constructor arguments of the model (widths, depth, ...).

  Pretraining (the dense model every compression run starts from):
    regime: ``same-task`` (the dense model is trained on the target task, then
      compressed) or ``transfer`` (the network is pretrained on a source task: the other
      half of the classes for images, masked-byte language modelling of the training
      glosses for text; it gets a fresh, dense head and is compressed while it adapts).
    pretrain_steps, pretrain_lr: dense training (AdamW, warm-up + cosine decay).
    init_from: start from these weights instead of pretraining: an ``.npz`` of the
      model's params keyed by ``/``-joined paths (``blocks/0/attn/query/kernel``) or an
      Orbax checkpoint directory of the params tree. Every leaf must match by path and
      shape, except the classifier head, which is left fresh when its class count
      differs (a pretrained network on a new task).

  Fine-tuning (the budget and optimiser every method shares):
    epochs: fine-tuning budget in epochs of the (limited) training set; when > 0 it sets
      ``steps`` (``round(epochs * train_examples / batch_size)``) and names the runs.
    steps: fine-tuning budget in optimiser steps of every method (equal for all); used
      when ``epochs`` is 0.
    lr: peak fine-tuning learning rate (AdamW, 5 % warm-up, cosine decay to 1 %).
    lr_schedule: ``cosine`` (one warm-up + cosine decay over the budget) or ``restart``
      (a method with a transition: a second warm-up + cosine decay starts where the
      transition ends, so the compressed model trains from a fresh peak; post-shot and
      dense have no transition and keep ``cosine``).
    mixup: mixup's Beta(alpha, alpha) parameter for fine-tuning (0: off; the paper: 1).
    augment: light image augmentation in fine-tuning (random shifts of up to 2 pixels and
      horizontal flips).
    eval_every: steps between evaluations on ``eval_examples`` test examples.
    checkpoint_every: steps between Orbax checkpoints (and at the end).
    seed: seed of the fine-tuning's data order, mixup and dropout (the dense model is
      shared by every seed).

  Compression (what the model is compressed to):
    compression: ``prune``, ``binarize``, ``quantize``, ``low-rank`` or ``prune-units``
      (structured: whole MLP units, heads and channels, ``vj.prune_units``).
    sparsity, bits, rank: the compression's target (prune / quantize / low-rank); for
      ``prune-units`` ``sparsity`` is the fraction of each unit group removed.
    pattern: ``"n:m"`` (e.g. ``"2:4"``) prunes to n:m sparsity instead of ``sparsity``
      (keep n of every m consecutive inputs; gradual: group pruning ramped to 1 - n/m).
    group_size: quantisation scales per group of this many inputs of each output unit
      (0: per output unit).
    update_every: prune mask refresh interval (1: every step, the paper's online mask).

  Method (how it gets there; :data:`vcon_experiments.method_registry.REGISTRY`):
    method: ``post-shot`` (compress at step 0), ``gradual`` (Zhu-Gupta cubic ramp of
      sparsity, bit width or rank), ``vcon`` (beta 1 -> 0), ``vcon-distill`` (VCON
      plus distillation from the dense path's logits), ``post-shot-distill`` or
      ``dense`` (no compression: the ceiling at equal budget).
    transition: VCON's transition length Q, and the gradual ramp's length, as a fraction
      of the budget (default 0.2: the paper's 12 of 60 epochs). With
      ``transition_rule="fitted"`` it is VCON's longest transition.
    transition_rule: ``fitted`` (the default: VCON's Q from the output jump of the
      compressed model on the run's first batch, :func:`vcon_jax.fitted_vanish`, at most
      ``transition``) or ``fixed`` (Q = ``transition`` of the budget, as in 0.3; the
      committed maps' ``vcon-Q20`` runs). Stored only for the methods whose beta vanishes.
    beta_schedule: ``linear`` (the paper's ``max(1 - t/Q, 0)``) or ``cosine``.
    beta_hold: VCON holds beta at 1 for this fraction of the budget before its
      transition of Q begins (0: the paper's schedule, the transition starts at step 0).
    distill_weight: weight of the distillation term (the methods that distil).
  """

  # ---------------------------------------------------------------------------- data
  dataset: str = DATA.field(
      "fashion_mnist", help="fashion_mnist (default), wordnet, or a prepared TFDS dataset "
      "such as tfds:cifar10; sets the model defaults of that dataset")
  data_dir: str | None = DATA.field(None, help="prepared TFDS data directory")
  source_dir: str | None = DATA.field(
      None, help="raw files of a local dataset (default: the Debian package's)")
  max_len: int = DATA.field(64, help="text length ({default})", range=_integer(2, 4096))
  train_limit: int = DATA.field(
      0, help="use only the first N training examples (0: all)", range=_integer(0))
  test_limit: int = DATA.field(
      0, help="use only the first N test examples (0: all)", range=_integer(0))
  batch_size: int = DATA.field(128, help="global batch ({default})", range=_integer(1))
  # --------------------------------------------------------------------------- model
  model: str = MODEL.field("cnn", help="model (default: cnn for images, transformer for "
                           "text)", choices=model_registry.REGISTRY)
  model_kwargs: dict = MODEL.field(
      factory=lambda: {"features": (16, 32), "hidden": 64}, metavar="JSON",
      help="model constructor arguments as JSON, e.g. '{\"hidden\": [128]}'")
  # --------------------------------------------------------------------- pretraining
  regime: str = PRETRAINING.field(
      "same-task", choices=("same-task", "transfer"),
      help="same-task: compress a dense model trained on the target task (default); "
      "transfer: pretrain on a source task, then compress while adapting to the target "
      "with a fresh dense head")
  pretrain_steps: int = PRETRAINING.field(1500, help="dense training steps ({default})",
                                          range=_integer(1))
  pretrain_lr: float = PRETRAINING.field(3e-3, help="dense peak learning rate ({default})",
                                         range=_number(0, 10, lo_open=True))
  init_from: str | None = PRETRAINING.field(
      None, omit_default=True, metavar="PATH",
      help="start from these weights instead of pretraining: an .npz of the model's "
      "params keyed by /-joined paths, or an Orbax checkpoint; a fresh head when the "
      "class count differs")
  # --------------------------------------------------------------------- fine-tuning
  epochs: float = FINE_TUNING.field(
      0.0, range=_number(0, 10000),
      help="fine-tuning budget in epochs of the training set, equal for every method "
      "(sets the steps; default: --steps)")
  steps: int = FINE_TUNING.field(
      400, range=_integer(1), help="fine-tuning steps, equal for every method, when "
      "--epochs is not given ({default})")
  lr: float = FINE_TUNING.field(
      1e-3, range=_number(0, 10, lo_open=True),
      help="fine-tuning peak learning rate, AdamW + cosine decay ({default})")
  lr_schedule: str = FINE_TUNING.field(
      "cosine", choices=("cosine", "restart"), omit_default=True,
      help="cosine: one warm-up + cosine decay; restart: a second one from the end of "
      "the transition ({default})")
  mixup: float = FINE_TUNING.field(
      0.0, range=_number(0, 100),
      help="mixup alpha for fine-tuning (0: off; the paper uses 1)")
  augment: bool = FINE_TUNING.field(
      False, help="light image augmentation in fine-tuning (shifts, flips)")
  eval_every: int = FINE_TUNING.field(50, help="steps between test evaluations ({default})",
                                      range=_integer(1))
  eval_examples: int = FINE_TUNING.field(
      2000, help="test examples per intermediate evaluation ({default})", range=_integer(1))
  checkpoint_every: int = FINE_TUNING.field(
      100, help="steps between checkpoints ({default})", range=_integer(1))
  seed: int = FINE_TUNING.field(0, help="seed of data order and dropout ({default})",
                                range=_integer(0))
  # --------------------------------------------------------------------- compression
  compression: str = COMPRESSION.field("prune", help="what to compress to ({default})",
                                       choices=compressions.REGISTRY)
  sparsity: float = COMPRESSION.field(
      0.9, range=_number(0, 1, hi_open=True),
      help="prune: fraction of weights removed, in [0, 1) ({default})")
  pattern: str = COMPRESSION.field(
      "", omit_default=True, metavar="N:M",
      help="prune: n:m sparsity instead of --sparsity, e.g. 2:4")
  bits: int = COMPRESSION.field(4, help="quantize: bit width ({default})",
                                range=_integer(1, 16))
  group_size: int = COMPRESSION.field(
      0, range=_integer(0), omit_default=True,
      help="quantize: a scale per this many inputs of each output unit (0: per output "
      "unit, the default)")
  rank: int = COMPRESSION.field(4, help="low-rank: rank ({default})", range=_integer(1))
  update_every: int = COMPRESSION.field(
      1, range=_integer(1), help="prune: mask refresh interval in steps ({default})")
  # -------------------------------------------------------------------------- method
  method: str = METHOD.field("vcon", help=_method_help(), choices=method_registry.REGISTRY)
  transition: float = METHOD.field(
      0.2, range=_number(0, 1), help="VCON transition Q (and gradual ramp) as a fraction "
      "of --steps ({default})")
  transition_rule: str = METHOD.field(
      "fitted", choices=("fitted", "fixed"),
      help="VCON: fit Q to the measured output jump, at most --transition, or keep it "
      "fixed at --transition ({default})")
  beta_schedule: str = METHOD.field("linear", choices=("linear", "cosine"),
                                    help="shape of beta from 1 to 0 ({default})")
  beta_hold: float = METHOD.field(
      0.0, range=_number(0, 1, hi_open=True), omit_default=True,
      help="VCON: hold beta at 1 for this fraction of --steps before the transition "
      "({default})")
  distill_weight: float = METHOD.field(
      0.5, range=_number(0, 1),
      help="vcon-distill: weight of the distillation term ({default})")

  def replace(self, **changes: Any) -> "Config":
    return validate(dataclasses.replace(self, **changes))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["model_kwargs"] = {k: list(v) if isinstance(v, tuple) else v
                         for k, v in self.model_kwargs.items()}
    for name, info in INFO.items():
      if info.omit_default and d[name] == FIELDS[name].default:
        del d[name]
    if method_registry.REGISTRY[self.method].transition != "beta":
      del d["transition_rule"]  # post-shot, gradual, dense: no beta transition to fit
    return d

  def dense_key(self) -> dict:
    """The fields the dense pretraining depends on (its cache key): the data, model and
    pretraining sections, but not ``test_limit`` (how many test examples score the dense
    model, not the model)."""
    d = self.to_dict()
    return {k: d[k] for section in (DATA, MODEL, PRETRAINING) for k in section.fields
            if k in d and k != "test_limit"}

  def budget_name(self) -> str:
    """``e4`` (4 epochs) or ``s400`` (400 steps): the budget as the user gave it."""
    return f"e{self.epochs:g}" if self.epochs > 0 else f"s{self.steps}"

  def run_name(self) -> str:
    """``<regime>/<budget>/<compression>/<method>/seed<k>``: every option that changes a
    result, options at their defaults left out (``vcon-Q20``, ``vcon-Q20-cosine-kd0.7``)."""
    method = method_registry.REGISTRY[self.method]
    budget = f"{self.regime}/{self.budget_name()}"
    if not method.compresses:  # one run serves every severity: no compression named
      return f"{budget}/{self.method}{self._train_extra()}/seed{self.seed}"
    extra = ""
    if method.transition is not None:
      fitted = method.transition == "beta" and self.transition_rule == "fitted"
      extra = f"-{'fitQ' if fitted else 'Q'}{round(self.transition * 100)}"
      if method.transition == "beta" and self.beta_schedule != Config.beta_schedule:
        extra += f"-{self.beta_schedule}"
      if method.transition == "beta" and self.beta_hold != Config.beta_hold:
        extra += f"-hold{round(self.beta_hold * 100)}"
      if self.lr_schedule != Config.lr_schedule:
        extra += f"-lr{self.lr_schedule}"
    compression = compressions.REGISTRY[self.compression]
    if self.update_every != 1 and "update_every" in compression.fields:
      extra += f"-every{self.update_every}"
    extra += self._train_extra()
    if method.distill and self.distill_weight != Config.distill_weight:
      extra += f"-kd{self.distill_weight:g}"
    return (f"{budget}/{compression.run_name(self.to_dict())}/"
            f"{self.method}{extra}/seed{self.seed}")

  def _train_extra(self) -> str:
    extra = f"-lr{self.lr:g}" if self.lr != Config.lr else ""
    if self.mixup:
      extra += f"-mixup{self.mixup:g}"
    if self.augment:
      extra += "-aug"
    return extra


#: Every field of :class:`Config` by name, in section order.
FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
#: What the suite knows of each field (section, flag help, allowed values).
INFO: dict[str, FieldInfo] = {name: f.metadata["info"] for name, f in FIELDS.items()}
#: The sections by name, in order.
SECTIONS: dict[str, Section] = {
    s.name: s for s in (DATA, MODEL, PRETRAINING, FINE_TUNING, COMPRESSION, METHOD)}
#: The fields with a fixed set of values, and those values.
CHOICES: dict[str, tuple[str, ...]] = {
    name: info.choices for name, info in INFO.items() if info.choices is not None}


def _fail(name: str, value: Any, allowed: str) -> None:
  raise ValueError(f"{name}={value!r} is not allowed: {allowed}.")


def _did_you_mean(value: Any, choices) -> str:
  close = difflib.get_close_matches(str(value), list(choices), n=1)
  return f"did you mean {close[0]!r}?" if close else ""


def _choice(name, value, choices):
  if value not in choices:
    hint = _did_you_mean(value, choices)
    raise ValueError(f"{name}={value!r} is not allowed{f' ({hint})' if hint else ''}; "
                     f"choose one of {', '.join(choices)}.")


def validate(cfg: Config) -> Config:
  """Checks every field; raises ``ValueError`` naming the field, value and what is allowed."""
  for name, choices in CHOICES.items():
    _choice(name, getattr(cfg, name), choices)
  if not isinstance(cfg.dataset, str) or not cfg.dataset:
    _fail("dataset", cfg.dataset, "a dataset name such as fashion_mnist or wordnet")
  if not isinstance(cfg.model_kwargs, dict):
    _fail("model_kwargs", cfg.model_kwargs, "a dict of model constructor arguments")
  # JSON (config files, --model-kwargs) gives lists where the models take tuples
  cfg = dataclasses.replace(cfg, model_kwargs={
      k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model_kwargs.items()})
  for name in ("data_dir", "source_dir"):
    value = getattr(cfg, name)
    if value is not None and not pathlib.Path(value).is_dir():
      _fail(name, value, "an existing directory")
  if cfg.init_from is not None and not pathlib.Path(cfg.init_from).exists():
    _fail("init_from", cfg.init_from, "an existing .npz file or Orbax checkpoint directory")
  for name, info in INFO.items():
    if info.range is not None:
      info.range.check(name, getattr(cfg, name))
  if cfg.beta_hold + cfg.transition > 1:
    _fail("beta_hold", cfg.beta_hold, f"at most 1 - transition = {1 - cfg.transition:g} "
          "(the hold and the transition must fit in the budget)")
  if (cfg.transition_rule == "fitted" and
      method_registry.REGISTRY[cfg.method].transition == "beta"):
    for name, default in (("beta_schedule", "linear"), ("beta_hold", 0.0),
                          ("lr_schedule", "cosine")):
      if getattr(cfg, name) != default:
        _fail(name, getattr(cfg, name), f"{default!r} with transition_rule='fitted' (the "
              f"fitted transition is linear from step 0 and its length is known only "
              f"once measured); pass transition_rule='fixed' to set it")
  if not isinstance(cfg.augment, bool):
    _fail("augment", cfg.augment, "true or false")
  if cfg.pattern:
    n_m = pattern_of(cfg.pattern)
    if n_m is None:
      _fail("pattern", cfg.pattern, "'n:m' with 1 <= n < m, e.g. '2:4' (or '' for none)")
  if not method_registry.fits_regime(cfg.method, cfg.regime):
    *others, last = (m for m in method_registry.REGISTRY
                     if method_registry.fits_regime(m, cfg.regime))
    _fail("method", cfg.method, f"{', '.join(others)} or {last} with regime=transfer (a "
          "distillation teacher is the frozen starting model, whose head for the target "
          "classes is untrained; distil with regime=same-task)")
  if cfg.model == "lm":
    if cfg.regime != "same-task":
      _fail("regime", cfg.regime, "same-task with model=lm (the LM is pretrained and "
            "compressed on the training texts)")
    if cfg.mixup or cfg.augment:
      _fail("mixup" if cfg.mixup else "augment", cfg.mixup or cfg.augment,
            "0 / false with model=lm")
  return cfg


def from_dict(d: dict) -> Config:
  """Builds a config from a dict (e.g. a JSON file), rejecting unknown keys.

  A ``"__doc__"`` entry (a config file's description: the command that runs it, its
  time and the result it should give) is skipped.
  """
  d = {k: v for k, v in d.items() if k != "__doc__"}
  unknown = [k for k in d if k not in FIELDS]
  if unknown:
    k = unknown[0]
    hint = _did_you_mean(k, FIELDS)
    hint = f"; {hint}" if hint else ""
    raise ValueError(f"unknown config key {k!r}{hint} Valid keys: {', '.join(FIELDS)}.")
  return validate(Config(**d))


def load(path: str | pathlib.Path) -> Config:
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"config file {str(path)!r} does not exist.")
  try:
    return from_dict(json.loads(path.read_text()))
  except json.JSONDecodeError as err:
    raise ValueError(f"config file {str(path)!r} is not valid JSON: {err}.") from None


#: Model settings per dataset, sized for 2 CPU cores (configs scale them up on TPU/GPU).
DATASET_DEFAULTS = {
    "fashion_mnist": {"model": "cnn", "model_kwargs": {"features": (16, 32), "hidden": 64}},
    "wordnet": {"model": "transformer",
                "model_kwargs": {"dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128},
                "batch_size": 64, "max_len": 48, "pretrain_steps": 1200, "pretrain_lr": 2e-3,
                "steps": 200, "eval_every": 40},
}


def severity_name(cfg: Config | Mapping) -> str:
  """How hard a config (or its ``to_dict()``) compresses, as tables and suite names say
  it: ``prune 90%``, ``binary``, ``4-bit`` or ``rank 4`` (its compression's
  ``severity``)."""
  d = cfg.to_dict() if isinstance(cfg, Config) else cfg
  return compressions.REGISTRY[d["compression"]].severity(d)
