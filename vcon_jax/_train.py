"""The VCON train step: one jitted, data-parallel function of (state, batch).

Per step ``t``: ``beta = schedule(t)``; every selected weight is blended in weight space,
``beta * W + (1 - beta) * C(W)`` (one forward pass; for layers linear in ``W`` this equals
blending the dense and compressed layers' outputs); the loss gradient updates the dense
params and the transform's trainable state together with the user's optax optimiser.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vcon_jax import _checks, _model
from vcon_jax._transform import Transform, TransformState, compress


class TrainState(NamedTuple):
  """Everything a run needs to resume exactly; a pytree Orbax checkpoints as is."""

  step: jax.Array
  params: Any
  transform_state: TransformState
  opt_state: Any
  model_state: Any
  rng: jax.Array  # raw uint32 key data of jax.random.key(seed)
  teacher: Any = None  # frozen dense params of the distillation teacher (or None)


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


def _accuracy(logits, labels):
  if labels is None or not jnp.issubdtype(labels.dtype, jnp.integer):
    return None
  if logits.ndim != labels.ndim + 1:
    return None
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def _distill_loss(student, teacher, temperature):
  t = jax.nn.softmax(teacher.astype(jnp.float32) / temperature)
  log_s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature)
  return jnp.mean(jnp.sum(t * (jnp.log(t + 1e-12) - log_s), -1)) * temperature ** 2


def _copy_tree(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _check_callable(name, value, allowed):
  if not callable(value):
    raise ValueError(f"{name} must be callable ({allowed}), got {value!r}.")


class TrainStep:
  """Built by :func:`make_train_step`; see there."""

  def __init__(self, model, transform, schedule, optimizer, loss_fn, mesh, axis_name,
               seed, train_kwargs, eval_kwargs, distill_weight, distill_temperature,
               donate, input_key, label_key, blend="weights", skip_nonfinite=False,
               distill_teacher="initial"):
    if distill_teacher not in ("initial", "current"):
      raise ValueError(f"distill_teacher must be 'initial' (frozen dense params at init) or "
                       f"'current' (the dense path of the params being trained), got "
                       f"{distill_teacher!r}.")
    self.distill_teacher = distill_teacher
    if blend not in ("weights", "outputs"):
      raise ValueError(f"blend must be 'weights' (one forward pass) or 'outputs' (dense "
                       f"and compressed passes, outputs blended), got {blend!r}.")
    if not isinstance(transform, Transform):
      raise ValueError(f"transform must be a vcon_jax Transform (prune, quantize, "
                       f"binarize, low_rank, chain), got {type(transform).__name__}.")
    _check_callable("schedule", schedule, "count -> beta in [0, 1], e.g. "
                    "vj.linear_vanish(1000) or any optax schedule")
    try:
      beta0 = schedule(0)
    except Exception as err:  # pylint: disable=broad-except
      raise ValueError(f"schedule(0) failed ({err}); a schedule maps a step count to "
                       f"beta.") from err
    if np.shape(beta0) != ():
      raise ValueError(f"schedule must return a scalar beta, schedule(0) has shape "
                       f"{np.shape(beta0)}.")
    if optimizer is None:
      optimizer = optax.adamw(1e-4, weight_decay=0.0)
    if not isinstance(optimizer, optax.GradientTransformation):
      raise ValueError(f"optimizer must be an optax.GradientTransformation, got "
                       f"{type(optimizer).__name__}.")
    loss_fn = softmax_cross_entropy if loss_fn is None else loss_fn
    _check_callable("loss_fn", loss_fn, "(logits, batch) -> loss or (loss, metrics)")
    _checks.check_loss_fn(loss_fn)
    if axis_name is not None and mesh is not None:
      raise ValueError("Pass either mesh (jit data parallelism) or axis_name (a step for "
                       "jax.pmap), not both.")
    if axis_name is not None and not isinstance(axis_name, str):
      raise ValueError(f"axis_name must be a string, got {axis_name!r}.")
    if isinstance(distill_weight, bool) or not isinstance(distill_weight, (int, float)) \
        or not 0.0 <= distill_weight <= 1.0:
      raise ValueError(f"distill_weight must be a number in [0, 1], got {distill_weight!r}.")
    if not isinstance(distill_temperature, (int, float)) or distill_temperature <= 0:
      raise ValueError(f"distill_temperature must be > 0, got {distill_temperature!r}.")

    self.model = model
    self.blend = blend
    self.skip_nonfinite = bool(skip_nonfinite)
    self.transform = transform
    self.schedule = schedule
    self.optimizer = optimizer
    self.loss_fn = loss_fn
    self.axis_name = axis_name
    self.seed = seed
    self.distill_weight = float(distill_weight)
    self.distill_temperature = float(distill_temperature)
    self.input_key, self.label_key = input_key, label_key
    self.needs_labels = loss_fn is softmax_cross_entropy
    self.adapter = _model.make_adapter(model, train_kwargs, eval_kwargs)
    self.trace_count = 0

    if axis_name is None:
      self.mesh = mesh if mesh is not None else jax.make_mesh(
          (jax.device_count(),), ("data",))
      if "data" not in self.mesh.axis_names:
        raise ValueError(f"mesh needs a 'data' axis for the batch, has "
                         f"{self.mesh.axis_names}.")
      self._sync = self.mesh.size > 1 and all(
          d.platform == "cpu" for d in self.mesh.devices.flat)
      self.replicated = NamedSharding(self.mesh, P())
      self.batch_sharding = NamedSharding(self.mesh, P("data"))
      # Explicit data parallelism: each device runs the step on its batch shard and the
      # gradients are averaged over 'data' (left to the partitioner, the mask computation
      # on replicated weights made it all-gather the batch instead). check_vma=False keeps
      # the pmap semantics: with it on, autodiff already psums the gradient of the
      # replicated params and our pmean would double it.
      self._axis = "data"
      sharded = jax.shard_map(self.fn, mesh=self.mesh, in_specs=(P(), P("data")),
                              out_specs=(P(), P()), check_vma=False)
      self._jitted = jax.jit(sharded, in_shardings=(self.replicated, self.batch_sharding),
                             out_shardings=(self.replicated, self.replicated),
                             donate_argnums=(0,) if donate else ())
    else:
      self.mesh = None
      self._axis = axis_name
    self._compressed = jax.jit(self._compressed_fn)
    self._eval = jax.jit(self._eval_fn, static_argnames=("compressed",))

  # ----------------------------------------------------------------------------- state
  def init(self, params: Any = None, *, seed: int | None = None) -> TrainState:
    """Builds the initial state from the model's params (validates the selection).

    Args:
      params: Linen: ``model.init(...)`` variables (or their ``'params'``). NNX: the
        module's ``nnx.Param`` state, or ``None`` to take it from the module.
      seed: overrides the step's seed for the per-step rng.
    """
    if params is None and self.adapter.kind == "linen":
      raise ValueError("init() needs the Linen model's params (model.init(...)).")
    params, model_state = self.adapter.split(params)
    # A copy: the step donates its input state, which must not delete the caller's arrays.
    params = _copy_tree(params)
    model_state = _copy_tree(model_state)
    tstate = self.transform.init(params)
    trainable = {"params": params, "transform": tstate.trainable}
    seed = self.seed if seed is None else seed
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, transform_state=tstate,
        opt_state=self.optimizer.init(trainable), model_state=model_state,
        rng=jax.random.key_data(jax.random.key(seed)),
        teacher=(_copy_tree(params)
                 if self.distill_weight > 0 and self.distill_teacher == "initial" else None))
    if self.mesh is not None:
      state = jax.device_put(state, self.replicated)
    return state

  # ------------------------------------------------------------------------------ step
  def fn(self, state: TrainState, batch: Mapping) -> tuple[TrainState, dict]:
    """The pure step function, mapped over a device axis (``shard_map`` or ``pmap``)."""
    self.trace_count += 1
    count = state.step
    beta = jnp.asarray(self.schedule(count), jnp.float32)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), count)
    rng = jax.random.fold_in(rng, jax.lax.axis_index(self._axis))
    inputs, labels = batch[self.input_key], batch.get(self.label_key)
    aux_state = state.transform_state.aux

    def loss_of(trainable):
      tstate = TransformState(trainable["transform"], aux_state)
      if self.blend == "weights":
        blended = self.transform.apply(trainable["params"], tstate, beta, count)
        logits, new_ms = self.adapter.apply(blended, state.model_state, inputs, rng, True)
      else:  # the reference form: two forward passes, outputs blended
        comp = self.transform.apply(trainable["params"], tstate, 0.0, count)
        dense, _ = self.adapter.apply(trainable["params"], state.model_state, inputs, rng,
                                      True)
        logits, new_ms = self.adapter.apply(comp, state.model_state, inputs, rng, True)
        logits = beta * dense + (1.0 - beta) * logits
      out = self.loss_fn(logits, batch)
      loss, extra = out if isinstance(out, tuple) else (out, {})
      if self.distill_weight > 0:
        teacher_params = trainable["params"] if state.teacher is None else state.teacher
        teacher, _ = self.adapter.apply(teacher_params, state.model_state, inputs, rng,
                                        True)
        kd = _distill_loss(logits, jax.lax.stop_gradient(teacher), self.distill_temperature)
        extra = {**extra, "task_loss": loss, "distill_loss": kd}
        loss = (1.0 - self.distill_weight) * loss + self.distill_weight * kd
      return loss, (logits, new_ms, extra)

    trainable = {"params": state.params, "transform": state.transform_state.trainable}
    (loss, (logits, new_ms, extra)), grads = jax.value_and_grad(loss_of, has_aux=True)(
        trainable)
    metrics = {"loss": loss, "beta": beta, **extra}
    acc = _accuracy(logits, labels)
    if acc is not None:
      metrics["accuracy"] = acc
      if self.needs_labels:  # [i14] a label out of range is a nan loss: say which
        metrics["invalid_labels"] = _checks.invalid_label_fraction(logits, labels)
    grads = jax.lax.pmean(grads, self._axis)
    metrics = jax.lax.pmean(metrics, self._axis)
    new_ms = jax.tree.map(lambda x: jax.lax.pmean(x, self._axis)
                          if jnp.issubdtype(x.dtype, jnp.floating) else x, new_ms)
    metrics["grad_norm"] = optax.global_norm(grads)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    if self.skip_nonfinite:
      # A step with a non-finite loss or gradient leaves params, optimiser and model state
      # as they were (the step counter and beta still advance) and is flagged.
      finite = jnp.isfinite(loss) & jnp.all(jnp.array(
          [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_trainable = keep(new_trainable, trainable)
      opt_state = keep(opt_state, state.opt_state)
      new_ms = keep(new_ms, state.model_state)
      metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    trainable = new_trainable
    tstate = self.transform.update(
        trainable["params"], TransformState(trainable["transform"], aux_state), count + 1)
    new_state = TrainState(count + 1, trainable["params"], tstate, opt_state, new_ms,
                           state.rng, state.teacher)
    return new_state, metrics

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
    if training and self.mesh is not None and n % self.mesh.size:
      raise ValueError(f"batch size {n} must be divisible by the number of devices in the "
                       f"'data' mesh axis ({self.mesh.size}).")

  def __call__(self, state: TrainState, batch: Mapping) -> tuple[TrainState, dict]:
    """One optimiser step. Returns the new state and a dict of scalar metrics."""
    _checks.check_state(state, TrainState)
    if self.axis_name is not None:
      try:
        return self.fn(state, batch)  # under the user's jax.pmap
      except NameError as err:
        if "unbound axis name" in str(err):
          raise _checks.unbound_axis_error(self.axis_name) from None
        raise
    self.check_batch(batch)
    _checks.preflight(self, state, batch, training=True)
    out = self._jitted(state, jax.device_put(dict(batch), self.batch_sharding))
    if self._sync:
      # XLA:CPU collectives with several host devices can deadlock (abort after 40 s)
      # when many steps are queued asynchronously; on CPU, waiting costs nothing.
      jax.block_until_ready(out)
    return out

  # -------------------------------------------------------------------------- views
  def _compressed_fn(self, state):
    return compress(self.transform, state.params, state.transform_state, state.step)

  def compressed_params(self, state: TrainState) -> Any:
    """The compressed model (beta = 0), exact values, same tree as the model's params.

    For NNX models this is an ``nnx.State`` for ``nnx.update(model, ...)``; for Linen the
    ``params`` dict for ``model.apply({'params': ...}, x)``.
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
    beta = self.schedule(state.step) if beta is None else beta
    params = self.transform.apply(state.params, state.transform_state, beta, state.step, True)
    return self.adapter.wrap_params(params)

  def _eval_fn(self, state, batch, compressed):
    if compressed:
      params = compress(self.transform, state.params, state.transform_state, state.step)
    else:
      beta = self.schedule(state.step)
      params = self.transform.apply(state.params, state.transform_state, beta, state.step,
                                    True)
    logits, _ = self.adapter.apply(params, state.model_state, batch[self.input_key], None,
                                   False)
    metrics = {}
    labels = batch.get(self.label_key)
    if labels is not None:
      out = self.loss_fn(logits, batch)
      metrics["loss"] = out[0] if isinstance(out, tuple) else out
      acc = _accuracy(logits, labels)
      if acc is not None:
        metrics["accuracy"] = acc
    return logits, metrics

  def evaluate(self, state: TrainState, batch: Mapping, *, compressed: bool = True
               ) -> tuple[jax.Array, dict]:
    """Eval-mode logits and metrics with the compressed (default) or blended weights.

    Labels are optional (without them the metrics are empty) and the batch may have any
    size, e.g. the last partial batch of a test set.
    """
    _checks.check_state(state, TrainState)
    _checks.check_not_replicated(state)
    self.check_batch(batch, training=False)
    _checks.preflight(self, state, batch, training=False)
    return self._eval(state, dict(batch), compressed=compressed)


