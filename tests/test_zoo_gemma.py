"""Issue 30: Google's ``gemma`` LMs (``gm.nn``, Flax Linen) through the train step.

``gemma`` needs Python >= 3.12 and TensorFlow (through kauldron) and is no dependency, so
``_GemmaLike`` below is a tiny copy of ``gm.nn``'s text transformer: the same module and
parameter names, shapes and einsum equations (``gemma/gm/nn/_layers.py``, ``_modules.py``,
``_transformer.py``; Gemma 3: GQA, qk-norm, post-attention / post-ffw norms, transposed
gating einsum, local-sliding and global layers, RoPE, a tied embedding) and its return
type, an ``Output`` ``flax.struct`` dataclass (``.logits``, ``.cache``,
``.hidden_states``), not an array. Its params (float32 here; Gemma's default is bf16)::

  embedder/input_embedding            (V, D)        tied: gathered, and logits = x @ E.T
  layer_i/attn/q_einsum/w             (N, D, H)     'BTD,NDH->BTNH'
  layer_i/attn/kv_einsum/w            (2, K, D, H)  'BSD,CKDH->CBSKH'
  layer_i/attn/attn_vec_einsum/w      (N, H, D)     'BTNH,NHD->BTD'
  layer_i/mlp/gating_einsum           (2, F, D)     '...F,NHF->...NH' (shared scope)
  layer_i/mlp/linear                  (F, D)        '...H,HF->...F'   (shared scope)
  layer_i/{pre,post}_{attention,ffw}_norm/scale, attn/_{query,key}_norm/scale, final_norm/scale

The last test runs the same checks on the real ``gm.nn.Gemma3_270M`` (shrunk) where
``gemma`` is importable.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vcon_jax as vj
from vcon_jax import _paths

VOCAB, D, N, K, H, F, LAYERS = 64, 32, 4, 2, 8, 64, 2
_PADDING_ID = 0
_K_MASK = -2.3819763e38

# The traced selection every test expects: each einsum weight with the axes its equation
# contracts (D for q / kv / gating, N and H for attn_vec, F for linear); the tied table and
# every norm scale dense.
EXPECTED_AXES = {
    "attn/q_einsum/w": (1,),
    "attn/kv_einsum/w": (2,),
    "attn/attn_vec_einsum/w": (0, 1),
    "mlp/gating_einsum": (2,),
    "mlp/linear": (0,),
}


# ----------------------------------------------------------------- a gm.nn look-alike
class AttentionType(enum.Enum):
  GLOBAL = 1
  LOCAL_SLIDING = 2


class Einsum(nn.Module):
  """``gm.nn._layers.Einsum``."""

  shape: tuple[int, ...]
  weight_name: str = "w"
  initializer: nn.initializers.Initializer = nn.initializers.normal()

  @nn.compact
  def __call__(self, eqn, x):
    return jnp.einsum(eqn, x, self.param(self.weight_name, self.initializer, self.shape))


class RMSNorm(nn.Module):
  """``gm.nn._layers.RMSNorm``: ``x / rms(x) * (1 + scale)``."""

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1]))
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    normed = x * jax.lax.rsqrt(var + 1e-06)
    return normed * (1 + jnp.expand_dims(scale, axis=range(len(x.shape) - 1)))


def _apply_rope(x, positions, base_frequency):
  """``gm.math._positional_embeddings.apply_rope`` (scale factor 1)."""
  first, second = jnp.split(x, 2, axis=-1)
  timescale = base_frequency ** (2 * jnp.arange(0, x.shape[-1] // 2) / x.shape[-1])
  angle = (positions[..., None] / timescale[None, None, :])[..., None, :]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1)


class Embedder(nn.Module):
  vocab_size: int
  embed_dim: int

  def setup(self):
    self.input_embedding_table = self.param(
        "input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim))

  def encode(self, x):
    x = self.input_embedding_table[(x,)]
    return x * jnp.sqrt(self.embed_dim).astype(x.dtype)

  def decode(self, x):
    return jnp.dot(x, self.input_embedding_table.T)


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  features: int
  head_dim: int
  attn_type: AttentionType
  query_pre_attn_scalar: float
  rope_base_frequency: int = 10_000
  sliding_window_size: int | None = None
  use_qk_norm: bool = True

  @property
  def use_gqa(self):
    return self.num_kv_heads != self.num_heads and self.num_kv_heads > 1

  def setup(self):
    self.attn_vec_einsum = Einsum(shape=(self.num_heads, self.head_dim, self.features))
    self.q_einsum = Einsum(shape=(self.num_heads, self.features, self.head_dim))
    self.kv_einsum = Einsum(shape=(2, self.num_kv_heads, self.features, self.head_dim))
    if self.use_qk_norm:
      self._query_norm = RMSNorm()
      self._key_norm = RMSNorm()

  def __call__(self, x, segment_pos, cache, attn_mask):
    query_proj = self.q_einsum("BTD,NDH->BTNH", x)
    key_proj, value_proj = self.kv_einsum("BSD,CKDH->CBSKH", x)
    if self.use_qk_norm:
      query_proj = self._query_norm(query_proj)
      key_proj = self._key_norm(key_proj)
    query_proj = _apply_rope(query_proj, segment_pos, self.rope_base_frequency)
    query_scaled = query_proj * self.query_pre_attn_scalar
    key_proj = _apply_rope(key_proj, segment_pos, self.rope_base_frequency)
    if self.use_gqa:
      b, t, kg, h = query_scaled.shape
      query_scaled = query_scaled.reshape((b, t, self.num_kv_heads, kg // self.num_kv_heads, h))
      logits = jnp.einsum("BTKGH,BSKH->BTKGS", query_scaled, key_proj)
      b, t, k, g, s = logits.shape
      logits = logits.reshape((b, t, k * g, s))
    else:
      logits = jnp.einsum("BTNH,BSNH->BTNS", query_scaled, key_proj)
    if self.attn_type == AttentionType.LOCAL_SLIDING:
      pos = segment_pos
      attn_mask = attn_mask * ((pos[..., None, :] > pos[..., :, None] - self.sliding_window_size)
                               * (pos[..., None, :] < pos[..., :, None] + self.sliding_window_size))
    padded_logits = jnp.where(jnp.expand_dims(attn_mask, -2), logits, _K_MASK)
    probs = jax.nn.softmax(padded_logits, axis=-1).astype(key_proj.dtype)
    if self.use_gqa:
      b, t, kg, s = probs.shape
      probs = probs.reshape((b, t, self.num_kv_heads, kg // self.num_kv_heads, s))
      encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, value_proj)
      b, t, k, g, h = encoded.shape
      encoded = encoded.reshape((b, t, k * g, h))
    else:
      encoded = jnp.einsum("BTNS,BSNH->BTNH", probs, value_proj)
    return None, self.attn_vec_einsum("BTNH,NHD->BTD", encoded)


class FeedForward(nn.Module):
  features: int
  hidden_dim: int

  @nn.compact
  def __call__(self, x):
    # transpose_gating_einsum=True (Gemma 3); the leaves sit in the module's own scope
    gating = Einsum(shape=(2, self.hidden_dim, self.features), weight_name="gating_einsum")
    nn.share_scope(self, gating)
    gate = gating("...F,NHF->...NH", x)
    activations = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
    linear = Einsum(shape=(self.hidden_dim, self.features), weight_name="linear")
    nn.share_scope(self, linear)
    return linear("...H,HF->...F", activations)


class Block(nn.Module):
  attn_type: AttentionType

  def setup(self):
    self.pre_attention_norm = RMSNorm()
    self.attn = Attention(num_heads=N, num_kv_heads=K, features=D, head_dim=H,
                          attn_type=self.attn_type, query_pre_attn_scalar=H**-0.5,
                          rope_base_frequency=10_000 if self.attn_type
                          == AttentionType.LOCAL_SLIDING else 1_000_000,
                          sliding_window_size=4)
    self.post_attention_norm = RMSNorm()
    self.pre_ffw_norm = RMSNorm()
    self.mlp = FeedForward(features=D, hidden_dim=F)
    self.post_ffw_norm = RMSNorm()

  def __call__(self, x, segment_pos, cache, attn_mask):
    cache, attn_output = self.attn(self.pre_attention_norm(x), segment_pos, cache, attn_mask)
    attn_output = self.post_attention_norm(attn_output)
    attn_output += x
    outputs = self.post_ffw_norm(self.mlp(self.pre_ffw_norm(attn_output)))
    return cache, outputs + attn_output


@flax.struct.dataclass
class Output:
  """``gm.nn.Output``."""

  logits: jax.Array
  cache: dict | None
  hidden_states: jax.Array | None


class GemmaLike(nn.Module):
  """``gm.nn.Transformer`` (text only): ``__call__`` jitted with ``nn.jit`` as there."""

  def setup(self):
    self.embedder = Embedder(vocab_size=VOCAB, embed_dim=D)
    types = (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL)
    self.blocks = [Block(name=f"layer_{i}", attn_type=types[i % 2]) for i in range(LAYERS)]
    self.final_norm = RMSNorm()

  @functools.partial(nn.jit, static_argnames=("return_hidden_states",))
  def __call__(self, tokens, *, cache=None, return_hidden_states=None):
    # gm's _types.Input: padding masked out, positions counted over the real tokens
    inputs_mask = tokens != _PADDING_ID
    positions = jnp.cumsum(inputs_mask, axis=-1) - 1
    causal = jnp.tril(jnp.ones((tokens.shape[-1],) * 2, jnp.bool_))
    attention_mask = inputs_mask[..., None, :] & causal
    x = self.embedder.encode(tokens)
    new_cache = {}
    for i, block in enumerate(self.blocks):
      new_cache[f"layer_{i}"], x = block(x, positions, None, attention_mask)
    x = self.final_norm(x)
    return Output(logits=self.embedder.decode(x),
                  cache=None if cache is None else new_cache,
                  hidden_states=x if return_hidden_states else None)


# ----------------------------------------------------------------------------- helpers
TOKENS = jnp.asarray(np.random.RandomState(0).randint(1, VOCAB, (4, 8)), jnp.int32)
CALLS = [0]  # traces of the model's __call__ (a Python side effect of tracing)


class CountingGemmaLike(GemmaLike):
  def __call__(self, tokens, **kwargs):  # noqa: D102
    CALLS[0] += 1
    return super().__call__(tokens, **kwargs)


def _init(model):
  """Params of ``model.init``'s tree, drawn with numpy: compiling init's thirty random
  initialisers takes seconds on CPU. Norm scales random too (not Gemma's zeros), so that a
  scale compressed by mistake could not pass for dense."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), TOKENS))["params"]
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.randn(*s.shape), s.dtype), shapes)


