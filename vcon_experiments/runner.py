"""Dense pretraining and one compression run, each checkpointed and resumable.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per logged step),
TensorBoard event files, ``checkpoints/`` (Orbax) and, once finished, ``result.json``
(written atomically). Restarting the same command resumes from the latest checkpoint; a
finished run is reused. Data order is a function of (seed, step), so a resumed run sees
exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import vcon_jax as vj
from vcon_jax import _paths as vj_paths
from vcon_experiments import data as vdata
from vcon_experiments import methods, tasks
from vcon_experiments.config import Config
from vcon_experiments.io import RunDir
from vcon_experiments.progress import progress as make_progress

#: The dense model is shared by every method and seed of a comparison (cached once per
#: dense config); seeds vary the fine-tuning's data order and dropout.
PRETRAIN_SEED = 0


# ---------------------------------------------------------------------------------- data
def load_split(cfg: Config, split: str, role: str = "target") -> tuple[np.ndarray, np.ndarray]:
  """The arrays of ``split`` for the regime's ``target`` (or ``source``) task."""
  return tasks.split(cfg, split, role)


batch_at = tasks.batch_at


def build_model(cfg: Config, seed: int = 0, role: str = "target") -> nnx.Module:
  """The model of ``cfg`` for the target task or, with ``role="source"``, for pretraining
  (the source classes, or the masked-byte language model of the text transfer regime)."""
  info = vdata.dataset_info(cfg.dataset)
  kwargs = dict(cfg.model_kwargs)
  from vcon_experiments.models import MaskedByteLM, get_model  # pylint: disable=import-outside-toplevel
  transfer = cfg.regime == "transfer"
  if tasks.is_lm(cfg):
    kwargs.setdefault("vocab_size", vdata.ByteTokenizer(cfg.max_len).vocab_size)
    kwargs.setdefault("max_len", cfg.max_len)
    return get_model("lm", rngs=nnx.Rngs(seed), **kwargs)
  if info.kind == "text":
    vocab = vdata.ByteTokenizer(cfg.max_len).vocab_size + (1 if transfer else 0)
    kwargs.setdefault("vocab_size", vocab)  # transfer: one more id, the [MASK] token
    kwargs.setdefault("max_len", cfg.max_len)
    if transfer and role == "source":
      return MaskedByteLM(**kwargs, rngs=nnx.Rngs(seed))
  elif cfg.model == "mlp":
    kwargs.setdefault("in_features", int(np.prod(info.input_shape)))
  else:
    kwargs.setdefault("in_channels", info.input_shape[-1])
    if cfg.model in ("cnn", "vit"):
      kwargs.setdefault("image_size", info.input_shape[0])
  kwargs.setdefault("num_classes", tasks.num_classes(cfg, role))
  return get_model(cfg.model, rngs=nnx.Rngs(seed), **kwargs)


