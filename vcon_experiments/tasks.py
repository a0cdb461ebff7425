"""The data of each regime, and the host-side batch transforms (mixup, augmentation, MLM).

- ``same-task``: pretraining and fine-tuning both see the target task (the first
  ``train_limit`` training examples).
- ``transfer`` with ``init_from`` (weights pretrained elsewhere, e.g. ImageNet): the
  target task is the whole data set.
- ``transfer``, images: the classes are split in two halves. The network is pretrained on
  the first half (all of their training examples: the "large source task") and fine-tuned,
  with a fresh head, on the second half (the first ``train_limit`` of their training
  examples), labels renumbered from 0. Tested on the second half's test examples.
- ``transfer``, text: the network is pretrained by masked-byte language modelling on the
  glosses of the training split only (no labels, no test text), then fine-tuned on the
  supersense labels with a fresh head: the analogue of a pretrained language model
  fine-tuned on a task.

Every batch is a pure function of (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import functools

import numpy as np

from vcon_experiments import data as vdata

#: Fraction of the non-padding tokens masked in masked-byte language modelling.
MLM_RATE = 0.15


@functools.lru_cache(maxsize=6)
def _arrays(dataset, split, data_dir, source_dir, max_len):
  info = vdata.dataset_info(dataset)
  tokenizer = vdata.ByteTokenizer(max_len) if info.kind == "text" else None
  return vdata.as_arrays(dataset, split, data_dir=data_dir, source_dir=source_dir,
                         tokenizer=tokenizer)


def _limit(arrays, n):
  return arrays if not n else (arrays[0][:n], arrays[1][:n])


def num_classes(cfg, role: str = "target") -> int:
  """Classes of the target task (or, for image transfer, of the source task)."""
  n = vdata.dataset_info(cfg.dataset).num_classes
  if _class_split(cfg):
    return n // 2 if role == "source" else n - n // 2
  return n


def is_image(cfg) -> bool:
  return vdata.dataset_info(cfg.dataset).kind != "text"


def _class_split(cfg) -> bool:
  """Image transfer splits the classes, unless the source is external (``init_from``)."""
  return cfg.regime == "transfer" and is_image(cfg) and getattr(cfg, "init_from", None) is None


def mask_id(cfg) -> int:
  """The [MASK] token of masked-byte LM: one id past the tokenizer's vocabulary."""
  return vdata.ByteTokenizer(cfg.max_len).vocab_size


def split(cfg, split_name: str, role: str = "target") -> tuple[np.ndarray, np.ndarray]:
  """``(inputs, labels)`` of ``split_name`` for the ``target`` or ``source`` task."""
  limit = cfg.train_limit if split_name == "train" else cfg.test_limit
  x, y = _arrays(cfg.dataset, split_name, cfg.data_dir, cfg.source_dir, cfg.max_len)
  if not _class_split(cfg):
    return _limit((x, y), limit)
  half = vdata.dataset_info(cfg.dataset).num_classes // 2
  keep = (y < half) if role == "source" else (y >= half)
  x, y = x[keep], (y[keep] - (0 if role == "source" else half)).astype(y.dtype)
  return _limit((x, y), 0 if role == "source" else limit)


def train_size(cfg) -> int:
  return len(split(cfg, "train")[0])


def steps_for(cfg) -> int:
  """The fine-tuning budget in optimiser steps (``epochs`` of the training set, if set)."""
  if cfg.epochs <= 0:
    return cfg.steps
  return max(1, int(round(cfg.epochs * train_size(cfg) / cfg.batch_size)))


def batch_at(arrays, step: int, batch_size: int, seed: int) -> dict:
  """The batch of optimiser step ``step``: epoch-wise permutations seeded by (seed, epoch)."""
  x, y = arrays
  per_epoch = len(x) // batch_size
  if per_epoch < 1:
    raise ValueError(f"batch_size={batch_size} is larger than the training set ({len(x)} "
                     f"examples).")
  epoch, i = divmod(step, per_epoch)
  order = np.random.default_rng((seed, epoch)).permutation(len(x))
  idx = np.sort(order[i * batch_size:(i + 1) * batch_size])
  return {"inputs": x[idx], "labels": y[idx]}


def augment(batch: dict, rng: np.random.Generator) -> dict:
  """Random shifts of up to 2 pixels (zero fill) and horizontal flips, per example."""
  x = batch["inputs"]
  out = np.zeros_like(x)
  b, h, w = x.shape[:3]
  shifts = rng.integers(-2, 3, size=(b, 2))
  flips = rng.random(b) < 0.5
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for k in range(b):
    dy, dx = shifts[k]
    img = padded[k, 2 + dy:2 + dy + h, 2 + dx:2 + dx + w]
    out[k] = img[:, ::-1] if flips[k] else img
  return {**batch, "inputs": out}


