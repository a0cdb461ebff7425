"""The Gemma-style causal LM of the suite: causality, GQA, dtypes, what is compressed,
the LM batches and bits per byte, and exactness of its compressed weights in bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vcon_jax as vj
from vcon_jax import _paths
from vcon_experiments import tasks
from vcon_experiments.models import get_model
from vcon_experiments.models.lm import CausalLM

SMALL = dict(vocab_size=257, max_len=16, dim=32, depth=2, heads=4, kv_heads=2)


def _tokens(b=4, t=16, seed=0):
  return np.random.RandomState(seed).randint(1, 257, (b, t)).astype(np.int32)


def test_logits_are_causal_and_float32():
  model = get_model("lm", **SMALL)
  x = _tokens()
  y = x.copy()
  y[:, 10:] = 7  # change the future only
  a, b = np.asarray(model(x)), np.asarray(model(y))
  assert a.shape == (4, 16, 257) and a.dtype == np.float32
  np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, 10:], b[:, 10:])


def test_grouped_query_attention_shapes_and_refusal():
  model = get_model("lm", **SMALL)
  attn = model.blocks[0].attn
  assert attn.query.kernel.shape == (32, 32) and attn.key.kernel.shape == (32, 16)
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    get_model("lm", **{**SMALL, "kv_heads": 3})


@pytest.mark.parametrize("param_dtype,dtype", [
    pytest.param("bfloat16", None, marks=pytest.mark.slow), ("float32", "bfloat16")])
def test_dtypes(param_dtype, dtype):
  model = get_model("lm", **SMALL, param_dtype=param_dtype, dtype=dtype)
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert {leaf.dtype for leaf in leaves} == {jnp.dtype(param_dtype)}
  assert model(_tokens()).dtype == jnp.float32


def test_default_selection_is_the_attention_and_mlp_projections():
  model = get_model("lm", **SMALL)
  step = vj.make_train_step(model, vj.quantize(4, group_size=16), vj.linear_vanish(2),
                            optax.sgd(0.1), loss_fn=tasks.token_loss)
  chosen = sorted(p for p, leaf in _paths.leaf_paths(step.init().params)
                  if step.transform.select(p, leaf))
  names = {p.split("/", 2)[2] for p in chosen}
  assert names == {"attn/query/kernel", "attn/key/kernel", "attn/value/kernel",
                   "attn/out/kernel", "mlp/gate/kernel", "mlp/up/kernel", "mlp/down/kernel"}
  assert len(chosen) == 7 * SMALL["depth"]  # embedding (tied output) and norms stay dense


def test_lm_batch_predicts_every_byte_from_the_bytes_before():
  tokens = np.array([[5, 6, 7, 0, 0]], np.int32)
  b = tasks.lm_batch(tokens)
  np.testing.assert_array_equal(b["inputs"], [[0, 5, 6, 7, 0]])
  np.testing.assert_array_equal(b["labels"], tokens)
  np.testing.assert_array_equal(b["weights"], [[1, 1, 1, 0, 0]])


class _Uniform:
  """A step whose model gives equal logits everywhere: log2(vocab) bits per byte."""

  def evaluate(self, state, batch, compressed=True):
    return np.zeros(batch["inputs"].shape + (256,), np.float32), {}


def test_bits_per_byte_of_a_uniform_model_is_eight():
  tokens = np.zeros((7, 12), np.int32)
  tokens[:, :5] = 3  # five bytes per text, the rest padding (not counted)
  assert tasks.bits_per_byte(_Uniform(), None, tokens, batch_size=3) == pytest.approx(8.0)


@pytest.mark.slow
def test_bf16_lm_wrap_optax_loop_is_its_compressed_model():
  model = CausalLM(**SMALL, param_dtype="bfloat16", rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = vj.wrap_optax(optax.adamw(1e-2), vj.quantize(3, group_size=16), vj.linear_vanish(3))
  opt_state = tx.init(params)
  batch = tasks.lm_batch(_tokens())

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      return tasks.token_loss(nnx.merge(graphdef, p)(batch["inputs"]), batch)
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(5):
    params, opt_state = step(params, opt_state)
  comp = vj.compressed_params(opt_state)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(comp)):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("transform", [lambda: vj.quantize(3, group_size=16),
                                       lambda: vj.chain(vj.prune(n=2, m=4),
                                                        vj.quantize(4, group_size=16))])
def test_the_served_lm_has_the_bits_per_byte_of_the_trained_compressed_lm(transform,
                                                                          tmp_path):
  model = get_model("lm", **SMALL)
  step = vj.make_train_step(model, transform(), vj.linear_vanish(2), optax.adamw(1e-2),
                            loss_fn=tasks.token_loss)
  state = step.init()
  for i in range(4):
    state, _ = step(state, tasks.lm_batch(_tokens(seed=i)))
  vj.export(step, state, tmp_path / "lm.npz")
  served = vj.load_compressed(tmp_path / "lm.npz").apply_fn(get_model("lm", **SMALL))
  held_out = _tokens(b=8, seed=99)
  held_out[:, 12:] = 0  # texts shorter than the window

  class _Served:
    def evaluate(self, state, batch, compressed=True):
      return served(batch["inputs"]), {}

  trained = tasks.bits_per_byte(step, state, held_out)
  assert tasks.bits_per_byte(_Served(), None, held_out) == pytest.approx(trained, rel=1e-6)


@pytest.mark.slow
def test_greedy_generation_from_the_export_follows_the_trained_compressed_model(tmp_path):
  from vcon_experiments import generate  # pylint: disable=import-outside-toplevel
  model = get_model("lm", **SMALL)
  step = vj.make_train_step(model, vj.quantize(4, group_size=16), vj.linear_vanish(0),
                            optax.adamw(3e-2), loss_fn=tasks.token_loss)
  state = step.init()
  text = np.array([[b + 1 for b in b"a cat is an animal"[:16]]] * 4, np.int32)
  for _ in range(30):  # learn one text by heart
    state, _ = step(state, tasks.lm_batch(text))
  vj.export(step, state, tmp_path / "lm.npz")
  served = vj.load_compressed(tmp_path / "lm.npz").apply_fn(get_model("lm", **SMALL))
  out = generate.generate(served, 16, "a cat", 8)

  class _Trained:  # the same loop on the training-time compressed model
    def __call__(self, x):
      batch = {"inputs": x, "labels": x, "weights": np.ones(x.shape, np.float32)}
      return step.evaluate(state, batch, compressed=True)[0]

  assert out == generate.generate(_Trained(), 16, "a cat", 8)
  assert out == b" is an a"  # what it learned
  # the key / value cache loop on the served weights writes the same text
  lm = get_model("lm", **SMALL)
  vj.load_compressed(tmp_path / "lm.npz").update(lm)
  assert generate.generate_cached(lm, 16, "a cat", 8) == out
  assert generate.generate_cached(lm, 16, "a cat", 30) == generate.generate(served, 16,
                                                                           "a cat", 30)[:11]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_decode_gives_the_forward_pass_logits(dtype):
  """CausalLM.decode, one token at a time against the cache, gives the logits of the
  whole-sequence forward pass at every position (GQA, rotary positions)."""
  model = get_model("lm", **{**SMALL, "dtype": dtype})
  tokens = _tokens(b=2, seed=5)[:, :10]
  full = np.asarray(model(tokens))
  cache = model.init_cache(2, 16)
  for pos in range(tokens.shape[1]):
    logits, cache = model.decode(tokens[:, pos], pos, cache)
    tol = 1e-5 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(np.asarray(logits), full[:, pos], atol=tol, rtol=tol)


def test_generate_refuses_a_directory_that_is_not_an_lm_run(tmp_path):
  from vcon_experiments import generate  # pylint: disable=import-outside-toplevel
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    generate.load_served(tmp_path)
