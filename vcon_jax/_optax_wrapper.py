r"""VCON as an optax wrapper: compression added to any training loop.

The params the user's model sees are the *blended* weights
``beta * W + (1 - beta) * C(W)``; the dense weights ``W``, the transform state (masks,
trainable low-rank factors) and the step count live in the optimiser state. An update
pulls the gradient of the blended weights back through the blend (straight-through for
prune and quantise, the true gradient for low-rank factors), steps the inner optimiser on
the dense weights and factors, and returns the updates that move the user's params to the
next blended weights.

The inner optimiser sees the user's params tree: a leaf whose transform has trainable
state (low-rank factors) becomes a :class:`WithState` node ``(weight, state)``, so labels
and masks given as (prefixes of) the params tree apply to the factors of their leaf too.

:func:`init_state`, :func:`blend_fn` and :func:`apply_gradients` are the single
implementation of the VCON update; :func:`vcon_jax.make_train_step` is built on them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vcon_jax import _paths, _schedules, _sharding, _trace
from vcon_jax._transform import (Transform, TransformState, compress, low_precision,
                                 reselected, rounded)


@dataclasses.dataclass(frozen=True)
class VconState:
  """The optimiser state of :func:`wrap_optax` (a pytree; Orbax checkpoints it).

  Attributes:
    count: optimiser steps taken (beta is ``schedule(count)``).
    params: the dense weights, same tree as the user's params.
    transform_state: masks, low-rank factors (:class:`~vcon_jax.TransformState`).
    inner_state: the wrapped optimiser's state.
    transform, schedule: static, so :func:`compressed_params` needs only the state.
    shardings: static per-leaf shardings recorded at ``init`` (kept by every update).
  """

  count: jax.Array
  params: Any
  transform_state: TransformState
  inner_state: Any
  transform: Transform = dataclasses.field(metadata={"static": True}, default=None)
  schedule: Callable = dataclasses.field(metadata={"static": True}, default=None)
  shardings: tuple | None = dataclasses.field(metadata={"static": True}, default=None)


jax.tree_util.register_dataclass(VconState)


class WithState(NamedTuple):
  """A compressed leaf and its trainable transform state, as the inner optimiser sees it."""

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
def _copy(tree):
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
  """Count 0, a copy of the dense ``params``, the transform's and optimiser's state.

  Every array is placed like its parameter; the rest (counts, scalars) is replicated on
  the params' mesh when they have one, so the caller's jitted step sees the same input
  shardings at every call and compiles once.
  """
  dense = _copy(params)  # the caller may donate its params; the copy keeps their sharding
  tstate = _place_transform_state(_init_transform(transform, dense), dense)
  inner = optimizer.init(join(dense, tstate.trainable))
  state = VconState(jnp.zeros((), jnp.int32), dense, tstate, inner, transform, schedule)
  return _sharding.replicate_unplaced(state, _sharding.params_mesh(dense))


def blend_fn(transform: Transform, aux: Any, beta: Any, count: Any) -> Callable:
  """``(dense, trainable) -> beta * W + (1 - beta) * C(W)``: the one blend (with gradients)."""
  def blended(trainable):
    dense, factors = trainable
    return transform.apply(dense, TransformState(factors, aux), beta, count)
  return blended


def blended_weights(state: VconState, count: Any = None) -> Any:
  """The exact weights the model sees at ``count`` (default: the state's count)."""
  count = state.count if count is None else count
  beta = jnp.asarray(state.schedule(count), jnp.float32)
  return state.transform.apply(state.params, state.transform_state, beta, count,
                                 exact=True)


def apply_gradients(optimizer: optax.GradientTransformation, state: VconState,
                    grads: tuple[Any, Any], keep_if: Any = None, **extra_args
                    ) -> VconState:
  """One optimiser step from ``grads = (dense grads, trainable-state grads)``.

  Args:
    optimizer: the inner optimiser (with extra-args support).
    state: the current :class:`VconState`.
    grads: gradients of the loss with respect to the dense params and the transform's
      trainable state (what :func:`blend_fn`'s VJP gives).
    keep_if: optional boolean scalar; where ``False`` the params, transform state and
      optimiser state stay as they were (the count still advances).
    **extra_args: passed to ``optimizer.update``.
  """
  tstate = state.transform_state
  current = join(state.params, tstate.trainable)
  updates, inner = optimizer.update(join(*grads), state.inner_state, current,
                                    **extra_args)
  dense, trainable = split(optax.apply_updates(current, updates), state.params,
                           tstate.trainable)
  if keep_if is not None:
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(keep_if, a, b), new, old)
    dense, trainable = keep(dense, state.params), keep(trainable, tstate.trainable)
    inner = keep(inner, state.inner_state)
  count = state.count + 1
  tstate = state.transform.refresh(dense, TransformState(trainable, tstate.aux), count)
  return dataclasses.replace(state, count=count, params=dense, transform_state=tstate,
                             inner_state=inner)