def next_token_loss(out, batch):
  tokens = batch["inputs"]
  return optax.softmax_cross_entropy_with_integer_labels(
      out.logits[:, :-1].astype(jnp.float32), tokens[:, 1:]).mean()


def _make_step(model, **kwargs):
  return vj.make_train_step(model, vj.quantize(4, group_size=8), vj.linear_vanish(3),
                            optax.adam(1e-3), train_kwargs={}, eval_kwargs={}, **kwargs)


def _selected(step, params, state=None):
  """``{path: traced input axes}`` of what ``step`` compresses."""
  out = {}
  for p, leaf in _paths.leaf_paths(params):
    specs = step.transform.describe(p, leaf, None if state is None else state.transform_state)
    if specs:
      axes = specs[0].in_axes
      out[p] = tuple(range(leaf.ndim - 1)) if axes is None else tuple(axes)
  return out


def _expected(params):
  """``{path: axes}`` of the einsum weights of ``params`` (``layer_i/...``)."""
  return {p: EXPECTED_AXES[p.split("/", 1)[1]] for p, _ in _paths.leaf_paths(params)
          if p.split("/", 1)[-1] in EXPECTED_AXES}


@pytest.fixture(scope="module")
def trained():
  """The look-alike trained 5 steps through the transition (beta 1 -> 0 over 3)."""
  model = GemmaLike()
  params = _init(model)
  step = _make_step(model, loss_fn=next_token_loss, example=TOKENS)
  state = step.init(params)
  history = []
  for _ in range(5):
    state, metrics = step(state, {"inputs": TOKENS})
    history.append({k: float(v) for k, v in metrics.items()})
  return model, params, step, state, history


