"""Mistakes caught before jit with a message that says what to pass (vcon_jax/_checks.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vcon_jax as vj
from foreign_models import (CLASSES, LinenAttention, LinenConvBNDrop, NNXAttention,
                            NNXConvBNDrop, image_batch, seq_batch)


def _linen_attention_step(**kw):
  model = LinenAttention()
  variables = model.init(jax.random.key(0), seq_batch()["inputs"])
  step = vj.make_train_step(model, vj.prune(sparsity=0.5), vj.linear_vanish(4),
                            optax.adam(1e-2), **kw)
  return step, step.init(variables), seq_batch


def _nnx_attention_step(**kw):
  step = vj.make_train_step(NNXAttention(nnx.Rngs(0)), vj.prune(sparsity=0.5),
                            vj.linear_vanish(4), optax.adam(1e-2), **kw)
  return step, step.init(), seq_batch


def _nnx_conv_step(**kw):
  step = vj.make_train_step(NNXConvBNDrop(nnx.Rngs(0)), vj.binarize(), vj.linear_vanish(4),
                            optax.adam(1e-2), **kw)
  return step, step.init(), image_batch


STEPS = {"linen_attention": _linen_attention_step, "nnx_attention": _nnx_attention_step,
         "nnx_conv_bn_dropout": _nnx_conv_step}


@pytest.mark.parametrize("make", STEPS.values(), ids=STEPS.keys())
@pytest.mark.parametrize("labels,match", [
    (lambda y: y.astype(np.float32), "dtype float32"),
    (lambda y: np.eye(CLASSES, dtype=np.float32)[y], "one-hot"),
    (lambda y: np.eye(CLASSES, dtype=np.int32)[y], "one-hot"),
    (lambda y: y[:, None], r"reshape\(-1\)"),
    (lambda y: y + CLASSES, r"must lie in \[0, 5\)"),
    (lambda y: y - 1, r"class ids in \[-1, 3\]"),
], ids=["float", "one_hot", "one_hot_int", "column", "too_large", "negative"])
def test_bad_labels_fail_before_jit(make, labels, match):
  step, state, batch_of = make()
  batch = batch_of()
  batch["labels"] = labels(batch["labels"])
  with pytest.raises(ValueError, match=match):
    step(state, batch)
  assert not step._jitted  # pylint: disable=protected-access  nothing was compiled
  with pytest.raises(ValueError, match=match):
    step.evaluate(state, batch)


@pytest.mark.slow
def test_labels_out_of_range_on_device_are_not_silent():
  step, state, batch_of = _linen_attention_step()
  batch = batch_of()
  labels = batch["labels"].copy()
  labels[0] = -1  # jnp indexing would wrap it round to the last class
  batch["labels"] = jnp.asarray(labels)  # a device array: not copied back to check
  _, m = step(state, batch)
  assert np.isnan(float(m["loss"]))
  assert float(m["invalid_labels"]) == pytest.approx(1 / len(labels))


class _Unfetchable:
  """Labels that cannot be copied to the host, as a global array spanning other
  processes' devices (the multi-host test)."""

  shape, dtype = (8,), np.dtype(np.int32)

  def __array__(self, *args, **kwargs):
    raise RuntimeError("labels fetched to the host")


def test_device_labels_are_checked_without_fetching_them():
  from vcon_jax import _checks  # pylint: disable=import-outside-toplevel
  _checks.check_labels(_Unfetchable(), (8, CLASSES))  # shape and dtype only
  with pytest.raises(ValueError, match="shape"):
    _checks.check_labels(_Unfetchable(), (4, CLASSES))


