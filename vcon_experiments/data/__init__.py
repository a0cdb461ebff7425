"""Datasets for the experiments, through TensorFlow Datasets without TF.

Local datasets, built from Debian package files into array_record on first
use (``$VCON_JAX_DATA_DIR`` or ``~/.cache/vcon_jax/tfds``):

* ``"fashion_mnist"``: TFDS builder ``fashion_mnist_local`` from
  ``dataset-fashion-mnist`` (60000 train / 10000 test, 28×28×1, 10 classes).
* ``"wordnet"``: TFDS builder ``wordnet_supersenses`` from ``wordnet-base``
  (WordNet 3.0 glosses -> 45 supersenses, train/validation/test 80/10/10).

Standard TFDS datasets, read if already prepared (never downloaded):
``"tfds:mnist"``, ``"tfds:fashion_mnist"``, ``"tfds:cifar10"``,
``"tfds:cifar100"``, ``"tfds:imagenet2012"``, ``"tfds:glue/sst2"``.

Example::

  from vcon_experiments import data
  train = data.load("fashion_mnist", "train")
  for batch in data.batches(train, 128, seed=0, epoch=0):
    batch["inputs"]  # (128, 28, 28, 1) float32 in [0, 1]
    batch["labels"]  # (128,) int32
"""

from vcon_experiments.data.catalog import DatasetInfo, dataset_info, names
from vcon_experiments.data.fashion_mnist import FashionMnistLocal
from vcon_experiments.data.loader import as_arrays, batches, check_available, load, prepare
from vcon_experiments.data.source import Source
from vcon_experiments.data.tokenizer import ByteTokenizer, Tokenizer, WordTokenizer
from vcon_experiments.data.wordnet import LEXNAMES, WordnetSupersenses

__all__ = [
    "ByteTokenizer",
    "DatasetInfo",
    "FashionMnistLocal",
    "LEXNAMES",
    "Source",
    "Tokenizer",
    "WordTokenizer",
    "WordnetSupersenses",
    "as_arrays",
    "batches",
    "check_available",
    "dataset_info",
    "load",
    "names",
    "prepare",
]