# ------------------------------------------------------------------------------- tests
def test_output_dataclass_trains_through_the_transition_with_traced_einsum_axes(trained):
  model, params, step, state, history = trained
  print("\n" + step.discovery.table())

  # the trace: every einsum weight a linear map with its contracted axes; table and norms not
  kinds = {p: (u.kind, u.in_axes) for p, u in step.discovery.leaves.items()}
  assert kinds["embedder/input_embedding"][0] == "tied"
  for p, (kind, _) in kinds.items():
    if p.endswith("scale"):
      assert kind == "elementwise", p
  expected = _expected(params)
  assert len(expected) == 5 * LAYERS
  assert {p: tuple(kinds[p][1]) for p in expected} == expected
  assert step.discovery.outputs == ()  # the output map is the tied table
  # ... and the selection the step compresses is exactly that
  assert _selected(step, params, state) == expected

  assert [h["beta"] for h in history] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 0.0])
  assert all(np.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history)
  assert "accuracy" not in history[0]  # an Output is not a logits array

  # beta = 0: the compressed params are the ones the model runs on
  cparams = step.compressed_params(state)
  dense = dict(_paths.leaf_paths(state.params))
  for p, leaf in _paths.leaf_paths(cparams):
    c, w = np.asarray(leaf), np.asarray(dense[p])
    if p in expected:
      assert not np.array_equal(c, w), p
      # 4 bits: at most 16 levels in every group of 8 inputs of an output unit
      axes = expected[p]
      out_axes = [a for a in range(c.ndim) if a not in axes]
      rows = np.transpose(c, list(axes) + out_axes).reshape(-1, 8, int(np.prod(
          [c.shape[a] for a in out_axes])))
      assert max(len(np.unique(rows[g, :, j])) for g in range(rows.shape[0])
                 for j in range(rows.shape[2])) <= 16, p
    else:
      np.testing.assert_array_equal(c, w, err_msg=p)
  out, metrics = step.evaluate(state, {"inputs": TOKENS}, compressed=True)
  assert isinstance(out, Output) and metrics == {}
  reference = model.apply({"params": cparams}, TOKENS)
  np.testing.assert_allclose(out.logits, reference.logits, rtol=1e-6, atol=1e-6)
  blended, _ = step.evaluate(state, {"inputs": TOKENS}, compressed=False)  # beta is 0
  np.testing.assert_allclose(blended.logits, out.logits, rtol=1e-6, atol=1e-6)
  dense_out = model.apply({"params": state.params}, TOKENS)
  assert not np.allclose(dense_out.logits, out.logits, atol=1e-4)