# ------------------------------------------------------------------------------ validation
def check_schedule(schedule: Any) -> None:
  """Raises ``ValueError`` unless ``schedule(0)`` is a scalar."""
  if not callable(schedule):
    raise ValueError(f"schedule must be callable (count -> beta in [0, 1], e.g. "
                     f"vj.linear_vanish(1000) or any optax schedule), got {schedule!r}.")
  try:
    beta0 = schedule(0)
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(f"schedule(0) failed ({err}); a schedule maps a step count to "
                     f"beta.") from err
  if np.shape(beta0) != ():
    raise ValueError(f"schedule must return a scalar beta, schedule(0) has shape "
                     f"{np.shape(beta0)}.")
  # values in [0, 1], starting at 1 (VCON) or 0 (post-shot): refuses an lr schedule
  _schedules.check_beta_schedule(schedule, "beta_schedule")


def check_transform(transform: Any) -> None:
  if not isinstance(transform, Transform):
    raise ValueError(f"transform must be a vcon_jax Transform (prune, quantize, "
                     f"binarize, low_rank, chain), got {type(transform).__name__}.")


def check_optimizer(optimizer: Any) -> None:
  if not isinstance(optimizer, optax.GradientTransformation):
    raise ValueError(f"optimizer must be an optax.GradientTransformation, got "
                     f"{type(optimizer).__name__}.")


def _update_to(target: jax.Array, param: jax.Array) -> jax.Array:
  """The update that ``optax.apply_updates`` turns into exactly ``target``.

  For float32 params ``(target - param)`` in float32 (``param + update`` equals
  ``target`` to float32 rounding). For bfloat16 / float16 params the update is float32:
  ``apply_updates`` adds in float32 (``param + update == target`` exactly, the difference
  of two bfloat16 numbers being exact in float32) and casts back to the param's dtype.
  An update in the param's dtype would be rounded first and land up to half a bfloat16
  step of ``|target - param|`` away from ``target`` (a binarised layer would hold more
  than two values).
  """
  param = jnp.asarray(param)
  if not low_precision(param.dtype):
    return (target - param).astype(param.dtype)
  return rounded(target, param.dtype).astype(jnp.float32) - param.astype(jnp.float32)


