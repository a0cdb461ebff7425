"""One compression run (:func:`train_and_evaluate`), and where each run is stored.

A run directory (``ROOT/<Config.run_name()>``) holds ``config.json``, ``metrics.jsonl``
(one JSON object per logged step), TensorBoard event files, ``checkpoints/`` (Orbax)
and, once finished, ``result.json`` (written atomically) and, unless the method
compresses nothing (``dense``), the compact compressed model ``model.npz``. Restarting
the same run resumes from the latest checkpoint; a finished run is reused. The dense
model it starts from comes from :mod:`vcon_experiments.pretrain`, the training loop
from :mod:`vcon_experiments.training`.
"""

from __future__ import annotations

import os
import pathlib
import time

import vcon_jax as vj
from vcon_experiments import compressions, method_registry, methods, pretrain, tasks, training
from vcon_experiments.config import Config
from vcon_experiments.io import RunDir


def canonical(cfg: Config) -> Config:
  """``cfg`` with a dense run's compression fields at their defaults (it compresses
  nothing, so one run serves every severity); needs no data, unlike :func:`resolve`."""
  if method_registry.REGISTRY[cfg.method].compresses:
    return cfg
  d = Config()
  fields = ("compression", *compressions.FIELDS, "transition", "beta_schedule",
            "distill_weight")
  return cfg.replace(**{name: getattr(d, name) for name in fields})


def resolve(cfg: Config) -> Config:
  """The config a run is stored under: :func:`canonical`, with the budget in steps."""
  return canonical(cfg).replace(steps=tasks.steps_for(cfg))


def result_of(cfg: Config, root) -> dict | None:
  """The result of a finished run, or None."""
  cfg = resolve(cfg)
  return RunDir(pathlib.Path(root) / cfg.run_name(), cfg.to_dict()).result()


def metrics_of(cfg: Config, root) -> list[dict]:
  """The logged rows of a run (``metrics.jsonl``), finished or not."""
  cfg = resolve(cfg)
  return RunDir(pathlib.Path(root) / cfg.run_name(), cfg.to_dict()).metrics()


def first_batch(cfg: Config, train) -> dict:
  """The batch of the run's first step (seed ``cfg.seed``), on which a fitted transition
  measures the jump."""
  return tasks.finetune_batch(cfg, tasks.batch_at(train, 0, cfg.batch_size, cfg.seed), 0,
                              cfg.seed)


def train_and_evaluate(cfg: Config, root: str | os.PathLike, *, progress: bool = True,
                       on_nonfinite: str = "stop") -> dict:
  """One whole run: fine-tunes the dense model into the compressed one with ``cfg.method``
  and tests it (the ``vcon-jax compress`` command).

  ``root`` is the directory of everything that shares the dense model
  (``WORKDIR/<compare.data_key(cfg)>``); the dense model is pretrained there first if it
  is not yet. With ``cfg.epochs > 0`` the step budget is derived from the training-set
  size first.

  Returns:
    The run's ``result.json``: the test metric (:func:`tasks.metric_key`), ``steps``,
    ``compressed_at_start`` (the metric of the compressed model at step 0), ``wall_s``
    and, unless the method compresses nothing, the export's ``summary``.
  """
  root = pathlib.Path(root)
  cfg = resolve(cfg)
  run = RunDir(root / cfg.run_name(), cfg.to_dict())
  if run.result() is not None:
    return run.result()
  with run.lock():
    pretrain.pretrain(cfg, root, progress=progress, on_nonfinite=on_nonfinite)
    train, test = tasks.split(cfg, "train"), tasks.split(cfg, "test")
    model, params = pretrain.dense_model(cfg, root)
    # an example input for the compressions that trace the model (only shapes matter)
    transform, schedule, distill = methods.build(cfg, params, model, train[0][:2])
    loss_fn = (tasks.token_loss if tasks.is_lm(cfg) else
               tasks.mixup_loss if cfg.mixup else None)
    if distill > 0:  # distillation from the frozen dense model it starts from
      loss_fn = vj.distill(loss_fn, weight=distill)
    step = vj.make_train_step(model, transform, schedule, training.optimizer(
        cfg.lr, cfg.steps,
        methods.transition_end(cfg) if cfg.lr_schedule == "restart" else 0),
                              loss_fn=loss_fn, seed=cfg.seed,
                              skip_nonfinite=on_nonfinite == "skip")
    state = step.init(batch=first_batch(cfg, train))  # fitted_vanish measures the jump
    fitted = step.schedule if isinstance(step.schedule, vj.FittedVanish) else None
    if fitted is not None and progress:
      print(f"{cfg.run_name()}: {fitted.describe()}")
    t0 = time.time()
    post_shot = training.score(cfg, step, state, test, cfg.eval_examples)
    state = training.train_loop(
        run, step, state, cfg, cfg.steps, train, test, cfg.run_name(), progress,
        eval_compressed=True, seed=cfg.seed,
        make_batch=lambda b, s: tasks.finetune_batch(cfg, b, s, cfg.seed))
    result = {tasks.metric_key(cfg): training.score(cfg, step, state, test),
              "steps": cfg.steps, "compressed_at_start": post_shot,
              "wall_s": time.time() - t0}
    if fitted is not None:
      result["output_jump"] = fitted.jump
      result["transition_steps"] = fitted.transition_steps
    if method_registry.REGISTRY[cfg.method].compresses:
      summary = vj.export(state, run.path / "model.npz", model=step.model)  # the compact model
      result["summary"] = {"rows": list(summary), "totals": summary.totals}
    run.write_result(result)
    return result
