"""Experiment configuration: one validated dataclass, per-dataset defaults, run names.

Every field is checked before any work starts (:func:`validate`); a config is saved as
``config.json`` beside each run's results, and a run directory refuses a different config.
The models and compressions, and how run names and tables name a compression's severity,
come from their registries (:mod:`vcon_experiments.model_registry`,
:mod:`vcon_experiments.compressions`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
from collections.abc import Mapping
from typing import Any

from vcon_experiments import compressions, model_registry
from vcon_experiments.compressions import pattern_of

METHODS = ("post-shot", "gradual", "vcon", "vcon-distill")
#: ``dense``: the same fine-tuning without compression (the ceiling at equal budget; in the
#: transfer regime the dense reference, since the pretrained model has no target head).
#: ``post-shot-distill``: post-shot with the distillation term of ``vcon-distill`` (the
#: QAT + KD baseline); neither is run by a preset unless it lists them.
ALL_METHODS = METHODS + ("dense", "post-shot-distill")
DISTILL_METHODS = ("vcon-distill", "post-shot-distill")
REGIMES = ("same-task", "transfer")
COMPRESSIONS = tuple(compressions.REGISTRY)
MODELS = tuple(model_registry.REGISTRY)
BETA_SCHEDULES = ("linear", "cosine")
#: ``cosine``: one warm-up + cosine decay over the budget; ``restart``: a second warm-up +
#: cosine decay begins when beta reaches 0 (the compressed model gets a fresh peak).
LR_SCHEDULES = ("cosine", "restart")


@dataclasses.dataclass(frozen=True)
class Config:
  """One experiment: data, model, dense pretraining and one compression run.

  Attributes:
    dataset: ``fashion_mnist``, ``wordnet`` or a prepared TFDS name (``tfds:cifar10``).
    model: ``mlp``, ``cnn``, ``vit``, ``transformer`` (text classifier) or ``lm`` (a
      Gemma-style causal LM of a text data set's texts, scored in test bits per byte;
      ``same-task`` only: pretrained on the training texts, compressed on them).
    model_kwargs: constructor arguments of the model (widths, depth, ...).
    data_dir: prepared TFDS data (default ``$VCON_JAX_DATA_DIR`` or ~/.cache/vcon_jax).
    source_dir: raw files of a local dataset (default: the Debian package's directory).
    max_len: token length of text inputs (byte tokenizer).
    train_limit, test_limit: use only the first N examples (0: all).
    batch_size: global batch (split over the 'data' mesh axis).
    pretrain_steps, pretrain_lr: dense training (AdamW, warm-up + cosine decay).
    regime: ``same-task`` (the dense model is trained on the target task, then
      compressed) or ``transfer`` (the network is pretrained on a source task: the other
      half of the classes for images, masked-byte language modelling of the training
      glosses for text; it gets a fresh, dense head and is compressed while it adapts).
    epochs: fine-tuning budget in epochs of the (limited) training set; when > 0 it sets
      ``steps`` (``round(epochs * train_examples / batch_size)``) and names the runs.
    steps: fine-tuning budget in optimiser steps of every method (equal for all); used
      when ``epochs`` is 0.
    mixup: mixup's Beta(alpha, alpha) parameter for fine-tuning (0: off; the paper: 1).
    augment: light image augmentation in fine-tuning (random shifts of up to 2 pixels and
      horizontal flips).
    lr: peak fine-tuning learning rate (AdamW, 5 % warm-up, cosine decay to 1 %).
    compression: ``prune``, ``binarize``, ``quantize``, ``low-rank`` or ``prune-units``
      (structured: whole MLP units, heads and channels, ``vj.prune_units``).
    sparsity, bits, rank: the compression's target (prune / quantize / low-rank); for
      ``prune-units`` ``sparsity`` is the fraction of each unit group removed.
    pattern: ``"n:m"`` (e.g. ``"2:4"``) prunes to n:m sparsity instead of ``sparsity``
      (keep n of every m consecutive inputs; gradual: group pruning ramped to 1 - n/m).
    group_size: quantisation scales per group of this many inputs of each output unit
      (0: per output unit).
    method: ``post-shot`` (compress at step 0), ``gradual`` (Zhu-Gupta cubic ramp of
      sparsity, bit width or rank), ``vcon`` (beta 1 -> 0) or ``vcon-distill`` (VCON
      plus distillation from the dense path's logits).
    transition: VCON's transition length Q, and the gradual ramp's length, as a fraction
      of the budget (default 0.2: the paper's 12 of 60 epochs).
    beta_schedule: ``linear`` (the paper's ``max(1 - t/Q, 0)``) or ``cosine``.
    beta_hold: VCON holds beta at 1 for this fraction of the budget before its
      transition of Q begins (0: the paper's schedule, the transition starts at step 0).
    lr_schedule: ``cosine`` (one warm-up + cosine decay over the budget) or ``restart``
      (VCON and gradual: a second warm-up + cosine decay starts where the transition
      ends, so the compressed model trains from a fresh peak; post-shot and dense have no
      transition and keep ``cosine``).
    distill_weight: weight of the distillation term (``vcon-distill``,
      ``post-shot-distill``).
    update_every: prune mask refresh interval (1: every step, the paper's online mask).
    eval_every: steps between evaluations on ``eval_examples`` test examples.
    checkpoint_every: steps between Orbax checkpoints (and at the end).
    seed: seed of data order, dropout and the pretraining init.
    init_from: start from these weights instead of pretraining: an ``.npz`` of the
      model's params keyed by ``/``-joined paths (``blocks/0/attn/query/kernel``) or an
      Orbax checkpoint directory of the params tree. Every leaf must match by path and
      shape, except the classifier head, which is left fresh when its class count
      differs (a pretrained network on a new task).
  """

  dataset: str = "fashion_mnist"
  model: str = "cnn"
  model_kwargs: dict = dataclasses.field(
      default_factory=lambda: {"features": (16, 32), "hidden": 64})
  data_dir: str | None = None
  source_dir: str | None = None
  max_len: int = 64
  train_limit: int = 0
  test_limit: int = 0
  batch_size: int = 128
  pretrain_steps: int = 1500
  pretrain_lr: float = 3e-3
  regime: str = "same-task"
  epochs: float = 0.0
  steps: int = 400
  mixup: float = 0.0
  augment: bool = False
  lr: float = 1e-3
  compression: str = "prune"
  sparsity: float = 0.9
  pattern: str = ""
  bits: int = 4
  group_size: int = 0
  rank: int = 4
  method: str = "vcon"
  transition: float = 0.2
  beta_schedule: str = "linear"
  beta_hold: float = 0.0
  lr_schedule: str = "cosine"
  distill_weight: float = 0.5
  update_every: int = 1
  eval_every: int = 50
  eval_examples: int = 2000
  checkpoint_every: int = 100
  seed: int = 0
  init_from: str | None = None

  def replace(self, **changes: Any) -> "Config":
    return validate(dataclasses.replace(self, **changes))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["model_kwargs"] = {k: list(v) if isinstance(v, tuple) else v
                         for k, v in self.model_kwargs.items()}
    # fields at the defaults they had before they existed are left out, which keeps the
    # configs (and run dirs) of earlier runs valid
    for name, before in (("init_from", None), ("pattern", ""), ("group_size", 0),
                         ("beta_hold", 0.0), ("lr_schedule", "cosine")):
      if d[name] == before:
        del d[name]
    return d

  def dense_key(self) -> dict:
    """The fields the dense pretraining depends on (its cache key)."""
    keys = ("dataset", "model", "model_kwargs", "data_dir", "source_dir", "max_len",
            "train_limit", "batch_size", "pretrain_steps", "pretrain_lr", "regime", "init_from")
    d = self.to_dict()
    return {k: d[k] for k in keys if k in d}

  def budget_name(self) -> str:
    """``e4`` (4 epochs) or ``s400`` (400 steps): the budget as the user gave it."""
    return f"e{self.epochs:g}" if self.epochs > 0 else f"s{self.steps}"

  def run_name(self) -> str:
    extra = ""
    if self.method == "dense":
      return f"{self.regime}/{self.budget_name()}/dense{self._train_extra()}/seed{self.seed}"
    if self.method in ("vcon", "vcon-distill", "gradual"):
      extra = f"-Q{round(self.transition * 100)}"
      if self.method != "gradual" and self.beta_schedule != "linear":
        extra += f"-{self.beta_schedule}"
      if self.method != "gradual" and self.beta_hold:
        extra += f"-hold{round(self.beta_hold * 100)}"
      if self.lr_schedule != "cosine":
        extra += f"-lr{self.lr_schedule}"
    compression = compressions.REGISTRY[self.compression]
    if self.update_every != 1 and "update_every" in compression.fields:
      extra += f"-every{self.update_every}"
    extra += self._train_extra()
    if self.method in DISTILL_METHODS and self.distill_weight != Config.distill_weight:
      extra += f"-kd{self.distill_weight:g}"
    return (f"{self.regime}/{self.budget_name()}/{compression.run_name(self.to_dict())}/"
            f"{self.method}{extra}/seed{self.seed}")

  def _train_extra(self) -> str:
    extra = f"-lr{self.lr:g}" if self.lr != Config.lr else ""
    if self.mixup:
      extra += f"-mixup{self.mixup:g}"
    if self.augment:
      extra += "-aug"
    return extra


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


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


_INT, _NUMBER = "an integer", "a number"


def _in_range(name, value, kind, lo, hi=None, lo_open=False, hi_open=False):
  """``kind`` (``an integer`` or ``a number``) in ``[lo, hi]``, ends open as asked."""
  types = int if kind == _INT else (int, float)
  if isinstance(value, bool) or not isinstance(value, types):
    _fail(name, value, kind)
  if (value < lo or (lo_open and value == lo) or
      (hi is not None and (value > hi or (hi_open and value == hi)))):
    _fail(name, value, f"{kind} in {'(' if lo_open else '['}{lo}, "
                       f"{hi if hi is not None else 'inf'}{')' if hi_open else ']'}")


#: Numeric fields, checked in this order: (kind, low, high or None, low open, high open).
_RANGES = {
    "max_len": (_INT, 2, 4096), "train_limit": (_INT, 0), "test_limit": (_INT, 0),
    "batch_size": (_INT, 1), "pretrain_steps": (_INT, 1), "steps": (_INT, 1),
    "epochs": (_NUMBER, 0, 10000), "mixup": (_NUMBER, 0, 100),
    "pretrain_lr": (_NUMBER, 0, 10, True), "lr": (_NUMBER, 0, 10, True),
    "sparsity": (_NUMBER, 0, 1, False, True), "bits": (_INT, 1, 16), "rank": (_INT, 1),
    "group_size": (_INT, 0),
    "transition": (_NUMBER, 0, 1), "beta_hold": (_NUMBER, 0, 1, False, True),
    "distill_weight": (_NUMBER, 0, 1),
    "update_every": (_INT, 1), "eval_every": (_INT, 1), "eval_examples": (_INT, 1),
    "checkpoint_every": (_INT, 1), "seed": (_INT, 0),
}


#: The fields with a fixed set of values, checked in this order.
CHOICES = {"model": MODELS, "compression": COMPRESSIONS, "method": ALL_METHODS,
           "regime": REGIMES, "beta_schedule": BETA_SCHEDULES, "lr_schedule": LR_SCHEDULES}


def method_fits_regime(method: str, regime: str) -> bool:
  """No distillation in the transfer regime: its teacher would be the frozen starting
  model, whose head for the target classes is untrained."""
  return not (regime == "transfer" and method in DISTILL_METHODS)


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
  for name, limits in _RANGES.items():
    _in_range(name, getattr(cfg, name), *limits)
  if cfg.beta_hold + cfg.transition > 1:
    _fail("beta_hold", cfg.beta_hold, f"at most 1 - transition = {1 - cfg.transition:g} "
          "(the hold and the transition must fit in the budget)")
  if not isinstance(cfg.augment, bool):
    _fail("augment", cfg.augment, "true or false")
  if cfg.pattern:
    n_m = pattern_of(cfg.pattern)
    if n_m is None:
      _fail("pattern", cfg.pattern, "'n:m' with 1 <= n < m, e.g. '2:4' (or '' for none)")
  if not method_fits_regime(cfg.method, cfg.regime):
    _fail("method", cfg.method, "post-shot, gradual, vcon or dense with regime=transfer (a "
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
