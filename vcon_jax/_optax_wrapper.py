r"""VCON as an optax wrapper: compression added to any training loop.

The params the user's model sees are the *blended* weights
``beta * W + (1 - beta) * C(W)``; the core's :class:`~vcon_jax.VconState` (dense
weights, transform state, inner optimiser state, step) lives in the optimiser state. An
update pulls the gradient of the blended weights back through the blend, steps the inner
optimiser (``_core.apply_gradients``, the update :func:`vcon_jax.make_train_step` runs
too) and returns the updates that move the user's params to the next blended weights.
This module holds only what is the wrapper's: ``wrap_optax``, the exact update, finding
the state inside a user's optax state, and the views of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vcon_jax import _fitted, _paths, _sharding, _trace, _validate
from vcon_jax._core import (VconState, apply_gradients, blend_fn, blended_view, blended_weights,
                            compressed_view, init_state, join)
from vcon_jax._transform import (Transform, check_transform, low_precision, reselected,
                                 rounded)


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
  if jax.tree.structure(state.opt_state) == treedef:
    return state
  norm = lambda path: tuple(str(k) for k in _paths.path_keys(path))
  have = {norm(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
  want = [norm(p) for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
  missing = [w for w in want if w not in have]
  if missing or len(have) != len(want):
    raise ValueError(f"opt_state's inner optimiser state does not match its init "
                     f"structure (missing {missing[:3]}); pass the opt_state that "
                     f"tx.init / tx.update returned.")
  inner = jax.tree.unflatten(treedef, [have[w] for w in want])
  return dataclasses.replace(state, opt_state=inner)


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

  Exactness: ``vj.blended_params`` / ``vj.compressed_params`` (and :func:`export`) give
  the exact values. The params your loop holds come from ``optax.apply_updates``, one
  float32 addition ``p + (t - p)``, which lands on the target ``t`` exactly for bfloat16
  and float16 params (the update is float32) but in float32 only to one rounding when a
  value jumps far (a quantisation level): take ``params = vj.blended_params(opt_state)``
  at the end of the loop, as export does.

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
  _validate.check_optimizer(optimizer)
  check_transform(transform)
  _fitted.check_measured(beta_schedule)  # wrap_optax has no model to measure it with
  _validate.check_step_schedule(beta_schedule)
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
    beta = jnp.asarray(beta_schedule(state.step), jnp.float32)
    tstate = state.transform_state
    _, pull_back = jax.vjp(blend_fn(transform, tstate.aux, beta, state.step),
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


def compressed_params(opt_state: Any) -> Any:
  """The compressed model (``beta = 0``): exact values, same tree as your params.

  >>> import jax.numpy as jnp, optax, vcon_jax as vj
  >>> tx = vj.wrap_optax(optax.sgd(0.1), vj.binarize(), vj.linear_vanish(10))
  >>> vj.compressed_params(tx.init({"kernel": jnp.array([[1.0, -3.0]])}))["kernel"].tolist()
  [[2.0, -2.0]]
  """
  state = unwrap_state(vcon_state(opt_state))
  return _params_placed(state, compressed_view(state))


def blended_params(opt_state: Any) -> Any:
  """The weights the model sees now, ``beta * W + (1 - beta) * C(W)`` (exact values)."""
  state = unwrap_state(vcon_state(opt_state))
  return _params_placed(state, blended_view(state))


def dense_params(opt_state: Any) -> Any:
  """The dense weights ``W`` kept in the optimiser state."""
  return unwrap_state(vcon_state(opt_state)).params
