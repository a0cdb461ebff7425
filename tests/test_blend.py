"""Weight-space blending equals output-space blending for layers linear in W."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vcon_jax as vj

# layer, input shape, the kernel's input axes (a DenseGeneral kernel does not say them)
LAYERS = {
    "dense": (nn.Dense(7), (5, 9), None),
    "conv": (nn.Conv(6, (3, 3)), (2, 8, 8, 4), {"kernel": (0, 1, 2)}),
    "attention_qkv": (nn.DenseGeneral((2, 4), use_bias=False), (3, 5, 8), {"kernel": 1}),
    "attention_out": (nn.DenseGeneral(8, axis=(-2, -1)), (3, 5, 2, 4), {"kernel": 2}),
}
TRANSFORMS = {
    "prune": lambda in_axes: vj.prune(sparsity=0.6, in_axes=in_axes),
    "binarize": lambda in_axes: vj.binarize(
        selection=vj.Selection(in_axes=in_axes) if in_axes else None),
    "quantize": lambda in_axes: vj.quantize(bits=2, in_axes=in_axes),
    "low_rank": lambda in_axes: vj.low_rank(rank=2, in_axes=in_axes),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("tname", sorted(TRANSFORMS))
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_weight_blend_equals_output_blend(layer, tname, beta):
  module, shape, in_axes = LAYERS[layer]
  x = jnp.asarray(np.random.RandomState(0).randn(*shape), jnp.float32)
  params = module.init(jax.random.key(0), x)["params"]
  t = TRANSFORMS[tname](in_axes)
  s = t.init(params)
  apply_fn = lambda p, inp: module.apply({"params": p}, inp)
  weight_space = apply_fn(vj.ops.blend_weights(t, params, s, beta), x)
  output_space = vj.ops.output_blend_apply(apply_fn, t, params, s, beta, x)
  np.testing.assert_allclose(weight_space, output_space, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tname", ["prune", "low_rank"])
def test_train_step_output_blend_is_the_reference_blend(tname):
  """``make_train_step(blend="outputs")`` runs the one output-space blend: its loss at
  beta = 0.5 is the reference ``output_blend_apply``'s, and for a layer linear in W its
  step lands where the weight-space step does."""
  import optax  # pylint: disable=import-outside-toplevel
  module = nn.Dense(7)
  x = jnp.asarray(np.random.RandomState(0).randn(8, 9), jnp.float32)
  labels = jnp.arange(8) % 7
  params = module.init(jax.random.key(0), x)["params"]
  t = TRANSFORMS[tname](None)
  steps = {blend: vj.make_train_step(module, t, vj.linear_vanish(2), optax.sgd(0.1),
                                     blend=blend, train_kwargs={}, eval_kwargs={},
                                     donate=False)
           for blend in ("outputs", "weights")}
  batch = {"inputs": x, "labels": labels}
  first = {b: s(s.init({"params": params}), batch)[0] for b, s in steps.items()}
  out = {b: s(first[b], batch) for b, s in steps.items()}  # the step at beta = 0.5
  apply_fn = lambda p, inp: module.apply({"params": p}, inp)
  s1 = first["outputs"]
  ref = vj.ops.output_blend_apply(apply_fn, t, s1.params, s1.transform_state, 0.5, x,
                                  count=s1.step)
  ref_loss = vj.softmax_cross_entropy(ref, batch)
  assert float(out["outputs"][1]["beta"]) == 0.5
  np.testing.assert_allclose(out["outputs"][1]["loss"], ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out["outputs"][0].params),
                  jax.tree.leaves(out["weights"][0].params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
