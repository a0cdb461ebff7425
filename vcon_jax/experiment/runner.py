"""Dense pretraining and one compression run, each checkpointed and resumable.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per logged step),
TensorBoard event files, ``checkpoints/`` (Orbax) and, once finished, ``result.json``
(written atomically). Restarting the same command resumes from the latest checkpoint; a
finished run is reused. Data order is a function of (seed, step), so a resumed run sees
exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

import vcon_jax as vj
from vcon_jax import data as vdata
from vcon_jax.experiment import methods
from vcon_jax.experiment.config import Config
from vcon_jax.experiment.io import RunDir

#: The dense model is shared by every method and seed of a comparison (cached once per
#: dense config); seeds vary the fine-tuning's data order and dropout.
PRETRAIN_SEED = 0


# ---------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=4)
def _arrays(dataset, split, data_dir, source_dir, max_len, limit):
  info = vdata.dataset_info(dataset)
  tokenizer = vdata.ByteTokenizer(max_len) if info.kind == "text" else None
  return vdata.as_arrays(dataset, split, data_dir=data_dir, source_dir=source_dir,
                         tokenizer=tokenizer, limit=limit or None)


def load_split(cfg: Config, split: str) -> tuple[np.ndarray, np.ndarray]:
  limit = cfg.train_limit if split == "train" else cfg.test_limit
  return _arrays(cfg.dataset, split, cfg.data_dir, cfg.source_dir, cfg.max_len, limit)


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


def build_model(cfg: Config, seed: int = 0) -> nnx.Module:
  info = vdata.dataset_info(cfg.dataset)
  kwargs = dict(cfg.model_kwargs)
  from vcon_jax.models import get_model  # pylint: disable=import-outside-toplevel
  if info.kind == "text":
    kwargs.setdefault("vocab_size", vdata.ByteTokenizer(cfg.max_len).vocab_size)
    kwargs.setdefault("max_len", cfg.max_len)
  elif cfg.model == "mlp":
    kwargs.setdefault("in_features", int(np.prod(info.input_shape)))
  else:
    kwargs.setdefault("in_channels", info.input_shape[-1])
    if cfg.model in ("cnn", "vit"):
      kwargs.setdefault("image_size", info.input_shape[0])
  kwargs.setdefault("num_classes", info.num_classes)
  return get_model(cfg.model, rngs=nnx.Rngs(seed), **kwargs)


def _optimizer(lr: float, steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=lr * 0.1, peak_value=lr, warmup_steps=max(1, steps // 20),
      decay_steps=steps, end_value=lr * 0.01)
  return optax.adamw(schedule, weight_decay=0.0)


def evaluate(step: vj.TrainStep, state, arrays, limit: int | None = None,
             compressed: bool = True, batch_size: int = 500) -> float:
  x, y = arrays
  n = len(x) if limit is None else min(limit, len(x))
  d = jax.device_count()
  correct = 0.0
  for s in range(0, n, batch_size):
    xb, yb = x[s:s + batch_size][: n - s], y[s:s + batch_size][: n - s]
    pad = (-len(xb)) % d
    if pad:  # every device needs an equal share; padded rows are not counted
      xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
      yb = np.concatenate([yb, np.repeat(yb[-1:], pad, 0)])
    logits, _ = step.evaluate(state, {"inputs": xb, "labels": yb}, compressed=compressed)
    pred = np.asarray(jax.device_get(logits)).argmax(-1)
    correct += float((pred[:len(pred) - pad] == yb[:len(yb) - pad]).sum())
  return correct / n


def _progress(total, initial, desc, enabled):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=False,
              dynamic_ncols=True)


def _train_loop(run: RunDir, step: vj.TrainStep, state, cfg: Config, total: int,
                train, test, desc: str, progress: bool, eval_compressed: bool, seed: int):
  """Runs ``step`` to ``total`` steps with logging, evaluation and checkpoints."""
  mgr = vj.CheckpointManager(run.path / "checkpoints", max_to_keep=2)
  start = 0
  restored = run.restore_latest(mgr, state)
  if restored is not None:
    state, start = restored
  run.truncate_metrics(start)
  writer = run.tensorboard()
  bar = _progress(total, start, desc, progress)
  t0 = time.time()
  try:
    skipped = sum(r.get("nonfinite", 0) for r in run.metrics())
    for s in range(start, total):
      state, metrics = step(state, batch_at(train, s, cfg.batch_size, seed))
      done = s + 1
      loss = float(metrics["loss"])
      if step.skip_nonfinite:
        skipped += float(metrics["nonfinite"])
      elif not np.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss {loss} at step {done} in {run.path}; stopped, the last good "
            f"checkpoint (step {mgr.latest_step()}) is kept. Lower the learning rate, or "
            f"pass --on-nonfinite skip to skip such steps.")
      if done % 10 == 0 or done == total or done % cfg.eval_every == 0:
        row = {"step": done, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        if step.skip_nonfinite:
          row["nonfinite_total"] = skipped
        if done % cfg.eval_every == 0 or done == total:
          row["test_accuracy"] = evaluate(step, state, test, cfg.eval_examples,
                                          eval_compressed)
          if eval_compressed and row["beta"] > 0:
            row["test_accuracy_blended"] = evaluate(step, state, test, cfg.eval_examples,
                                                    False)
        row["time"] = time.time() - t0
        run.log(row, writer)
        bar.set_postfix(loss=f"{row['loss']:.3f}", beta=f"{row['beta']:.2f}")
      if done % cfg.checkpoint_every == 0 or done == total:
        mgr.save(done, state)
      bar.update(1)
  finally:
    bar.close()
    writer.close()
    mgr.close()
  return state


def _dense_step(cfg: Config, skip_nonfinite: bool = False):
  """The dense model and its plain training step (also the restore target of its state)."""
  model = build_model(cfg, seed=PRETRAIN_SEED)
  step = vj.make_train_step(model, vj.identity(), vj.constant(1.0),
                            _optimizer(cfg.pretrain_lr, cfg.pretrain_steps),
                            seed=PRETRAIN_SEED, skip_nonfinite=skip_nonfinite)
  return model, step


def pretrain(cfg: Config, root: str | os.PathLike, *, progress: bool = True,
             on_nonfinite: str = "stop") -> dict:
  """Trains the dense model once per dense config; a second call reuses the result."""
  run = RunDir(pathlib.Path(root) / "dense", cfg.dense_key())
  if run.result() is not None:
    return run.result()
  with run.lock():
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    _, step = _dense_step(cfg, skip_nonfinite=on_nonfinite == "skip")
    state = step.init()
    t0 = time.time()
    state = _train_loop(run, step, state, cfg, cfg.pretrain_steps, train, test,
                        "pretrain", progress, eval_compressed=False, seed=PRETRAIN_SEED)
    result = {"test_accuracy": evaluate(step, state, test, compressed=False),
              "steps": cfg.pretrain_steps, "wall_s": time.time() - t0}
    run.write_result(result)
    return result


def dense_model(cfg: Config, root: str | os.PathLike) -> tuple[nnx.Module, Any]:
  """The pretrained dense model (weights and BatchNorm statistics) and its params."""
  run = RunDir(pathlib.Path(root) / "dense", cfg.dense_key())
  if run.result() is None:
    raise FileNotFoundError(f"no finished dense pretraining in {run.path}; run "
                            f"`vcon-jax pretrain` with the same data/model options first.")
  model, step = _dense_step(cfg)
  mgr = vj.CheckpointManager(run.path / "checkpoints", max_to_keep=None)
  try:
    state = mgr.restore(step.init())
  finally:
    mgr.close()
  step.update_model(state, compressed=False)
  return model, state.params


def compress(cfg: Config, root: str | os.PathLike, *, progress: bool = True,
             on_nonfinite: str = "stop") -> dict:
  """Fine-tunes the dense model into the compressed one with ``cfg.method``."""
  root = pathlib.Path(root)
  run = RunDir(root / cfg.run_name(), cfg.to_dict())
  if run.result() is not None:
    return run.result()
  with run.lock():
    pretrain(cfg, root, progress=progress, on_nonfinite=on_nonfinite)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    model, params = dense_model(cfg, root)
    transform, schedule, distill = methods.build(cfg, params)
    step = vj.make_train_step(model, transform, schedule, _optimizer(cfg.lr, cfg.steps),
                              seed=cfg.seed, distill_weight=distill,
                              skip_nonfinite=on_nonfinite == "skip")
    state = step.init()
    t0 = time.time()
    post_shot = evaluate(step, state, test, cfg.eval_examples)
    state = _train_loop(run, step, state, cfg, cfg.steps, train, test,
                        cfg.run_name(), progress, eval_compressed=True, seed=cfg.seed)
    result = {"test_accuracy": evaluate(step, state, test), "steps": cfg.steps,
              "compressed_at_start": post_shot, "wall_s": time.time() - t0}
    summary = vj.export(step, state, run.path / "model.npz")  # the compact model
    result["summary"] = {"rows": list(summary), "totals": summary.totals}
    run.write_result(result)
    return result
