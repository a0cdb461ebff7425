"""Weight-space blending equals output-space blending for layers linear in W."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vcon_jax as vj

LAYERS = {
    "dense": (nn.Dense(7), (5, 9)),
    "conv": (nn.Conv(6, (3, 3)), (2, 8, 8, 4)),
    "attention_qkv": (nn.DenseGeneral((2, 4), use_bias=False), (3, 5, 8)),
    "attention_out": (nn.DenseGeneral(8, axis=(-2, -1)), (3, 5, 2, 4)),
}
TRANSFORMS = {
    "prune": lambda: vj.prune(sparsity=0.6),
    "binarize": vj.binarize,
    "quantize": lambda: vj.quantize(bits=2),
    "low_rank": lambda: vj.low_rank(rank=2),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("tname", sorted(TRANSFORMS))
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_weight_blend_equals_output_blend(layer, tname, beta):
  module, shape = LAYERS[layer]
  x = jnp.asarray(np.random.RandomState(0).randn(*shape), jnp.float32)
  params = module.init(jax.random.key(0), x)["params"]
  t = TRANSFORMS[tname]()
  s = t.init(params)
  apply_fn = lambda p, inp: module.apply({"params": p}, inp)
  weight_space = apply_fn(vj.blend_weights(t, params, s, beta), x)
  output_space = vj.output_blend_apply(apply_fn, t, params, s, beta, x)
  np.testing.assert_allclose(weight_space, output_space, rtol=1e-5, atol=1e-5)
