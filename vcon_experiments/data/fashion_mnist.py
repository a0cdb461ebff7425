"""TFDS builder ``fashion_mnist_local``: Fashion-MNIST from local IDX files.

The IDX files come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) or from any directory holding the four
standard files (gzipped or not). Features are a ``Tensor`` (not ``Image``), so
preparing and reading need no TensorFlow; records are written as array_record.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vcon_experiments.data import locations
from vcon_experiments.data._base import LocalBuilder

#: Class names of Fashion-MNIST, in label order.
CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)

#: IDX file stem for each (split, kind).
_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_IMAGE_MAGIC = 2051
_LABEL_MAGIC = 2049


def find_idx_file(source_dir: Path, split: str, kind: str) -> Path:
  """Returns the path of one IDX file, gzipped or not.

  Args:
    source_dir: Directory holding the IDX files.
    split: ``"train"`` or ``"test"``.
    kind: ``"images"`` or ``"labels"``.

  Raises:
    FileNotFoundError: If neither ``<stem>.gz`` nor ``<stem>`` exists.
  """
  stem = _STEMS[(split, kind)]
  for name in (stem + ".gz", stem):
    path = Path(source_dir) / name
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"Fashion-MNIST IDX files not found in {source_dir} (looked for "
      f"{stem}.gz or {stem}); install the Debian package "
      "'dataset-fashion-mnist' (sudo apt-get install dataset-fashion-mnist) "
      "or pass source_dir=... naming a directory with the four IDX files."
  )


def read_idx(path: Path) -> np.ndarray:
  """Reads an IDX image (``N×28×28``) or label (``N``) file as uint8.

  Args:
    path: IDX file, gzipped if its name ends in ``.gz``.

  Raises:
    ValueError: If the magic number or the size does not match the header.
  """
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  magic, count = struct.unpack(">II", data[:8])
  if magic == _IMAGE_MAGIC:
    rows, cols = struct.unpack(">II", data[8:16])
    shape, offset = (count, rows, cols), 16
  elif magic == _LABEL_MAGIC:
    shape, offset = (count,), 8
  else:
    raise ValueError(
        f"{path}: bad IDX magic number {magic}; expected {_IMAGE_MAGIC} "
        f"(images) or {_LABEL_MAGIC} (labels)."
    )
  expected = int(np.prod(shape))
  if len(data) - offset != expected:
    raise ValueError(
        f"{path}: header says {shape} ({expected} bytes) but the file holds "
        f"{len(data) - offset} bytes of data."
    )
  return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def read_split(source_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split as ``(images N×28×28×1 uint8, labels N uint8)``."""
  images = read_idx(find_idx_file(source_dir, split, "images"))
  labels = read_idx(find_idx_file(source_dir, split, "labels"))
  if len(images) != len(labels):
    raise ValueError(
        f"Fashion-MNIST {split} split in {source_dir}: {len(images)} images "
        f"but {len(labels)} labels."
    )
  return images[..., None], labels


class FashionMnistLocal(LocalBuilder):
  """Fashion-MNIST (60000 train / 10000 test 28×28 greyscale) from IDX files."""

  DEFAULT_SOURCE_DIR = locations.FASHION_MNIST_SOURCE_DIR
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release, from Debian dataset-fashion-mnist."}

  def check_source(self) -> None:
    """Raises ``FileNotFoundError`` if any of the four IDX files is missing."""
    for split in ("train", "test"):
      for kind in ("images", "labels"):
        find_idx_file(self.source_dir, split, kind)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST read from local IDX files (no download).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(
                shape=(28, 28, 1), dtype=np.uint8, encoding="bytes"
            ),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # Nothing is downloaded.
    self.check_source()
    return {
        "train": self._generate_examples("train"),
        "test": self._generate_examples("test"),
    }

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    images, labels = read_split(self.source_dir, split)
    for i in range(len(labels)):
      yield i, {"image": images[i], "label": int(labels[i])}