def test_without_an_example_init_asks_for_it_before_anything_runs():
  model = CountingGemmaLike()
  params = _init(model)
  step = _make_step(model, loss_fn=next_token_loss)
  before = CALLS[0]
  with pytest.raises(ValueError, match="example=") as err:
    step.init(params)
  print("\n" + str(err.value))
  assert CALLS[0] == before  # the model was never traced
  assert not step._jitted  # pylint: disable=protected-access


def test_the_default_loss_on_an_output_dataclass_says_to_pass_loss_fn():
  model = GemmaLike()
  params = _init(model)
  step = _make_step(model, example=TOKENS)  # no loss_fn: softmax CE on batch["labels"]
  state = step.init(params)
  batch = {"inputs": TOKENS, "labels": TOKENS}
  with pytest.raises(ValueError, match="loss_fn") as err:
    step(state, batch)
  message = str(err.value)
  print("\n" + message)
  assert "\n" not in message and "Output" in message
  assert not step._jitted  # refused before the step was compiled


def test_export_round_trip_logits_equal_the_compressed_eval(trained, tmp_path):
  model, _, step, state, _ = trained
  rows = vj.export(step, state, tmp_path / "gemma.npz")
  formats = {r["name"]: r["transform"] for r in rows}
  assert {p for p, t in formats.items() if t} == set(_expected(state.params))
  loaded = vj.load_compressed(tmp_path / "gemma.npz")
  cparams = step.compressed_params(state)
  for a, b in zip(jax.tree.leaves(loaded.params()), jax.tree.leaves(cparams)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit
  assert jax.tree.structure(loaded.params()) == jax.tree.structure(cparams)
  reference, _ = step.evaluate(state, {"inputs": TOKENS})
  for decode in ("once", "on_the_fly"):
    out = loaded.apply(model, TOKENS, decode=decode)
    logits = out.logits if isinstance(out, Output) else out
    np.testing.assert_allclose(logits, reference.logits, rtol=1e-5, atol=1e-5,
                               err_msg=decode)


def test_the_real_gemma_package_gets_the_same_selection():
  gm = pytest.importorskip("gemma.gm")
  types = (gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL)
  config = dataclasses.replace(gm.nn.Gemma3_270M().config, num_embed=VOCAB, embed_dim=D,
                               hidden_dim=F, num_heads=N, head_dim=H, num_kv_heads=K,
                               attention_types=types, sliding_window_size=4)
  model = gm.nn.Gemma3_270M(config=config, dtype=jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), TOKENS))["params"]
  out = jax.eval_shape(lambda p: model.apply({"params": p}, TOKENS), shapes)
  assert isinstance(out, gm.nn.Output) and out.logits.shape == (*TOKENS.shape, VOCAB)
  found = vj.discover(lambda p, t: model.apply({"params": p}, t).logits, shapes, TOKENS)
  print("\n" + found.table())
  assert found.leaves["embedder/input_embedding"].kind == "tied"
  expected = _expected(shapes)
  assert len(expected) == 5 * LAYERS
  assert {p: tuple(u.in_axes) for p, u in found.leaves.items() if u.kind == "linear"} \
      == expected
  assert all(u.kind == "elementwise" for p, u in found.leaves.items() if p.endswith("scale"))
  # make_train_step's own trace (the Linen init by eval_shape) selects the same
  step = _make_step(model, loss_fn=next_token_loss, example=TOKENS)
  assert _selected(step, shapes) == expected
