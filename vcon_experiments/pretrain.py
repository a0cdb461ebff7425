"""The dense model every compression run starts from, trained once per dense config.

It lives in ``ROOT/dense`` (``config.json`` holds :meth:`Config.dense_key`, the fields
it depends on): shared by every method and seed of a comparison, resumable like a run,
and reused once finished. With ``init_from`` nothing is trained: the weights given are
the dense model (:mod:`vcon_experiments.init_from`).
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

import vcon_jax as vj
from vcon_experiments import init_from, model_registry, models, tasks, training
from vcon_experiments.config import Config
from vcon_experiments.io import RunDir

#: The dense model is shared by every method and seed of a comparison (cached once per
#: dense config); seeds vary the fine-tuning's data order and dropout.
PRETRAIN_SEED = 0


def _dense_step(cfg: Config, skip_nonfinite: bool = False):
  """The pretraining model and its plain training step (also the restore target)."""
  model = models.build_model(cfg, seed=PRETRAIN_SEED, role="source")
  mlm = cfg.regime == "transfer" and not tasks.is_image(cfg)
  step = vj.make_train_step(model, vj.identity(), vj.constant(1.0),
                            training.optimizer(cfg.pretrain_lr, cfg.pretrain_steps),
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
    train, test = tasks.split(cfg, "train", "source"), tasks.split(cfg, "test", "source")
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
    state = training.train_loop(run, step, state, cfg, cfg.pretrain_steps, train,
                                None if mlm else test, "pretrain", progress,
                                eval_compressed=False, seed=PRETRAIN_SEED,
                                make_batch=make_batch)
    if mlm:
      acc = _mlm_accuracy(step, state, test[0], tasks.mask_id(cfg))
    else:
      acc = training.score(cfg, step, state, test, compressed=False)
    result = {tasks.metric_key(cfg): acc, "steps": cfg.pretrain_steps,
              "wall_s": time.time() - t0,
              "task": "masked-byte LM" if mlm else "causal LM" if tasks.is_lm(cfg) else
                      ("source classes" if cfg.regime == "transfer" else "target")}
    run.write_result(result)
    return result


def pretrain_result(cfg: Config, root) -> dict | None:
  """The result of the finished dense pretraining of ``cfg``, or None."""
  return RunDir(pathlib.Path(root) / "dense", cfg.dense_key()).result()


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
  pretraining model's output layers, its registry entry's ``heads``, are dropped).
  ``init_from``: the given weights (:func:`vcon_experiments.init_from.load`).
  """
  if cfg.init_from is not None:
    return init_from.load(cfg, seed=PRETRAIN_SEED)
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
  target = models.build_model(cfg, seed=PRETRAIN_SEED)
  heads = model_registry.REGISTRY[cfg.model].heads
  nnx.update(target, nnx.State({k: v for k, v in nnx.state(model).items()
                                if k not in heads}))
  return target, training.plain_step(target).init().params
