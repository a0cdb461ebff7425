"""TFDS builder ``wordnet_supersenses``: WordNet gloss -> supersense.

Reads the WordNet 3.0 database of the Debian package ``wordnet-base``
(``/usr/share/wordnet/data.{noun,verb,adj,adv}``) or any directory holding
those four files. Each synset is one example: its gloss (the text after
``|``: definition plus any quoted examples) and its lexicographer file
("supersense", e.g. ``noun.animal``), one of 45 classes. Splits are
train/validation/test, 80/10/10, by a hash of the synset id so they are
deterministic and independent of file order. No TensorFlow is needed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from vcon_experiments.data import locations
from vcon_experiments.data._base import LocalBuilder

#: The 45 lexicographer file names, indexed by ``lex_filenum`` (WordNet 3.0
#: ``lexnames(5WN)``; the ``lexnames`` file itself is not shipped by Debian).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act",
    "noun.animal", "noun.artifact", "noun.attribute", "noun.body",
    "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape",
    "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion",
    "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
)

#: Data file suffix -> one-letter part of speech used in synset ids.
POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}

#: Percent of synsets in each split; a synset's bucket is ``hash % 100``.
SPLIT_PERCENT = {"train": 80, "validation": 10, "test": 10}


def split_of(synset_id: str) -> str:
  """Returns the split of a synset id such as ``"n00001740"``.

  The split depends only on the id (first 8 bytes of its SHA-1), so it is
  stable across machines, Python versions and file orders.
  """
  bucket = int.from_bytes(
      hashlib.sha1(synset_id.encode()).digest()[:8], "big") % 100
  upper = 0
  for split, percent in SPLIT_PERCENT.items():
    upper += percent
    if bucket < upper:
      return split
  raise AssertionError("SPLIT_PERCENT must sum to 100")


def parse_line(line: str, pos: str) -> tuple[str, int, str] | None:
  """Parses one line of a ``data.*`` file.

  Args:
    line: The line. License header lines start with two spaces.
    pos: One-letter part of speech of the file (``n``, ``v``, ``a``, ``r``).

  Returns:
    ``(synset_id, lex_filenum, gloss)`` or ``None`` for a header line.

  Raises:
    ValueError: If a synset line is malformed.
  """
  if line.startswith("  ") or not line.strip():
    return None
  head, sep, gloss = line.partition(" | ")
  fields = head.split(" ", 2)
  if not sep or len(fields) < 3 or not fields[1].isdigit():
    raise ValueError(f"Malformed WordNet data line: {line[:80]!r}")
  lex_filenum = int(fields[1])
  if not 0 <= lex_filenum < len(LEXNAMES):
    raise ValueError(
        f"lex_filenum {lex_filenum} out of range 0..{len(LEXNAMES) - 1} in "
        f"line {line[:80]!r}"
    )
  return f"{pos}{fields[0]}", lex_filenum, gloss.strip()


def data_files(source_dir: Path) -> dict[str, Path]:
  """Returns ``{pos letter: path}`` of the four ``data.*`` files.

  Raises:
    FileNotFoundError: If any of them is missing.
  """
  files = {pos: Path(source_dir) / f"data.{name}"
           for name, pos in POS_FILES.items()}
  missing = [p.name for p in files.values() if not p.is_file()]
  if missing:
    raise FileNotFoundError(
        f"WordNet data files {missing} not found in {source_dir}; install "
        "the Debian package 'wordnet-base' (sudo apt-get install "
        "wordnet-base) or pass source_dir=... naming a directory with "
        "data.noun, data.verb, data.adj and data.adv."
    )
  return files


def read_synsets(source_dir: Path) -> Iterator[tuple[str, int, str]]:
  """Yields ``(synset_id, lex_filenum, gloss)`` for every synset."""
  for pos, path in data_files(source_dir).items():
    with open(path, encoding="utf-8") as f:
      for line in f:
        parsed = parse_line(line, pos)
        if parsed is not None:
          yield parsed


class WordnetSupersenses(LocalBuilder):
  """WordNet 3.0 glosses labelled with their 45 supersenses."""

  DEFAULT_SOURCE_DIR = locations.WORDNET_SOURCE_DIR
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release, from Debian wordnet-base."}

  def check_source(self) -> None:
    """Raises ``FileNotFoundError`` if any ``data.*`` file is missing."""
    data_files(self.source_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "WordNet 3.0 synset glosses with their lexicographer file "
            "(supersense) as label."
        ),
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=LEXNAMES),
            "id": tfds.features.Text(),
        }),
        supervised_keys=("text", "label"),
        homepage="https://wordnet.princeton.edu/",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # Nothing is downloaded.
    self.check_source()
    by_split: dict[str, list[tuple[str, int, str]]] = {
        split: [] for split in SPLIT_PERCENT}
    for synset in read_synsets(self.source_dir):  # Parse the files once.
      by_split[split_of(synset[0])].append(synset)
    return {split: self._generate_examples(synsets)
            for split, synsets in by_split.items()}

  def _generate_examples(
      self, synsets: list[tuple[str, int, str]]
  ) -> Iterator[tuple[str, dict]]:
    for synset_id, lex_filenum, gloss in synsets:
      yield synset_id, {"text": gloss, "label": lex_filenum, "id": synset_id}
