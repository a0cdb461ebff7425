"""``Source``: random access to one split, yielding model-ready arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vcon_experiments.data import convert
from vcon_experiments.data.catalog import DatasetInfo
from vcon_experiments.data.tokenizer import Tokenizer


def fetch(records: Any, indices: Sequence[int]) -> list[dict[str, Any]]:
  """Reads several records of a TFDS data source at once.

  ``__getitems__`` is ~9× faster than one ``__getitem__`` per record on
  array_record. ``tfds.testing.mock_data`` (TFDS 4.9.10) patches
  ``__getitems__`` with a function missing its ``self`` argument, which
  raises ``TypeError``; we then fall back to one record at a time.
  """
  indices = [int(i) for i in indices]
  getitems = getattr(records, "__getitems__", None)
  if getitems is not None:
    try:
      return list(getitems(indices))
    except TypeError:
      pass
  return [records[i] for i in indices]


class Source:
  """One split of a dataset: ``len()``, indexing and batch reads.

  Items are dicts ``{"inputs": ..., "labels": ...}``: images as float32
  ``H×W×C`` in [0, 1], texts as int32 token ids, labels as int32.

  Attributes:
    info: The dataset's ``DatasetInfo``.
    split: Split name.
    records: The underlying TFDS data source (decoded feature dicts).
    tokenizer: Tokenizer for text datasets, ``None`` for images.
  """

  def __init__(self, info: DatasetInfo, split: str, records: Any,
               tokenizer: Tokenizer | None = None):
    if info.kind == "text" and tokenizer is None:
      raise ValueError(f"Text dataset {info.name!r} needs a tokenizer.")
    self.info = info
    self.split = split
    self.records = records
    self.tokenizer = tokenizer

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {n} examples.")
    batch = self.get_batch([index % n])
    return {key: value[0] for key, value in batch.items()}

  def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Reads and converts the examples at ``indices``.

    Returns:
      ``{"inputs": (B, *input_shape), "labels": (B,) int32}``.
    """
    examples = fetch(self.records, indices)
    raw_inputs = [ex[self.info.input_key] for ex in examples]
    if self.info.kind == "image":
      inputs = convert.images_to_float(raw_inputs, self.info.input_shape)
    else:
      inputs = convert.texts_to_ids(raw_inputs, self.tokenizer)
    labels = convert.labels_to_int32([ex[self.info.label_key]
                                      for ex in examples])
    return {"inputs": inputs, "labels": labels}

  def __repr__(self) -> str:
    return (f"Source(name={self.info.name!r}, split={self.split!r}, "
            f"len={len(self)}, kind={self.info.kind!r})")
