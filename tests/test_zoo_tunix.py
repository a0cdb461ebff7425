"""VCON on the real model-zoo code of Tunix (google-tunix): its NNX Llama3, Gemma3 and
Qwen3 (tiny random configs, float32, CPU) and its ``PeftTrainer``.

* the trace selects the attention einsum weights (``w``, with their contracting axes)
  and the MLP kernels; embeddings, norms and the output layer stay dense; without a
  trace the einsum ``w`` leaves are refused, never left dense silently;
* a plain jitted ``wrap_optax`` loop runs through the transition; the params the model
  sees are then the compressed ones, and the export reloads to the same logits;
* ``PeftTrainer`` trains with ``wrap_optax(inject_hyperparams(adamw))`` and logs its
  learning rate (it used to fail with "'VconState' object is not iterable");
* ``prune_units`` through the trace, then ``shrink`` removes heads and MLP units.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vcon_jax as vj

pytest.importorskip("tunix")
# Importing Tunix's model modules sets flax_always_shard_variable=False for the whole
# process (its models cannot be built without a mesh otherwise: their Params carry
# sharding annotations); restore the flag at once, and set Tunix's value only while these
# tests run.
_SHARD_FLAG = getattr(flax.config, "flax_always_shard_variable", None)
llama = pytest.importorskip("tunix.models.llama3.model")
gemma = pytest.importorskip("tunix.models.gemma3.model")
qwen = pytest.importorskip("tunix.models.qwen3.model")
peft_trainer = pytest.importorskip("tunix.sft.peft_trainer")
sft_utils = pytest.importorskip("tunix.sft.utils")
if _SHARD_FLAG is not None:
  flax.config.update("flax_always_shard_variable", _SHARD_FLAG)


@pytest.fixture(autouse=True, scope="module")
def _tunix_flax_config():
  if _SHARD_FLAG is None:
    yield
    return
  flax.config.update("flax_always_shard_variable", False)
  try:
    yield
  finally:
    flax.config.update("flax_always_shard_variable", _SHARD_FLAG)


VOCAB, B, T = 32, 2, 8
TOKENS = jax.random.randint(jax.random.key(0), (B, T), 0, VOCAB)
POSITIONS = jnp.broadcast_to(jnp.arange(T), (B, T))
CAUSAL = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))


def _config(name, heads=2, kv_heads=1):
  common = dict(num_layers=1, embed_dim=16, hidden_dim=32, num_heads=heads, head_dim=8,
                num_kv_heads=kv_heads)
  if name == "llama3":
    return llama.Llama3, llama.ModelConfig(vocab_size=VOCAB, rope_theta=10_000,
                                           norm_eps=1e-6, **common)
  if name == "qwen3":
    return qwen.Qwen3, qwen.ModelConfig(vocab_size=VOCAB, rope_theta=10_000, norm_eps=1e-6,
                                        dtype=jnp.float32, param_dtype=jnp.float32, **common)
  if name == "gemma3":
    return gemma.Gemma3, gemma.ModelConfig(num_embed=VOCAB, sliding_window_size=4,
                                           param_dtype=jnp.float32, **common)
  raise ValueError(name)


def _build(name, seed=0, **kw):
  """The Tunix model with random weights (Tunix inits the MLP kernels to zero and the
  norms to constants: noise is added to every param so nothing is degenerate)."""
  cls, config = _config(name, **kw)
  model = cls(config, rngs=nnx.Rngs(seed))
  params = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
  nnx.update(model, jax.tree.map(
      lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape, x.dtype), params))
  return model


def _forward(model):
  """``(graphdef, params, rest, apply_fn)``: ``apply_fn(params, tokens) -> logits``
  (causal mask, positions 0..T-1, no cache)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(p, tokens):
    return nnx.merge(graphdef, p, rest)(tokens, POSITIONS, None, CAUSAL)[0]
  return graphdef, params, rest, apply_fn


def _key(k):
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  return None if getattr(k, "name", None) == "value" else str(k)  # nnx.Param's .value