def make_train_step(model: Any, transform: Transform, schedule: Callable,
                    optimizer: optax.GradientTransformation | None = None, *,
                    loss_fn: Callable | None = None, mesh: jax.sharding.Mesh | None = None,
                    axis_name: str | None = None, seed: int = 0,
                    train_kwargs: dict | None = None, eval_kwargs: dict | None = None,
                    distill_weight: float = 0.0, distill_temperature: float = 1.0,
                    donate: bool = True, input_key: str = "inputs",
                    label_key: str = "labels", blend: str = "weights",
                    skip_nonfinite: bool = False,
                    distill_teacher: str = "initial") -> TrainStep:
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
    loss_fn: ``(logits, batch) -> loss`` or ``(loss, metrics)``, called with the whole
      batch dict; default softmax cross-entropy on integer ``batch['labels']`` (labels are
      checked before jit: integer, one per example, and, for host arrays, in range; on
      device a label out of range gives a ``nan`` loss and ``metrics['invalid_labels']``,
      the fraction of such labels, shows it).
    mesh: a mesh with a ``'data'`` axis (default: all devices); the batch is sharded over
      it and the state replicated. BatchNorm then normalises each device's shard with the
      shard's own statistics, as ``jax.pmap`` training does (the running averages are
      averaged over devices), so results differ slightly from one big batch; for
      whole-batch statistics build the BatchNorm layers with ``axis_name='data'``.
    axis_name: instead of jit, return a step meant for ``jax.pmap(step, axis_name=...)``:
      gradients, metrics and model state are averaged over that axis. Give it
      ``vj.replicate(step.init(params))`` and read results from ``vj.unreplicate(state)``
      (README, "Using jax.pmap").
    seed: seed of the per-step rng, folded with the step number and the device index:
      Linen dropout draws from it, and for NNX models it salts every ``nnx.Rngs`` stream,
      so dropout differs per device and per seed (``step.init(seed=...)`` overrides it).
    train_kwargs, eval_kwargs: extra keyword arguments to a Linen model's ``apply`` in
      training / evaluation (e.g. ``{'train': True}``). When one is not given and the
      model's ``__call__`` has exactly one of the arguments ``train``, ``training``,
      ``is_training`` or ``deterministic``, it is passed for you (``train=True`` /
      ``deterministic=False`` in training, the opposite in evaluation), so BatchNorm
      statistics move and dropout is on; with several of them a ``ValueError`` asks for
      both kwargs. Pass ``{}`` to give no argument.
    distill_weight: weight of a distillation term from the dense path (``beta = 1``
      logits as teacher); costs a second forward pass.
    distill_teacher: ``'initial'`` (default): the dense params given to ``init``, frozen
      (a copy lives in the state). ``'current'``: the dense params being trained; once
      beta is 0 they only receive straight-through gradients and drift, and in our
      Fashion-MNIST runs that teacher cost 13-17 accuracy points.
    distill_temperature: softmax temperature of the distillation term.
    donate: donate the input state's buffers to the step (saves memory; the old state
      must not be reused).
    input_key, label_key: batch keys.
    blend: ``'weights'`` (default): one forward pass with ``beta * W + (1 - beta) * C(W)``;
      ``'outputs'``: the reference form, dense and compressed forward passes with their
      logits blended (equal for layers linear in ``W``; about twice the cost).
    skip_nonfinite: a step whose loss or gradients are not finite changes nothing (params,
      optimiser and model state stay; the step count advances) and reports
      ``metrics['nonfinite'] = 1``. Default: the update is applied and the caller checks
      ``metrics['loss']`` (the CLI stops the run, keeping the last good checkpoint).

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
  return TrainStep(model, transform, schedule, optimizer, loss_fn, mesh, axis_name, seed,
                   train_kwargs, eval_kwargs, distill_weight, distill_temperature, donate,
                   input_key, label_key, blend, skip_nonfinite, distill_teacher)
