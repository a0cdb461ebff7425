"""Output-space blending: the "two models in parallel" reference form.

The train step blends in weight space (one forward pass). This module runs the dense and
the compressed model separately and blends their outputs, as the method is stated; it is
the checked reference (for a layer linear in its weights both agree) and the naive
baseline of the overhead benchmark.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from vcon_jax._transform import Transform, TransformState, compress


def blend_outputs(apply_fn: Callable[[Any, Any], Any], params: Any,
                  compressed_params: Any, beta: Any, inputs: Any, *,
                  has_aux: bool = False) -> Any:
  r"""``beta * f(params, x) + (1 - beta) * f(compressed_params, x)``.

  .. math:: \bar g_\beta(x) = \beta f(x) + (1 - \beta) g(x)

  The one output-space blend: the reference of the tests, and what
  ``make_train_step(blend="outputs")`` runs (with its straight-through compressed params).

  Args:
    apply_fn: ``(params, inputs) -> outputs`` (or ``(outputs, aux)`` with ``has_aux``).
    params, compressed_params: the dense and compressed parameter trees.
    beta: blend factor in ``[0, 1]``.
    inputs: the model inputs.
    has_aux: ``apply_fn`` also returns an auxiliary value (the model state); the
      compressed pass's is returned beside the blended outputs.
  """
  beta = jnp.asarray(beta, jnp.float32)
  dense = apply_fn(params, inputs)
  comp = apply_fn(compressed_params, inputs)
  # any output structure (a dict, a dataclass of logits and cache): blended leaf by leaf
  mix = lambda d, c: (beta * d + (1.0 - beta) * c  # noqa: E731
                      if jnp.issubdtype(jnp.result_type(d), jnp.inexact) else c)
  if has_aux:
    (dense, _), (comp, aux) = dense, comp
    return jax.tree.map(mix, dense, comp), aux
  return jax.tree.map(mix, dense, comp)


def blend_weights(transform: Transform, params: Any, state: TransformState, beta: Any,
                  count: Any = 0) -> Any:
  """The weight-space blend ``beta * W + (1 - beta) * C(W)`` of every selected leaf."""
  return transform.apply(params, state, beta, count, exact=True)


def output_blend_apply(apply_fn: Callable, transform: Transform, params: Any,
                       state: TransformState, beta: Any, inputs: Any, count: Any = 0
                       ) -> jax.Array:
  """Output-space VCON forward (two passes), for comparison with the weight-space one."""
  return blend_outputs(apply_fn, params, compress(transform, params, state, count), beta,
                       inputs)
