"""What a transform did to one leaf: the typed record export reads (:class:`LeafSpec`).

``Transform.describe(path, leaf, state, count)`` returns a tuple of specs, one per
compression applied to the leaf in order (``()`` for a leaf it leaves alone; ``chain``
concatenates its members'). Export chooses the encodings to try from them; the values
then decide which encoding is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """One compression of one leaf.

  Attributes:
    kind: the compression's name (``"prune"``, ``"quantize"``, ``"binarize"``,
      ``"low_rank"`` or a custom transform's own); shown in the export summary.
    bits: width of the quantised values (1 for binary), or ``None`` if not quantised.
      Export tries ``bits``-bit codes for ``2 <= bits <= 16``.
    per_channel: quantisation scales per output unit (``True``) or per layer.
    group_size: quantisation scales per group of this many consecutive inputs of each
      output unit (``None``: not group-wise).
    symmetric: ``False`` for asymmetric codes with a zero point per scale (``None``:
      symmetric).
    sparsity: fraction of zeros the compression aims at.
    granularity: pruning granularity (``"layer"``, ``"neuron"``, ``"group"``).
    pattern: ``(n, m)`` for n:m sparsity (``n`` kept of every ``m`` inputs).
    rank: the rank of a low-rank factorisation.
    in_axes: the leaf's input axes when they are not every axis but the last (e.g.
      ``(0,)`` for an ``(in, heads, head_dim)`` attention kernel); ``None``: Flax's default.
      The leaf's ``(fan_in, fan_out)`` matrix is taken over these axes.
    factors: ``(A, B)`` with ``A @ B`` the leaf as a ``(fan_in, fan_out)`` matrix (``A``
      may have more than ``rank`` columns; the first ``rank`` count). A leaf whose last
      spec has factors is exported as them when their product matches its values.

  >>> LeafSpec("quantize", bits=4, per_channel=True).settings()
  {'kind': 'quantize', 'bits': 4, 'per_channel': True}
  """

  kind: str
  bits: int | None = None
  per_channel: bool | None = None
  group_size: int | None = None
  symmetric: bool | None = None
  sparsity: float | None = None
  granularity: str | None = None
  pattern: tuple[int, int] | None = None
  rank: int | None = None
  in_axes: tuple[int, ...] | None = None
  factors: tuple[Any, Any] | None = dataclasses.field(default=None, compare=False,
                                                      repr=False)

  def settings(self) -> dict:
    """The fields that are set, as plain values (no factors): the manifest's record."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name != "factors" and value is not None:
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def last(specs: tuple[LeafSpec, ...], name: str) -> Any:
  """The last value of field ``name`` that a spec in ``specs`` sets, else ``None``.

  >>> last((LeafSpec("prune", sparsity=0.5), LeafSpec("quantize", bits=8)), "bits")
  8
  """
  for spec in reversed(specs):
    value = getattr(spec, name)
    if value is not None:
      return value
  return None
