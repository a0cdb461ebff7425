"""What pretraining and fine-tuning share: the optimiser, the training loop, the test metric.

The loop checkpoints as it goes and resumes from the latest checkpoint; data order is a
function of (seed, step), so a resumed run sees exactly the batches the uninterrupted one
would have.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import vcon_jax as vj
from vcon_experiments import tasks
from vcon_experiments.config import Config
from vcon_experiments.io import RunDir
from vcon_experiments.progress import progress as make_progress


def _cosine(lr: float, steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=lr * 0.1, peak_value=lr, warmup_steps=max(1, steps // 20),
      decay_steps=steps, end_value=lr * 0.01)


def optimizer(lr: float, steps: int, restart_at: int = 0) -> optax.GradientTransformation:
  """AdamW with warm-up + cosine decay over ``steps``; with ``0 < restart_at < steps`` the
  first cycle spans ``restart_at`` steps and a second the rest (``lr_schedule="restart"``)."""
  if 0 < restart_at < steps:
    schedule = optax.join_schedules(
        [_cosine(lr, restart_at), _cosine(lr, steps - restart_at)], [restart_at])
  else:
    schedule = _cosine(lr, steps)
  return optax.adamw(schedule, weight_decay=0.0)


def plain_step(model: nnx.Module) -> vj.TrainStep:
  """A step of ``model`` that compresses and trains nothing: only its ``init`` (the
  model's params, in the step's layout) and ``update_model`` (params back into the
  module) are used."""
  return vj.make_train_step(model, vj.identity(), vj.constant(1.0), optax.sgd(0.0))


def score(cfg: Config, step: vj.TrainStep, state, arrays, limit: int | None = None,
          compressed: bool = True) -> float:
  """The task's test metric (:func:`tasks.metric_key`): accuracy, or an LM's bits per
  byte."""
  if tasks.is_lm(cfg):
    return tasks.bits_per_byte(step, state, arrays[0], limit, compressed)
  return evaluate(step, state, arrays, limit, compressed)


def evaluate(step: vj.TrainStep, state, arrays, limit: int | None = None,
             compressed: bool = True, batch_size: int = 500) -> float:
  x, y = arrays
  n = len(x) if limit is None else min(limit, len(x))
  correct = 0.0
  for (xb, yb), pad in tasks.device_chunks(n, batch_size, x, y):
    logits, _ = step.evaluate(state, {"inputs": xb, "labels": yb}, compressed=compressed)
    pred = np.asarray(jax.device_get(logits)).argmax(-1)
    correct += float((pred[:len(pred) - pad] == yb[:len(yb) - pad]).sum())
  return correct / n


def train_loop(run: RunDir, step: vj.TrainStep, state, cfg: Config, total: int,
               train, test, desc: str, progress: bool, eval_compressed: bool, seed: int,
               make_batch=None):
  """Runs ``step`` to ``total`` steps with logging, evaluation and checkpoints.

  The loop never waits for the device between log points: non-finite losses are
  detected on the device (the first bad step is kept in a device scalar and read at
  each log point and before each checkpoint, so a checkpoint never holds a bad step),
  and the host prepares the next batch while the device runs the current step.
  ``test=None`` skips evaluation; ``make_batch(batch, s)`` post-processes each batch.
  """
  mgr = vj.CheckpointManager(run.path / "checkpoints", max_to_keep=2)
  start = 0
  restored = run.restore_latest(mgr, state)
  if restored is not None:
    state, start = restored
  run.truncate_metrics(start)
  writer = run.tensorboard()
  bar = make_progress(total, start, desc, progress)
  evals = _every(cfg.eval_every, total, 12)
  t0 = time.time()
  first_bad = jnp.zeros((), jnp.int32)  # 0: none yet; else the 1-based step
  skip = step.skip_nonfinite

  def check():
    bad = int(first_bad)
    if bad:
      raise FloatingPointError(
          f"non-finite loss at step {bad} in {run.path}; stopped, the last good "
          f"checkpoint (step {mgr.latest_step()}) is kept. Lower the learning rate, or "
          f"pass --on-nonfinite skip to skip such steps.")

  try:
    skipped = sum(r.get("nonfinite", 0) for r in run.metrics())
    nonfinite = jnp.zeros((), jnp.float32)
    for s in range(start, total):
      batch = tasks.batch_at(train, s, cfg.batch_size, seed)
      if make_batch is not None:
        batch = make_batch(batch, s)
      state, metrics = step(state, batch)
      done = s + 1
      if skip:
        nonfinite = nonfinite + metrics["nonfinite"]
      else:
        first_bad = _first_bad(first_bad, metrics["loss"], done)
      if done % 10 == 0 or done == total or done % evals == 0:
        check()
        row = {"step": done, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        if skip:
          row["nonfinite_total"] = skipped + float(nonfinite)
        if test is not None and (done % evals == 0 or done == total):
          key = tasks.metric_key(cfg)
          row[key] = score(cfg, step, state, test, cfg.eval_examples, eval_compressed)
          if eval_compressed and row["beta"] > 0:
            row[f"{key}_blended"] = score(cfg, step, state, test, cfg.eval_examples, False)
        row["time"] = time.time() - t0
        run.log(row, writer)
        bar.set_postfix(loss=f"{row['loss']:.3f}", beta=f"{row['beta']:.2f}")
        bar.update(done - bar.n)
      if done % cfg.checkpoint_every == 0 or done == total:
        check()
        mgr.save(done, state)
  finally:
    bar.close()
    writer.close()
    mgr.close()
  return state


@jax.jit
def _first_bad_jit(first_bad, loss, done):
  return jnp.where((first_bad == 0) & ~jnp.isfinite(loss), done, first_bad)


def _first_bad(first_bad, loss, done):
  return _first_bad_jit(first_bad, loss, jnp.int32(done))


def _every(every: int, total: int, most: int) -> int:
  """``every``, widened so that a run evaluates at most ``most`` times."""
  return max(every, -(-total // most))
