"""The VCON core: one state type, the blend and the update.

:func:`vcon_jax.make_train_step` (``_train``) and :func:`vcon_jax.wrap_optax`
(``_optax_wrapper``) are both built on this module and keep the same state,
:class:`VconState`: the dense weights ``W``, the transform state (masks, trainable
low-rank factors), the optimiser's state over them and the step count. Per step,
``beta = schedule(step)``; the model sees ``beta * W + (1 - beta) * C(W)``
(:func:`blend_fn`); the loss gradient is pulled back through the blend
(straight-through for prune and quantise, the true gradient for low-rank factors) and
:func:`apply_gradients` steps the optimiser on ``W`` and the factors.

The optimiser sees the params tree: a leaf whose transform has trainable state (low-rank
factors) becomes a :class:`WithState` node ``(weight, state)`` (:func:`join`), so labels
and masks given as (prefixes of) the params tree apply to the factors of their leaf too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vcon_jax import _paths, _sharding
from vcon_jax._transform import Transform, TransformState


@dataclasses.dataclass(frozen=True)
class VconState:
  """The one state of VCON training (a pytree; Orbax checkpoints it as is).

  :func:`vcon_jax.make_train_step`'s ``step.init`` returns it with every field set;
  :func:`vcon_jax.wrap_optax` keeps it inside the optax state, with ``model_state``,
  ``rng`` and ``teacher`` left ``None`` (the user's loop holds those).

  Attributes:
    step: optimiser steps taken (beta is ``schedule(step)``; ``count`` is the same, as
      optax calls it).
    params: the dense weights ``W``, same tree as the model's params.
    transform_state: masks, low-rank factors (:class:`~vcon_jax.TransformState`).
    opt_state: the optimiser's state over the params (factors attached, see
      :class:`WithState`).
    model_state: the model's other state (BatchNorm statistics); train step only.
    rng: raw uint32 key data of ``jax.random.key(seed)``; train step only.
    teacher: frozen dense params of the distillation teacher, or ``None``.
    transform, schedule: static, so the views (:func:`vcon_jax.compressed_params`) need
      only the state.
    shardings: static per-leaf shardings ``wrap_optax`` records at ``init`` (kept by every
      update); ``None`` in the train step, whose jit keeps the placement.
  """

  step: jax.Array
  params: Any
  transform_state: TransformState
  opt_state: Any
  model_state: Any = None
  rng: jax.Array | None = None
  teacher: Any = None
  transform: Transform = dataclasses.field(metadata={"static": True}, default=None)
  schedule: Callable = dataclasses.field(metadata={"static": True}, default=None)
  shardings: tuple | None = dataclasses.field(metadata={"static": True}, default=None)

  @property
  def count(self) -> jax.Array:
    """``step``, by optax's name."""
    return self.step

  def _replace(self, **changes: Any) -> "VconState":
    """A copy with ``changes`` (as a NamedTuple's ``_replace``)."""
    return dataclasses.replace(self, **changes)

  # Trainers read the learning rate by walking the optimiser state as optax chains are
  # walked (Tunix's PeftTrainer: ``opt_state.hyperparams``, else ``for part in
  # opt_state``): the wrapper's state answers both with the inner optimiser's state.
  def __iter__(self):
    """The inner optimiser's state, part by part (a chain's members; else the state)."""
    inner = self.opt_state
    return iter(inner if isinstance(inner, tuple) and not hasattr(inner, "_fields")
                else (inner,))

  def __getattr__(self, name: str) -> Any:
    # only reached for names the dataclass does not have: ``hyperparams`` (and any other
    # field of an ``optax.inject_hyperparams`` state) is the inner optimiser's
    if name.startswith("__") or name in _FIELDS:
      raise AttributeError(name)
    inner = self.__dict__.get("opt_state")
    if inner is not None and hasattr(inner, "_fields") and name in inner._fields:
      return getattr(inner, name)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


jax.tree_util.register_dataclass(VconState)
_FIELDS = frozenset(f.name for f in dataclasses.fields(VconState))

#: The name :func:`vcon_jax.make_train_step`'s documentation uses; the same class.
TrainState = VconState


class WithState(NamedTuple):
  """A compressed leaf and its trainable transform state, as the optimiser sees it."""

  weight: Any
  state: tuple


# ----------------------------------------------------------------- params <-> optimiser tree
def _owners(params: Any, trainable: Any) -> dict[str, list[int]]:
  """Param path -> indices of the trainable-state leaves that belong to it."""
  paths = {p for p, _ in _paths.leaf_paths(params)}
  owners: dict[str, list[int]] = {}
  for i, (keys, _) in enumerate(jax.tree_util.tree_flatten_with_path(trainable)[0]):
    owner = next((k.key for k in keys if isinstance(k, jax.tree_util.DictKey)
                  and k.key in paths), None)
    if owner is None:
      raise ValueError(f"trainable transform state {jax.tree_util.keystr(keys)} is not "
                       f"keyed by a parameter path; the optax wrapper needs per-leaf state.")
    owners.setdefault(owner, []).append(i)
  return owners


def join(params: Any, trainable: Any) -> Any:
  """The inner optimiser's tree: ``params`` with each leaf's trainable state attached."""
  owners = _owners(params, trainable)
  if not owners:
    return params
  flat = jax.tree.leaves(trainable)

  def one(path, leaf):
    idx = owners.get(_paths.path_str(path))
    return leaf if idx is None else WithState(leaf, tuple(flat[i] for i in idx))
  return jax.tree_util.tree_map_with_path(one, params)


