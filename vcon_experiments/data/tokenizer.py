"""Text tokenizers: byte-level (default, no vocabulary) and word-level.

Both map text to fixed-length int32 id arrays with ``0`` as padding,
truncating longer texts. The byte tokenizer's default ``max_length=128``
holds 88.6% of WordNet glosses whole (median 66 UTF-8 bytes, 90th
percentile 134); what is cut is almost always the trailing quoted usage
examples, not the definition.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

PAD_ID = 0
DEFAULT_MAX_LENGTH = 128


class Tokenizer(Protocol):
  """What the loader needs from a tokenizer."""

  vocab_size: int
  max_length: int

  def encode_batch(self, texts: Sequence[str | bytes]) -> np.ndarray:
    """Returns an int32 array of shape ``(len(texts), max_length)``."""
    ...


def _as_bytes(text: str | bytes) -> bytes:
  return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _check_max_length(max_length: int) -> None:
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}.")


class ByteTokenizer:
  """UTF-8 bytes shifted by one: id = byte + 1, 0 = padding.

  Attributes:
    max_length: Length of every encoded sequence.
    vocab_size: 257 (padding plus 256 byte values).
  """

  vocab_size = 257

  def __init__(self, max_length: int = DEFAULT_MAX_LENGTH):
    """Initialises the tokenizer.

    Args:
      max_length: Sequences are truncated or padded to this many ids.
    """
    _check_max_length(max_length)
    self.max_length = max_length

  def encode(self, text: str | bytes) -> np.ndarray:
    """Encodes one text to ``(max_length,)`` int32 ids."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str | bytes]) -> np.ndarray:
    """Encodes texts to ``(len(texts), max_length)`` int32 ids."""
    out = np.zeros((len(texts), self.max_length), dtype=np.int32)
    for row, text in enumerate(texts):
      data = np.frombuffer(_as_bytes(text)[:self.max_length], dtype=np.uint8)
      out[row, :len(data)] = data.astype(np.int32) + 1
    return out

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes ids back to text, dropping padding (invalid UTF-8 replaced)."""
    data = bytes(int(i) - 1 for i in ids if int(i) != PAD_ID)
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return f"ByteTokenizer(max_length={self.max_length})"


_WORD_RE = re.compile(r"\w+|[^\w\s]")


def split_words(text: str | bytes) -> list[str]:
  """Lower-cases and splits text into words and punctuation marks."""
  if isinstance(text, bytes):
    text = text.decode("utf-8", errors="replace")
  return _WORD_RE.findall(text.lower())


class WordTokenizer:
  """Word-level ids from a vocabulary: 0 = padding, 1 = unknown word.

  Build the vocabulary from the training split only
  (``WordTokenizer.build(train_texts)``) so that no test words leak in.

  Attributes:
    vocab: Words in id order, starting with ``"<pad>"`` and ``"<unk>"``.
    max_length: Length of every encoded sequence.
    vocab_size: ``len(vocab)``.
  """

  UNK_ID = 1

  def __init__(self, vocab: Sequence[str], max_length: int = 32):
    """Initialises the tokenizer from a vocabulary.

    Args:
      vocab: Words in id order; ``vocab[0]`` must be ``"<pad>"`` and
        ``vocab[1]`` ``"<unk>"``.
      max_length: Sequences are truncated or padded to this many ids.
    """
    _check_max_length(max_length)
    if list(vocab[:2]) != ["<pad>", "<unk>"]:
      raise ValueError(
          "vocab must start with '<pad>', '<unk>'; got "
          f"{list(vocab[:2])}. Use WordTokenizer.build(texts) to make one.")
    self.vocab = list(vocab)
    self.max_length = max_length
    self.vocab_size = len(self.vocab)
    self._ids = {word: i for i, word in enumerate(self.vocab)}

  @classmethod
  def build(cls, texts: Iterable[str | bytes], *, max_vocab: int = 20000,
            min_count: int = 2, max_length: int = 32) -> "WordTokenizer":
    """Builds the vocabulary from texts (use the training split only).

    Args:
      texts: Training texts.
      max_vocab: Largest vocabulary size, including padding and unknown.
      min_count: Words seen fewer times are left out (mapped to unknown).
      max_length: Sequences are truncated or padded to this many ids.

    Returns:
      The tokenizer; ties in frequency are broken alphabetically, so the
      vocabulary depends only on the multiset of texts.
    """
    if max_vocab < 3:
      raise ValueError(f"max_vocab must be >= 3, got {max_vocab}.")
    counts = collections.Counter(w for t in texts for w in split_words(t))
    ranked = sorted((w for w, c in counts.items() if c >= min_count),
                    key=lambda w: (-counts[w], w))
    return cls(["<pad>", "<unk>"] + ranked[:max_vocab - 2],
               max_length=max_length)

  def encode(self, text: str | bytes) -> np.ndarray:
    """Encodes one text to ``(max_length,)`` int32 ids."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str | bytes]) -> np.ndarray:
    """Encodes texts to ``(len(texts), max_length)`` int32 ids."""
    out = np.zeros((len(texts), self.max_length), dtype=np.int32)
    for row, text in enumerate(texts):
      ids = [self._ids.get(w, self.UNK_ID)
             for w in split_words(text)[:self.max_length]]
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes ids to space-separated words, dropping padding."""
    return " ".join(self.vocab[int(i)] for i in ids if int(i) != PAD_ID)

  def __repr__(self) -> str:
    return (f"WordTokenizer(vocab_size={self.vocab_size}, "
            f"max_length={self.max_length})")
