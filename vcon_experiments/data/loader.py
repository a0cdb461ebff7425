"""Opening splits by name, and iterating over them in batches."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vcon_experiments.data import catalog, fashion_mnist, locations, wordnet
from vcon_experiments.data.source import Source
from vcon_experiments.data.tokenizer import ByteTokenizer, Tokenizer

_LOCAL_BUILDERS = {
    "fashion_mnist": fashion_mnist.FashionMnistLocal,
    "wordnet": wordnet.WordnetSupersenses,
}
def prepare(name: str, *, data_dir: str | Path | None = None,
            source_dir: str | Path | None = None) -> tfds.core.DatasetBuilder:
  """Builds a local dataset into ``data_dir`` unless already there.

  Args:
    name: ``"fashion_mnist"`` or ``"wordnet"`` (or their builder names).
    data_dir: Where prepared datasets live; defaults to
      ``$VCON_JAX_DATA_DIR`` or ``~/.cache/vcon_jax/tfds``.
    source_dir: Directory with the raw files; defaults to where the Debian
      package installs them. Only read when the dataset is not prepared yet.

  Returns:
    The prepared builder (``builder.as_data_source()`` reads it).

  Raises:
    ValueError: If ``name`` is not a local dataset.
    FileNotFoundError: If the raw files are missing (names the Debian
      package to install).
  """
  info = catalog.dataset_info(name)
  if not info.local:
    raise ValueError(
        f"prepare() builds only our local datasets "
        f"({', '.join(_LOCAL_BUILDERS)}); {info.name!r} is a standard TFDS "
        "dataset: prepare it with TFDS itself (tfds build / "
        "tfds.builder(...).download_and_prepare()).")
  builder_cls = _LOCAL_BUILDERS[info.name]
  builder = builder_cls(
      data_dir=str(data_dir or locations.default_data_dir()),
      source_dir=source_dir)
  # Same test as `builder.is_prepared()`, which logs a warning when false.
  if not (Path(builder.data_dir) / "dataset_info.json").exists():
    builder.check_source()  # Clear error before TFDS writes anything.
    # Sharded runs (`--shard i/N`) start N processes that may all find the dataset
    # missing: one builds it, the others wait on the lock and then find it built.
    with _build_lock(Path(builder.data_dir).parent):
      if not (Path(builder.data_dir) / "dataset_info.json").exists():
        builder.download_and_prepare()
        return builder
    # Another process built it while this one waited: this builder read the empty
    # directory when it was made (no splits), so open the built dataset afresh.
    builder = builder_cls(data_dir=str(data_dir or locations.default_data_dir()),
                          source_dir=source_dir)
  return builder


@contextlib.contextmanager
def _build_lock(directory: Path):
  """An exclusive lock (``fcntl.flock``) on ``directory/.build.lock``, held while building."""
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / ".build.lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def check_available(name: str, *, data_dir: str | Path | None = None,
                    source_dir: str | Path | None = None) -> None:
  """Raises a one-line error unless ``name`` can be read here, writing nothing.

  A local dataset needs its prepared copy or its raw files (the Debian package); a
  standard TFDS dataset must already be prepared (nothing is downloaded).
  """
  info = catalog.dataset_info(name)
  if info.local:
    builder = _LOCAL_BUILDERS[info.name](
        data_dir=str(data_dir or locations.default_data_dir()), source_dir=source_dir)
    if not (Path(builder.data_dir) / "dataset_info.json").exists():
      builder.check_source()
  elif not _is_prepared(info.tfds_name, None if data_dir is None else str(data_dir)):
    where = data_dir or "the TFDS default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    raise FileNotFoundError(
        f"dataset {name!r} is not prepared in {where} and is never downloaded here; "
        f"prepare it with TFDS first (tfds build {info.tfds_name} "
        f"--file_format=array_record) or pass --data-dir pointing at a prepared copy.")


def _is_prepared(tfds_name: str, data_dir: str | None) -> bool:
  try:
    return tfds.builder(tfds_name, data_dir=data_dir).is_prepared()
  except Exception:  # pylint: disable=broad-except  Unknown / unreadable.
    return False


def _standard_data_source(info: catalog.DatasetInfo, split: str,
                          data_dir: str | Path | None) -> Any:
  """Opens a prepared standard TFDS dataset (never downloads)."""
  if info.tfds_name.startswith("glue/"):
    # Without TensorFlow, `import tensorflow_datasets` skips the legacy
    # `tensorflow_datasets.text` package, so GLUE is not registered.
    import tensorflow_datasets.text.glue  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  data_dir = None if data_dir is None else str(data_dir)
  try:
    return tfds.data_source(info.tfds_name, split=split, data_dir=data_dir,
                            download=False)
  except (AssertionError, FileNotFoundError, NotImplementedError,
          tfds.core.registered.DatasetNotFoundError) as e:
    # Unprepared datasets surface as NotImplementedError ("Random access
    # data source for file format FileFormat.TFRECORD is not supported").
    where = data_dir or ("the TFDS default data_dir ($TFDS_DATA_DIR or "
                         "~/tensorflow_datasets)")
    if _is_prepared(info.tfds_name, data_dir):
      raise ValueError(
          f"Standard TFDS dataset {info.tfds_name!r} in {where} is not "
          "stored as array_record, which random access needs; re-prepare "
          "it with file_format='array_record' (or convert it with TFDS's "
          f"convert_format tool). TFDS said: {e}") from e
    raise FileNotFoundError(
        f"Standard TFDS dataset {info.tfds_name!r} (split {split!r}) is not "
        f"prepared in {where}; it is never downloaded here. Prepare it with "
        f"TFDS first (e.g. `tfds build {info.tfds_name} "
        "--file_format=array_record`) or pass data_dir=... pointing at a "
        f"prepared copy. TFDS said: {e}") from e


def load(name: str, split: str, *, data_dir: str | Path | None = None,
         source_dir: str | Path | None = None,
         tokenizer: Tokenizer | None = None,
         image_size: int | None = None) -> Source:
  """Opens one split of a dataset for random access.

  Args:
    name: ``"fashion_mnist"`` and ``"wordnet"`` (built locally from Debian
      package files, prepared on first use), or a standard TFDS dataset
      prepared beforehand: ``"tfds:mnist"``, ``"tfds:fashion_mnist"``,
      ``"tfds:cifar10"``, ``"tfds:cifar100"``, ``"tfds:imagenet2012"``,
      ``"tfds:glue/sst2"`` (the prefix may be left out except for
      fashion_mnist). Standard datasets are never downloaded.
    split: Split name, e.g. ``"train"``; TFDS slicing (``"train[:10%]"``)
      works too.
    data_dir: Prepared data directory. Local datasets default to
      ``$VCON_JAX_DATA_DIR`` or ``~/.cache/vcon_jax/tfds``; standard ones
      to TFDS's default.
    source_dir: Raw files of a local dataset (see ``prepare``).
    tokenizer: Text datasets only; defaults to ``ByteTokenizer(128)``.
    image_size: ImageNet only: side of the center crop (default 224).

  Returns:
    A ``Source`` whose items are ``{"inputs", "labels"}`` numpy arrays.

  Raises:
    ValueError: Unknown name or split, or an option that does not apply.
    FileNotFoundError: Missing raw files or unprepared standard dataset.
  """
  info = catalog.dataset_info(name, tokenizer=tokenizer, image_size=image_size)
  if info.kind == "text" and tokenizer is None:
    tokenizer = ByteTokenizer()
  if info.local:
    for part in split.split("+"):  # TFDS syntax: "train[:10%]+test".
      if part.split("[", 1)[0].strip() not in info.splits:
        raise ValueError(f"Unknown split {split!r} for {info.name!r}; "
                         f"allowed: {', '.join(info.splits)} (with TFDS "
                         "slicing such as 'train[:10%]').")
    builder = prepare(info.name, data_dir=data_dir, source_dir=source_dir)
    records = builder.as_data_source(split=split)
  else:
    if source_dir is not None:
      raise ValueError(
          f"source_dir= only applies to the local datasets "
          f"({', '.join(_LOCAL_BUILDERS)}), not {info.name!r}.")
    records = _standard_data_source(info, split, data_dir)
  return Source(info, split, records, tokenizer)


def batches(source: Source, batch_size: int, *, seed: int,
            shuffle: bool = True, drop_remainder: bool = True,
            epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Iterates once over a split in batches.

  The order is a permutation drawn from ``np.random.default_rng((seed,
  epoch))``, so it is the same on every run for the same ``(seed, epoch)``
  and differs between epochs. Call once per epoch with ``epoch=0, 1, ...``.

  Args:
    source: From ``load``.
    batch_size: Examples per batch.
    seed: Shuffling seed.
    shuffle: If False, examples come in stored order.
    drop_remainder: Drop the last batch if smaller than ``batch_size``.
    epoch: Epoch number, mixed into the shuffling seed.

  Yields:
    ``{"inputs": (B, *input_shape), "labels": (B,) int32}``.

  Raises:
    ValueError: If ``batch_size`` < 1 or ``epoch`` < 0.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if epoch < 0:
    raise ValueError(f"epoch must be >= 0, got {epoch}.")
  n = len(source)
  if shuffle:
    order = np.random.default_rng((seed, epoch)).permutation(n)
  else:
    order = np.arange(n)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    yield source.get_batch(order[start:start + batch_size])


def as_arrays(name: str | Source, split: str | None = None, *,
              data_dir: str | Path | None = None,
              source_dir: str | Path | None = None,
              tokenizer: Tokenizer | None = None,
              image_size: int | None = None,
              limit: int | None = None,
              chunk_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole split (or its first ``limit`` examples) into memory.

  The stored order is TFDS's (a fixed shuffle by example key), so the
  first ``limit`` examples are a fixed, roughly class-balanced subset.

  Args:
    name: Dataset name (see ``load``) or an already loaded ``Source``.
    split: Split name; required with a dataset name.
    data_dir: See ``load``.
    source_dir: See ``load``.
    tokenizer: See ``load``.
    image_size: See ``load``.
    limit: Read at most this many examples.
    chunk_size: Examples read per batch read (memory/speed trade-off).

  Returns:
    ``(inputs, labels)``: ``(N, *input_shape)`` float32 images or int32
    ids, and ``(N,)`` int32 labels.
  """
  if isinstance(name, Source):
    source = name
  else:
    if split is None:
      raise ValueError("as_arrays(name, split): split is required.")
    source = load(name, split, data_dir=data_dir, source_dir=source_dir,
                  tokenizer=tokenizer, image_size=image_size)
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}.")
  n = len(source) if limit is None else min(limit, len(source))
  chunks = [source.get_batch(range(i, min(i + chunk_size, n)))
            for i in range(0, n, chunk_size)]
  if not chunks:
    empty = np.zeros((0, *source.info.input_shape),
                     np.float32 if source.info.kind == "image" else np.int32)
    return empty, np.zeros((0,), np.int32)
  return (np.concatenate([c["inputs"] for c in chunks]),
          np.concatenate([c["labels"] for c in chunks]))
