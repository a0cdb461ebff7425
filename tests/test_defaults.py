"""Right by default (issue 30): one Selection value, refusals whose suggestions work when
followed literally, the output layer dense, any model output, optimiser states trainers
walk, and the one JAX-version adapter of the trace."""

import dataclasses
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import vcon_jax as vj
from vcon_jax import _trace


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(8)(x)), None


class ScanNet(nn.Module):
  """A Linen ``nn.scan`` stack of 3 Dense layers between an input map and a head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8)(x)
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)()(x, None)
    return nn.Dense(4, name="head")(x)


X = jnp.asarray(np.random.RandomState(0).randn(2, 8), jnp.float32)
STACK = "ScanBlock_0/Dense_0/kernel"


def _scan_params():
  return ScanNet().init(jax.random.key(0), X)["params"]


def _apply(p, x):
  return ScanNet().apply({"params": p}, x)


def _layer_sparsity(c):
  return [float((c["ScanBlock_0"]["Dense_0"]["kernel"][k] == 0).mean()) for k in range(3)]


def _compressed(t, params):
  return vj.compress(t, params, t.init(params))


# ------------------------------------------------------------------ scanned stacks
def test_scan_stack_without_a_trace_is_refused_naming_example_first():
  with pytest.raises(ValueError, match=r"^prune: cannot tell what ScanBlock_0/Dense_0/kernel"
                                       r" \(shape \(3, 8, 8\)\).* Pass example="):
    vj.prune(0.9).init(_scan_params())


def test_scan_stack_refusal_suggestions_followed_literally():
  params = _scan_params()
  with pytest.raises(ValueError) as err:
    vj.quantize(4).init(params)
  msg = str(err.value)
  # the stack suggestion, as printed: each layer pruned / quantised on its own
  stacked = vj.Selection(stacked={f"^{STACK}$": 1})
  assert f"vj.Selection(stacked={{'^{STACK}$': 1}})" in msg
  assert _layer_sparsity(_compressed(vj.prune(0.9, selection=stacked), params)) == [
      pytest.approx(0.90625)] * 3
  q = _compressed(vj.quantize(2, selection=stacked), params)["ScanBlock_0"]["Dense_0"]["kernel"]
  for k in range(3):  # per layer, per output unit: at most 3 levels (int2 symmetric)
    assert max(len(np.unique(np.asarray(q[k][:, j]))) for j in range(8)) <= 3
  # the keep-dense suggestion
  assert f"vj.Selection(exclude='^{STACK}$')" in msg
  c = _compressed(vj.prune(0.9, selection=vj.Selection(exclude=f"^{STACK}$")), params)
  np.testing.assert_array_equal(c["ScanBlock_0"]["Dense_0"]["kernel"],
                                params["ScanBlock_0"]["Dense_0"]["kernel"])


def test_scan_stack_traced_gets_a_threshold_per_layer_and_the_head_stays_dense():
  params = _scan_params()
  found = vj.discover(_apply, params, X)
  assert found.outputs == ("head/kernel",)
  c = _compressed(vj.prune(0.9, selection=found.selection()), params)
  assert _layer_sparsity(c) == [pytest.approx(0.90625)] * 3
  np.testing.assert_array_equal(c["head"]["kernel"], params["head"]["kernel"])
  assert float((c["Dense_0"]["kernel"] == 0).mean()) == pytest.approx(0.90625)
  # opt in to the output layer by name
  c = _compressed(vj.prune(0.9, selection=found.selection(outputs="head")), params)
  assert float((c["head"]["kernel"] == 0).mean()) == pytest.approx(0.90625)


def test_dense_general_suggestion_with_real_axes_gives_a_correct_map():
  model = nn.DenseGeneral((2, 4), axis=-1)
  params = model.init(jax.random.key(0), jnp.ones((1, 6)))["params"]
  with pytest.raises(ValueError, match=r"Pass example=.*stacked=.*in_axes=\{'\^kernel\$': \(axis, \.\.\.\)\}"):
    vj.quantize(4).init(params)
  t = vj.quantize(2, selection=vj.Selection(in_axes={"^kernel$": (0,)}))
  k = np.asarray(_compressed(t, params)["kernel"])  # (in, 2, 4): a scale per output unit
  assert all(len(np.unique(np.abs(k[:, a, b]))) <= 2 for a in range(2) for b in range(4))


# ------------------------------------------------------------- names that say nothing
def test_weight_not_named_kernel_refused_and_declaring_it_works():
  params = {"attn": {"w": jnp.asarray(np.random.RandomState(1).randn(6, 4), jnp.float32)},
            "mlp": {"kernel": jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match=r"^quantize: cannot tell what attn/w .*Pass example="):
    vj.quantize(4).init(params)
  with pytest.raises(ValueError, match="Pass example="):  # where= naming it: refused too
    vj.prune(0.5, selection=vj.Selection(where="attn")).init(params)
  t = vj.quantize(2, selection=vj.Selection(in_axes={"^attn/w$": (0,)}))
  w = np.asarray(_compressed(t, params)["attn"]["w"])
  assert all(len(np.unique(np.abs(w[:, j]))) <= 2 for j in range(4))


def test_default_exclude_holds_under_every_option():
  params = {"embedder": {"input_embedding": jnp.ones((10, 4))},
            "Dense_0": {"kernel": jnp.arange(16.0).reshape(4, 4), "bias": jnp.ones(4)}}
  for sel in (vj.Selection(), vj.Selection(include_non_kernels=True),
              vj.Selection(where="embed|Dense", include_non_kernels=True),
              vj.Selection(in_axes={"embedder": (0,)})):
    t = vj.prune(0.9, selection=sel)
    assert not t.select("embedder/input_embedding", params["embedder"]["input_embedding"])
    c = _compressed(t, params)
    np.testing.assert_array_equal(c["embedder"]["input_embedding"], 1.0)


def test_lm_head_by_name_stays_dense_without_a_trace():
  params = {"lm_head": {"kernel": jnp.ones((4, 8))}, "mlp": {"kernel": jnp.ones((4, 4))}}
  t = vj.quantize(4)
  assert not t.select("lm_head/kernel", params["lm_head"]["kernel"])
  assert t.select("mlp/kernel", params["mlp"]["kernel"])


def test_old_keywords_warn_and_mean_the_same_selection():
  params = _scan_params()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    old = vj.prune(0.9, stacked={f"^{STACK}$": 1}, exclude="head")
  assert any(issubclass(w.category, DeprecationWarning) and "selection=vj.Selection(" in
             str(w.message) and w.filename == __file__ for w in caught)
  new = vj.prune(0.9, selection=vj.Selection(stacked={f"^{STACK}$": 1}, exclude="head"))
  jax.tree.map(np.testing.assert_array_equal, _compressed(old, params),
               _compressed(new, params))
  with pytest.raises(ValueError, match="not both"):
    vj.prune(0.9, where="x", selection=vj.Selection())


# ----------------------------------------------------- the trace in the train step
def test_make_train_step_example_selects_and_summary_shows_roles(tmp_path):
  params = _scan_params()
  step = vj.make_train_step(ScanNet(), vj.quantize(4), vj.linear_vanish(2), optax.adam(1e-3),
                            example=X, train_kwargs={}, eval_kwargs={})
  state = step.init({"params": params})
  batch = {"inputs": X, "labels": jnp.array([0, 1])}
  for _ in range(3):
    state, _ = step(state, batch)
  c = step.compressed_params(state)
  c = c.get("params", c)
  np.testing.assert_array_equal(c["head"]["kernel"], state.params["head"]["kernel"])
  roles = {r["name"]: r["role"] for r in vj.summary(step, state, print_fn=None)}
  assert roles["head/kernel"].endswith("output layer")
  assert roles[STACK].startswith("stack of 3 layers")


def test_wrap_optax_traced_summary_shows_roles():
  params = _scan_params()
  tx = vj.wrap_optax(optax.sgd(0.1), vj.prune(0.5), vj.linear_vanish(2), apply_fn=_apply,
                     params=params, example=X)
  opt_state = tx.init(params)
  roles = {r["name"]: r["role"] for r in vj.summary(opt_state, model=ScanNet(),
                                                          print_fn=None)}
  assert roles["head/kernel"].endswith("output layer")
  assert roles["Dense_0/kernel"].startswith("linear")


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="down")(nn.relu(nn.Dense(16, name="up")(x)))


def test_prune_units_takes_its_groups_from_the_steps_trace():
  x = jnp.ones((2, 8))
  params = _MLP().init(jax.random.key(0), x)["params"]
  step = vj.make_train_step(_MLP(), vj.prune_units(0.5), vj.linear_vanish(2), optax.sgd(0.1),
                            example=x, train_kwargs={}, eval_kwargs={})
  state = step.init({"params": params})
  state, _ = step(state, {"inputs": x, "labels": jnp.array([0, 1])})
  state, _ = step(state, {"inputs": x, "labels": jnp.array([0, 1])})
  c = step.compressed_params(state)
  up, down = (np.asarray(c.get("params", c)[n]["kernel"]) for n in ("up", "down"))
  assert (np.abs(up).sum(0) == 0).sum() == 8  # half of the 16 hidden units removed,
  np.testing.assert_array_equal(np.abs(up).sum(0) == 0, np.abs(down).sum(1) == 0)  # both


# ------------------------------------------------------------------ any model output
@dataclasses.dataclass
class Output:
  logits: jax.Array
  cache: object = None


jax.tree_util.register_dataclass(Output, data_fields=["logits", "cache"], meta_fields=[])


class _Structured(nn.Module):
  @nn.compact
  def __call__(self, x):
    return Output(nn.Dense(3)(nn.relu(nn.Dense(8)(x))))


def test_a_model_returning_a_dataclass_trains_with_its_loss_fn():
  x = jnp.ones((4, 5))
  params = _Structured().init(jax.random.key(0), x)["params"]
  loss = lambda out, batch: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      out.logits, batch["labels"]).mean()
  step = vj.make_train_step(_Structured(), vj.prune(0.5), vj.linear_vanish(2),
                            optax.sgd(0.1), loss_fn=loss, train_kwargs={}, eval_kwargs={})
  state = step.init({"params": params})
  state, metrics = step(state, {"inputs": x, "labels": jnp.array([0, 1, 2, 0])})
  assert np.isfinite(float(metrics["loss"])) and "accuracy" not in metrics
  out, _ = step.evaluate(state, {"inputs": x})
  assert isinstance(out, Output) and out.logits.shape == (4, 3)
  default = vj.make_train_step(_Structured(), vj.prune(0.5), vj.linear_vanish(2),
                               optax.sgd(0.1), train_kwargs={}, eval_kwargs={})
  with pytest.raises(ValueError, match=r"returns 'Output', not a logits array.*loss_fn="):
    default(default.init({"params": params}), {"inputs": x, "labels": jnp.array([0, 1, 2, 0])})


def test_output_blend_blends_every_float_leaf_of_a_structured_output():
  f = lambda p, x: {"logits": x @ p, "ids": jnp.argmax(x @ p, -1)}  # noqa: E731
  w, c, x = jnp.ones((3, 2)), jnp.zeros((3, 2)), jnp.ones((1, 3))
  out = vj.ops.blend_outputs(f, w, c, 0.25, x)
  np.testing.assert_allclose(out["logits"], 0.75)
  assert jnp.issubdtype(out["ids"].dtype, jnp.integer)  # the compressed pass's ids


# ------------------------------------------------------ optimiser states walked
def _wrapped(inner):
  params = {"Dense_0": {"kernel": jnp.arange(16.0).reshape(4, 4) - 8.0}}
  tx = vj.wrap_optax(inner, vj.prune(0.5), vj.linear_vanish(4))
  return tx, params, tx.init(params)


def test_state_walked_like_an_optax_chain():
  tx, params, s = _wrapped(optax.inject_hyperparams(optax.adamw)(learning_rate=3e-3))
  assert float(s.hyperparams["learning_rate"]) == pytest.approx(3e-3)  # Tunix's first try
  assert float(optax.tree_utils.tree_get(s, "learning_rate")) == pytest.approx(3e-3)
  _, _, s = _wrapped(optax.chain(optax.clip(1.0),
                                 optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)))
  parts = list(s)  # Tunix's fallback: for part in opt_state
  assert any(hasattr(p, "hyperparams") for p in parts)
  with pytest.raises(AttributeError):
    _ = s.hyperparams


def test_nnx_optimizer_and_orbax_round_trip(tmp_path):
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  tx = vj.wrap_optax(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), vj.prune(0.5),
                     vj.linear_vanish(2))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.ones((2, 4))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  opt.update(model, grads)
  assert float(optax.tree_utils.tree_get(
      nnx.to_pure_dict(nnx.state(opt, nnx.OptState)), "learning_rate")) == pytest.approx(0.1)
  assert int(jnp.asarray(vj.ops.vcon_state(opt.opt_state).step)) == 1
  assert list(vj.ops.vcon_state(opt.opt_state))  # walkable inside nnx.Optimizer too
  _, _, s = _wrapped(optax.adam(1e-3))
  path = os.path.join(tmp_path, "ckpt")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, s)
  with ocp.StandardCheckpointer() as ckpt:
    back = ckpt.restore(path, target=s)
  jax.tree.map(np.testing.assert_array_equal, back, s)


# --------------------------------------------------------------- the JAX adapter
def test_scan_operand_groups_are_read_on_this_jax():
  a = jnp.ones((3, 3))

  def body(c, x):
    w, v = x
    return (c[0] @ w @ a, c[1] + 1.0), v  # both carries change: none moved to consts

  jaxpr = jax.make_jaxpr(lambda w, v: jax.lax.scan(body, (jnp.ones(3), jnp.ones(2)),
                                                   (w, v)))(jnp.ones((4, 3, 3)),
                                                            jnp.ones((4, 5)))
  eqn = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
  consts, carry = _trace.scan_split(eqn.params)
  assert (consts, carry) == (len(eqn.invars) - 4, 2)
  with pytest.raises(NotImplementedError, match=r"Selection\(in_axes=.*stacked="):
    _trace.scan_split({"length": 3})


# ---------------------------------------------------------- review cases (issue 30)
def _residual(p, x):
  h = x
  for i in range(3):
    h = h + jnp.tanh(h @ p[f"l{i}"]["up"]) @ p[f"l{i}"]["down"]
  return {"logits": h @ p["head"], "hidden_states": h}


def test_the_output_layer_is_not_a_layer_whose_result_is_read_again():
  params = {f"l{i}": {"up": jnp.ones((4, 8)), "down": jnp.ones((8, 4))} for i in range(3)}
  params["head"] = jnp.ones((4, 5))
  x = jnp.ones((2, 4))
  assert vj.discover(_residual, params, x).outputs == ("head",)  # hidden_states returned
  softmax = lambda p, x: jax.nn.softmax(x @ p["head"])  # noqa: E731
  assert vj.discover(softmax, {"head": jnp.ones((4, 5))}, x).outputs == ("head",)


def test_weights_in_cond_branches_are_linear_maps():
  f = lambda p, x: jax.lax.cond(  # noqa: E731
      x.sum() > 0, lambda x: x @ p["a"], lambda x: x @ p["b"], x) @ p["c"]
  params = {k: jnp.ones((4, 4)) for k in "abc"}
  found = vj.discover(f, params, jnp.ones((2, 4)))
  assert [found.leaves[k].kind for k in "abc"] == ["linear"] * 3


def test_a_weight_the_trace_cannot_read_is_refused_then_declared():
  f = lambda p, x: x @ ((p["w"] - p["w"].mean(0)) / p["w"].std(0)) @ p["head"]  # noqa: E731
  params = {"w": jnp.asarray(np.random.RandomState(0).randn(4, 4), jnp.float32),
            "head": jnp.ones((4, 3))}
  found = vj.discover(f, params, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"^quantize: cannot tell what w .*reduce_sum"):
    vj.reselect(vj.quantize(4), found).init(params)
  t = vj.reselect(vj.quantize(2, selection=vj.Selection(in_axes={"^w$": (0,)})), found)
  assert [p for p in params if t.select(p, params[p])] == ["w"]


def test_a_declaration_keeps_a_traced_stack_and_skips_biases():
  params = _scan_params()
  found = vj.discover(_apply, params, X)
  sel = vj.Selection(in_axes={"ScanBlock_0/Dense_0": (1,)}).traced(found)
  r = sel.resolver("q", True)
  assert r.plan(STACK, params["ScanBlock_0"]["Dense_0"]["kernel"]) == ((1,), 1)
  assert r.plan("ScanBlock_0/Dense_0/bias", params["ScanBlock_0"]["Dense_0"]["bias"]) is None
  t = vj.quantize(2, selection=vj.Selection(in_axes={"linear": (0,)}))
  assert not t.select("linear/b", jnp.array([-1.6, -2.8, -1.5, 1.1]))  # a 1-D bias


def test_outputs_opts_lm_head_in_and_old_where_still_narrows():
  t = vj.quantize(4, selection=vj.Selection(outputs="lm_head"))
  assert t.select("lm_head/kernel", jnp.ones((4, 6)))
  f = lambda p, x: jnp.tanh(x @ p["attn"]["w"]) @ p["mlp"]["w"] @ p["head"]  # noqa: E731
  params = {"attn": {"w": jnp.ones((4, 4))}, "mlp": {"w": jnp.ones((4, 4))},
            "head": jnp.ones((4, 2))}
  d = vj.discover(f, params, jnp.ones((1, 4)))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    old = vj.prune(0.5, **d.selection(where="mlp"))
  assert [p for p in ("attn/w", "mlp/w") if old.select(p, jnp.ones((4, 4)))] == ["mlp/w"]


def test_include_non_kernels_under_a_trace_keeps_the_axes_and_the_output_layer():
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), x.dtype), _scan_params())
  tx = vj.wrap_optax(optax.sgd(0.1), vj.prune(0.5, selection=vj.Selection(
      include_non_kernels=True)), vj.linear_vanish(2), apply_fn=_apply, params=params,
                     example=X)
  c = vj.compressed_params(tx.init(params))
  np.testing.assert_array_equal(c["head"]["kernel"], params["head"]["kernel"])
  assert _layer_sparsity(c) == [pytest.approx(0.5)] * 3  # per layer, a stack
  assert float((c["Dense_0"]["bias"] == 0).mean()) == pytest.approx(0.5)  # a whole tensor


def test_a_scanned_dense_named_like_attention_is_refused_and_real_attention_is_not():
  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.Dense(8, name="query")(x), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Scanned, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)(name="stack")(x, None)[0]

  params = Net().init(jax.random.key(0), X)["params"]  # stack/query/kernel (3, 8, 8)
  with pytest.raises(ValueError, match=r"stack/query/kernel .*Pass example="):
    vj.quantize(4).init(params)
  attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  params = attn.init(jax.random.key(0), jnp.ones((1, 3, 8)))["params"]
  t = vj.quantize(4)
  t.init(params)  # query/key/value (in, heads, head_dim) and out (heads, head_dim, out)
  assert all(t.select(f"{n}/kernel", params[n]["kernel"])
             for n in ("query", "key", "value", "out"))