def _cosine(lr: float, steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=lr * 0.1, peak_value=lr, warmup_steps=max(1, steps // 20),
      decay_steps=steps, end_value=lr * 0.01)


def _optimizer(lr: float, steps: int, restart_at: int = 0) -> optax.GradientTransformation:
  """AdamW with warm-up + cosine decay over ``steps``; with ``0 < restart_at < steps`` the
  first cycle spans ``restart_at`` steps and a second the rest (``lr_schedule="restart"``)."""
  if 0 < restart_at < steps:
    schedule = optax.join_schedules(
        [_cosine(lr, restart_at), _cosine(lr, steps - restart_at)], [restart_at])
  else:
    schedule = _cosine(lr, steps)
  return optax.adamw(schedule, weight_decay=0.0)


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


def _train_loop(run: RunDir, step: vj.TrainStep, state, cfg: Config, total: int,
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
      batch = batch_at(train, s, cfg.batch_size, seed)
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


def _dense_step(cfg: Config, skip_nonfinite: bool = False):
  """The pretraining model and its plain training step (also the restore target)."""
  model = build_model(cfg, seed=PRETRAIN_SEED, role="source")
  mlm = cfg.regime == "transfer" and not tasks.is_image(cfg)
  step = vj.make_train_step(model, vj.identity(), vj.constant(1.0),
                            _optimizer(cfg.pretrain_lr, cfg.pretrain_steps),
                            loss_fn=tasks.token_loss if mlm or tasks.is_lm(cfg) else None,
                            seed=PRETRAIN_SEED, skip_nonfinite=skip_nonfinite)
  return model, step


def pretrain(cfg: Config, root: str | os.PathLike, *, progress: bool = True,
             on_nonfinite: str = "stop") -> dict:
  """Trains the dense model once per dense config; a second call reuses the result.

  ``same-task``: on the target task. ``transfer``: on the source task (images: the other
  half of the classes; text: masked-byte language modelling of the training glosses,
  evaluated by masked-byte accuracy on the test glosses).
  """
  run = RunDir(pathlib.Path(root) / "dense", cfg.dense_key())
  committed = run.result()
  if committed is not None and (cfg.init_from is not None or
                                _has_checkpoint(run, committed.get("steps"))):
    return committed
  if committed is not None:  # results committed without checkpoints (a fresh clone)
    print(f"{run.path}: the dense result is here but not its checkpoint (results are "
          f"committed without checkpoints); pretraining again (seeded: the same weights "
          f"on the same machine and software; on another CPU XLA's float rounding may "
          f"differ, and the new dense result replaces the committed one).", flush=True)
  if cfg.init_from is not None:  # pretrained weights given: nothing to train here
    with run.lock():
      _, params = dense_model(cfg, root)
      result = {"test_accuracy": None, "steps": 0, "wall_s": 0.0,
                "task": f"init-from {cfg.init_from}"}
      run.write_result(result)
      return result
  with run.lock():
    mlm = cfg.regime == "transfer" and not tasks.is_image(cfg)
    train, test = load_split(cfg, "train", "source"), load_split(cfg, "test", "source")
    _, step = _dense_step(cfg, skip_nonfinite=on_nonfinite == "skip")
    state = step.init()
    t0 = time.time()
    make_batch = None
    if tasks.is_lm(cfg):
      make_batch = lambda b, s: tasks.lm_batch(b["inputs"])  # noqa: E731
    if mlm:
      mask = tasks.mask_id(cfg)
      make_batch = lambda b, s: tasks.mlm_batch(  # noqa: E731
          b["inputs"], np.random.default_rng((PRETRAIN_SEED, s, 2)), mask)
    state = _train_loop(run, step, state, cfg, cfg.pretrain_steps, train,
                        None if mlm else test, "pretrain", progress, eval_compressed=False,
                        seed=PRETRAIN_SEED, make_batch=make_batch)
    if mlm:
      acc = _mlm_accuracy(step, state, test[0], tasks.mask_id(cfg))
    else:
      acc = score(cfg, step, state, test, compressed=False)
    result = {tasks.metric_key(cfg): acc, "steps": cfg.pretrain_steps,
              "wall_s": time.time() - t0,
              "task": "masked-byte LM" if mlm else "causal LM" if tasks.is_lm(cfg) else
                      ("source classes" if cfg.regime == "transfer" else "target")}
    run.write_result(result)
    return result


def _has_checkpoint(run: RunDir, steps: int | None) -> bool:
  """Whether the pretraining's *final* checkpoint (step ``steps``) is on disk: while
  another process pretrains again (a fresh clone, ``--shard``), its earlier checkpoints
  are there but are not the dense model."""
  ckpt = run.path / "checkpoints"
  return ckpt.is_dir() and any(p.name == str(steps) for p in ckpt.iterdir())


def _mlm_accuracy(step, state, tokens, mask: int, n: int = 2000) -> float:
  batch = tasks.mlm_batch(tokens[:n], np.random.default_rng(12345), mask)
  logits, _ = step.evaluate(state, batch, compressed=False)
  pred = np.asarray(jax.device_get(logits)).argmax(-1)
  w = batch["weights"]
  return float(((pred == batch["labels"]) * w).sum() / max(w.sum(), 1.0))


def dense_model(cfg: Config, root: str | os.PathLike) -> tuple[nnx.Module, Any]:
  """The model fine-tuning starts from and its params.

  ``same-task``: the pretrained dense model (weights and BatchNorm statistics).
  ``transfer``: the pretrained network with a fresh head for the target task (the
  pretraining head, and the language-model head, are dropped).
  """
  if cfg.init_from is not None:
    return _init_from(cfg)
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
  if cfg.regime == "same-task":
    return model, state.params
  target = build_model(cfg, seed=PRETRAIN_SEED)
  nnx.update(target, nnx.State({k: v for k, v in nnx.state(model).items()
                                if k not in ("head", "lm_head")}))
  return target, _plain_step(target).init().params


def canonical(cfg: Config) -> Config:
  """``cfg`` with a dense run's compression fields at their defaults (it compresses
  nothing, so one run serves every severity); needs no data, unlike :func:`resolve`."""
  if cfg.method != "dense":
    return cfg
  d = Config()
  return cfg.replace(compression=d.compression, sparsity=d.sparsity, bits=d.bits,
                     pattern=d.pattern, group_size=d.group_size,
                     rank=d.rank, transition=d.transition, beta_schedule=d.beta_schedule,
                     distill_weight=d.distill_weight, update_every=d.update_every)


def resolve(cfg: Config) -> Config:
  """The config a run is stored under: :func:`canonical`, with the budget in steps."""
  return canonical(cfg).replace(steps=tasks.steps_for(cfg))


def result_of(cfg: Config, root) -> dict | None:
  """The result of a finished run, or None."""
  cfg = resolve(cfg)
  return RunDir(pathlib.Path(root) / cfg.run_name(), cfg.to_dict()).result()


def metrics_of(cfg: Config, root) -> list[dict]:
  cfg = resolve(cfg)
  return RunDir(pathlib.Path(root) / cfg.run_name(), cfg.to_dict()).metrics()


def pretrain_result(cfg: Config, root) -> dict | None:
  return RunDir(pathlib.Path(root) / "dense", cfg.dense_key()).result()


def load_params_file(path: str) -> dict[str, np.ndarray]:
  """``{"/"-joined path: array}`` from an ``.npz`` or an Orbax checkpoint of params."""
  path = pathlib.Path(path)
  if path.is_file():
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  tree = ocp.StandardCheckpointer().restore(path.resolve())
  return {p: np.asarray(v) for p, v in vj_paths.leaf_paths(tree)}


def _plain_step(model: nnx.Module) -> vj.TrainStep:
  """A step of ``model`` that compresses and trains nothing: only its ``init`` (the
  model's params, in the step's layout) and ``update_model`` (params back into the
  module) are used."""
  return vj.make_train_step(model, vj.identity(), vj.constant(1.0), optax.sgd(0.0))


def _init_from(cfg: Config) -> tuple[nnx.Module, Any]:
  """The target model with the weights of ``cfg.init_from`` (a fresh head if the class
  count differs); any other missing or misshapen leaf is an error naming it."""
  model = build_model(cfg, seed=PRETRAIN_SEED)
  plain = _plain_step(model)
  fresh = plain.init().params
  loaded = load_params_file(cfg.init_from)
  used = set()

  def take(path, leaf):
    name = vj_paths.path_str(path)
    if name not in loaded:
      raise ValueError(f"init_from={cfg.init_from!r} has no leaf {name!r} (shape "
                       f"{tuple(leaf.shape)}); it holds e.g. {sorted(loaded)[:3]}.")
    value = loaded[name]
    used.add(name)
    if value.shape != leaf.shape:
      if name.split("/")[0] == "head":
        return leaf  # a pretrained network on a new task: a fresh head
      raise ValueError(f"init_from={cfg.init_from!r}: leaf {name!r} has shape "
                       f"{value.shape}, the model needs {tuple(leaf.shape)}.")
    return jnp.asarray(value, leaf.dtype)

  params = jax.tree_util.tree_map_with_path(take, fresh)
  plain.update_model(plain.init(params), compressed=False)
  return model, params


def run_compression(cfg: Config, root: str | os.PathLike, *, progress: bool = True,
                    on_nonfinite: str = "stop") -> dict:
  """One whole run: fine-tunes the dense model into the compressed one with ``cfg.method``
  (the ``vcon-jax compress`` command; not to be confused with :func:`vcon_jax.compress`,
  the compressed view of a params tree).

  With ``cfg.epochs > 0`` the step budget is derived from the training-set size first.
  """
  root = pathlib.Path(root)
  cfg = resolve(cfg)
  run = RunDir(root / cfg.run_name(), cfg.to_dict())
  if run.result() is not None:
    return run.result()
  with run.lock():
    pretrain(cfg, root, progress=progress, on_nonfinite=on_nonfinite)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    model, params = dense_model(cfg, root)
    # an example input for the compressions that trace the model (only shapes matter)
    transform, schedule, distill = methods.build(cfg, params, model, train[0][:2])
    loss_fn = (tasks.token_loss if tasks.is_lm(cfg) else
               tasks.mixup_loss if cfg.mixup else None)
    step = vj.make_train_step(model, transform, schedule, _optimizer(
        cfg.lr, cfg.steps,
        methods.transition_end(cfg) if cfg.lr_schedule == "restart" else 0),
                              loss_fn=loss_fn,
                              seed=cfg.seed, distill_weight=distill,
                              skip_nonfinite=on_nonfinite == "skip")
    state = step.init()
    t0 = time.time()
    post_shot = score(cfg, step, state, test, cfg.eval_examples)
    state = _train_loop(run, step, state, cfg, cfg.steps, train, test,
                        cfg.run_name(), progress, eval_compressed=True, seed=cfg.seed,
                        make_batch=lambda b, s: tasks.finetune_batch(cfg, b, s, cfg.seed))
    result = {tasks.metric_key(cfg): score(cfg, step, state, test), "steps": cfg.steps,
              "compressed_at_start": post_shot, "wall_s": time.time() - t0}
    if cfg.method != "dense":
      summary = vj.export(step, state, run.path / "model.npz")  # the compact model
      result["summary"] = {"rows": list(summary), "totals": summary.totals}
    run.write_result(result)
    return result
