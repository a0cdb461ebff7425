"""Losses of the train step: the default cross-entropy and distillation as a loss wrapper."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

TEACHERS = ("initial", "current")


def softmax_cross_entropy(logits: jax.Array, batch: Mapping) -> jax.Array:
  """Default loss: mean softmax cross-entropy on integer ``batch["labels"]``.

  A label outside ``[0, num_classes)`` makes the loss ``nan`` (jnp indexing would
  otherwise wrap a negative label round to the last class without a word).
  """
  labels = batch["labels"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           labels)
  valid = (labels >= 0) & (labels < logits.shape[-1])
  return jnp.where(valid, losses, jnp.nan).mean()


def accuracy(logits, labels):
  """Top-1 accuracy, or ``None`` when ``labels`` are not integer class indices."""
  if labels is None or not jnp.issubdtype(labels.dtype, jnp.integer):
    return None
  if not hasattr(logits, "ndim"):  # a structured output (a dataclass, a dict): the
    return None  # user's loss_fn knows what in it the logits are
  if logits.ndim != labels.ndim + 1:
    return None
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def kl_distillation(student, teacher, temperature, weights=None):
  r"""``T^2 KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch (and
  positions), or the ``weights``-weighted mean (a sequence model's padding weighs 0)."""
  t = jax.nn.softmax(teacher.astype(jnp.float32) / temperature)
  log_s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature)
  kl = jnp.sum(t * (jnp.log(t + 1e-12) - log_s), -1)
  if weights is None or jnp.shape(weights) != kl.shape:
    return jnp.mean(kl) * temperature ** 2
  w = jnp.asarray(weights, jnp.float32)
  return jnp.sum(kl * w) / jnp.maximum(jnp.sum(w), 1e-6) * temperature ** 2


class Distillation(NamedTuple):
  """A task loss plus a distillation term from the dense model (see :func:`distill`)."""

  loss_fn: Callable
  weight: float
  temperature: float
  teacher: str

  def __call__(self, logits, batch, teacher_logits):
    out = self.loss_fn(logits, batch)
    loss, extra = out if isinstance(out, tuple) else (out, {})
    weights = batch.get("weights") if isinstance(batch, Mapping) else None
    kd = kl_distillation(logits, jax.lax.stop_gradient(teacher_logits), self.temperature,
                         weights)
    total = (1.0 - self.weight) * loss + self.weight * kd
    return total, {**extra, "task_loss": loss, "distill_loss": kd}


def distill(loss_fn: Callable | None = None, *, weight: float, temperature: float = 1.0,
            teacher: str = "initial") -> Distillation:
  r"""Wraps a loss with distillation from the dense model's logits.

  .. math:: L = (1 - w) L_{task} + w\, T^2 \mathrm{KL}(p_{teacher}^T \| p_{student}^T)

  The KL term is averaged over the batch (and the positions of a sequence model); when the
  batch has ``"weights"`` of the KL's shape (per token, e.g. 0 on padding) it is their
  weighted mean.

  The train step runs the teacher (a second forward pass) when its loss is one of these.

  Args:
    loss_fn: the task loss ``(logits, batch) -> loss or (loss, metrics)`` (default
      softmax cross-entropy).
    weight: ``w`` in ``[0, 1]``.
    temperature: ``T > 0``.
    teacher: ``'initial'``: the dense params given to ``init``, frozen (a copy lives in
      the train state). ``'current'``: the dense params being trained; once beta is 0 they
      only receive straight-through gradients and drift, and in our Fashion-MNIST runs
      that teacher cost 13-17 accuracy points.
  """
  loss_fn = softmax_cross_entropy if loss_fn is None else loss_fn
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable ((logits, batch) -> loss or (loss, "
                     f"metrics)), got {loss_fn!r}.")
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
      0.0 <= weight <= 1.0):
    raise ValueError(f"distill_weight must be a number in [0, 1], got {weight!r}.")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or (
      temperature <= 0):
    raise ValueError(f"distill_temperature must be > 0, got {temperature!r}.")
  if teacher not in TEACHERS:
    raise ValueError(f"distill_teacher must be 'initial' (frozen dense params at init) or "
                     f"'current' (the dense path of the params being trained), got "
                     f"{teacher!r}.")
  return Distillation(loss_fn, float(weight), float(temperature), teacher)
