"""LeafSpec: the typed record transforms give export (Transform.describe)."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

import vcon_jax as vj
from vcon_jax import LeafSpec


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8)(nn.relu(nn.Dense(16)(x)))


_X = np.random.RandomState(0).rand(4, 32).astype(np.float32)
_MODEL = _MLP()
_PARAMS = _MODEL.init(jax.random.key(0), _X)["params"]
_KERNEL = "Dense_0/kernel"


def _describe(t, path=_KERNEL):
  state = t.init(_PARAMS)
  leaf = dict(vj._paths.leaf_paths(_PARAMS))[path]  # pylint: disable=protected-access
  return t.describe(path, leaf, state, 0)


def test_each_transform_describes_itself_with_typed_specs():
  assert _describe(vj.prune(sparsity=0.5)) == (
      LeafSpec("prune", sparsity=0.5, granularity="layer"),)
  assert _describe(vj.prune(n=2, m=4)) == (
      LeafSpec("prune", sparsity=0.5, granularity="group", pattern=(2, 4)),)
  assert _describe(vj.quantize(bits=4)) == (LeafSpec("quantize", bits=4, per_channel=True),)
  assert _describe(vj.binarize()) == (LeafSpec("binarize", bits=1, per_channel=False),)
  (spec,) = _describe(vj.low_rank(rank=3))
  assert spec.kind == "low_rank" and spec.rank == 3
  assert [np.shape(f) for f in spec.factors] == [(16, 3), (3, 8)]  # Dense(8) is Dense_0
  assert _describe(vj.prune(sparsity=0.5), path="Dense_0/bias") == ()  # not selected
  assert _describe(vj.identity()) == ()


def test_chain_concatenates_its_members_specs_in_order():
  t = vj.chain(vj.prune(sparsity=0.5), vj.quantize(bits=8, where="Dense_1"))
  assert [s.kind for s in _describe(t)] == ["prune"]  # quantize does not select Dense_0
  assert [s.kind for s in _describe(t, "Dense_1/kernel")] == ["prune", "quantize"]
  assert LeafSpec("prune", pattern=(2, 4)).settings() == {"kind": "prune", "pattern": [2, 4]}


def test_custom_transform_spec_drives_the_export(tmp_path):
  base = vj.quantize(bits=4)

  def describe(path, leaf, state, count=0):
    return (LeafSpec("mine", bits=4, per_channel=True),) if base.select(path, leaf) else ()

  step = vj.make_train_step(_MODEL, base._replace(describe=describe), vj.linear_vanish(0))
  state = step.init(_PARAMS)
  rows = [r for r in vj.export(step, state, tmp_path / "m.npz") if r["transform"]]
  assert [(r["transform"], r["format"]) for r in rows] == [("mine", "dense+int4/channel")] * 2
  assert rows[0]["settings"]["specs"] == [{"kind": "mine", "bits": 4, "per_channel": True}]


def test_a_describe_that_breaks_the_contract_is_recorded_not_trusted(tmp_path):
  t = vj.quantize(bits=4)
  t = t._replace(describe=lambda path, leaf, state, count=0: {"bits": 4})  # a dict: wrong
  step = vj.make_train_step(_MODEL, t, vj.linear_vanish(0))
  state = step.init(_PARAMS)
  rows = [r for r in vj.export(step, state, tmp_path / "m.npz") if r["transform"]]
  assert all(r["transform"] == "custom" for r in rows)
  assert "tuple of vcon_jax.LeafSpec" in rows[0]["settings"]["describe_error"]
  # still exact: the values are searched as for a transform with no description
  loaded = vj.load_compressed(tmp_path / "m.npz").params()
  jax.tree.map(np.testing.assert_array_equal, loaded, step.compressed_params(state))


def test_leafspec_is_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    LeafSpec("prune").bits = 3  # type: ignore[misc]
