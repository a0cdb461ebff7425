"""Which datasets the loader knows, and what their examples look like."""

from __future__ import annotations

import dataclasses
from typing import Literal

from vcon_experiments.data import fashion_mnist, wordnet
from vcon_experiments.data.tokenizer import DEFAULT_MAX_LENGTH, ByteTokenizer

Kind = Literal["image", "text"]

#: Prefix selecting a standard TFDS dataset, e.g. ``"tfds:fashion_mnist"``.
TFDS_PREFIX = "tfds:"

#: Side of the square crop standard variable-size image datasets are
#: resized to (ImageNet).
DEFAULT_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model needs to know about a dataset.

  Attributes:
    name: Canonical name (``"fashion_mnist"``, ``"wordnet"``,
      ``"tfds:cifar10"``, ...).
    kind: ``"image"`` (inputs float32 NHWC in [0, 1]) or ``"text"`` (inputs
      int32 token ids).
    num_classes: Number of labels; labels are ``0..num_classes-1``.
    input_shape: Shape of one example's ``inputs`` after conversion.
    vocab_size: Token vocabulary size for text, ``None`` for images.
    tfds_name: Name of the TFDS builder that stores the data.
    input_key: Feature key holding the inputs in TFDS examples.
    label_key: Feature key holding the label in TFDS examples.
    splits: Known split names (for standard datasets, the usual ones).
    local: Whether we build it ourselves from Debian package files.
  """

  name: str
  kind: Kind
  num_classes: int
  input_shape: tuple[int, ...]
  vocab_size: int | None
  tfds_name: str
  input_key: str
  label_key: str
  splits: tuple[str, ...]
  local: bool


def _image(name: str, tfds_name: str, num_classes: int,
           shape: tuple[int, int, int], splits: tuple[str, ...],
           local: bool = False) -> DatasetInfo:
  return DatasetInfo(name, "image", num_classes, shape, None, tfds_name,
                     "image", "label", splits, local)


def _text(name: str, tfds_name: str, num_classes: int, input_key: str,
          splits: tuple[str, ...], local: bool = False) -> DatasetInfo:
  tok = ByteTokenizer(DEFAULT_MAX_LENGTH)
  return DatasetInfo(name, "text", num_classes, (tok.max_length,),
                     tok.vocab_size, tfds_name, input_key, "label", splits,
                     local)


_TRAIN_TEST = ("train", "test")
_CATALOG: dict[str, DatasetInfo] = {
    info.name: info for info in (
        _image("fashion_mnist", fashion_mnist.FashionMnistLocal.name, 10,
               (28, 28, 1), _TRAIN_TEST, local=True),
        _text("wordnet", wordnet.WordnetSupersenses.name,
              len(wordnet.LEXNAMES), "text",
              tuple(wordnet.SPLIT_PERCENT), local=True),
        _image("tfds:mnist", "mnist", 10, (28, 28, 1), _TRAIN_TEST),
        _image("tfds:fashion_mnist", "fashion_mnist", 10, (28, 28, 1),
               _TRAIN_TEST),
        _image("tfds:cifar10", "cifar10", 10, (32, 32, 3), _TRAIN_TEST),
        _image("tfds:cifar100", "cifar100", 100, (32, 32, 3), _TRAIN_TEST),
        _image("tfds:imagenet2012", "imagenet2012", 1000,
               (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3),
               ("train", "validation")),
        # The GLUE test split has no labels (all -1).
        _text("tfds:glue/sst2", "glue/sst2", 2, "sentence",
              ("train", "validation", "test")),
    )
}
#: Short names accepted for the entries above.
_ALIASES = {
    "wordnet_supersenses": "wordnet",
    "fashion_mnist_local": "fashion_mnist",
    "mnist": "tfds:mnist",
    "cifar10": "tfds:cifar10",
    "cifar100": "tfds:cifar100",
    "imagenet2012": "tfds:imagenet2012",
    "glue/sst2": "tfds:glue/sst2",
    "sst2": "tfds:glue/sst2",
}


def names() -> tuple[str, ...]:
  """Returns every accepted dataset name (canonical names and aliases)."""
  return tuple(sorted(set(_CATALOG) | set(_ALIASES)))


def canonical_name(name: str) -> str:
  """Resolves an alias (``"cifar10"``) to its canonical name.

  Raises:
    ValueError: If the name is unknown.
  """
  name = _ALIASES.get(name, name)
  if name not in _CATALOG:
    raise ValueError(
        f"Unknown dataset {name!r}; allowed: {', '.join(names())}. "
        "'fashion_mnist' is our local build from the Debian package; use "
        "'tfds:fashion_mnist' for the standard TFDS one."
    )
  return name


def dataset_info(name: str, *, tokenizer: object | None = None,
                 image_size: int | None = None) -> DatasetInfo:
  """Returns the ``DatasetInfo`` of a dataset name or alias.

  Args:
    name: Dataset name, see ``names()``.
    tokenizer: For text datasets, the tokenizer that will be used (anything
      with ``vocab_size`` and ``max_length``); defaults to
      ``ByteTokenizer(128)``.
    image_size: For variable-size image datasets (ImageNet), the side of the
      square crop; defaults to 224.

  Raises:
    ValueError: If the name is unknown or an option does not apply.
  """
  info = _CATALOG[canonical_name(name)]
  if tokenizer is not None:
    if info.kind != "text":
      raise ValueError(f"tokenizer= only applies to text datasets, not "
                       f"{info.kind} dataset {info.name!r}.")
    info = dataclasses.replace(info, input_shape=(tokenizer.max_length,),
                               vocab_size=tokenizer.vocab_size)
  if image_size is not None:
    if info.name != "tfds:imagenet2012":
      raise ValueError(f"image_size= only applies to variable-size image "
                       f"datasets (tfds:imagenet2012), not {info.name!r}.")
    info = dataclasses.replace(info, input_shape=(image_size, image_size, 3))
  return info