def _flat(tree):
  """``{"layers/0/attn/q_proj/w": array}`` of an ``nnx.State`` or a nested dict."""
  return {"/".join(s for s in map(_key, path) if s is not None): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# What the trace must find, per model: {path: input axes} of the compressed linear maps.
_ATTN_DNH = {"attn/q_proj/w": (0,), "attn/k_proj/w": (0,), "attn/v_proj/w": (0,),
             "attn/o_proj/w": (0, 1)}
_MLP = {"mlp/gate_proj/kernel": (0,), "mlp/up_proj/kernel": (0,),
        "mlp/down_proj/kernel": (0,)}
EXPECTED = {
    # q/k/v: 'BTD,DNH->BTNH' contracts D (axis 0); o: 'BTNH,NHD->BTD' contracts N, H
    "llama3": ({**_ATTN_DNH, **_MLP}, "lm_head/w"),
    "qwen3": ({**_ATTN_DNH, **_MLP}, "lm_head/w"),
    # q: 'BTD,NDH->BTNH' contracts D (axis 1); kv: 'BSD,CKDH->CBSKH' contracts D (axis 2);
    # the output is the tied embedding (decode), which stays dense
    "gemma3": ({"attn/q_einsum/w": (1,), "attn/kv_einsum/w": (2,),
                "attn/attn_vec_einsum/w": (0, 1), **_MLP}, None),
    # num_heads == num_kv_heads: one 'BTD,SNDH->SBTNH' qkv einsum, D is axis 2
    "gemma3_mha": ({"attn/qkv_einsum/w": (2,), "attn/attn_vec_einsum/w": (0, 1), **_MLP},
                   None),
}
_KW = {"gemma3_mha": dict(heads=2, kv_heads=2)}


def _model(case, seed=0):
  return _build(case.split("_")[0], seed, **_KW.get(case, {}))


@pytest.mark.parametrize("case", ["llama3", "gemma3", "qwen3",
                                  pytest.param("gemma3_mha", marks=pytest.mark.slow)])
def test_trace_selects_the_einsum_attention_and_mlp_weights(case):
  model = _model(case)
  _, params, _, apply_fn = _forward(model)
  found = vj.discover(apply_fn, params, TOKENS)
  table = found.table()
  expected, output = EXPECTED[case]
  want = {f"layers/0/{p}": axes for p, axes in expected.items()}
  kinds = {p: u.kind for p, u in found.leaves.items()}
  got = {p: tuple(u.in_axes) for p, u in found.leaves.items() if u.kind == "linear"}
  if output is not None:
    assert got.pop(output) == (0,), table
  assert got == want, f"\n{table}\noutputs: {found.outputs}"
  assert found.outputs == ((output,) if output else ()), table
  assert kinds["embedder/input_embedding"] == ("tied" if output is None else "lookup"), table
  norms = [p for p in kinds if p.endswith(("norm/w", "norm/scale"))]
  assert norms and all(kinds[p] == "elementwise" for p in norms), table

  # wrap_optax with the trace: exactly these leaves, with these axes, are compressed
  tx = vj.wrap_optax(optax.sgd(0.1), vj.quantize(4, group_size=8), vj.linear_vanish(3),
                     apply_fn=apply_fn, params=params, example=TOKENS)
  opt_state = tx.init(params)
  state = vj.ops.vcon_state(opt_state)
  sel = state.transform.selection
  chosen = {p: t.in_axes for p, t in sel.leaves.items()
            if state.transform.select(p, _flat(params)[p])}
  assert chosen == want, f"\n{table}\nselected: {chosen}"
  assert sel.output_layers == ((output,) if output else ())
  dense, compressed = _flat(params), _flat(vj.compressed_params(opt_state))
  changed = {p for p in dense if not np.array_equal(dense[p], compressed[p])}
  assert changed == set(want), f"\n{table}\nchanged at beta=0: {sorted(changed)}"


@pytest.mark.parametrize("case", ["llama3", "gemma3", "qwen3"])
def test_without_a_trace_the_einsum_weights_are_refused(case):
  params = nnx.state(_model(case), nnx.Param)
  tx = vj.wrap_optax(optax.sgd(0.1), vj.quantize(4), vj.linear_vanish(3))
  with pytest.raises(ValueError, match="example=") as err:
    tx.init(params)
  assert "/w" in str(err.value)  # names the einsum weight it cannot settle


def _groups(w, in_axes, group_size):
  """``w`` as ``(groups, group_size, outputs)``: its input axes first, flattened, cut into
  groups of ``group_size`` consecutive inputs of each output unit."""
  outs = [a for a in range(w.ndim) if a not in in_axes]
  mat = np.transpose(w, list(in_axes) + outs)
  fan_in = int(np.prod([w.shape[a] for a in in_axes]))
  return mat.reshape(fan_in // group_size, group_size, -1)


def _lm_loss(logits, tokens):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def _assert_sees_the_compressed_model(params, opt_state):
  """Past the transition the params the model sees are the compressed ones: to float32
  rounding, and exactly once taken from ``vj.blended_params``.

  Not bit for bit as they come out of the loop: ``optax.apply_updates`` adds the
  wrapper's update ``target - param`` to the param in float32, and ``param + (target -
  param)`` is ``target`` only to one rounding. When a quantised value moves from one
  level to the next and its magnitude doubles (``param`` not within a factor 2 of
  ``target``), no float32 update reaches ``target`` exactly (seen here: Gemma3's
  ``q_einsum``, 1 ulp); dense leaves (embedding, norms, output layer) are likewise one
  rounding from the dense weights.
  """
  compressed = _flat(vj.compressed_params(opt_state))
  seen = _flat(params)
  assert seen.keys() == compressed.keys()
  for path, want in compressed.items():
    np.testing.assert_allclose(seen[path], want, rtol=1e-6, atol=1e-7, err_msg=path)
  exact = _flat(vj.blended_params(opt_state))  # beta = 0: the blend is C(W) exactly
  for path, want in compressed.items():
    np.testing.assert_array_equal(exact[path], want, err_msg=path)


@pytest.mark.parametrize("case", ["llama3", "gemma3",
                                  pytest.param("qwen3", marks=pytest.mark.slow)])
def test_wrap_optax_loop_ends_compressed_and_exports(case, tmp_path):
  bits, group = 4, 8
  model = _model(case)
  _, params, _, apply_fn = _forward(model)
  tx = vj.wrap_optax(optax.adam(1e-2), vj.quantize(bits, group_size=group),
                     vj.linear_vanish(3), apply_fn=apply_fn, params=params, example=TOKENS)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(lambda q: _lm_loss(apply_fn(q, TOKENS), TOKENS))(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  losses = []
  for _ in range(4):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  state = vj.ops.vcon_state(opt_state)
  assert int(state.count) == 4 and float(state.schedule(state.count)) == 0.0
  assert losses[-1] < losses[0], losses

  expected, _ = EXPECTED[case]
  selected = {f"layers/0/{p}": axes for p, axes in expected.items()}
  compressed = _flat(vj.compressed_params(opt_state))
  for path in selected:  # at most 2**bits values in each group of each output unit
    groups = _groups(compressed[path], selected[path], group)
    levels = max(len(np.unique(g[:, j])) for g in groups for j in range(g.shape[-1]))
    assert levels <= 2 ** bits, (path, levels)
  _assert_sees_the_compressed_model(params, opt_state)

  rows = vj.export(opt_state, tmp_path / "m.npz", model=model)
  assert {r["name"] for r in rows if r["transform"]} == set(selected), rows.table()
  loaded = vj.load_compressed(tmp_path / "m.npz")
  got = _flat(loaded.params())
  assert got.keys() == compressed.keys()
  for path, want in compressed.items():
    np.testing.assert_array_equal(got[path], want, err_msg=path)

  # Exactly equal logits: the export decodes to the compressed params bit for bit and the
  # same compiled forward pass runs on both.
  fresh = _model(case, seed=7)
  loaded.update(fresh)
  logits = jax.jit(apply_fn)
  np.testing.assert_array_equal(np.asarray(logits(nnx.state(fresh, nnx.Param), TOKENS)),
                                np.asarray(logits(vj.compressed_params(opt_state), TOKENS)))
  # and the trained model (the params the loop holds) gives them to float32 rounding
  np.testing.assert_allclose(np.asarray(logits(params, TOKENS)),
                             np.asarray(logits(nnx.state(fresh, nnx.Param), TOKENS)),
                             rtol=1e-5, atol=1e-5)


def _peft_inputs(x):
  return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
          "positions": sft_utils.build_positions_from_mask(x.input_mask),
          "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask)}


def test_tunix_peft_trainer_runs_the_wrapped_optimizer_and_logs_its_learning_rate():
  model = _build("llama3")
  _, params, _, apply_fn = _forward(model)
  schedule = optax.linear_schedule(1e-2, 1e-3, 4)
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule)
  tx = vj.wrap_optax(inner, vj.quantize(4, group_size=8), vj.linear_vanish(3),
                     apply_fn=apply_fn, params=params, example=TOKENS)
  config = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=4)
  trainer = peft_trainer.PeftTrainer(model, tx, config)
  trainer = trainer.with_gen_model_input_fn(_peft_inputs)
  rng = np.random.RandomState(0)
  data = [peft_trainer.TrainingInput(
      input_tokens=rng.randint(0, VOCAB, (B, T)).astype(np.int32),
      input_mask=np.ones((B, T), bool)) for _ in range(6)]
  trainer.train(data)  # used to fail: "'VconState' object is not iterable"
  assert trainer.train_steps == 4

  opt_state = trainer.optimizer.opt_state  # a VconState of nnx.OptState variables
  assert int(vj.ops.vcon_state(opt_state).count.get_value()) == 4
  lr = trainer.metrics_logger.get_metric_history("", "learning_rate", "train")
  assert len(lr) == 4, lr
  # found where Tunix looks (opt_state.hyperparams): the inner inject_hyperparams state's
  assert float(lr[-1]) == pytest.approx(float(opt_state.hyperparams["learning_rate"].value))
  assert float(lr[-1]) == pytest.approx(float(schedule(3)))
  values = [float(schedule(k)) for k in range(4)]
  assert all(any(float(v) == pytest.approx(s) for s in values) for v in lr), lr
  assert len({float(v) for v in lr}) > 1, lr  # it follows the schedule

  # past the transition the module holds the compressed weights
  _assert_sees_the_compressed_model(nnx.state(model, nnx.Param), opt_state)


@pytest.mark.slow
def test_llama3_prune_units_through_the_trace_then_shrink():
  model = _build("llama3", heads=4, kv_heads=2)
  graphdef, params, rest, apply_fn = _forward(model)
  tx = vj.wrap_optax(optax.adam(1e-2), vj.prune_units(0.5), vj.linear_vanish(3),
                     apply_fn=apply_fn, params=params, example=TOKENS)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s):
    grads = jax.grad(lambda q: _lm_loss(apply_fn(q, TOKENS), TOKENS))(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  for _ in range(4):
    params, opt_state = step(params, opt_state)
  assert int(vj.ops.vcon_state(opt_state).count) == 4

  # the traced prune_units does not expose its groups: the same trace gives them again
  units = vj.find_units(apply_fn, params, TOKENS)
  by_path = {(m.path, m.axis) for g in units.groups for m in g.members}
  assert [g.units for g in units.groups] == [2, 32], str(units)  # KV groups; MLP units
  assert {("layers/0/attn/q_proj/w", 1), ("layers/0/attn/k_proj/w", 1),
          ("layers/0/attn/v_proj/w", 1), ("layers/0/attn/o_proj/w", 0),
          ("layers/0/mlp/gate_proj/kernel", 1), ("layers/0/mlp/up_proj/kernel", 1),
          ("layers/0/mlp/down_proj/kernel", 0)} == by_path, str(units)

  compressed = vj.compressed_params(opt_state)
  seen = _flat(params)
  for path, c in _flat(compressed).items():  # the removed units are exactly zero
    np.testing.assert_array_equal(seen[path] == 0, c == 0, err_msg=path)
  masked_model = nnx.merge(graphdef, compressed, rest)
  masked = masked_model(TOKENS, POSITIONS, None, CAUSAL)[0]

  shrunk = vj.shrink(masked_model, units)
  assert shrunk.widths == [(2, 1), (32, 16)], str(shrunk)
  attn, mlp = masked_model.layers[0].attn, masked_model.layers[0].mlp
  assert attn.q_proj.w.shape == (16, 2, 8) and attn.k_proj.w.shape == (16, 1, 8)
  assert attn.v_proj.w.shape == (16, 1, 8) and attn.o_proj.w.shape == (2, 8, 16)
  assert mlp.gate_proj.kernel.shape == (16, 16) and mlp.down_proj.kernel.shape == (16, 16)
  got = nnx.jit(lambda m: m(TOKENS, POSITIONS, None, CAUSAL)[0])(masked_model)
  # to float32 rounding: the smaller matmuls sum in another order
  np.testing.assert_allclose(np.asarray(got), np.asarray(masked), rtol=1e-5, atol=1e-5)
