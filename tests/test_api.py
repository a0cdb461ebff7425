"""Public API hygiene: keyword-only flags, the flat export list."""

import jax.numpy as jnp
import pytest

import vcon_jax as vj


@pytest.mark.parametrize("make", [lambda: vj.prune(sparsity=0.5), vj.identity,
                                  lambda: vj.chain(vj.prune(sparsity=0.5), vj.binarize())])
def test_exact_is_keyword_only(make):
  t = make()
  params = {"kernel": jnp.arange(6.0).reshape(2, 3)}
  state = t.init(params)
  with pytest.raises(TypeError):
    t.apply(params, state, 0.0, 0, True)  # a bare positional flag
  out = t.apply(params, state, 0.0, 0, exact=True)
  assert out["kernel"].shape == (2, 3)


def test_public_names():
  assert {"LeafSpec", "export", "load_compressed", "summary", "CompressedModel",
          "Summary"} <= set(vj.__all__)
  assert all(hasattr(vj, name) for name in vj.__all__)
  assert callable(vj.export) and vj.CompressedModel.__module__ == "vcon_jax.export.runtime"
