"""Running a loaded export: :class:`CompressedModel` and :func:`load_compressed`.

A run is planned before anything is traced: which layers run their matmul from their
compact form at its site (low-rank layers as thin matmuls; with ``decode="native"`` k-bit,
binary and sparse layers decoded where they are used: :mod:`vcon_jax.export.layers`), hence
which arrays (dense, packed or factors) the jitted function takes. The traced function
itself is pure: it decodes, runs the model through the training step's adapter
(:func:`vcon_jax._model.make_adapter`) and returns the logits.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vcon_jax import _model, _paths
from vcon_jax.export import codec, encoder, format as fmt_lib, layers
from vcon_jax.export import table

DECODE_MODES = ("auto", "once", "on_the_fly", "native")
_log = logging.getLogger("vcon_jax")


def auto_decode(backend: str | None = None) -> str:
  """The mode ``decode="auto"`` runs on ``backend`` (default: JAX's default backend).

  ``"once"`` on CPU: measured fastest there at batch 1 and 256
  (``experiments/results/bench_serving.md``; XLA:CPU has no fast int8 / int4 matmul, so
  decoding in the call only adds work). ``"native"`` on GPU and TPU, where the weights
  then stay small and XLA can fuse a layer's decode into its matmul; not measured (no GPU
  or TPU was lent), so check it with ``experiments/bench_serving.py`` on yours. A
  model's run picks ``"native"`` there only when every coded kernel is a plain ``Linear``
  / ``Dense`` layer (others would be decoded whole in every call), else ``"once"``; the
  runner's ``decode`` and a log line say which.
  """
  return "once" if (backend or jax.default_backend()) == "cpu" else "native"


def _nbytes(tree) -> int:
  """Bytes of the distinct arrays in ``tree``."""
  seen = {id(a): a for a in jax.tree.leaves(tree) if hasattr(a, "nbytes")}
  return int(sum(a.nbytes for a in seen.values()))


class _Runner:
  """``x -> logits`` of a loaded export; ``lower(x)`` gives the jitted computation.

  At the first call, ``plan(x)`` gives the keys of the kernels that run their matmul at
  their site (low-rank ones as thin matmuls, and with ``decode="native"`` the coded ones);
  then the arrays are placed and the run function jitted.

  Attributes:
    decode: the mode this runner runs (``"auto"`` resolved by :func:`auto_decode`).
    fast_layers: low-rank kernels run as ``(x @ A) @ B``.
    native_layers: coded kernels decoded at their matmul's site (``"native"`` only); the
      other coded leaves of a native run are decoded inside the call before the model runs.
  """

  def __init__(self, owner: "CompressedModel", adapter, model_state, decode: str,
               plan: Callable, auto: bool = False):
    self._owner, self._adapter, self._state = owner, adapter, model_state
    self.decode, self._plan, self._auto = decode, plan, auto
    self._jitted = self._arrays = None
    self.fast_layers: list[str] = []
    self.native_layers: list[str] = []

  def __repr__(self):
    return (f"<vcon_jax runner: decode={self.decode!r}, {len(self.fast_layers)} thin "
            f"low-rank layers, {len(self.native_layers)} native layers>")

  def _ready(self, x):
    if self._jitted is None:
      owner = self._owner
      sites = self._plan(x)
      if self._auto and self.decode == "native":
        missed = owner._not_at_sites(sites)
        if missed:  # some coded kernels would be decoded whole in every call
          _log.info("vcon_jax: decode='auto' runs 'once': %d coded kernels are not plain "
                    "Linear / Dense layers (e.g. %s)", len(missed), missed[0])
          self.decode, sites = "once", sites & owner.low_rank_keys
      fast = sites & owner.low_rank_keys
      native = sites - fast
      dense_keys = owner.low_rank_keys - fast if self.decode == "once" else frozenset()
      fmts, self._arrays = owner._plan(self.decode, dense_keys)
      self._jitted = jax.jit(self._make_run(fmts, sites))
      self.fast_layers = sorted("/".join(map(str, k)) for k in fast)
      self.native_layers = sorted("/".join(map(str, k)) for k in native)
      _log.info("vcon_jax: running the export with decode=%r (%d low-rank layers as thin "
                "matmuls, %d layers decoded at their matmul)", self.decode,
                len(fast), len(native))
    self._owner.fast_layers = self.fast_layers
    self._owner.native_layers = self.native_layers
    return self._jitted

  def _make_run(self, fmts: list, sites: frozenset) -> Callable:
    owner, apply = self._owner, self._adapter.apply

    def run(arrays, model_state, x):
      params = owner._decode_all(fmts, arrays)  # what the site layers skip, XLA drops
      matmuls, dtypes = owner._matmuls(fmts, arrays, sites)
      with layers.layer_matmuls(matmuls, dtypes):
        logits, _ = apply(params, model_state, x, None, train=False)
      return logits

    return run

  def device_bytes(self, x=None) -> int:
    """Bytes this runner holds on the device between calls: the arrays every call takes
    (dense kernels, compact forms, factors) and the model state. Planned at the first call;
    before it, pass an input ``x`` to plan now."""
    if self._jitted is None:
      if x is None:
        raise ValueError("the runner is planned at its first call: call it once, or pass "
                         "an input: device_bytes(x).")
      self._ready(x)
    return _nbytes((self._arrays, self._state))

  def __call__(self, x):
    return self._ready(x)(self._arrays, self._state, x)

  def lower(self, x):
    return self._ready(x).lower(self._arrays, self._state, x)


class CompressedModel:
  """A compact export loaded by :func:`load_compressed`.

  * :meth:`params` decodes the dense-equivalent params (the tree of
    ``step.compressed_params(state)``);
  * :meth:`apply` / :meth:`apply_fn` run a model inside one ``jit``, with the k-bit,
    binary and sparse layers decoded once to dense arrays kept on the device
    (``decode="once"``: as fast as the dense model), from their packed form at the start
    of every call (``"on_the_fly"``), or kept compact on the device and decoded inside
    each layer's own matmul (``"native"``); ``"auto"`` (the default) picks per backend
    (:func:`auto_decode`). In every mode low-rank ``flax.linen.Dense`` /
    ``flax.nnx.Linear`` layers run as two thin matmuls ``(x @ A) @ B`` (the rebuilt
    ``A @ B`` is never formed). :meth:`device_bytes` says what is held on the device.

  Attributes:
    manifest: the export's JSON manifest.
    arrays: the stored (compact) numpy arrays by name.
    kind: ``"linen"`` or ``"nnx"``, the kind of model that was exported.
    step: the train step count of the exported state.
    fast_layers: paths of the low-rank kernels the last run (:meth:`apply` or a function
      from :meth:`apply_fn`) computes as ``(x @ A) @ B``; planned before tracing.
    native_layers: paths of the coded kernels the last ``"native"`` run decodes at their
      matmul.
  """

  def __init__(self, manifest: dict, arrays: dict, path: str | None = None):
    self.manifest = manifest
    self.arrays = arrays
    self.path = path
    self.kind = manifest["kind"]
    self.step = manifest.get("step")
    self._leaves = manifest["leaves"]
    self._dense: dict[int, jax.Array] = {}  # decoded leaves on the device: params(), "once"
    self._runtime: dict[tuple, tuple] = {}  # (leaf, native?): compact forms on the device
    self._apply_cache: dict = {}
    self.low_rank_keys = frozenset(tuple(leaf["keys"]) for leaf in self._leaves
                                   if leaf["format"]["kind"] == "low_rank")
    self.fast_layers: list[str] = []
    self.native_layers: list[str] = []

  def __repr__(self):
    s = self.summary(print_fn=None).totals
    return (f"CompressedModel({self.kind}, {len(self._leaves)} leaves, "
            f"{s['compressed_bytes']} bytes of {s['dense_bytes']} dense"
            f"{f', from {self.path!r}' if self.path else ''})")

  # ------------------------------------------------------------------------ decoding
  def _stored(self, leaf) -> dict:
    return {role: self.arrays[name] for role, name in leaf["arrays"].items()}

  def _decode(self, xp, fmt, arrays, leaf):
    shape, dtype, in_axes = tuple(leaf["shape"]), jnp.dtype(leaf["dtype"]), fmt.get("in_axes")
    matrix = _paths.matricize_shape(shape, in_axes)
    if in_axes is None:
      return codec.decode_leaf(xp, fmt, arrays, shape, dtype, matrix)
    # stored as its (fan_in, fan_out) matrix over in_axes (an attention kernel): decoded
    # as that matrix, then put back in the leaf's layout
    return _paths.from_matrix(codec.decode_leaf(xp, fmt, arrays, matrix, dtype, matrix),
                              shape, in_axes)

  def _dense_leaf(self, i: int) -> jax.Array:
    """Leaf ``i`` decoded on the host (numpy: no compile) and put on the device, cached."""
    if i not in self._dense:
      leaf = self._leaves[i]
      self._dense[i] = jnp.asarray(self._decode(np, leaf["format"], self._stored(leaf), leaf))
    return self._dense[i]

  def _runtime_leaf(self, i: int, native: bool = False) -> tuple[dict, dict]:
    """Leaf ``i`` as decoded inside a jitted call (:func:`codec.runtime_coded`, or with
    ``native`` :func:`codec.native_coded`), put on the device, cached."""
    if (i, native) not in self._runtime:
      leaf = self._leaves[i]
      form = codec.native_coded if native else codec.runtime_coded
      fmt, arrays = form(
          leaf["format"], self._stored(leaf),
          *_paths.matricize_shape(tuple(leaf["shape"]), leaf["format"].get("in_axes")))
      self._runtime[i, native] = (fmt, {k: jnp.asarray(v) for k, v in arrays.items()})
    return self._runtime[i, native]

  def _plan(self, decode: str, dense_keys=frozenset()) -> tuple[list, list]:
    """Per leaf, the (static) format and the device arrays a jitted call decodes.

    ``"once"``: every leaf dense except low-rank ones (their factors), unless in
    ``dense_keys`` (low-rank kernels not run as thin matmuls). ``"on_the_fly"``: the
    compact forms; ``"native"``: the compact forms with byte-friendly code widths.
    """
    fmts, arrays = [], []
    for i, leaf in enumerate(self._leaves):
      kind = leaf["format"]["kind"]
      if kind == "low_rank" and tuple(leaf["keys"]) not in dense_keys:
        fmt, arr = self._runtime_leaf(i)
      elif kind == "raw" or decode == "once":
        fmt, arr = {"kind": "raw"}, {"value": self._dense_leaf(i)}
      else:
        fmt, arr = self._runtime_leaf(i, native=decode == "native")
      fmts.append(fmt)
      arrays.append(arr)
    return fmts, arrays

  @property
  def coded_keys(self) -> frozenset:
    """Kernels stored coded (k-bit, binary, sparse) in their plain ``(in, out)`` layout:
    the ones ``decode="native"`` can decode at a ``Linear`` / ``Dense`` layer's matmul."""
    return frozenset(tuple(leaf["keys"]) for leaf in self._leaves
                     if leaf["format"]["kind"] == "coded" and len(leaf["shape"]) == 2
                     and leaf["format"].get("in_axes") is None)

  def _decode_all(self, fmts, arrays) -> dict:
    return fmt_lib.unflatten([(leaf["keys"], self._decode(jnp, fmt, arr, leaf))
                              for leaf, fmt, arr in zip(self._leaves, fmts, arrays)])

  def _matmuls(self, fmts, arrays, sites: frozenset) -> tuple[dict, dict]:
    """The :class:`~vcon_jax.export.layers.Matmul` of every site layer and its kernel's
    dtype: low-rank factors as thin matmuls, coded kernels decoded at the matmul."""
    matmuls, dtypes = {}, {}
    for leaf, fmt, arr in zip(self._leaves, fmts, arrays):
      key = tuple(leaf["keys"])
      if key not in sites or fmt["kind"] == "raw":
        continue
      if fmt["kind"] == "low_rank":
        matmuls[key] = layers.low_rank_matmul(arr["a"], arr["b"])
      else:
        matmuls[key] = layers.decoded_matmul(
            lambda a, dtype, fmt=fmt, leaf=leaf: self._decode(jnp, fmt, a, leaf).astype(dtype),
            arr)
      dtypes[key] = jnp.dtype(leaf["dtype"])
    return matmuls, dtypes

  def device_bytes(self) -> int:
    """Bytes of the weights this object holds on the device now: the dense leaves of
    :meth:`params` and ``decode="once"`` runs, and the compact forms (packed codes, sparse
    values and positions, low-rank factors) of ``"on_the_fly"`` / ``"native"`` runs; each
    array counted once. A runner's own total (with the model state) is its
    ``device_bytes()``."""
    return _nbytes((self._dense, [arr for _, arr in self._runtime.values()]))

  def params(self, model: Any = None) -> Any:
    """The dense-equivalent params, the tree of ``step.compressed_params(state)``.

    Decoded on the host once and kept on the device (the same arrays a
    ``decode="once"`` :meth:`apply` runs on).

    Args:
      model: optional. For an NNX module the result is an ``nnx.State`` (for
        ``nnx.update(model, ...)``); otherwise a nested dict (Linen's ``params``; NNX's
        ``nnx.update`` also takes it).
    """
    params = fmt_lib.unflatten([(leaf["keys"], self._dense_leaf(i))
                                for i, leaf in enumerate(self._leaves)])
    if model is not None and self.kind == "nnx":
      from flax import nnx
      if isinstance(model, nnx.Module):
        state = jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))
        nnx.replace_by_pure_dict(state, params)
        return state
    return params

  def update(self, module: Any) -> Any:
    """Puts the exported weights *and* model state (BatchNorm statistics, ...) into the
    NNX ``module`` in place, and returns it: after this, ``module`` in eval mode is the
    compressed model. (``nnx.update(module, self.params(module))`` alone would keep the
    module's own statistics.) A Linen model takes ``{"params": self.params(),
    **self.model_state()}`` instead."""
    if self.kind != "nnx":
      raise ValueError("update() puts an export into an NNX module; this export is of a "
                       "Linen model: use {'params': m.params(), **m.model_state()}.")
    adapter = _model.make_adapter(module, None, None)
    params, rest = adapter.split(None)
    self._check_params(params)
    return adapter.assign(self.params(), self._merged_state(rest))

  def model_state(self) -> dict:
    """The exported non-param state (Linen collections such as ``batch_stats``; NNX
    BatchNorm statistics and rng counters) as a nested dict."""
    return fmt_lib.unflatten([(e["keys"], jnp.asarray(self.arrays[e["array"]]))
                              for e in self.manifest["model_state"]])

  # -------------------------------------------------------------------------- running
  def apply_fn(self, model: Any, *, decode: str = "auto", **kwargs) -> Callable:
    """A jitted ``x -> logits`` running ``model`` (eval mode) on this export.

    ``model`` is the same architecture that was exported (a ``flax.linen.Module`` or an
    ``nnx.Module``; the NNX module's structure and its non-exported state are read now,
    the module itself is left as it is).

    Args:
      model: the Linen or NNX model.
      decode: where the k-bit, binary and sparse layers are decoded.

        * ``"auto"`` (default): the mode :func:`auto_decode` picks for the backend
          (``"once"`` on CPU, ``"native"`` on GPU / TPU); the runner's ``decode`` says
          which.
        * ``"once"``: on the host at the first call, to dense arrays of the
          model's dtype that stay on the device (cached on this object and shared with
          :meth:`params`); every call then runs the plain dense model. Fastest; device
          memory of the dense model for those layers.
        * ``"on_the_fly"``: inside every jitted call, from the packed arrays (which are
          all that stays on the device; sparse layers as their values and ``int32``
          positions, 4 bytes per kept value more than the file's bitmask). Saves device
          memory between calls, but each call writes every such layer's dense kernel
          (transient, one layer at a time in XLA's schedule) before its matmul: on CPU
          several times slower than ``"once"`` at small batches.
        * ``"native"``: the compact forms stay on the device (k-bit codes packed in 1, 2,
          4 or 8 bits, widened from 3 to 4 and from 5-7 to 8; binary as sign bits; sparse
          as values and positions) and each plain ``nnx.Linear`` / ``nn.Dense`` layer
          decodes its kernel inside its own matmul, after its input exists (see
          :attr:`native_layers`): no dense kernel is held between calls and inside a call
          only the one in use (XLA on GPU / TPU fuses the decode into the matmul). Other
          coded leaves are decoded at the start of the call, as in ``"on_the_fly"``. The
          same weights as ``"once"``, bit for bit.

        In every mode low-rank ``flax.linen.Dense`` / ``flax.nnx.Linear`` layers run as
        two thin matmuls ``(x @ A) @ B`` from their factors (see :attr:`fast_layers`);
        other low-rank layers (convs, ``DenseGeneral``, einsums) use the kernel ``A @ B``,
        formed once (``"once"``) or in every call (``"on_the_fly"``).
      **kwargs: passed to a Linen model's ``apply`` (e.g. ``train=False``).
    """
    if decode not in DECODE_MODES:
      raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}.")
    auto = decode == "auto"
    if auto:
      decode = auto_decode()
    site_keys = self.low_rank_keys | (self.coded_keys if decode == "native" else frozenset())
    kind = _model.model_kind(model)
    if kind != self.kind:
      raise ValueError(f"this export is of {'an NNX' if self.kind == 'nnx' else 'a Linen'} "
                       f"model; pass the {'nnx' if self.kind == 'nnx' else 'flax.linen'}"
                       f".Module.")
    if kind == "nnx":
      if kwargs:
        raise ValueError("keyword arguments are for Linen models' apply; an NNX module is "
                         "run in eval mode as it is.")
      from flax import nnx
      # a new module with shape-only params (the adapter keeps it as its template), its
      # low-rank layers switched to thin matmuls; the user's module stays as it is
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
      model = nnx.merge(graphdef, params, rest)
      sites = layers.nnx_site_keys(model, site_keys)
      if auto and decode == "native" and self._not_at_sites(sites):
        decode = "once"  # the layers switched above are rebuilt: once runs them dense
        model = nnx.merge(graphdef, params, rest)
        sites = layers.nnx_site_keys(model, self.low_rank_keys)
      adapter = _model.make_adapter(model, None, None)
      params, rest = adapter.split(None)
      self._check_params(params)
      return _Runner(self, adapter, self._merged_state(rest), decode, lambda x: sites,
                     auto=auto)
    adapter = _model.make_adapter(model, None, kwargs)
    state = self.model_state()
    shapes = fmt_lib.unflatten([
        (leaf["keys"], jax.ShapeDtypeStruct(tuple(leaf["shape"]), jnp.dtype(leaf["dtype"])))
        for leaf in self._leaves])
    plan = lambda x: layers.linen_site_keys(
        lambda p, s, x: adapter.apply(p, s, x, None, train=False)[0], (shapes, state, x),
        site_keys)
    return _Runner(self, adapter, state, decode, plan, auto=auto)

  def _not_at_sites(self, sites: frozenset) -> list[str]:
    """The coded kernels a native run would decode at the start of each call (not plain
    ``Linear`` / ``Dense`` layers): ``"auto"`` then prefers ``"once"``."""
    return sorted("/".join(map(str, k)) for k in self.coded_keys - sites) + sorted(
        leaf["path"] for leaf in self._leaves if leaf["format"]["kind"] == "coded"
        and tuple(leaf["keys"]) not in self.coded_keys)

  def _check_params(self, params) -> None:
    """Raises if the model's param leaves (keys and shapes) differ from the export's."""
    expected = {tuple(k): tuple(v.shape) for k, _, v in encoder.flatten(params)}
    stored = {tuple(leaf["keys"]): tuple(leaf["shape"]) for leaf in self._leaves}
    if expected != stored:
      diff = sorted({"/".join(map(str, k)) for k in set(expected) ^ set(stored)} | {
          "/".join(map(str, k)) for k in set(expected) & set(stored)
          if expected[k] != stored[k]})
      raise ValueError(f"the model's params do not match the export (differing leaves: "
                       f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}).")

  def _merged_state(self, rest) -> dict:
    """The module's model state with the exported leaves (BatchNorm statistics) put in."""
    exported = {tuple(e["keys"]): self.arrays[e["array"]] for e in self.manifest["model_state"]}
    merged = []
    for keys, _, leaf in encoder.flatten(rest):
      new = exported.get(tuple(keys))
      if new is not None and np.shape(new) == np.shape(leaf):
        leaf = jnp.asarray(new, dtype=leaf.dtype)
      merged.append((keys, leaf))
    return fmt_lib.unflatten(merged)

  def apply(self, model: Any, x: Any, *, decode: str = "auto", **kwargs) -> jax.Array:
    """Logits of ``model`` on ``x`` from this export (see :meth:`apply_fn`; the jitted
    function is kept per model, ``decode`` mode and keyword arguments)."""
    try:
      key = (id(model), decode, tuple(sorted(kwargs.items())))
      hash(key)
    except TypeError:
      return self.apply_fn(model, decode=decode, **kwargs)(x)
    if key not in self._apply_cache:
      self._apply_cache[key] = (model, self.apply_fn(model, decode=decode, **kwargs))
    return self._apply_cache[key][1](x)

  def summary(self, print_fn: Callable | None = print) -> table.Summary:
    """The per-layer size table of this export (see :func:`~vcon_jax.summary`)."""
    return table.summary(self, print_fn=print_fn)


def load_compressed(path: str | os.PathLike) -> CompressedModel:
  """Loads a compact export written by :func:`~vcon_jax.export`.

  >>> model = vj.load_compressed("model.npz")              # doctest: +SKIP
  >>> logits = model.apply(flax_model, x)                  # doctest: +SKIP
  >>> params = model.params()                              # doctest: +SKIP

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file is not a vcon_jax compact export.
  """
  manifest, arrays = fmt_lib.read(path)
  return CompressedModel(manifest, arrays, os.fspath(path))
