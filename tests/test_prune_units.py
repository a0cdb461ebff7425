"""Structured pruning: unit groups from the data flow, prune_units, shrink."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vcon_jax as vj


class MLP(nn.Module):
  width: int = 32

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(self.width)(x))  # Dense_0: Linen names layers as they are built
    return nn.Dense(10)(h)


class GatedMLP(nnx.Module):
  def __init__(self, hidden=24, *, rngs):
    self.gate = nnx.Linear(8, hidden, rngs=rngs)
    self.up = nnx.Linear(8, hidden, use_bias=False, rngs=rngs)
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)  # a norm over the units: not removable
    self.down = nnx.Linear(hidden, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.down(nnx.gelu(self.gate(x)) * self.up(x)))


class ConvBN(nn.Module):
  chans: tuple = (8, 12)

  @nn.compact
  def __call__(self, x, train=False):
    for c in self.chans:
      x = nn.Conv(c, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.relu(x)
    return nn.Dense(10)(x.mean((1, 2)))


X = jax.random.normal(jax.random.key(1), (16, 8))


def _paths_of(group):
  return sorted((m.path, m.axis, m.block) for m in group.members)


def test_mlp_group_is_producer_bias_and_consumer():
  params = MLP().init(jax.random.key(0), X)["params"]
  units = vj.find_units(MLP(), params, X)
  assert len(units) == 1
  assert units.groups[0].units == 32
  assert _paths_of(units.groups[0]) == [("Dense_0/bias", 0, 1), ("Dense_0/kernel", 1, 1),
                                        ("Dense_1/kernel", 0, 1)]


def test_gated_mlp_couples_gate_and_up_and_a_norm_over_units_breaks_the_group():
  class NoNorm(GatedMLP):
    def __call__(self, x):
      return self.head(self.down(nnx.gelu(self.gate(x)) * self.up(x)))

  class WithNorm(GatedMLP):
    def __call__(self, x):
      return self.head(self.down(self.norm(nnx.gelu(self.gate(x)) * self.up(x))))

  found = vj.find_units(NoNorm(rngs=nnx.Rngs(0)), None, X)
  paths = {m.path for g in found.groups for m in g.members}
  assert {"gate/kernel", "gate/bias", "up/kernel", "down/kernel"} <= paths
  # the model's output is never a unit; down's outputs (read by head) are a group
  members = {(m.path, m.axis) for g in found.groups for m in g.members}
  assert ("head/kernel", 1) not in members and ("head/bias", 0) not in members
  assert {("down/kernel", 1), ("down/bias", 0), ("head/kernel", 0)} <= members
  found = vj.find_units(WithNorm(rngs=nnx.Rngs(0)), None, X)
  assert not any(m.path.startswith(("gate", "up")) for g in found.groups for m in g.members)


@pytest.mark.slow
def test_conv_channels_through_batchnorm_include_the_statistics():
  xi = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  v = ConvBN().init(jax.random.key(0), xi)
  units = vj.find_units(ConvBN(), v, xi)
  assert [g.units for g in units.groups] == [8, 12]
  assert {m.path for m in units.state_members[0]} == {"batch_stats/BatchNorm_0/mean",
                                                      "batch_stats/BatchNorm_0/var"}
  assert ("Conv_1/kernel", 2, 1) in _paths_of(units.groups[0])


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_prune_units_zeroes_whole_units_in_every_member(fraction):
  params = MLP().init(jax.random.key(0), X)["params"]
  units = vj.find_units(MLP(), params, X)
  t = vj.prune_units(fraction, units=units)
  c = vj.compress(t, params, t.init(params))
  alive_in = np.any(np.asarray(c["Dense_0"]["kernel"]) != 0, axis=0)
  alive_out = np.any(np.asarray(c["Dense_1"]["kernel"]) != 0, axis=1)
  assert alive_in.sum() == 32 - round(fraction * 32)
  np.testing.assert_array_equal(alive_in, alive_out)
  assert not np.any(np.asarray(c["Dense_0"]["bias"])[~alive_in])  # the bias goes too
  # the kept units are those of largest L2 norm over all their slices
  score = (np.square(params["Dense_0"]["kernel"]).sum(0) + np.square(params["Dense_0"]["bias"])
           + np.square(params["Dense_1"]["kernel"]).sum(1))
  assert set(np.flatnonzero(alive_in)) == set(np.argsort(-score)[:alive_in.sum()])


@pytest.mark.slow
def test_linen_mlp_trains_with_vcon_and_shrinks_exactly():
  params = MLP().init(jax.random.key(0), X)["params"]
  units = vj.find_units(MLP(), params, X)
  step = vj.make_train_step(MLP(), vj.prune_units(0.5, units=units), vj.linear_vanish(4),
                            optimizer=optax.adam(1e-2))
  state = step.init(params)
  y = jnp.arange(16) % 10
  for _ in range(6):
    state, metrics = step(state, {"inputs": X, "labels": y})
  assert float(metrics["beta"]) == 0.0
  c = step.compressed_params(state)
  shrunk = vj.shrink(MLP(), units, c, example=X, rebuilt=MLP(width=16))
  assert shrunk.widths == [(32, 16)]
  assert shrunk.params["Dense_0"]["kernel"].shape == (8, 16)
  assert shrunk.params["Dense_1"]["kernel"].shape == (16, 10)
  np.testing.assert_allclose(MLP(width=16).apply({"params": shrunk.params}, X),
                             MLP().apply({"params": c}, X), atol=1e-5)


@pytest.mark.slow
def test_linen_cnn_with_batchnorm_shrinks_with_its_statistics():
  xi = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
  v = ConvBN().init(jax.random.key(0), xi)
  v = {"params": v["params"], "batch_stats": jax.tree.map(
      lambda s: s + jax.random.uniform(jax.random.key(3), s.shape), v["batch_stats"])}
  units = vj.find_units(ConvBN(), v, xi)
  t = vj.prune_units(0.5, units=units)
  c = vj.compress(t, v["params"], t.init(v["params"]))
  masked = ConvBN().apply({"params": c, "batch_stats": v["batch_stats"]}, xi)
  shrunk = vj.shrink(ConvBN(), units, c, {"batch_stats": v["batch_stats"]}, example=xi,
                     rebuilt=ConvBN(chans=(4, 6)))
  assert shrunk.widths == [(8, 4), (12, 6)]
  assert shrunk.model_state["batch_stats"]["BatchNorm_1"]["mean"].shape == (6,)
  got = ConvBN(chans=(4, 6)).apply({"params": shrunk.params, **shrunk.model_state}, xi)
  np.testing.assert_allclose(got, masked, atol=1e-5)


def test_linen_shrink_check_needs_the_rebuilt_model():
  params = MLP().init(jax.random.key(0), X)["params"]
  units = vj.find_units(MLP(), params, X)
  with pytest.raises(ValueError, match="rebuilt="):
    vj.shrink(MLP(), units, params, example=X)


def _nnx_case(model, example):
  units = vj.find_units(model, None, example)
  t = vj.prune_units(0.5, units=units)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  c = vj.compress(t, params, t.init(params))
  nnx.update(model, jax.tree.map(lambda x: x, c))
  model.eval()
  masked = model(example)
  shrunk = vj.shrink(model, units, example=example)
  return units, shrunk, masked, model(example)


def test_nnx_gated_mlp_shrinks_in_place():
  model = GatedMLP(rngs=nnx.Rngs(0))
  units, shrunk, masked, got = _nnx_case(model, X)
  assert sorted(shrunk.widths) == [(8, 4), (24, 12)]  # the hidden units, down's outputs
  assert model.gate.kernel.shape == (8, 12) and model.down.kernel.shape == (12, 4)
  assert model.head.kernel.shape == (4, 3)
  assert model.gate.out_features == 12 and model.down.in_features == 12
  np.testing.assert_allclose(got, masked, atol=1e-5)


@pytest.mark.slow
def test_vit_mlp_units_and_heads_shrink_exactly():
  from vcon_experiments.models import get_model  # pylint: disable=import-outside-toplevel
  model = get_model("vit", **{"image_size": 28, "patch_size": 7, "in_channels": 1, "dim": 32,
                              "depth": 2, "heads": 4, "mlp_dim": 64, "num_classes": 10})
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  units, shrunk, masked, got = _nnx_case(model, x)
  sizes = sorted(g.units for g in units.groups)
  assert sizes == [4, 4, 64, 64]  # the heads and the MLP units of both blocks
  assert sorted(shrunk.widths) == [(4, 2), (4, 2), (64, 32), (64, 32)]
  np.testing.assert_allclose(got, masked, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_lm_heads_with_their_query_group_and_mlp_units_shrink_exactly(kv_heads):
  from vcon_experiments.models import get_model  # pylint: disable=import-outside-toplevel
  model = get_model("lm", vocab_size=64, max_len=16, dim=32, depth=2, heads=4,
                    kv_heads=kv_heads)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  units, shrunk, masked, got = _nnx_case(model, tokens)
  heads = [g for g in units.groups if any("attn/query" in m.path for m in g.members)]
  assert [g.units for g in heads] == [kv_heads] * 2  # a key/value head and its queries
  q = next(m for m in heads[0].members if m.path.endswith("query/kernel"))
  assert q.block == (4 // kv_heads) * 8
  assert model.blocks[0].attn.key.kernel.shape == (32, kv_heads // 2 * 8)
  np.testing.assert_allclose(got, masked, atol=1e-4)


def test_declared_groups_are_checked_before_training():
  params = MLP().init(jax.random.key(0), X)["params"]
  bad = vj.UnitGroup(32, (vj.Member("Dense_0/kernel", 1, 1), vj.Member("nope/kernel", 0, 1)))
  with pytest.raises(ValueError, match="'nope/kernel' is not a param leaf"):
    vj.prune_units(0.5, units=[bad]).init(params)
  bad = vj.UnitGroup(16, (vj.Member("Dense_0/kernel", 1, 1), vj.Member("Dense_1/kernel", 0, 1)))
  with pytest.raises(ValueError, match="16 units"):
    vj.prune_units(0.5, units=[bad]).init(params)
  with pytest.raises(ValueError, match="example=.*find_units"):  # no trace, no units
    vj.prune_units(0.5).init(params)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    vj.prune_units(1.0, units=vj.find_units(MLP(), params, X))


def test_prune_units_exports_exactly_and_wrap_optax_gives_the_same_values(tmp_path):
  params = MLP().init(jax.random.key(0), X)["params"]
  units = vj.find_units(MLP(), params, X)
  t = vj.prune_units(0.5, units=units)
  tx = vj.wrap_optax(optax.sgd(0.1), t, vj.linear_vanish(3))
  opt_state = tx.init(params)
  p = params
  y = jnp.arange(16) % 10

  @jax.jit
  def train(p, opt_state):
    def loss(p):
      logits = MLP().apply({"params": p}, X)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    g = jax.grad(loss)(p)
    u, opt_state = tx.update(g, opt_state, p)
    return optax.apply_updates(p, u), opt_state

  for _ in range(5):
    p, opt_state = train(p, opt_state)
  c = vj.compressed_params(opt_state)
  alive = np.any(np.asarray(c["Dense_0"]["kernel"]) != 0, axis=0)
  assert alive.sum() == 16
  np.testing.assert_array_equal(np.any(np.asarray(c["Dense_1"]["kernel"]) != 0, axis=1), alive)
  for leaf in ("kernel", "bias"):  # the model's params at beta = 0 are the compressed ones
    np.testing.assert_allclose(p["Dense_0"][leaf], c["Dense_0"][leaf], rtol=1e-6, atol=0)
  # and the exported file holds exactly the compressed values
  path = str(tmp_path / "m.npz")
  vj.export(opt_state, path, model=MLP())
  loaded = vj.load_compressed(path)
  jax.tree.map(np.testing.assert_array_equal, loaded.params(), c)


def test_resume_mid_transition_is_bit_identical(tmp_path):
  params = MLP().init(jax.random.key(0), X)["params"]
  units = vj.find_units(MLP(), params, X)
  step = vj.make_train_step(MLP(), vj.prune_units(vj.polynomial_ramp(0.5, 0, 4), units=units),
                            vj.linear_vanish(4), optimizer=optax.adam(1e-2))
  batch = {"inputs": X, "labels": jnp.arange(16) % 10}
  straight = step.init(params)
  for _ in range(6):
    straight, _ = step(straight, batch)
  state = step.init(params)
  for _ in range(3):
    state, _ = step(state, batch)
  vj.save(state, tmp_path / "ck")
  state = vj.restore(tmp_path / "ck", step.init(params))
  for _ in range(3):
    state, _ = step(state, batch)
  jax.tree.map(np.testing.assert_array_equal, step.compressed_params(state),
               step.compressed_params(straight))


@pytest.mark.slow
def test_suite_cnn_channels_flattened_into_a_dense_layer_shrink_exactly():
  """(h, w, channels) flattened into fc: a channel is every C-th row of fc's kernel."""
  from vcon_experiments.models import get_model  # pylint: disable=import-outside-toplevel
  model = get_model("cnn", features=(8, 16), hidden=32)
  x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
  units, shrunk, masked, got = _nnx_case(model, x)
  fc = next(m for g in units.groups for m in g.members if m.path == "fc/kernel" and m.axis == 0)
  assert (fc.block, fc.repeat) == (1, 49)
  assert sorted(shrunk.widths) == [(8, 4), (16, 8), (32, 16)]
  assert model.fc.kernel.shape == (49 * 8, 16) and model.norms[1].mean.shape == (8,)
  np.testing.assert_allclose(got, masked, atol=1e-4)


def test_the_shrunk_model_exports_with_its_smaller_shapes_and_runs_loaded(tmp_path):
  model = GatedMLP(rngs=nnx.Rngs(0))
  units, shrunk, masked, got = _nnx_case(model, X)
  shrunk.export(tmp_path / "nnx.npz")
  loaded = vj.load_compressed(tmp_path / "nnx.npz")
  assert loaded.params()["gate"]["kernel"].shape == (8, 12)
  np.testing.assert_allclose(loaded.apply(model, X), masked, atol=1e-5)
  # Linen: the params for the model built with the new widths
  params = MLP().init(jax.random.key(0), X)["params"]
  units = vj.find_units(MLP(), params, X)
  t = vj.prune_units(0.5, units=units)
  c = vj.compress(t, params, t.init(params))
  small = vj.shrink(MLP(), units, c)
  with pytest.raises(ValueError, match="model built with the new widths"):
    small.export(tmp_path / "linen.npz")
  small.export(tmp_path / "linen.npz", model=MLP(width=16))
  loaded = vj.load_compressed(tmp_path / "linen.npz")
  np.testing.assert_allclose(loaded.apply(MLP(width=16), X), MLP().apply({"params": c}, X),
                             atol=1e-5)
