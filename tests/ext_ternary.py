r"""A compression defined outside vcon_jax, with its public API only: ternary weights.

Ternary weight networks (Li, Zhang and Liu, 2016): per output unit, the weights below a
threshold ``t = 0.7 * mean|w|`` become 0 and the rest ``+-a``, ``a`` the mean magnitude of
the kept ones; the gradient passes straight through.

.. math:: C(W)_{ij} = a_j\,\mathrm{sign}(W_{ij})\,[|W_{ij}| > t_j],\quad
          t_j = 0.7\,\overline{|W_{:,j}|},\quad a_j = \overline{|W_{ij}|}_{|W_{ij}| > t_j}

This file is the whole compression (tests/test_extension.py checks that training, the
optax wrapper, export and the summary take it with no change to the library):

>>> import jax.numpy as jnp
>>> t = ternary()
>>> params = {"Dense_0": {"kernel": jnp.array([[1.0, -0.1], [-3.0, 0.4], [0.2, 2.0]])}}
>>> t.apply(params, t.init(params), 0.0)["Dense_0"]["kernel"]
Array([[ 2.,  0.],
       [-2.,  0.],
       [ 0.,  2.]], dtype=float32)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import vcon_jax as vj


def ternary_values(w: jax.Array, axes: tuple[int, ...], threshold: float = 0.7) -> jax.Array:
  """``w`` ternarised per output unit: statistics over its input ``axes``."""
  aw = jnp.abs(w.astype(jnp.float32))
  # a mean as a product with a host-computed reciprocal: under jit XLA rewrites a division
  # by a constant as that product, so eager and jitted values agree only this way
  inv_n = np.float32(1.0 / math.prod(w.shape[a] for a in axes))
  kept = aw > threshold * (jnp.sum(aw, axis=axes, keepdims=True) * inv_n)
  count = jnp.sum(kept, axis=axes, keepdims=True)
  a = jnp.sum(jnp.where(kept, aw, 0.0), axis=axes, keepdims=True) / jnp.maximum(count, 1)
  return jnp.where(kept, jnp.where(w >= 0, a, -a), 0.0).astype(w.dtype)


def ternary(*, threshold: float = 0.7, selection: vj.Selection | None = None
            ) -> vj.Transform:
  """Ternary weights ``{-a, 0, +a}`` per output unit (straight-through).

  Args:
    threshold: weights with ``|w| <= threshold * mean|w|`` of their unit become 0.
    selection: which leaves (:class:`vcon_jax.Selection`); default: the linear maps a
      trace finds, else Flax's ``kernel`` leaves.
  """
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
    raise ValueError(f"ternary(threshold=...) must be a number >= 0, got {threshold!r}.")

  def init(path, w, *, axes):
    return None, None  # no state: C is recomputed from w at every step

  def compress(w, *, axes, trainable, aux, count):
    return ternary_values(w, axes, threshold)

  def describe(w, *, axes, trainable, count):
    # values in {-a, 0, +a} per output unit: 2-bit codes with one scale per unit (export
    # also tries, and here finds smaller, a bitmask of the non-zeros with their signs)
    return vj.LeafSpec("ternary", bits=2, per_channel=True)

  rule = vj.LeafRule(init, compress, None, describe, needs_axes=True)
  return vj.leafwise(rule, name="ternary", selection=selection)
