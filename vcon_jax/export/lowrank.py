"""Low-rank inference: ``flax.linen.Dense`` and ``flax.nnx.Linear`` layers run as ``(x A) B``.

A loaded low-rank layer need not rebuild its kernel ``A @ B``: two thin matmuls give the
same output for less work. Which layers qualify is decided before the model is traced
(:func:`nnx_fast_keys` from the module tree; :func:`linen_fast_keys` by one abstract run,
since a compact Linen module has no submodules until it runs); the traced function then
reads the factors of exactly those layers from :func:`thin_factors`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.linen import dtypes as linen_dtypes
from jax import lax

Key = tuple  # the keys of a kernel leaf, e.g. ("Dense_0", "kernel")

# {kernel keys: (A, B)} of the call being traced; set by thin_factors
_FACTORS: contextvars.ContextVar = contextvars.ContextVar("vcon_jax_thin_factors",
                                                         default=None)


def thin_matmul(x, a, b, precision=None, preferred_element_type=None):
  """``(x @ a) @ b`` contracting the last axis of ``x``."""
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  h = lax.dot_general(x, a, dims, precision=precision,
                      preferred_element_type=preferred_element_type)
  return lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


# ---------------------------------------------------------------------------------- NNX
class _ThinDotGeneral:
  """An ``nnx.Linear.dot_general`` that ignores the kernel and uses ``x A B``."""

  def __init__(self, key: Key):
    self.key = key

  def __call__(self, inputs, kernel, dimension_numbers, precision=None,
               preferred_element_type=None, **unused):
    del dimension_numbers, unused
    a, b = _FACTORS.get()[self.key]
    return thin_matmul(inputs, a.astype(kernel.dtype), b.astype(kernel.dtype), precision,
                       preferred_element_type)


def nnx_fast_keys(module: nnx.Module, low_rank: frozenset) -> frozenset:
  """Switches ``module``'s plain ``nnx.Linear`` layers with a low-rank kernel to thin
  matmuls (in place: pass a clone) and returns their kernel keys."""
  fast = set()
  for path, sub in nnx.iter_modules(module):
    key = (*path, "kernel")
    if (type(sub) is nnx.Linear and key in low_rank
        and getattr(sub, "dot_general", None) is lax.dot_general):
      sub.dot_general = _ThinDotGeneral(key)
      fast.add(key)
  return frozenset(fast)


# -------------------------------------------------------------------------------- Linen
def _linen_key(context, args, kwargs) -> Key | None:
  """The kernel keys of a plain ``nn.Dense`` call that can run as ``x A B``, else None."""
  mod = context.module
  if (context.method_name != "__call__" or type(mod) is not nn.Dense or kwargs
      or len(args) != 1 or getattr(mod, "dot_general", None) is not None
      or getattr(mod, "dot_general_cls", None) is not None):
    return None
  return (*mod.path, "kernel")


def _linen_interceptor(fast: frozenset) -> Callable:
  def interceptor(next_fun, args, kwargs, context):
    key = _linen_key(context, args, kwargs)
    if key is None or key not in fast:
      return next_fun(*args, **kwargs)
    mod = context.module
    a, b = _FACTORS.get()[key]
    bias = mod.get_variable("params", "bias") if mod.use_bias else None
    x, a, b, bias = linen_dtypes.promote_dtype(args[0], a, b, bias, dtype=mod.dtype)
    y = thin_matmul(x, a, b, mod.precision)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y

  return interceptor


def linen_fast_keys(run: Callable, args: tuple, low_rank: frozenset) -> frozenset:
  """The low-rank kernels of plain ``nn.Dense`` layers that ``run(*args)`` (the model on
  its dense params) calls; found by an abstract run (``jax.eval_shape``: no compile)."""
  if not low_rank:
    return frozenset()
  found = set()

  def record(next_fun, a, kw, context):
    key = _linen_key(context, a, kw)
    if key in low_rank:
      found.add(key)
    return next_fun(*a, **kw)

  with nn.intercept_methods(record):
    jax.eval_shape(run, *args)
  return frozenset(found)


@contextlib.contextmanager
def thin_factors(factors: dict[Key, tuple[Any, Any]], fast: frozenset):
  """Inside: the ``fast`` layers (NNX ones already switched) run as ``x A B`` from
  ``factors``."""
  token = _FACTORS.set(factors)
  try:
    with nn.intercept_methods(_linen_interceptor(fast)):
      yield
  finally:
    _FACTORS.reset(token)
