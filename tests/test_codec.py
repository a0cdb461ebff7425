"""The export codec on its own: numpy only, loaded without vcon_jax, JAX or Flax."""

import importlib.util
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "vcon_jax" / "export" / "codec.py"


def _load():
  spec = importlib.util.spec_from_file_location("standalone_codec", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


codec = _load()


def test_codec_imports_numpy_only():
  code = (f"import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('c', {str(_PATH)!r})\n"
          f"spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
          f"bad = sorted(m for m in sys.modules if m.split('.')[0] in "
          f"('jax', 'flax', 'vcon_jax', 'optax'))\n"
          f"assert not bad, bad\n")
  subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 5, 8, 11])
def test_bit_packing_round_trip(nbits):
  codes = np.random.RandomState(nbits).randint(0, 2 ** nbits, size=37)
  packed = codec.pack(codes, nbits)
  assert packed.dtype == np.uint8 and packed.size == math.ceil(37 * nbits / 8)
  np.testing.assert_array_equal(codec.unpack(np, packed, 37, nbits), codes)


def test_index_dtypes_are_the_smallest():
  assert codec.index_dtype(256) == np.uint8 and codec.index_dtype(257) == np.uint16
  assert codec.count_dtype(255) == np.uint8 and codec.count_dtype(256) == np.uint16
  assert codec.index_dtype(1 << 17) == np.int32
  assert [codec.nm_bits(m) for m in (1, 2, 4, 5, 8)] == [0, 1, 2, 3, 3]


def _matrix():
  # (fan_in 4, fan_out 2); unit 0 keeps inputs 0 and 3, unit 1 keeps input 2
  mat = np.zeros((4, 2), np.float32)
  mat[0, 0], mat[3, 0], mat[2, 1] = 1.5, -2.0, 0.25
  return mat


def _sparse_cases():
  mat = _matrix()
  values = np.array([1.5, -2.0, 0.25], np.float32)  # unit-major order
  mask = np.packbits((mat.T != 0).reshape(-1))
  return mat, {
      "bitmask": ({"layout": "bitmask"}, {"mask": mask}),
      "indices": ({"layout": "indices"}, {"counts": np.array([2, 1], np.uint8),
                                           "indices": np.array([0, 3, 2], np.uint8)}),
  }, values


@pytest.mark.parametrize("layout", ["bitmask", "indices"])
def test_sparse_layouts_decode_and_runtime_form(layout):
  mat, cases, values = _sparse_cases()
  extra, arrays = cases[layout]
  fmt = {"kind": "coded", "codec": "float", "count": 3, **extra}
  arrays = {**arrays, "values": values}
  np.testing.assert_array_equal(codec.decode_coded(np, fmt, arrays, 4, 2, np.float32), mat)
  rfmt, rarrays = codec.runtime_coded(fmt, arrays, 4, 2)
  assert rfmt["layout"] == "positions" and rfmt["sorted"]
  assert np.all(np.diff(rarrays["positions"]) > 0)
  np.testing.assert_array_equal(codec.decode_coded(np, rfmt, rarrays, 4, 2, np.float32), mat)


def test_nm_layout_and_int_codec():
  # 1:2 over fan_in 4, fan_out 1: keeps input 1 of group 0 and input 2 of group 1
  fmt = {"kind": "coded", "layout": "nm", "n": 1, "m": 2, "codec": "int", "bits": 3,
         "scale": "layer", "count": 2}
  q = np.array([3, -1]) + 3  # stored codes are q + L, L = 3
  arrays = {"nm_index": codec.pack(np.array([1, 0]), 1), "codes": codec.pack(q, 3),
            "scale": np.float32(0.5)}
  out = codec.decode_coded(np, fmt, arrays, 4, 1, np.float32)
  np.testing.assert_array_equal(out[:, 0], [0.0, 1.5, -0.5, 0.0])


def test_leaf_kinds_and_errors():
  a, b = np.ones((3, 1), np.float32), np.full((1, 2), 2.0, np.float32)
  out = codec.decode_leaf(np, {"kind": "low_rank", "rank": 1}, {"a": a, "b": b}, (3, 2),
                          np.float32, (3, 2))
  np.testing.assert_array_equal(out, np.full((3, 2), 2.0))
  with pytest.raises(ValueError, match="unknown leaf encoding"):
    codec.decode_leaf(np, {"kind": "zip"}, {}, (1,), np.float32, (1, 1))
  _, cases, values = _sparse_cases()
  fmt = {"kind": "coded", "codec": "float", "count": 4, "layout": "indices"}
  with pytest.raises(ValueError, match="corrupt export"):
    codec.decode_coded(np, fmt, {**cases["indices"][1], "values": values}, 4, 2, np.float32)
  with pytest.raises(ValueError, match="unknown layout"):
    codec.decode_coded(np, {**fmt, "layout": "csr"}, {}, 4, 2, np.float32)
