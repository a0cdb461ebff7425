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


def test_api_groups_and_moved_names():
  """Users' names at the top; the pure functions, reference blends and wrap_optax state
  parts in vcon_jax.ops; the old top-level spelling still works and warns where they went."""
  assert len(vj.__all__) == len(set(vj.__all__))
  for name in vj.ops.__all__:
    assert name not in vj.__all__ and hasattr(vj.ops, name)
    with pytest.warns(DeprecationWarning, match=f"moved to vcon_jax.ops.{name}"):
      assert getattr(vj, name) is getattr(vj.ops, name)
  with pytest.raises(AttributeError, match="no attribute"):
    _ = vj.not_a_name
