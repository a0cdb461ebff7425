"""The export file: one ``.npz`` of named arrays plus a JSON manifest, and its version.

Manifest (the ``__manifest__`` entry, UTF-8 JSON bytes)::

  {"format": "vcon_jax.compact", "version": 3, "kind": "linen" | "nnx", "step": int,
   "leaves": [{"path", "keys", "shape", "dtype", "selected", "settings", "format",
               "arrays": {role: array name}, "dense_bytes", "compressed_bytes",
               "sparsity"}, ...],
   "model_state": [{"keys", "array"}, ...],
   "views": {array name: dtype name}}

``format`` of a leaf is ``{"kind": "raw"}``, ``{"kind": "low_rank", "rank": r}`` (arrays
``a`` and ``b``) or a ``coded`` format (see :mod:`vcon_jax.export.codec`); either may
carry ``"in_axes"`` (version 2): the leaf's input axes when its ``(fan_in, fan_out)``
matrix is not taken over every axis but the last (attention kernels); the stored matrix
is that view, transposed back on decoding. ``settings`` of a
selected leaf is ``{"transform": "prune+quantize", "specs": [LeafSpec.settings(), ...]}``
(plus ``describe_error`` if the transform's ``describe`` failed); it is informative only
(the summary's ``transform`` column), decoding never reads it. Arrays of
dtypes numpy cannot store (bfloat16, ...) are stored as unsigned ints of the same width and
listed in ``views``. A reader refuses files of a newer ``version``; a change to the
encodings that old readers cannot decode must increase :data:`VERSION`.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

FORMAT = "vcon_jax.compact"
#: 1: the first format; 2: leaf formats may carry ``in_axes`` (version 1 readers would
#: reshape such a leaf wrongly, so they must refuse it); 3: scales per group of inputs
#: (``"scale": "group"``) and asymmetric codes with zero points (``zero_point``).
VERSION = 3
MANIFEST_KEY = "__manifest__"


def jsonable(x):
  """``x`` with numpy scalars and tuples turned into plain JSON values."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x)
  if x is None or isinstance(x, str):
    return x
  try:
    return float(np.asarray(x))
  except (TypeError, ValueError):
    return str(x)


def unflatten(entries) -> dict:
  """Nested dict from ``(keys, value)`` pairs."""
  root: dict = {}
  for keys, value in entries:
    node = root
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return root


def storable(arrays: Mapping) -> tuple[dict, dict]:
  """Views non-numpy dtypes (bfloat16, ...) as unsigned ints; returns their dtype names."""
  out, views = {}, {}
  for name, arr in arrays.items():
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biufc" or np.dtype(arr.dtype.str) != arr.dtype:
      views[name] = str(arr.dtype)
      arr = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
    out[name] = arr
  return out, views


def write(path: str, manifest: dict, arrays: Mapping) -> None:
  """Writes ``manifest`` and ``arrays`` to ``path`` atomically (temporary file, rename)."""
  arrays, views = storable(arrays)
  manifest["views"] = views
  blob = np.frombuffer(json.dumps(manifest).encode("utf-8"), np.uint8)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **{MANIFEST_KEY: blob}, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read(path) -> tuple[dict, dict]:
  """``(manifest, arrays)`` of the export at ``path``; checks format and version."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No compact export at {path!r} (write one with "
                            f"vj.export(step, state, path)).")
  if os.path.isdir(path):
    raise ValueError(f"{path!r} is a directory; load_compressed needs the .npz file "
                     f"written by vj.export.")
  not_export = f"{path!r} is not a vcon_jax compact export (an .npz written by vj.export)"
  try:
    z = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
    raise ValueError(f"{not_export}: {err}") from err
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise ValueError(f"{not_export}: it holds a single array.")
  with z:
    if MANIFEST_KEY not in z.files:
      raise ValueError(f"{not_export}: no {MANIFEST_KEY!r} entry.")
    try:
      files = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
      raise ValueError(f"{not_export}: {err}") from err
  try:
    manifest = json.loads(files.pop(MANIFEST_KEY).tobytes().decode("utf-8"))
  except (ValueError, UnicodeDecodeError) as err:
    raise ValueError(f"{path!r}: unreadable export manifest ({err}).") from err
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path!r} is not a vcon_jax compact export (format "
                     f"{manifest.get('format')!r}).")
  if manifest.get("version", 0) > VERSION:
    raise ValueError(f"{path!r} was written by a newer vcon_jax (format version "
                     f"{manifest['version']}; this one reads up to {VERSION}).")
  for name, dtype in manifest.get("views", {}).items():
    files[name] = files[name].view(jnp.dtype(dtype))
  return manifest, files


def format_name(fmt: Mapping, dtype) -> str:
  """Short name of a leaf format for the summary, e.g. ``bitmask+int8/channel``."""
  kind = fmt["kind"]
  if kind == "raw":
    return "raw"
  if kind == "low_rank":
    return f"low_rank(r={fmt['rank']})"
  layout = fmt["layout"] if fmt["layout"] != "nm" else f"{fmt['n']}:{fmt['m']}"
  codec = {"float": np.dtype(dtype).name, "binary": "binary"}.get(
      fmt["codec"], f"int{fmt.get('bits')}")
  if fmt["codec"] != "float":
    codec += {"layer": "/layer", "channel": "/channel"}.get(
        fmt["scale"], f"/group{fmt.get('group_size')}")
    if fmt.get("zero_point"):
      codec += "+zero"
  return f"{layout}+{codec}"
