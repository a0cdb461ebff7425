"""Tests for the NNX classifiers in ``vcon_experiments.models``.

Most tests share one small configuration per model and fixed input shapes, so that JAX's
per-shape compilation caches are reused across tests.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vcon_experiments.model_registry import REGISTRY
from vcon_experiments.models import CNN, MLP, MaskedByteLM, TextTransformer, ViT, get_model

# Same rule as the library's default selection: lookup tables stay dense.
_TABLE_RE = re.compile(r"(?i)(embed|cls_token|class_token|pos_emb|position)")

# Small configurations sharing weight shapes: on CPU, initialising a kernel of a new shape
# compiles the random initialiser again, which dominates the cost of these tests.
_SMALL = {
    "mlp": dict(hidden=(16, 16)),
    "cnn": dict(features=(8, 8), hidden=16),
    "vit": dict(patch_size=7, dim=16, depth=1, heads=2, mlp_dim=16),
    "transformer": dict(max_len=32, dim=16, depth=1, heads=2, mlp_dim=16),
}
# The classifiers; the causal LM (``"lm"``) has its own tests (tests/test_lm.py).
CLASSIFIERS = sorted(n for n, spec in REGISTRY.items() if spec.classifier)
_IMAGES = jnp.asarray(np.random.default_rng(0).random((3, 28, 28, 1)), jnp.float32)
_LENGTHS = (16, 7, 0)  # a full row, a padded row and a row made only of padding


def _token_rows(length: int, pad_id: int = 0) -> np.ndarray:
  """Three rows of random non-pad tokens followed by ``pad_id`` up to ``length``."""
  rows = np.random.default_rng(1).integers(1, 258, (3, 16)).astype(np.int32)
  out = np.full((3, length), pad_id, np.int32)
  for i, n in enumerate(_LENGTHS):
    out[i, :n] = rows[i, :n]
  return out


_TOKENS = jnp.asarray(_token_rows(16))


def _small(name, **kwargs):
  return get_model(name, **{**_SMALL[name], **kwargs})


def _abstract_default(name, **kwargs):
  """A default-size model with ``jax.ShapeDtypeStruct`` leaves (nothing is computed)."""
  return nnx.eval_shape(lambda: get_model(name, **kwargs))


# Jitted forward pass (one compilation per model structure, mode and input shape is much
# cheaper than running the layers eagerly on CPU).
_forward = nnx.jit(lambda model, x: model(x))


def _input(name):
  return _TOKENS if name == "transformer" else _IMAGES


def _num_classes(name):
  return 45 if name == "transformer" else 10


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_output_shapes_in_train_and_eval_mode(name):
  extra = {} if name == "cnn" else dict(dropout=0.5)
  # Default sizes, traced abstractly.
  model = _abstract_default(name, **extra)
  x = jax.ShapeDtypeStruct(_input(name).shape, _input(name).dtype)
  for mode in (model.train, model.eval):
    mode()
    y = nnx.eval_shape(lambda model, x: model(x), model, x)
    assert (y.shape, y.dtype) == ((3, _num_classes(name)), jnp.float32)
  # Small sizes, computed.
  model = _small(name, **extra)
  for mode in (model.train, model.eval):
    mode()
    y = _forward(model, _input(name))
    assert (y.shape, y.dtype) == ((3, _num_classes(name)), jnp.float32)
    assert bool(jnp.all(jnp.isfinite(y)))


def test_train_and_eval_set_dropout_and_batchnorm_flags():
  model = _small("cnn", dropout=0.5)
  assert not model.dropout.deterministic  # NNX modules start in training mode
  model.eval()
  assert model.dropout.deterministic
  assert all(norm.use_running_average for norm in model.norms)
  model.train()
  assert not model.dropout.deterministic
  assert not any(norm.use_running_average for norm in model.norms)


def test_batchnorm_statistics_update_only_in_train_mode():
  model = _small("cnn")
  stats = lambda: jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  before = stats()
  model.train()
  _forward(model, _IMAGES)
  after_train = stats()
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, after_train)
  assert jax.tree.leaves(changed) == [True] * 4  # mean and var of both BatchNorms
  model.eval()
  y_batch = _forward(model, _IMAGES)
  jax.tree.map(np.testing.assert_array_equal, after_train, stats())
  # With running statistics an example's output does not depend on the rest of the batch.
  y_reversed = _forward(model, _IMAGES[::-1])
  np.testing.assert_allclose(y_batch, y_reversed[::-1], rtol=1e-5, atol=1e-5)


def test_cnn_average_pooling_and_non_square_images():
  model = CNN(features=(8,), hidden=16, image_size=(12, 8), pool="avg", rngs=nnx.Rngs(0))
  assert _forward(model, jnp.ones((2, 12, 8, 1))).shape == (2, 10)
  with pytest.raises(ValueError, match="pool"):
    CNN(pool="median", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="too small"):
    CNN(features=(4, 4, 4), image_size=4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_dropout_uses_rng_in_train_mode_only(name):
  x = _input(name)
  model = _small(name, dropout=0.5, rngs=1)
  model.train()
  y1, y2 = _forward(model, x), _forward(model, x)
  assert not np.allclose(y1, y2)  # the dropout stream advances between calls
  np.testing.assert_array_equal(_forward(_small(name, dropout=0.5, rngs=1), x), y1)  # same seed
  model.eval()
  np.testing.assert_array_equal(_forward(model, x), _forward(model, x))
  # In eval mode dropout is the identity: same output as the dropout-free model.
  fresh, reference = _small(name, dropout=0.5, rngs=1), _small(name, rngs=1)
  fresh.eval()
  reference.eval()
  np.testing.assert_allclose(_forward(fresh, x), _forward(reference, x), rtol=1e-6, atol=1e-6)


def test_dropout_rng_advances_under_jit():
  model = _small("mlp", dropout=0.5)
  assert not np.allclose(_forward(model, _IMAGES), _forward(model, _IMAGES))
  model.eval()
  np.testing.assert_array_equal(_forward(model, _IMAGES), _forward(model, _IMAGES))
  model.train()
  assert not np.allclose(model(_IMAGES), model(_IMAGES))  # and eagerly


@pytest.mark.parametrize("pad_id", [0, 258])
def test_text_model_ignores_padding(pad_id):
  model = _small("transformer", pad_id=pad_id, rngs=3)
  model.eval()
  short, long = _token_rows(16, pad_id), _token_rows(32, pad_id)
  y_short = _forward(model, jnp.asarray(short))
  np.testing.assert_allclose(y_short, _forward(model, jnp.asarray(long)), rtol=1e-5, atol=1e-5)
  # Rows do not interact, and tokens that are not padding do matter.
  changed = short.copy()
  changed[1, 0] = 1 if changed[1, 0] != 1 else 2
  y_changed = _forward(model, jnp.asarray(changed))
  np.testing.assert_allclose(y_changed[::2], y_short[::2], rtol=1e-5, atol=1e-5)
  assert not np.allclose(y_changed[1], y_short[1])
  # A row made only of padding pools to zeros, so its logits are head(norm(0)): no NaN.
  assert bool(jnp.all(jnp.isfinite(y_short)))
  np.testing.assert_allclose(y_short[2], model.head(model.norm(jnp.zeros((16,)))), atol=1e-6)


def test_text_model_rejects_sequences_longer_than_max_len():
  model = _small("transformer")
  with pytest.raises(ValueError, match="max_len"):
    model(jnp.ones((1, 33), jnp.int32))


def test_masked_byte_lm_runs_the_classifier_encoder_under_the_same_names():
  """The text transfer regime copies the pretrained encoder into the classifier by name."""
  lm = MaskedByteLM(vocab_size=259, max_len=32, dim=16, depth=1, heads=2, mlp_dim=16,
                    rngs=nnx.Rngs(5))
  clf = _small("transformer")
  lm_state = nnx.state(lm, nnx.Param).flat_state()
  clf_state = nnx.state(clf, nnx.Param).flat_state()
  encoder = {p for p, _ in lm_state if p[0] != "lm_head"}
  assert encoder == {p for p, _ in clf_state}
  nnx.update(clf, nnx.State({k: v for k, v in nnx.state(lm).items() if k != "lm_head"}))
  lm.eval()
  clf.eval()
  tokens = jnp.asarray(_token_rows(16))
  x_lm, mask = lm._encode(tokens)  # pylint: disable=protected-access
  x_clf, _ = clf._encode(tokens)  # pylint: disable=protected-access
  np.testing.assert_allclose(x_lm, x_clf, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(mask, tokens != 0)
  np.testing.assert_allclose(lm(tokens), lm.lm_head(lm.norm(x_lm)), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="max_len"):
    lm(jnp.ones((1, 33), jnp.int32))


def test_invalid_transformer_shapes():
  with pytest.raises(ValueError, match="divisible by heads"):
    ViT(dim=10, heads=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible by heads"):
    TextTransformer(dim=10, heads=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="patch_size"):
    ViT(image_size=28, patch_size=5, rngs=nnx.Rngs(0))


def test_registry():
  assert set(REGISTRY) == {"mlp", "cnn", "vit", "transformer", "lm"}
  assert isinstance(_small("mlp"), MLP)
  assert REGISTRY["vit"].load() is ViT and REGISTRY["transformer"].source() is MaskedByteLM
  # rngs may be given as a seed or as nnx.Rngs; the same seed gives the same weights.
  a, b = _small("mlp", rngs=5), _small("mlp", rngs=nnx.Rngs(5))
  np.testing.assert_array_equal(a.head.kernel[...], b.head.kernel[...])
  with pytest.raises(ValueError, match="Unknown model 'resnet'") as err:
    get_model("resnet")
  message = str(err.value).split(";", 1)[1]
  assert all(name in message for name in REGISTRY)


_DEFAULT_PARAMS = {"mlp": 269_322, "cnn": 421_738, "vit": 139_018, "transformer": 94_765}


def _expected_matrices(name, model):
  if name == "mlp":
    return {"layers/0/kernel", "layers/1/kernel", "head/kernel"}
  if name == "cnn":
    return {"convs/0/kernel", "convs/1/kernel", "fc/kernel", "head/kernel"}
  block = {f"blocks/{i}/{sub}/kernel" for i in range(len(model.blocks))
           for sub in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2")}
  if name == "vit":
    return block | {"patch_proj/kernel", "head/kernel", "cls_token", "pos_embedding"}
  return block | {"head/kernel", "embed/embedding", "pos_embedding"}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_matrix_params_are_exactly_kernels_and_tables(name):
  model = _abstract_default(name)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  shapes = {"/".join(map(str, path)): var.get_value().shape for path, var in flat}
  assert sum(int(np.prod(shape)) for shape in shapes.values()) == _DEFAULT_PARAMS[name]
  matrices = {path for path, shape in shapes.items() if len(shape) >= 2}
  assert matrices == _expected_matrices(name, model)
  assert all(path.endswith("/kernel") != bool(_TABLE_RE.search(path)) for path in matrices)
  if name in ("vit", "transformer"):  # projections are plain (in, out) matrices
    assert shapes["blocks/0/attn/query/kernel"] == (64, 64)
    assert shapes["blocks/0/mlp/fc1/kernel"] == (64, 128)
    assert shapes["blocks/0/mlp/fc2/kernel"] == (128, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_jitted_adam_step_reduces_loss(name):
  model = _small(name, rngs=2)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x, labels = _input(name), jnp.array([0, 1, 2])  # text input has a fully padded row

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads

  losses = []
  for _ in range(4):
    loss, grads = step(model, optimizer)
    losses.append(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