def test_loss_fn_taking_labels_is_explained():
  loss = lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(
      logits, labels).mean()
  step, state, batch_of = _nnx_attention_step(loss_fn=loss)
  with pytest.raises(ValueError, match=r"second argument is named 'labels'.*batch dict"):
    step(state, batch_of())
  with pytest.raises(TypeError, match=r"loss_fn\(logits, batch\)"):
    vj.make_train_step(LinenAttention(), vj.binarize(), vj.linear_vanish(2),
                       loss_fn=lambda logits: logits.mean())
  step, state, batch_of = _nnx_attention_step(loss_fn=lambda logits, batch: logits)
  with pytest.raises(ValueError, match="scalar loss"):
    step(state, batch_of())


def test_state_that_is_not_a_train_state():
  step, state, batch_of = _linen_attention_step()
  with pytest.raises(TypeError, match=r"got None as state; pass the state returned by "
                                      r"step.init"):
    step(None, batch_of())
  with pytest.raises(TypeError, match=r"model's params.*step.init"):
    step(state.params, batch_of())
  with pytest.raises(TypeError, match="step.init"):
    step.evaluate(state.params, batch_of())


def test_linen_batchnorm_given_params_alone_fails_at_init():
  model = LinenConvBNDrop()
  variables = model.init(jax.random.key(0), image_batch()["inputs"], train=False)
  step = vj.make_train_step(model, vj.prune(sparsity=0.5), vj.linear_vanish(2))
  with pytest.raises(ValueError, match=r"BatchNorm_0.*step.init\(variables\)"):
    step.init(variables["params"])


def test_linen_missing_collection_fails_before_jit():
  class Net(nn.Module):  # a BatchNorm whose name does not say so
    @nn.compact
    def __call__(self, x, train: bool):
      return nn.Dense(3)(nn.BatchNorm(use_running_average=not train, name="norm")(x))

  x = np.ones((4, 6), np.float32)
  variables = Net().init(jax.random.key(0), x, train=False)
  step = vj.make_train_step(Net(), vj.prune(sparsity=0.5), vj.linear_vanish(2))
  state = step.init(variables["params"])
  with pytest.raises(ValueError, match=r"batch_stats.*whole dict model.init"):
    step(state, {"inputs": x, "labels": np.zeros(4, np.int32)})
  assert not step._jitted  # pylint: disable=protected-access  nothing was compiled


def test_nnx_step_given_linen_variables_fails_at_init():
  step = vj.make_train_step(NNXConvBNDrop(nnx.Rngs(0)), vj.binarize(), vj.linear_vanish(2))
  linen = LinenConvBNDrop().init(jax.random.key(0), image_batch()["inputs"], train=False)
  with pytest.raises(ValueError, match=r"Linen variables.*step.init\(\)"):
    step.init(linen)
  with pytest.raises(ValueError, match=r"step.init\(\)"):
    step.init(linen["params"])


def test_pmap_step_called_without_pmap():
  step, state, batch_of = _linen_attention_step(axis_name="batch")
  with pytest.raises(ValueError, match=r"wrap it in jax.pmap\(step, axis_name='batch'\)"):
    step(state, batch_of())


def test_views_of_a_replicated_state_ask_for_unreplicate():
  step, state, _ = _linen_attention_step(axis_name="batch")
  replicated = vj.replicate(state)
  for view in (step.compressed_params, step.update_model, step.blended_params):
    with pytest.raises(ValueError, match=r"leading device axis.*vj.unreplicate\(state\)"):
      view(replicated)


def test_both_linen_collection_errors_give_the_same_fix_word_for_word():
  from vcon_jax import _checks  # pylint: disable=import-outside-toplevel
  fix = "pass step.init(variables) with the whole dict model.init(...) returns"
  assert str(_checks.missing_collection_error(KeyError("batch_stats"))) == (
      f"the model needs a variable collection the state lacks ('batch_stats'); {fix} "
      f"(e.g. 'params' and 'batch_stats'), not variables['params'].")
  with pytest.raises(ValueError) as err:
    _checks.check_linen_variables({"BatchNorm_0": {"scale": np.ones(3)}})
  assert str(err.value) == (f"init got the params alone, but the model has BatchNorm layers "
                            f"(BatchNorm_0) whose statistics live in 'batch_stats': {fix}.")
