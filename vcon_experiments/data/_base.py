"""Common base class of the local (no-download) TFDS builders."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds


class LocalBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
  """A ``GeneratorBasedBuilder`` that reads local files and downloads nothing.

  Subclasses set ``DEFAULT_SOURCE_DIR`` and implement ``check_source``.

  TFDS 4.9.10 computes ``code_path`` (to look for a ``checksums.tsv``) with an
  ``isinstance`` check on ``importlib_resources.abc.Traversable``, a package it
  only declares as a dependency for Python < 3.9; ``download_and_prepare``
  then fails with ``ModuleNotFoundError: No module named
  'importlib_resources'`` for any builder defined inside a package
  (tensorflow/datasets#11212). Our builders download nothing and have no
  checksums file, so ``code_path = None`` skips that look-up entirely.

  Being abstract, this class is not added to the TFDS registry.
  """

  code_path = None  # See the class docstring.
  DEFAULT_SOURCE_DIR: ClassVar[Path]

  def __init__(self, *, source_dir: str | Path | None = None, **kwargs: Any):
    """Initialises the builder.

    Args:
      source_dir: Directory holding the raw files; defaults to
        ``DEFAULT_SOURCE_DIR`` (where the Debian package installs them).
        Only read by ``download_and_prepare``.
      **kwargs: Passed to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``,
        ``file_format``, ...). ``file_format`` defaults to ``array_record``.
    """
    self.source_dir = Path(source_dir or self.DEFAULT_SOURCE_DIR)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @abc.abstractmethod
  def check_source(self) -> None:
    """Raises ``FileNotFoundError`` naming the Debian package if files lack."""