def _conform_inner(optimizer: optax.GradientTransformation, state: VconState) -> VconState:
  """The inner optimiser's state in the structure its ``init`` gives.

  ``nnx.Optimizer`` writes the state back through ``nnx.state`` after every update, which
  turns the :class:`WithState` nodes of the inner state (a low-rank kernel with its
  factors) into ``nnx.State`` dicts: the next update's ``tree_map`` over gradients and
  moments then fails. The leaves are matched by key path (``.weight`` and ``['weight']``
  are one key) and put back into the expected structure; a state that does not match is
  refused with the paths that differ.
  """
  like = jax.eval_shape(optimizer.init, join(state.params, state.transform_state.trainable))
  treedef = jax.tree.structure(like)
  if jax.tree.structure(state.inner_state) == treedef:
    return state
  norm = lambda path: tuple(str(k) for k in _paths.path_keys(path))
  have = {norm(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.inner_state)[0]}
  want = [norm(p) for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
  missing = [w for w in want if w not in have]
  if missing or len(have) != len(want):
    raise ValueError(f"opt_state's inner optimiser state does not match its init "
                     f"structure (missing {missing[:3]}); pass the opt_state that "
                     f"tx.init / tx.update returned.")
  inner = jax.tree.unflatten(treedef, [have[w] for w in want])
  return dataclasses.replace(state, inner_state=inner)


# ---------------------------------------------------------------------------- public API
def wrap_optax(optimizer: optax.GradientTransformation, transform: Transform,
               beta_schedule: Callable, *, apply_fn: Callable | None = None,
               params: Any = None, example: Any = None
               ) -> optax.GradientTransformationExtraArgs:
  r"""VCON for your own training loop: wraps an optax optimiser.

  .. math:: \bar W_t = \beta_t W_t + (1 - \beta_t) C(W_t)

  The params your model sees are the blended weights ``W_bar``; the dense ``W``, the
  transform state and the count live in the optimiser state (Orbax checkpoints them with
  the rest). ``tx.update(grads, opt_state, params)`` needs ``params`` (the blended weights
  the gradient was taken at) and returns updates that move them to the next step's
  blended weights, so ``optax.apply_updates`` works as usual. Beta steps once per
  ``update``; wrap *this* in ``optax.MultiSteps`` for gradient accumulation.

  Start from ``tx.init(params)`` with your trained dense params; when the schedule starts
  below 1 (post-shot, ``linear_vanish(0)``) start the loop from
  ``params = vj.blended_params(opt_state)``.

  Args:
    optimizer: any optax optimiser; it sees your params tree (low-rank factors attached
      to their leaf as :class:`WithState` nodes), so ``optax.multi_transform`` labels and
      ``adamw(mask=...)`` keyed by your params work.
    transform: what to compress to (:func:`prune`, :func:`binarize`, ...).
    beta_schedule: ``count -> beta``, e.g. :func:`linear_vanish`.
    apply_fn, params, example: given together, ``apply_fn(params, example)`` (your model's
      forward pass: ``lambda p, x: model.apply({"params": p}, x)`` for Linen,
      ``lambda p, x: nnx.merge(graphdef, p)(x)`` for NNX) is traced once (shapes only:
      ``params`` may be ``jax.ShapeDtypeStruct`` leaves) and a default-selection
      ``transform`` is re-selected onto the linear maps found, with their input axes and
      scanned stacks (:func:`vcon_jax.reselect` of :func:`vcon_jax.discover`): Gemma-style
      einsum weights named ``w``, ``(out, in)`` kernels and ``nn.scan`` stacks are then
      compressed as what they are. Without them the selection is by Flax's names.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra arguments go to ``optimizer``).

  >>> import jax, jax.numpy as jnp, optax, vcon_jax as vj
  >>> params = {"kernel": jnp.arange(8.0).reshape(2, 4) - 4.0}
  >>> tx = vj.wrap_optax(optax.sgd(0.1), vj.prune(sparsity=0.5), vj.linear_vanish(2))
  >>> opt_state = tx.init(params)
  >>> for _ in range(2):
  ...   grads = jax.grad(lambda p: jnp.sum(p["kernel"] ** 2))(params)
  ...   updates, opt_state = tx.update(grads, opt_state, params)
  ...   params = optax.apply_updates(params, updates)
  >>> int((vj.compressed_params(opt_state)["kernel"] != 0).sum())
  4
  """
  check_optimizer(optimizer)
  check_transform(transform)
  check_schedule(beta_schedule)
  traced = [a is not None for a in (apply_fn, params, example)]
  if any(traced) and not all(traced):
    raise ValueError("wrap_optax traces the model with apply_fn=, params= and example= "
                     "together (apply_fn(params, example) runs the forward pass); pass all "
                     "three, or none to select by Flax's names.")
  if all(traced):
    transform = reselected(transform, _trace.discover(apply_fn, params, example))
  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    state = init_state(inner, transform, beta_schedule, params)
    shardings = _sharding.shardings_of(state)
    return dataclasses.replace(state, shardings=shardings if any(shardings) else None)

  def update_fn(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError("vj.wrap_optax needs the params: tx.update(grads, opt_state, "
                       "params), the blended weights the gradients were taken at.")
    if not isinstance(state, VconState):
      raise ValueError(f"opt_state must come from this wrapper's init, got "
                       f"{type(state).__name__}.")
    state = _conform_inner(inner, state)
    beta = jnp.asarray(beta_schedule(state.count), jnp.float32)
    tstate = state.transform_state
    _, pull_back = jax.vjp(blend_fn(transform, tstate.aux, beta, state.count),
                           (state.params, tstate.trainable))
    (trainable_grads,) = pull_back(grads)
    new = apply_gradients(inner, state, trainable_grads, **extra_args)
    new = _sharding.constrain(new, state.shardings)
    target = blended_weights(new)
    updates = jax.tree.map(_update_to, target, params)
    if state.shardings:
      n = len(jax.tree.leaves(state.params))
      updates = _sharding.constrain(updates, state.shardings[1:1 + n])
    return updates, new

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def vcon_state(opt_state: Any) -> VconState:
  """The :class:`VconState` inside ``opt_state`` (also within chains, MultiSteps, ...)."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, VconState))
           if isinstance(x, VconState)]
  if len(found) != 1:
    raise ValueError(f"opt_state must hold exactly one vj.wrap_optax state, found "
                     f"{len(found)}.")
  return found[0]


def unwrap_state(state: VconState) -> VconState:
  """``state`` with the values of nnx.Optimizer's OptState variables (plain arrays)."""
  # nnx.Optimizer keeps its state as OptState variables; their values are what we need.
  is_opt = lambda x: isinstance(x, nnx.OptState)
  return jax.tree.map(lambda x: x.get_value() if is_opt(x) else x, state, is_leaf=is_opt)


def _params_placed(state: VconState, tree: Any) -> Any:
  if not state.shardings:
    return tree
  n = len(jax.tree.leaves(state.params))
  return _sharding.place(tree, state.shardings[1:1 + n])


# The views run compiled, as the update does: XLA's CPU arithmetic op by op (eager) is
# not always that of the same operations fused in a program (a reduction's order, a
# division), and one ulp on a rounding tie is a whole quantisation level. Compiled, a
# view gives the values the user's jitted loop holds, bit for bit (tests/test_low_precision).
@jax.jit
def _compiled_compress(state: VconState) -> Any:
  return compress(state.transform, state.params, state.transform_state, state.count)


@jax.jit
def _compiled_blend(state: VconState) -> Any:
  return blended_weights(state)


def compressed_params(opt_state: Any) -> Any:
  """The compressed model (``beta = 0``): exact values, same tree as your params.

  >>> import jax.numpy as jnp, optax, vcon_jax as vj
  >>> tx = vj.wrap_optax(optax.sgd(0.1), vj.binarize(), vj.linear_vanish(10))
  >>> vj.compressed_params(tx.init({"kernel": jnp.array([[1.0, -3.0]])}))["kernel"].tolist()
  [[2.0, -2.0]]
  """
  state = unwrap_state(vcon_state(opt_state))
  return _params_placed(state, _compiled_compress(state))


def blended_params(opt_state: Any) -> Any:
  """The weights the model sees now, ``beta * W + (1 - beta) * C(W)`` (exact values)."""
  state = unwrap_state(vcon_state(opt_state))
  return _params_placed(state, _compiled_blend(state))


def dense_params(opt_state: Any) -> Any:
  """The dense weights ``W`` kept in the optimiser state."""
  return unwrap_state(vcon_state(opt_state)).params