def split(joined: Any, params: Any, trainable: Any) -> tuple[Any, Any]:
  """Inverse of :func:`join` (``params`` and ``trainable`` give the structures)."""
  owners = _owners(params, trainable)
  if not owners:
    return joined, trainable
  flat, treedef = jax.tree.flatten(trainable)
  flat = list(flat)

  def one(path, _, node):
    idx = owners.get(_paths.path_str(path))
    if idx is None:
      return node
    for i, x in zip(idx, node.state):
      flat[i] = x
    return node.weight
  dense = jax.tree_util.tree_map_with_path(one, params, joined)
  return dense, jax.tree.unflatten(treedef, flat)


# ------------------------------------------------------------------------------- the core
def copy_tree(tree):
  """A copy of every array (the caller may donate the originals)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _place_transform_state(tstate: TransformState, params: Any) -> TransformState:
  """Puts masks and factors where their parameter is (eager; a no-op under jit)."""
  flat_params = dict(_paths.leaf_paths(params))
  shardings = {p: _sharding.named_sharding(x) for p, x in flat_params.items()}
  if not any(s is not None for s in shardings.values()):
    return tstate

  def owner(keys):
    return next((k.key for k in keys if isinstance(k, jax.tree_util.DictKey)
                 and k.key in flat_params), None)

  def one(keys, leaf):
    p = owner(keys)
    return leaf if p is None else _sharding.like_param(leaf, flat_params[p], shardings[p])
  return jax.tree_util.tree_map_with_path(one, tstate)


def _init_transform(transform: Transform, params: Any) -> TransformState:
  """``transform.init(params)``, compiled as one program when it traces.

  Run eagerly, the masks of a chain's members (needed by the next member's init) cost
  one dispatch and one compilation per operation: seconds per process at start-up on a
  mesh. An init that does not trace (low-rank's NumPy SVD, or an invalid selection) runs
  eagerly, which gives its values or raises its own error.
  """
  try:
    return jax.jit(transform.init)(params)
  except Exception:  # pylint: disable=broad-except
    return transform.init(params)


def init_state(optimizer: optax.GradientTransformation, transform: Transform,
               schedule: Callable, params: Any) -> VconState:
  """Step 0, a copy of the dense ``params``, the transform's and optimiser's state.

  Every array is placed like its parameter; the rest (counts, scalars) is replicated on
  the params' mesh when they have one, so the caller's jitted step sees the same input
  shardings at every call and compiles once.
  """
  dense = copy_tree(params)  # the caller may donate its params; the copy keeps their sharding
  tstate = _place_transform_state(_init_transform(transform, dense), dense)
  inner = optimizer.init(join(dense, tstate.trainable))
  state = VconState(step=jnp.zeros((), jnp.int32), params=dense, transform_state=tstate,
                    opt_state=inner, transform=transform, schedule=schedule)
  return _sharding.replicate_unplaced(state, _sharding.params_mesh(dense))


def blend_fn(transform: Transform, aux: Any, beta: Any, count: Any) -> Callable:
  """``(dense, trainable) -> beta * W + (1 - beta) * C(W)``: the one blend (with gradients)."""
  def blended(trainable):
    dense, factors = trainable
    return transform.apply(dense, TransformState(factors, aux), beta, count)
  return blended


def blended_weights(state: VconState, count: Any = None) -> Any:
  """The exact weights the model sees at ``count`` (default: the state's step)."""
  count = state.step if count is None else count
  beta = jnp.asarray(state.schedule(count), jnp.float32)
  return state.transform.apply(state.params, state.transform_state, beta, count,
                                 exact=True)


# The views run compiled, as the update does: XLA's CPU arithmetic op by op (eager) is
# not always that of the same operations fused in a program (a reduction's order, a
# division), and one ulp on a rounding tie is a whole quantisation level. Compiled, a
# view gives the values a jitted loop holds, bit for bit (tests/test_low_precision). The
# one implementation of each view: the train step's methods, vj.compressed_params /
# vj.blended_params (opt_state) and export all call these.
@jax.jit
def compressed_view(state: VconState) -> Any:
  """The exact compressed params (``beta = 0``), same tree as ``state.params``."""
  return state.transform.apply(state.params, state.transform_state, 0.0, state.step,
                               exact=True)


@jax.jit
def blended_view(state: VconState, beta: Any = None) -> Any:
  """The exact weights the model sees at ``beta`` (default: the schedule's, now)."""
  if beta is None:
    return blended_weights(state)
  return state.transform.apply(state.params, state.transform_state,
                               jnp.asarray(beta, jnp.float32), state.step, exact=True)


def apply_gradients(optimizer: optax.GradientTransformation, state: VconState,
                    grads: tuple[Any, Any], **extra_args) -> VconState:
  """One optimiser step from ``grads = (dense grads, trainable-state grads)``.

  Args:
    optimizer: the inner optimiser (with extra-args support; ``skip_nonfinite`` wraps it
      in ``optax.apply_if_finite``).
    state: the current :class:`VconState`.
    grads: gradients of the loss with respect to the dense params and the transform's
      trainable state (what :func:`blend_fn`'s VJP gives).
    **extra_args: passed to ``optimizer.update``.
  """
  tstate = state.transform_state
  current = join(state.params, tstate.trainable)
  updates, inner = optimizer.update(join(*grads), state.opt_state, current, **extra_args)
  dense, trainable = split(optax.apply_updates(current, updates), state.params,
                           tstate.trainable)
  step = state.step + 1
  tstate = state.transform.refresh(dense, TransformState(trainable, tstate.aux), step)
  return dataclasses.replace(state, step=step, params=dense, transform_state=tstate,
                             opt_state=inner)
