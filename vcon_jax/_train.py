"""The VCON train step: one jitted function of (state, batch), built on the core.

Per step ``t``: ``beta = schedule(t)``; every selected weight is blended in weight space,
``beta * W + (1 - beta) * C(W)`` (one forward pass; for layers linear in ``W`` this equals
blending the dense and compressed layers' outputs); the loss gradient updates the dense
params and the transform's trainable state together with the user's optax optimiser. The
state, the blend and the update are the core's (``_core``), which
:func:`vcon_jax.wrap_optax` runs too; the step carries one :class:`~vcon_jax.VconState`
from call to call, with its model state, rng and distillation teacher set.

Parallelism is ``jax.jit`` with shardings: the batch is split over the mesh's ``'data'``
axis, every state array keeps the placement of its parameter (replicated, or split over
another axis by the user: FSDP, tensor parallel), and the partitioner inserts the
collectives. ``axis_name=`` instead gives a step for the user's ``jax.pmap``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vcon_jax import _checks, _core, _model, _sharding, _trace, _validate
from vcon_jax._blend import blend_outputs
from vcon_jax._fitted import FittedVanish, check_measured, jump_of_step
from vcon_jax._core import TrainState, VconState
from vcon_jax._losses import Distillation, accuracy, softmax_cross_entropy
from vcon_jax._schedules import linear_vanish
from vcon_jax._step_options import BatchKeys, ModelKwargs, Parallel, from_deprecated
from vcon_jax._transform import Transform, check_transform, compress, reselected

__all__ = ["TrainState", "TrainStep", "make_train_step", "softmax_cross_entropy"]

#: ``optax.apply_if_finite`` gives up skipping after this many non-finite steps in a row;
#: ``skip_nonfinite`` never does.
_NEVER = 2**31 - 1


class TrainStep:
  """Built by :func:`make_train_step`; see there for the arguments."""

  def __init__(self, model: Any, transform: Transform, schedule: Callable,
               optimizer: optax.GradientTransformation | None = None, *,
               loss_fn: Callable | None = None, example: Any = None,
               parallel: Parallel = Parallel(), keys: BatchKeys = BatchKeys(),
               model_kwargs: ModelKwargs = ModelKwargs(), seed: int = 0,
               blend: str = "weights", skip_nonfinite: bool = False, **deprecated: Any):
    if deprecated:  # the 0.3 keywords, as make_train_step takes them
      parallel, keys, model_kwargs, loss_fn = from_deprecated(
          deprecated, parallel=None if parallel == Parallel() else parallel,
          keys=None if keys == BatchKeys() else keys,
          model_kwargs=None if model_kwargs == ModelKwargs() else model_kwargs,
          loss_fn=loss_fn)
    mesh, axis_name, donate = parallel
    input_key, label_key = keys
    train_kwargs, eval_kwargs = model_kwargs
    if blend not in ("weights", "outputs"):
      raise ValueError(f"blend must be 'weights' (one forward pass) or 'outputs' (dense "
                       f"and compressed passes, outputs blended), got {blend!r}.")
    check_transform(transform)
    if not isinstance(schedule, FittedVanish):  # measured at init; a linear_vanish then
      _validate.check_step_schedule(schedule)
    optimizer = optax.adamw(1e-4, weight_decay=0.0) if optimizer is None else optimizer
    _validate.check_optimizer(optimizer)
    loss_fn = softmax_cross_entropy if loss_fn is None else loss_fn
    if not callable(loss_fn):
      raise ValueError(f"loss_fn must be callable ((logits, batch) -> loss or (loss, "
                       f"metrics)), got {loss_fn!r}.")
    # a distillation wrapper also takes the teacher's logits: its task loss is checked
    _checks.check_loss_fn(loss_fn.loss_fn if isinstance(loss_fn, Distillation) else loss_fn)
    if axis_name is not None and mesh is not None:
      raise ValueError("Pass either mesh (jit over a device mesh) or axis_name (a step for "
                       "jax.pmap), not both.")
    if axis_name is not None and not isinstance(axis_name, str):
      raise ValueError(f"axis_name must be a string, got {axis_name!r}.")

    self.model, self.transform, self.schedule = model, transform, schedule
    if skip_nonfinite:  # a non-finite gradient leaves params and optimiser state as they were
      optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=_NEVER)
    self.optimizer = optax.with_extra_args_support(optimizer)
    self.loss_fn, self.blend, self.seed = loss_fn, blend, seed
    self.skip_nonfinite, self.donate = bool(skip_nonfinite), donate
    self.input_key, self.label_key = input_key, label_key
    self.distillation = loss_fn if isinstance(loss_fn, Distillation) else None
    self.task_loss = self.distillation.loss_fn if self.distillation else loss_fn
    self.needs_labels = self.task_loss is softmax_cross_entropy
    self.adapter = _model.make_adapter(model, train_kwargs, eval_kwargs)
    self.discovery = None  # the trace of make_train_step(example=), read by export
    if example is not None:
      self.transform, self.discovery = _reselect_by_trace(
          self.adapter, model, transform, example, train_kwargs, eval_kwargs)
    self.axis_name = axis_name
    self.mesh = None
    if axis_name is None:
      self.mesh = _sharding.auto_mesh(mesh) if mesh is not None else _sharding.data_mesh()
      if "data" not in self.mesh.axis_names:
        raise ValueError(f"mesh needs a 'data' axis for the batch, has "
                         f"{self.mesh.axis_names}.")
      self.replicated = NamedSharding(self.mesh, P())
      self.batch_sharding = NamedSharding(self.mesh, P("data"))
      # XLA:CPU collectives with several host devices can deadlock (abort after 40 s)
      # when many steps are queued asynchronously; on CPU, waiting costs nothing.
      self._sync = self.mesh.size > 1 and all(
          d.platform == "cpu" for d in self.mesh.devices.flat)
    self._jitted: dict = {}
    self._eval = jax.jit(self._eval_fn, static_argnames=("compressed",))

  # ----------------------------------------------------------------------------- state
  @property
  def distill_weight(self) -> float:
    return self.distillation.weight if self.distillation else 0.0

  def _on_mesh(self, x: Any) -> Any:
    """``x`` on the step's mesh: a user's split kept (same devices and names), else replicated."""
    sharding = getattr(x, "sharding", None)
    spec = P()
    if isinstance(sharding, NamedSharding):
      m = sharding.mesh
      if m.axis_names == self.mesh.axis_names and m.devices.shape == self.mesh.devices.shape \
          and all(a == b for a, b in zip(m.devices.flat, self.mesh.devices.flat)):
        spec = sharding.spec
    target = NamedSharding(self.mesh, spec)
    return x if sharding == target else jax.device_put(x, target)

  def init(self, params: Any = None, *, seed: int | None = None,
           batch: Mapping | None = None) -> TrainState:
    """Builds the initial state from the model's params (validates the selection).

    Params placed on the step's mesh with a ``NamedSharding`` keep their split (the masks,
    factors and optimiser moments follow it); others are replicated.

    Args:
      params: Linen: ``model.init(...)`` variables (or their ``'params'``). NNX: the
        module's ``nnx.Param`` state, or ``None`` to take it from the module.
      seed: overrides the step's seed for the per-step rng.
      batch: a training batch on which a :func:`~vcon_jax.fitted_vanish` schedule
        measures the jump of the compressed model (needed then, ignored otherwise); the
        step keeps the fitted schedule (``step.schedule``). The measurement depends only
        on the params and the batch, so a resumed run that calls ``init`` the same way
        fits the same transition.
    """
    if isinstance(self.schedule, FittedVanish) and (batch is not None
                                                     or self.schedule.jump is None):
      return self._init_fitted(params, seed, batch)
    return self._init(params, seed)

  def _init_fitted(self, params, seed, batch) -> TrainState:
    if batch is None:
      check_measured(self.schedule)  # no jump and no batch to measure it on
    self.check_batch(batch, training=False)
    probe = self._init(params, seed, schedule=linear_vanish(0))
    fitted = self.schedule.measured(jump_of_step(self, probe, batch))
    if fitted != self.schedule:
      self._jitted.clear()  # compiled with another transition
    self.schedule = fitted
    return dataclasses.replace(probe, schedule=fitted)

  def _init(self, params: Any, seed: int | None, schedule: Callable | None = None
            ) -> TrainState:
    if params is None and self.adapter.kind == "linen":
      raise ValueError("init() needs the Linen model's params (model.init(...)).")
    params, model_state = self.adapter.split(params)
    if self.mesh is not None:
      params = jax.tree.map(self._on_mesh, params)
    state = _core.init_state(self.optimizer, self.transform,
                             self.schedule if schedule is None else schedule, params)
    seed = self.seed if seed is None else seed
    teacher = None
    if self.distillation and self.distillation.teacher == "initial":
      teacher = _core.copy_tree(state.params)
    state = dataclasses.replace(
        state, model_state=_core.copy_tree(model_state),
        rng=jax.random.key_data(jax.random.key(seed)), teacher=teacher)
    if self.mesh is not None:
      state = jax.tree.map(self._on_mesh, state)
    return state

  # ------------------------------------------------------------------------------ step
  def fn(self, state: TrainState, batch: Mapping) -> tuple[TrainState, dict]:
    """The pure step function (jitted by ``__call__``; or run under the user's pmap)."""
    count = state.step
    beta = jnp.asarray(self.schedule(count), jnp.float32)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), count)
    if self.axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(self.axis_name))
    inputs, labels = batch[self.input_key], batch.get(self.label_key)
    aux = state.transform_state.aux
    blended = _core.blend_fn(self.transform, aux, beta, count)
    forward = lambda params: self.adapter.apply(params, state.model_state, inputs, rng, True)

    def loss_of(trainable):
      if self.blend == "weights":
        logits, new_ms = forward(blended(trainable))
      else:  # the reference form: two forward passes, outputs blended
        compressed = _core.blend_fn(self.transform, aux, 0.0, count)(trainable)
        logits, new_ms = blend_outputs(lambda p, _: forward(p), trainable[0], compressed,
                                       beta, inputs, has_aux=True)
      if self.distillation is None:
        out = self.loss_fn(logits, batch)
      else:
        teacher_params = trainable[0] if state.teacher is None else state.teacher
        out = self.loss_fn(logits, batch, forward(teacher_params)[0])
      loss, extra = out if isinstance(out, tuple) else (out, {})
      return loss, (logits, new_ms, extra)

    trainable = (state.params, state.transform_state.trainable)
    (loss, (logits, new_ms, extra)), grads = jax.value_and_grad(loss_of, has_aux=True)(
        trainable)
    metrics = {"loss": loss, "beta": beta, **extra}
    acc = accuracy(logits, labels)
    if acc is not None:
      metrics["accuracy"] = acc
      if self.needs_labels:  # a label out of range is a nan loss: say how many
        metrics["invalid_labels"] = _checks.invalid_label_fraction(logits, labels)
    if self.axis_name is not None:
      grads = jax.lax.pmean(grads, self.axis_name)
      metrics = jax.lax.pmean(metrics, self.axis_name)
      new_ms = jax.tree.map(lambda x: jax.lax.pmean(x, self.axis_name)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x, new_ms)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if self.skip_nonfinite:
      # A step with a non-finite loss or gradient leaves params, optimiser and model state
      # as they were (the step counter and beta still advance) and is flagged: the
      # optimiser is wrapped in optax.apply_if_finite, which skips on a non-finite
      # gradient; a non-finite loss makes the gradient non-finite for it.
      grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
    new = _core.apply_gradients(self.optimizer, state, grads)
    if self.skip_nonfinite:  # apply_if_finite's own verdict on this step
      finite = new.opt_state.last_finite
      new_ms = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_ms, state.model_state)
      metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return dataclasses.replace(new, model_state=new_ms), metrics

  def check_batch(self, batch: Any, *, training: bool = True) -> None:
    """Raises ``ValueError`` for a batch the step cannot take (called before jit).

    ``training=False`` (evaluation): labels are optional and any batch size is taken.
    """
    needs_labels = self.needs_labels and training
    if not isinstance(batch, Mapping):
      raise ValueError(f"batch must be a dict with key {self.input_key!r}"
                       f"{f' and {self.label_key!r}' if needs_labels else ''}, got "
                       f"{type(batch).__name__}.")
    required = [self.input_key] + ([self.label_key] if needs_labels else [])
    missing = [k for k in required if k not in batch]
    if missing:
      raise ValueError(f"batch is missing key(s) {missing}; it has {sorted(batch)}; the "
                       f"step needs {required}.")
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None
             for k, v in batch.items() if v is not None}
    if None in sizes.values() or len(set(sizes.values())) != 1:
      raise ValueError(f"every batch entry needs the same leading (batch) size, got "
                       f"{ {k: s for k, s in sizes.items()} }.")
    n = next(iter(sizes.values()))
    data = self.mesh.shape["data"] if self.mesh is not None else 1
    if training and n % data:
      raise ValueError(f"batch size {n} must be divisible by the number of devices in the "
                       f"'data' mesh axis ({data}).")

  def _compiled(self, state: TrainState) -> Callable:
    """The step jitted for ``state``'s placement (kept by the output state)."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    key = (jax.tree.structure(state), tuple(jax.tree.leaves(shardings)))
    if key not in self._jitted:
      self._jitted[key] = jax.jit(
          self.fn, in_shardings=(shardings, self.batch_sharding),
          out_shardings=(shardings, self.replicated),
          donate_argnums=(0,) if self.donate else ())
    return self._jitted[key]

  def __call__(self, state: TrainState, batch: Mapping) -> tuple[TrainState, dict]:
    """One optimiser step. Returns the new state and a dict of scalar metrics."""
    _checks.check_state(state, VconState)
    if self.axis_name is not None:
      try:
        return self.fn(state, batch)  # under the user's jax.pmap
      except NameError as err:
        if "unbound axis name" in str(err):
          raise _checks.unbound_axis_error(self.axis_name) from None
        raise
    self.check_batch(batch)
    _checks.preflight(self, state, batch, training=True)
    out = self._compiled(state)(state, jax.device_put(dict(batch), self.batch_sharding))
    if self._sync:
      jax.block_until_ready(out)
    return out

  # -------------------------------------------------------------------------- views
  def _placed(self, state: TrainState, out: Any) -> Any:
    """``out`` placed like the dense params."""
    shardings = _sharding.shardings_of(state.params)
    return _sharding.place(out, shardings) if self.mesh is not None else out

  def _compressed(self, state: TrainState) -> Any:
    """The exact compressed params (the core's compiled view), placed like the params."""
    return self._placed(state, _core.compressed_view(state))

  def compressed_params(self, state: TrainState) -> Any:
    """The compressed model (beta = 0), exact values, same tree as the model's params.

    For NNX models this is an ``nnx.State`` for ``nnx.update(model, ...)``; for Linen the
    ``params`` dict for ``model.apply({'params': ...}, x)``. Split params stay split.
    """
    _checks.check_not_replicated(state)
    return self.adapter.wrap_params(self._compressed(state))

  def update_model(self, state: TrainState, *, compressed: bool = True) -> Any:
    """The trained model: compressed (default) or dense params plus the model state.

    NNX: updates the module given to :func:`make_train_step` in place (weights *and*
    BatchNorm statistics, which ``compressed_params`` alone would leave stale) and returns
    it. Linen: returns the variables dict ``{'params': ..., 'batch_stats': ...}``.
    """
    _checks.check_not_replicated(state)
    params = self._compressed(state) if compressed else state.params
    return self.adapter.assign(jax.device_get(params), jax.device_get(state.model_state))

  def blended_params(self, state: TrainState, beta: float | None = None) -> Any:
    """The weights the forward pass uses at ``beta`` (default: the schedule's current)."""
    _checks.check_not_replicated(state)
    return self.adapter.wrap_params(self._placed(state, _core.blended_view(state, beta)))

  def _eval_fn(self, state, batch, compressed):
    if compressed:
      params = compress(self.transform, state.params, state.transform_state, state.step)
    else:
      params = _core.blended_weights(state)
    logits, _ = self.adapter.apply(params, state.model_state, batch[self.input_key], None,
                                   train=False)
    metrics = {}
    labels = batch.get(self.label_key)
    if labels is not None:
      out = self.task_loss(logits, batch)
      metrics["loss"] = out[0] if isinstance(out, tuple) else out
      acc = accuracy(logits, labels)
      if acc is not None:
        metrics["accuracy"] = acc
    return logits, metrics

  def evaluate(self, state: TrainState, batch: Mapping, *, compressed: bool = True
               ) -> tuple[jax.Array, dict]:
    """Eval-mode logits and metrics with the compressed (default) or blended weights.

    Labels are optional (without them the metrics are empty) and the batch may have any
    size, e.g. the last partial batch of a test set.
    """
    _checks.check_state(state, VconState)
    _checks.check_not_replicated(state)
    self.check_batch(batch, training=False)
    _checks.preflight(self, state, batch, training=False)
    return self._eval(state, dict(batch), compressed=compressed)


def make_train_step(model: Any, transform: Transform, schedule: Callable,
                    optimizer: optax.GradientTransformation | None = None, *,
                    loss_fn: Callable | None = None, example: Any = None,
                    parallel: Parallel | None = None, keys: BatchKeys | None = None,
                    model_kwargs: ModelKwargs | None = None, seed: int = 0,
                    blend: str = "weights", skip_nonfinite: bool = False,
                    **deprecated: Any) -> TrainStep:
  r"""Builds the VCON train step for a Flax model.

  Args:
    model: a ``flax.nnx.Module`` (run in ``train()`` mode in the step and ``eval()`` mode
      in ``evaluate``, on copies of its graph: the module keeps the mode it had) or a
      ``flax.linen.Module``.
    transform: what to compress to (:func:`prune`, :func:`quantize`, :func:`binarize`,
      :func:`low_rank`, :func:`chain`).
    schedule: ``count -> beta``, e.g. :func:`linear_vanish`; any optax schedule works.
      ``linear_vanish(0)`` is the post-shot baseline.
    optimizer: an optax optimiser (default ``adamw(1e-4, weight_decay=0)``, the paper's).
      It sees the params tree (see :func:`wrap_optax`), so masks and labels keyed by it
      work.
    loss_fn: ``(outputs, batch) -> loss`` or ``(loss, metrics)``, called with whatever
      the model returns (an array, a dict, a dataclass such as Gemma's ``Output``) and
      the whole batch dict; default softmax cross-entropy of a logits array on integer
      labels (checked before jit: integer, one per example, and, for host arrays, in
      range; on device a label out of range gives a ``nan`` loss and
      ``metrics['invalid_labels']``). Distillation from the dense model is a loss:
      ``loss_fn=vj.distill(task_loss, weight=..., temperature=..., teacher=...)``.
    example: an input batch (only its shapes are used). With it the model is traced once
      (:func:`vcon_jax.discover`; a Linen model's params from ``jax.eval_shape`` of its
      ``init``) and the transform's :class:`vcon_jax.Selection` becomes what the trace
      found: the linear maps (any weight name: Gemma's ``w``, Equinox-style ``(out,
      in)``) with their input axes, each layer of a scanned stack on its own; lookup
      tables, tied embeddings, biases, norms and the output layer stay dense;
      ``prune_units()`` takes its unit groups from it. Without it, selection is by
      Flax's names and refuses what they cannot settle.
    parallel: a :class:`vcon_jax.Parallel`: ``mesh`` (a device mesh with a ``'data'``
      axis, default all devices on it; the batch is split over ``'data'``, params keep
      the ``NamedSharding`` they were given on this mesh or are replicated; one
      ``jax.jit``, so BatchNorm sees the whole global batch), or ``axis_name`` (a step
      for the user's ``jax.pmap``: gradients, metrics and model state averaged over that
      axis; give it ``vj.replicate(step.init(params))``), and ``donate`` (the input
      state's buffers are donated; default ``True``).
    keys: a :class:`vcon_jax.BatchKeys`: the batch entries of the model's input and of
      the default loss's labels (default ``"inputs"``, ``"labels"``).
    model_kwargs: a :class:`vcon_jax.ModelKwargs`: extra keyword arguments to a Linen
      model's ``apply`` in training / evaluation (e.g. ``{'train': True}``). When one is
      not given and the model's ``__call__`` has exactly one of the arguments ``train``,
      ``training``, ``is_training`` or ``deterministic``, it is passed for you
      (``train=True`` / ``deterministic=False`` in training, the opposite in
      evaluation); with several a ``ValueError`` asks for both. ``{}`` gives none.
    seed: seed of the per-step rng, folded with the step number and the device index
      (Linen dropout draws from it; for NNX models it salts every ``nnx.Rngs`` stream;
      ``step.init(seed=...)`` overrides it).
    blend: ``'weights'`` (default): one forward pass with ``beta * W + (1 - beta) * C(W)``;
      ``'outputs'``: the reference form, dense and compressed forward passes with their
      outputs blended (equal for layers linear in ``W``; about twice the cost).
    skip_nonfinite: a step whose loss or gradients are not finite changes nothing (params,
      optimiser and model state stay; the step count advances) and reports
      ``metrics['nonfinite'] = 1``. Default: the update is applied and the caller checks
      ``metrics['loss']`` (the CLI stops the run, keeping the last good checkpoint).
    **deprecated: the 0.3 keywords ``mesh`` / ``axis_name`` / ``donate`` (now
      ``parallel``), ``input_key`` / ``label_key`` (``keys``), ``train_kwargs`` /
      ``eval_kwargs`` (``model_kwargs``) and ``distill_weight`` / ``distill_temperature``
      / ``distill_teacher`` (``loss_fn=vj.distill(...)``) work for one release with a
      ``DeprecationWarning`` naming the new spelling.

  Returns:
    A :class:`TrainStep`: ``state = step.init(params)``, ``state, metrics = step(state,
    batch)``, ``step.compressed_params(state)``, ``step.evaluate(state, batch)``.

  >>> import optax, vcon_jax as vj
  >>> from flax import nnx
  >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  >>> step = vj.make_train_step(model, vj.prune(sparsity=0.5), vj.linear_vanish(10),
  ...                           optax.adam(1e-3))
  >>> state = step.init()
  """
  parallel, keys, model_kwargs, loss_fn = from_deprecated(
      deprecated, parallel=parallel, keys=keys, model_kwargs=model_kwargs, loss_fn=loss_fn)
  return TrainStep(model, transform, schedule, optimizer, loss_fn=loss_fn, example=example,
                   parallel=parallel, keys=keys, model_kwargs=model_kwargs, seed=seed,
                   blend=blend, skip_nonfinite=skip_nonfinite)


def _reselect_by_trace(adapter, model, transform, example, train_kwargs, eval_kwargs):
  """``transform`` re-selected on the linear maps of one trace of ``model`` on
  ``example`` (shapes only: nothing is computed), and the trace."""
  if adapter.kind == "nnx":
    variables = None
  else:
    _, kwargs = _model.linen_mode_kwargs(model, train_kwargs, eval_kwargs)
    try:
      variables = jax.eval_shape(lambda: model.init(jax.random.key(0), example, **kwargs))
    except Exception as err:  # pylint: disable=broad-except
      raise ValueError(f"make_train_step(example=...): the Linen model's init does not run "
                       f"on the example ({type(err).__name__}: {err}); pass an input batch "
                       f"the model takes.") from err
  pure, model_state = adapter.split(variables)
  found = _trace.discover(lambda p, x: adapter.apply(p, model_state, x, None, False)[0],
                          pure, example)
  # unit groups (prune_units) from the module itself: BatchNorm statistics join them
  found = dataclasses.replace(found, source=(model, variables, example))
  return reselected(transform, found), found