def mixup(batch: dict, rng: np.random.Generator, alpha: float) -> dict:
  """Mixup (Zhang et al. 2018): one Beta(alpha, alpha) weight per batch, a permuted partner.

  The loss is ``lam * CE(labels) + (1 - lam) * CE(labels_b)`` (:func:`mixup_loss`).
  """
  lam = float(rng.beta(alpha, alpha))
  perm = rng.permutation(len(batch["labels"]))
  x = batch["inputs"].astype(np.float32)
  return {"inputs": (lam * x + (1 - lam) * x[perm]).astype(batch["inputs"].dtype),
          "labels": batch["labels"], "labels_b": batch["labels"][perm],
          "lam": np.full(len(perm), lam, np.float32)}


def mixup_loss(logits, batch):
  import optax  # pylint: disable=import-outside-toplevel
  ce = optax.softmax_cross_entropy_with_integer_labels
  logits = logits.astype("float32")
  if "lam" not in batch:  # evaluation batches are not mixed
    return ce(logits, batch["labels"]).mean()
  lam = batch["lam"]
  return (lam * ce(logits, batch["labels"]) + (1 - lam) * ce(logits, batch["labels_b"])).mean()


def mlm_batch(tokens: np.ndarray, rng: np.random.Generator, mask_token: int) -> dict:
  """Masked-byte LM: ``MLM_RATE`` of the non-padding tokens become ``mask_token``."""
  chosen = (tokens != 0) & (rng.random(tokens.shape) < MLM_RATE)
  return {"inputs": np.where(chosen, mask_token, tokens).astype(tokens.dtype),
          "labels": tokens.astype(np.int32), "weights": chosen.astype(np.float32)}


def token_loss(logits, batch):
  """Mean cross-entropy over the tokens with ``batch["weights"]`` 1 (masked-byte and
  causal language modelling)."""
  import optax  # pylint: disable=import-outside-toplevel
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype("float32"),
                                                       batch["labels"])
  w = batch["weights"]
  return (ce * w).sum() / (w.sum() + 1e-6)


def is_lm(cfg) -> bool:
  return cfg.model == "lm"


def metric_key(cfg) -> str:
  """The result field of the task's test metric: ``test_accuracy`` (higher is better) or,
  for a language model, ``test_bpb`` (bits per byte, lower is better)."""
  return "test_bpb" if is_lm(cfg) else "test_accuracy"


def lm_batch(tokens: np.ndarray) -> dict:
  """Causal LM on byte ids (0 = padding): position ``i`` reads the bytes before ``i``
  (id 0 standing for the start) and predicts byte ``i``; padding is not predicted."""
  tokens = np.asarray(tokens, np.int32)
  inputs = np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
  return {"inputs": inputs, "labels": tokens, "weights": (tokens != 0).astype(np.float32)}


def device_chunks(n: int, batch_size: int, *arrays: np.ndarray):
  """Yields ``(chunks, pad)``: the first ``n`` rows of each array, ``batch_size`` at a
  time, each chunk topped up by repeating its last row to a multiple of the device count
  (every device needs an equal share); the last ``pad`` rows are not to be counted."""
  import jax  # pylint: disable=import-outside-toplevel
  d = jax.device_count()
  for s in range(0, n, batch_size):
    chunks = [a[s:min(s + batch_size, n)] for a in arrays]
    pad = (-len(chunks[0])) % d
    if pad:
      chunks = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunks]
    yield chunks, pad


def bits_per_byte(step, state, tokens: np.ndarray, limit: int | None = None,
                  compressed: bool = True, batch_size: int = 250) -> float:
  """Test bits per byte of the first ``limit`` texts (their first ``max_len`` bytes):
  the summed next-byte cross-entropy over ``ln 2`` times the bytes predicted."""
  import jax  # pylint: disable=import-outside-toplevel
  n = len(tokens) if not limit else min(limit, len(tokens))
  nats, count = 0.0, 0.0
  for (chunk,), pad in device_chunks(n, batch_size, tokens):
    batch = lm_batch(chunk)
    batch["weights"][len(chunk) - pad:] = 0.0  # the repeated rows are not counted
    logits, _ = step.evaluate(state, batch, compressed=compressed)
    logp = jax.nn.log_softmax(np.asarray(jax.device_get(logits), np.float32), -1)
    ce = -np.take_along_axis(np.asarray(logp), batch["labels"][..., None], -1)[..., 0]
    nats += float((ce * batch["weights"]).sum())
    count += float(batch["weights"].sum())
  return nats / (np.log(2.0) * max(count, 1.0))


def finetune_batch(cfg, batch: dict, step: int, seed: int) -> dict:
  """``batch`` with the config's augmentation and mixup (seeded by (seed, step))."""
  if is_lm(cfg):
    return lm_batch(batch["inputs"])
  if not (cfg.augment or cfg.mixup):
    return batch
  rng = np.random.default_rng((seed, step, 1))
  if cfg.augment and is_image(cfg):
    batch = augment(batch, rng)
  if cfg.mixup:
    batch = mixup(batch, rng, cfg.mixup)
  return batch
