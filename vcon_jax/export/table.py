"""The per-layer size table of a compact export (:func:`summary`)."""

from __future__ import annotations

import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from vcon_jax.export import encoder, format as fmt_lib


class Summary(list):
  """Rows (one dict per param leaf) of a compact export, with :attr:`totals`.

  Row keys: ``name``, ``shape``, ``dtype``, ``transform`` (empty for untouched leaves),
  ``format``, ``sparsity`` (fraction of zeros), ``bits`` (of the stored values; ``None``
  for low-rank and untouched leaves), ``rank``, ``dense_bytes`` (the leaf in its own dtype,
  i.e. fp32 bytes for an fp32 model), ``compressed_bytes`` (of the stored encoding) and
  ``ratio``. ``totals`` sums the bytes over all leaves and over the compressed (selected)
  ones (``compressed_layers_*``), and has ``file_bytes`` when read from a file.
  """

  def __init__(self, rows, totals):
    super().__init__(rows)
    self.totals = totals

  def table(self) -> str:
    roles = any(r.get("role") for r in self)  # the export came from a traced model
    head = ["name", "shape", *(["role"] if roles else []), "transform", "format",
            "sparsity", "bits", "rank", "dense", "compressed", "ratio"]
    lines = [head]
    for r in self:
      lines.append([
          r["name"], "x".join(map(str, r["shape"])) or "()",
          *([r.get("role") or "-"] if roles else []), r["transform"] or "-",
          r["format"], f"{r['sparsity']:.3f}" if r["transform"] else "-",
          "-" if r["bits"] is None else str(r["bits"]),
          "-" if r["rank"] is None else str(r["rank"]), _human(r["dense_bytes"]),
          _human(r["compressed_bytes"]), f"{r['ratio']:.4f}"])
    t = self.totals
    pad = [""] * (7 if roles else 6)
    lines.append(["compressed layers", *pad, _human(t["compressed_layers_dense_bytes"]),
                  _human(t["compressed_layers_bytes"]),
                  f"{t['compressed_layers_ratio']:.4f}"])
    lines.append(["total", *pad, _human(t["dense_bytes"]),
                  _human(t["compressed_bytes"]), f"{t['ratio']:.4f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    right = {i for i, h in enumerate(head)
             if h in ("sparsity", "bits", "rank", "dense", "compressed", "ratio")}
    out = []
    for n, row in enumerate(lines):
      cells = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(row, widths))]
      out.append("  ".join(cells).rstrip())
      if n == 0 or n == len(lines) - 3:
        out.append("  ".join("-" * w for w in widths))
    if t.get("file_bytes") is not None:
      out.append(f"file: {_human(t['file_bytes'])} ({t['file_bytes']} bytes)")
    return "\n".join(out)

  def __str__(self):
    return self.table()


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def from_manifest(manifest: dict, file_bytes: int | None = None) -> Summary:
  """The :class:`Summary` of an export's manifest (sizes from its actual encodings)."""
  rows = []
  for leaf in manifest["leaves"]:
    fmt = leaf["format"]
    bits = None
    if fmt["kind"] == "coded":
      bits = int(fmt["bits"]) if fmt["codec"] != "float" else np.dtype(
          jnp.dtype(leaf["dtype"])).itemsize * 8
    rows.append({
        "name": leaf["path"], "shape": tuple(leaf["shape"]), "dtype": leaf["dtype"],
        "transform": (leaf["settings"].get("transform") or "custom") if leaf["selected"]
                     else "",
        "settings": leaf["settings"],
        "format": fmt_lib.format_name(fmt, jnp.dtype(leaf["dtype"])),
        "sparsity": float(leaf["sparsity"]), "bits": bits,
        "rank": fmt.get("rank") if fmt["kind"] == "low_rank" else None,
        "dense_bytes": int(leaf["dense_bytes"]),
        "compressed_bytes": int(leaf["compressed_bytes"]),
        "ratio": leaf["compressed_bytes"] / leaf["dense_bytes"] if leaf["dense_bytes"] else 1.0,
        "role": leaf.get("role"),
    })
  dense = sum(r["dense_bytes"] for r in rows)
  comp = sum(r["compressed_bytes"] for r in rows)
  sel = [r for r in rows if r["transform"]]
  sel_dense = sum(r["dense_bytes"] for r in sel)
  sel_comp = sum(r["compressed_bytes"] for r in sel)
  totals = {"dense_bytes": dense, "compressed_bytes": comp,
            "ratio": comp / dense if dense else 1.0,
            "compressed_layers_dense_bytes": sel_dense, "compressed_layers_bytes": sel_comp,
            "compressed_layers_ratio": sel_comp / sel_dense if sel_dense else 1.0,
            "file_bytes": file_bytes}
  return Summary(rows, totals)


def summary(target: Any, state: Any = None, *, model: Any = None, model_state: Any = None,
            print_fn: Callable | None = print) -> Summary:
  """Per-layer size table of a compressed model; printed, and returned as data.

  Args:
    target: a train state of :func:`~vcon_jax.make_train_step` or the ``opt_state`` of a
      :func:`~vcon_jax.wrap_optax` loop (with ``model=``, as :func:`~vcon_jax.export`),
      a path written by :func:`~vcon_jax.export`, or a
      :class:`~vcon_jax.CompressedModel`. (0.3: ``summary(step, state)``, deprecated.)
    state: only in the deprecated ``summary(step, state)``.
    model, model_state: as :func:`~vcon_jax.export`.
    print_fn: called with the table text (default ``print``); ``None`` to only return it.

  Returns:
    A :class:`Summary`: a list of row dicts (name, shape, transform, format, sparsity,
    bits, rank, dense_bytes, compressed_bytes, ratio) with ``.totals`` and ``.table()``.
    Sizes come from the actual export encodings.
  """
  if isinstance(target, (str, os.PathLike)):
    manifest, _ = fmt_lib.read(target)
    out = from_manifest(manifest, file_bytes=os.path.getsize(target))
  elif hasattr(target, "manifest"):  # a CompressedModel
    out = from_manifest(target.manifest, file_bytes=_file_bytes(getattr(target, "path", None)))
  else:
    target, _, model = encoder.legacy_step_call("summary", target, (state,), model)
    manifest, _ = encoder.encode_state(target, model, model_state)
    out = from_manifest(manifest)
  if print_fn is not None:
    print_fn(out.table())
  return out


def _file_bytes(path) -> int | None:
  return os.path.getsize(path) if path and os.path.exists(path) else None
