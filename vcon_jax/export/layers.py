"""Layers that run from their compact form: the matmul of a loaded layer done at its site.

A loaded layer need not be handed to the model as a dense kernel. A low-rank layer runs as
two thin matmuls ``(x A) B`` (fewer flops, the kernel ``A @ B`` never formed); with
``decode="native"`` a k-bit, binary or sparse layer decodes its kernel from the compact
arrays right where its matmul runs (one layer at a time, after its input exists), so the
dense kernel is never held between calls nor all at once inside one.

Which layers qualify (plain ``flax.nnx.Linear`` and ``flax.linen.Dense``) is decided before
the model is traced: :func:`nnx_site_keys` from the module tree, :func:`linen_site_keys` by
one abstract run (a compact Linen module has no submodules until it runs). The traced
function then reads each such layer's :class:`Matmul` from :func:`layer_matmuls`. Every
other leaf reaches the model as a (decoded) dense array.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.linen import dtypes as linen_dtypes
from jax import lax

Key = tuple  # the keys of a kernel leaf, e.g. ("Dense_0", "kernel")


class Matmul(Protocol):
  """``x @ W`` for one layer (contracting the last axis of ``x``), ``W`` in ``dtype``."""

  def __call__(self, x: jax.Array, *, dtype: Any, precision: Any = None,
               preferred_element_type: Any = None) -> jax.Array: ...


# {kernel keys: Matmul} of the call being traced; set by layer_matmuls
_MATMULS: contextvars.ContextVar = contextvars.ContextVar("vcon_jax_layer_matmuls",
                                                         default=None)


def _dot(x, w, precision=None, preferred_element_type=None):
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def thin_matmul(x, a, b, precision=None, preferred_element_type=None):
  """``(x @ a) @ b`` contracting the last axis of ``x``."""
  return _dot(_dot(x, a, precision, preferred_element_type), b, precision,
              preferred_element_type)


def low_rank_matmul(a, b) -> Matmul:
  """The :class:`Matmul` of a low-rank layer: ``(x A) B`` from its factors."""
  def matmul(x, *, dtype, precision=None, preferred_element_type=None):
    return thin_matmul(x, a.astype(dtype), b.astype(dtype), precision,
                       preferred_element_type)
  return matmul


def decoded_matmul(decode: Callable[[Any, Any], jax.Array], arrays: Any) -> Matmul:
  """The :class:`Matmul` of a layer whose kernel ``decode(arrays, dtype)`` forms from its
  compact ``arrays`` at the matmul's site.

  The arrays are made to depend on ``x`` (:func:`after`), so XLA cannot decode the kernel
  before the layer's input exists: each dense kernel lives only around its own matmul (on
  backends that fuse the decode into the matmul, not at all).
  """
  def matmul(x, *, dtype, precision=None, preferred_element_type=None):
    return _dot(x, decode(after(x, arrays), dtype), precision, preferred_element_type)
  return matmul


def after(x: jax.Array, arrays: Any) -> Any:
  """``arrays`` unchanged, made to depend on ``x``: computed from them, XLA cannot schedule
  it before ``x`` exists.

  On CPU ``lax.optimization_barrier`` does not do this (XLA:CPU's scheduler still hoisted
  every layer's decode to the start of the call: all dense kernels at once, measured with
  ``memory_analysis()``), so there a select on a predicate read from ``x`` that is false
  for every value (nothing is below -inf, NaN included) makes a true data dependence that
  XLA cannot fold; it fuses into the decode (one compare per stored element). Reading
  ``x[0]`` would cost a collective per layer on a batch-sharded ``x`` and batch the
  compact arrays under ``vmap``, so on other backends (GPU, TPU) the barrier is used, whose
  scheduling there is XLA's.
  """
  if jax.default_backend() != "cpu":
    _, arrays = lax.optimization_barrier((x, arrays))
    return arrays
  if x.size == 0:
    return arrays
  never = jnp.ravel(x)[0] < -jnp.inf
  return jax.tree.map(
      lambda a: lax.select(jnp.broadcast_to(never, a.shape), jnp.zeros_like(a), a), arrays)


# ---------------------------------------------------------------------------------- NNX
class _SiteDotGeneral:
  """An ``nnx.Linear.dot_general`` that ignores the kernel and runs the layer's Matmul."""

  def __init__(self, key: Key):
    self.key = key

  def __call__(self, inputs, kernel, dimension_numbers, precision=None,
               preferred_element_type=None, **unused):
    del dimension_numbers, unused
    return _MATMULS.get()[self.key](inputs, dtype=kernel.dtype, precision=precision,
                                    preferred_element_type=preferred_element_type)


def nnx_site_keys(module: nnx.Module, keys: frozenset) -> frozenset:
  """Switches ``module``'s plain ``nnx.Linear`` layers whose kernel is in ``keys`` to run
  their :class:`Matmul` (in place: pass a clone) and returns those kernel keys."""
  found = set()
  for path, sub in nnx.iter_modules(module):
    key = (*path, "kernel")
    if (type(sub) is nnx.Linear and key in keys
        and getattr(sub, "dot_general", None) is lax.dot_general):
      sub.dot_general = _SiteDotGeneral(key)
      found.add(key)
  return frozenset(found)


# -------------------------------------------------------------------------------- Linen
def _linen_key(context, args, kwargs) -> Key | None:
  """The kernel keys of a plain ``nn.Dense`` call that can run its Matmul, else None."""
  mod = context.module
  if (context.method_name != "__call__" or type(mod) is not nn.Dense or kwargs
      or len(args) != 1 or getattr(mod, "dot_general", None) is not None
      or getattr(mod, "dot_general_cls", None) is not None):
    return None
  return (*mod.path, "kernel")


def _linen_interceptor(sites: frozenset, dtypes: dict) -> Callable:
  def interceptor(next_fun, args, kwargs, context):
    key = _linen_key(context, args, kwargs)
    if key is None or key not in sites:
      return next_fun(*args, **kwargs)
    mod = context.module
    bias = mod.get_variable("params", "bias") if mod.use_bias else None
    like = jnp.zeros((0,), dtypes[key])  # the kernel's dtype, for Dense's promotion
    x, like, bias = linen_dtypes.promote_dtype(args[0], like, bias, dtype=mod.dtype)
    y = _MATMULS.get()[key](x, dtype=like.dtype, precision=mod.precision)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y

  return interceptor


def linen_site_keys(run: Callable, args: tuple, keys: frozenset) -> frozenset:
  """The kernels in ``keys`` of plain ``nn.Dense`` layers that ``run(*args)`` (the model on
  its dense params) calls; found by an abstract run (``jax.eval_shape``: no compile)."""
  if not keys:
    return frozenset()
  found = set()

  def record(next_fun, a, kw, context):
    key = _linen_key(context, a, kw)
    if key in keys:
      found.add(key)
    return next_fun(*a, **kw)

  with nn.intercept_methods(record):
    jax.eval_shape(run, *args)
  return frozenset(found)


@contextlib.contextmanager
def layer_matmuls(matmuls: dict[Key, Matmul], dtypes: dict[Key, Any]):
  """Inside: the layers of ``matmuls`` (NNX ones already switched by
  :func:`nnx_site_keys`) run their :class:`Matmul`; ``dtypes`` are their kernels'."""
  token = _MATMULS.set(matmuls)
  try:
    with nn.intercept_methods(_linen_interceptor(frozenset(matmuls), dtypes)):
      yield
  finally:
    _MATMULS.reset(token)
