"""Tests of vcon_experiments.data: local TFDS builders, tokenizers and the loader.

The Fashion-MNIST builder is prepared once per session in full (a few
seconds); the WordNet builder on a real slice of the Debian files. Tests that
need the Debian packages are skipped when they are missing (install them
with scripts/install_system_deps.sh).
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vcon_experiments import data
from vcon_experiments.data import catalog, fashion_mnist, locations, source, wordnet

FM_DIR = locations.FASHION_MNIST_SOURCE_DIR
WN_DIR = locations.WORDNET_SOURCE_DIR
needs_fm = pytest.mark.skipif(
    not (FM_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed")
needs_wn = pytest.mark.skipif(
    not (WN_DIR / "data.noun").exists(),
    reason="Debian package wordnet-base not installed")

WN_SLICE_LINES = 600  # Synset lines kept per data.* file.
UTF8_LINE = '99999999 05 n 01 café 0 000 | a naïve “café” animal  \n'


# --------------------------------------------------------------- fixtures --


@pytest.fixture(scope="session")
def fm_data_dir(tmp_path_factory) -> Path:
  """Full Fashion-MNIST prepared once per session."""
  if not (FM_DIR / "train-images-idx3-ubyte.gz").exists():
    pytest.skip("Debian package dataset-fashion-mnist not installed")
  data_dir = tmp_path_factory.mktemp("fm_tfds")
  data.prepare("fashion_mnist", data_dir=data_dir)
  return data_dir


def _write_wordnet_slice(out: Path, extra_line: str = "") -> int:
  """Copies header + the first synsets of each data.* file; returns count."""
  out.mkdir(parents=True, exist_ok=True)
  count = 0
  for name in wordnet.POS_FILES:
    kept = []
    with open(WN_DIR / f"data.{name}", encoding="utf-8") as f:
      for line in f:
        is_synset = not line.startswith("  ")
        if is_synset and count_in(kept) >= WN_SLICE_LINES:
          break
        kept.append(line)
    if name == "noun" and extra_line:
      kept.append(extra_line)
    count += count_in(kept)
    (out / f"data.{name}").write_text("".join(kept), encoding="utf-8")
  return count


def count_in(lines: list[str]) -> int:
  return sum(not line.startswith("  ") for line in lines)


@pytest.fixture(scope="session")
def wn_source(tmp_path_factory) -> tuple[Path, int]:
  """A real slice of the WordNet files, plus one UTF-8 gloss."""
  if not (WN_DIR / "data.noun").exists():
    pytest.skip("Debian package wordnet-base not installed")
  out = tmp_path_factory.mktemp("wn_src")
  return out, _write_wordnet_slice(out, UTF8_LINE)


@pytest.fixture(scope="session")
def wn_data_dir(tmp_path_factory, wn_source) -> Path:
  data_dir = tmp_path_factory.mktemp("wn_tfds")
  data.prepare("wordnet", data_dir=data_dir, source_dir=wn_source[0])
  return data_dir


# ---------------------------------------------------------- fashion mnist --


@needs_fm
def test_fashion_mnist_splits_and_features(fm_data_dir):
  builder = data.FashionMnistLocal(data_dir=str(fm_data_dir))
  assert builder.name == "fashion_mnist_local"
  assert builder.info.splits["train"].num_examples == 60000
  assert builder.info.splits["test"].num_examples == 10000
  assert builder.info.features["label"].num_classes == 10
  assert builder.info.file_format.value == "array_record"
  # The standard TFDS entry point finds the registered builder.
  ds = tfds.data_source("fashion_mnist_local", split="test",
                        data_dir=str(fm_data_dir), download=False)
  ex = ds[0]
  assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == np.uint8
  assert 0 <= ex["label"] < 10


@needs_fm
def test_fashion_mnist_content_matches_idx(fm_data_dir):
  images, labels = fashion_mnist.read_split(FM_DIR, "test")
  x, y = data.as_arrays("fashion_mnist", "test", data_dir=fm_data_dir)
  assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
  assert y.shape == (10000,) and y.dtype == np.int32
  assert 0.0 <= x.min() and x.max() <= 1.0
  np.testing.assert_array_equal(np.bincount(y, minlength=10),
                                np.bincount(labels, minlength=10))
  # Same multiset of images: compare exact per-class pixel sums.
  pixels = np.rint(x * 255).astype(np.int64).reshape(len(x), -1).sum(1)
  raw = images.astype(np.int64).reshape(len(images), -1).sum(1)
  for c in range(10):
    assert np.sort(pixels[y == c]).tolist() == np.sort(raw[labels == c]).tolist()


@needs_fm
def test_fashion_mnist_missing_source_is_clear(tmp_path):
  data_dir = tmp_path / "tfds"
  with pytest.raises(FileNotFoundError,
                     match=r"install the Debian package 'dataset-fashion-mnist'"):
    data.load("fashion_mnist", "train", data_dir=data_dir,
              source_dir=tmp_path / "nothing")
  assert not (data_dir / "fashion_mnist_local").exists()


def test_read_idx_rejects_bad_files(tmp_path):
  bad = tmp_path / "bad-idx"
  bad.write_bytes(b"\x00\x00\x08\x04" + b"\x00" * 12)
  with pytest.raises(ValueError, match="bad IDX magic number"):
    fashion_mnist.read_idx(bad)
  short = tmp_path / "short-idx"
  short.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
  with pytest.raises(ValueError, match=r"header says \(5,\)"):
    fashion_mnist.read_idx(short)


# ---------------------------------------------------------------- wordnet --


def test_parse_line():
  assert wordnet.parse_line("  1 This software and database\n", "n") is None
  line = ("00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is "
          "perceived  \n")
  assert wordnet.parse_line(line, "n") == ("n00001740", 3,
                                           "that which is perceived")
  with pytest.raises(ValueError, match="Malformed WordNet data line"):
    wordnet.parse_line("00001740 xx n 01 entity\n", "n")
  with pytest.raises(ValueError, match="out of range"):
    wordnet.parse_line("00001740 45 n 01 entity 0 000 | gloss\n", "n")


def test_lexnames():
  assert len(wordnet.LEXNAMES) == len(set(wordnet.LEXNAMES)) == 45
  assert wordnet.LEXNAMES[0] == "adj.all"
  assert wordnet.LEXNAMES[5] == "noun.animal"
  assert wordnet.LEXNAMES[38] == "verb.motion"
  assert wordnet.LEXNAMES[44] == "adj.ppl"


def test_split_of_is_deterministic_and_balanced():
  ids = [f"n{i:08d}" for i in range(20000)]
  splits = [wordnet.split_of(i) for i in ids]
  assert splits == [wordnet.split_of(i) for i in ids]
  counts = collections.Counter(splits)
  assert abs(counts["train"] / 20000 - 0.8) < 0.02
  assert abs(counts["validation"] / 20000 - 0.1) < 0.02
  # Pinned values: a change in hashing would silently reshuffle the splits.
  assert [wordnet.split_of(i) for i in (
      "n00001740", "v00001740", "a00001740", "r00001740", "n00006269")] == [
          "train", "validation", "test", "validation", "test"]


@needs_wn
def test_wordnet_builder(wn_data_dir, wn_source):
  _, n_synsets = wn_source
  builder = data.WordnetSupersenses(data_dir=str(wn_data_dir))
  assert builder.name == "wordnet_supersenses"
  sizes = {s: builder.info.splits[s].num_examples
           for s in ("train", "validation", "test")}
  assert sum(sizes.values()) == n_synsets
  assert sizes["train"] > sizes["validation"] > 0 and sizes["test"] > 0
  labels = builder.info.features["label"]
  assert labels.num_classes == 45 and labels.names == list(data.LEXNAMES)
  found_utf8 = False
  for split, records in builder.as_data_source().items():
    for ex in source.fetch(records, range(len(records))):
      synset_id = ex["id"].decode()
      assert wordnet.split_of(synset_id) == split
      assert 0 <= ex["label"] < 45 and ex["text"]
      pos = synset_id[0]
      assert wordnet.LEXNAMES[ex["label"]].startswith(
          {"n": "noun.", "v": "verb.", "a": "adj.", "r": "adv."}[pos])
      if synset_id == "n99999999":
        found_utf8 = True
        assert ex["text"].decode("utf-8") == "a naïve “café” animal"
        assert ex["label"] == 5
  assert found_utf8


@needs_wn
def test_wordnet_rebuild_gives_same_splits(tmp_path, wn_source, wn_data_dir):
  other = data.prepare("wordnet", data_dir=tmp_path, source_dir=wn_source[0])
  first = data.WordnetSupersenses(data_dir=str(wn_data_dir)).as_data_source()
  second = other.as_data_source()
  for split in ("train", "validation", "test"):
    ids = lambda ds: [ex["id"] for ex in source.fetch(ds, range(len(ds)))]
    assert ids(first[split]) == ids(second[split])  # Same ids, same order.


@needs_wn
def test_wordnet_loader(wn_data_dir):
  src = data.load("wordnet", "validation", data_dir=wn_data_dir)
  assert src.info.kind == "text" and src.info.num_classes == 45
  item = src[0]
  assert item["inputs"].shape == (128,) and item["inputs"].dtype == np.int32
  assert item["inputs"].max() < 257 and item["inputs"][0] > 0
  tok = data.WordTokenizer.build(
      [ex["text"] for ex in source.fetch(
          data.load("wordnet", "train", data_dir=wn_data_dir).records,
          range(200))], min_count=1, max_length=16)
  x, y = data.as_arrays("wordnet", "validation", data_dir=wn_data_dir,
                        tokenizer=tok, limit=10)
  assert x.shape == (10, 16) and x.dtype == np.int32 and x.max() < tok.vocab_size
  assert y.shape == (10,) and y.dtype == np.int32


def test_wordnet_missing_source_is_clear(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r"install the Debian package 'wordnet-base'"):
    data.prepare("wordnet", data_dir=tmp_path, source_dir=tmp_path / "none")
  assert not (tmp_path / "wordnet_supersenses").exists()


# -------------------------------------------------------------- tokenizer --


def test_byte_tokenizer():
  tok = data.ByteTokenizer(max_length=8)
  assert tok.vocab_size == 257
  ids = tok.encode("hé")  # 'h' + two UTF-8 bytes of 'é'.
  assert ids.dtype == np.int32 and ids.shape == (8,)
  assert ids.tolist() == [ord("h") + 1, 0xC3 + 1, 0xA9 + 1, 0, 0, 0, 0, 0]
  assert tok.decode(ids) == "hé"
  assert tok.encode("hé".encode()).tolist() == ids.tolist()  # bytes == str input
  batch = tok.encode_batch(["abcdefghijk", ""])
  assert batch.shape == (2, 8)
  assert tok.decode(batch[0]) == "abcdefgh"  # Truncated.
  assert not batch[1].any()  # All padding.
  assert data.ByteTokenizer().max_length == 128
  with pytest.raises(ValueError, match="max_length must be >= 1"):
    data.ByteTokenizer(0)


def test_word_tokenizer():
  train = ["The cat sat.", "the dog sat", "a cat"]
  tok = data.WordTokenizer.build(train, min_count=2, max_length=5)
  assert tok.vocab == ["<pad>", "<unk>", "cat", "sat", "the"]
  assert tok.encode("The cat ate, sat!").tolist() == [4, 2, 1, 1, 3]
  assert tok.decode(tok.encode("cat zebra")) == "cat <unk>"
  assert data.WordTokenizer.build(reversed(train), min_count=2).vocab == tok.vocab
  with pytest.raises(ValueError, match="vocab must start with"):
    data.WordTokenizer(["cat"])


# ----------------------------------------------------------------- loader --


def test_dataset_info():
  fm = data.dataset_info("fashion_mnist")
  assert (fm.kind, fm.num_classes, fm.input_shape, fm.vocab_size) == (
      "image", 10, (28, 28, 1), None)
  assert fm.local and fm.tfds_name == "fashion_mnist_local"
  wn = data.dataset_info("wordnet")
  assert (wn.kind, wn.num_classes, wn.input_shape, wn.vocab_size) == (
      "text", 45, (128,), 257)
  assert data.dataset_info("cifar10") == data.dataset_info("tfds:cifar10")
  assert data.dataset_info("tfds:fashion_mnist").tfds_name == "fashion_mnist"
  assert data.dataset_info("tfds:glue/sst2").input_key == "sentence"
  assert data.dataset_info("imagenet2012", image_size=160).input_shape == (
      160, 160, 3)
  assert data.dataset_info(
      "wordnet", tokenizer=data.ByteTokenizer(64)).input_shape == (64,)
  with pytest.raises(ValueError, match="Unknown dataset 'svhn'.*allowed"):
    data.dataset_info("svhn")
  with pytest.raises(ValueError, match="only applies to text"):
    data.dataset_info("cifar10", tokenizer=data.ByteTokenizer())


@needs_fm
def test_batches_deterministic(fm_data_dir):
  src = data.load("fashion_mnist", "test[:300]", data_dir=fm_data_dir)
  assert len(src) == 300

  def labels(**kw):
    return [b["labels"] for b in data.batches(src, 64, **kw)]

  a, b = labels(seed=1, epoch=0), labels(seed=1, epoch=0)
  assert len(a) == 4 and all(x.shape == (64,) for x in a)  # 300 // 64
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y)
                 for x, y in zip(a, labels(seed=1, epoch=1)))
  assert not all(np.array_equal(x, y)
                 for x, y in zip(a, labels(seed=2, epoch=0)))
  full = labels(seed=1, drop_remainder=False)
  assert [len(x) for x in full] == [64, 64, 64, 64, 44]
  in_order = np.concatenate(labels(seed=0, shuffle=False,
                                   drop_remainder=False))
  _, y = data.as_arrays(src)
  np.testing.assert_array_equal(in_order, y)
  np.testing.assert_array_equal(np.sort(np.concatenate(full)), np.sort(y))
  batch = next(data.batches(src, 8, seed=0))
  assert batch["inputs"].shape == (8, 28, 28, 1)
  assert batch["inputs"].dtype == np.float32
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    next(data.batches(src, 0, seed=0))


@needs_fm
def test_as_arrays_limit_and_errors(fm_data_dir):
  x, y = data.as_arrays("fashion_mnist", "train", data_dir=fm_data_dir,
                        limit=50, chunk_size=16)
  assert x.shape == (50, 28, 28, 1) and y.shape == (50,)
  x0, y0 = data.as_arrays("fashion_mnist", "train", data_dir=fm_data_dir,
                          limit=0)
  assert x0.shape == (0, 28, 28, 1) and y0.shape == (0,)
  with pytest.raises(ValueError, match="Unknown split 'valid'.*train, test"):
    data.load("fashion_mnist", "valid", data_dir=fm_data_dir)
  with pytest.raises(ValueError, match="source_dir= only applies"):
    data.load("cifar10", "train", source_dir="/tmp")
  with pytest.raises(ValueError, match="standard TFDS dataset"):
    data.prepare("cifar10")


@pytest.mark.parametrize("name,split,shape,vocab,num_classes", [
    ("cifar10", "train", (32, 32, 3), None, 10),
    ("tfds:mnist", "test", (28, 28, 1), None, 10),
    ("tfds:fashion_mnist", "test", (28, 28, 1), None, 10),
    ("cifar100", "test", (32, 32, 3), None, 100),
    ("imagenet2012", "validation", (64, 64, 3), None, 1000),
    ("glue/sst2", "validation", (128,), 257, 2),
])
def test_standard_datasets_with_mock_data(name, split, shape, vocab,
                                          num_classes):
  kw = {"image_size": 64} if "imagenet" in name else {}
  with tfds.testing.mock_data(num_examples=10):
    src = data.load(name, split, **kw)
    assert len(src) == 10
    batch = next(data.batches(src, 4, seed=0))
  assert batch["inputs"].shape == (4, *shape)
  assert batch["labels"].dtype == np.int32
  assert ((0 <= batch["labels"]) & (batch["labels"] < num_classes)).all()
  if vocab is None:
    assert batch["inputs"].dtype == np.float32
    assert 0.0 <= batch["inputs"].min() and batch["inputs"].max() <= 1.0
  else:
    assert batch["inputs"].dtype == np.int32 and batch["inputs"].max() < vocab


def test_standard_dataset_not_prepared_is_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="'cifar10'.*not prepared"):
    data.load("cifar10", "train", data_dir=tmp_path)


def test_center_crop_resize():
  from vcon_experiments.data import convert
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 30:50] = 255  # A bright vertical band in the middle.
  out = convert.center_crop_resize(image, 20)
  assert out.shape == (20, 20, 3) and out.dtype == np.uint8
  assert out[:, 10].min() == 255 and out[:, 0].max() == 0
  assert convert.center_crop_resize(image[..., :1], 8).shape == (8, 8, 1)


def test_catalog_names():
  assert {"fashion_mnist", "wordnet", "tfds:fashion_mnist", "cifar10",
          "glue/sst2"} <= set(catalog.names())


@needs_fm
@needs_wn
def test_no_tensorflow_needed(fm_data_dir, wn_data_dir):
  del fm_data_dir, wn_data_dir  # Preparing both must not import TF.
  assert "tensorflow" not in sys.modules


@needs_wn
@pytest.mark.slow
def test_concurrent_prepare_builds_once(tmp_path, wn_source):
  """Two processes (two --shard runs on a fresh machine) preparing at once both succeed
  and both can read what was built."""
  # Each reads the split through the builder it got: the one that waited must not hold
  # a builder made before the other finished (it saw no splits).
  code = ("import sys; from vcon_experiments import data; "
          "b = data.prepare('wordnet', data_dir=sys.argv[1], source_dir=sys.argv[2]); "
          "assert len(b.as_data_source(split='train')) > 0; print('ok')")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(wn_source[0])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate() for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.strip().endswith("ok")
  assert len(data.prepare("wordnet", data_dir=tmp_path, source_dir=wn_source[0])
             .as_data_source()["train"]) > 0
