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
    "conv": (nn.Conv(6, (3, 3)), (2, 8, 8, 4), None),
    "attention_qkv": (nn.DenseGeneral((2, 4), use_bias=False), (3, 5, 8), {"kernel": 1}),
    "attention_out": (nn.DenseGeneral(8, axis=(-2, -1)), (3, 5, 2, 4), {"kernel": 2}),
}
TRANSFORMS = {
    "prune": lambda in_axes: vj.prune(sparsity=0.6, in_axes=in_axes),
    "binarize": lambda in_axes: vj.binarize(),
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
