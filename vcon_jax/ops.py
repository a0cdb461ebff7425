"""The pure functions behind the transforms, the reference blends, and wrap_optax's state.

Most code never needs these: the transforms (:func:`vcon_jax.prune`, ...) call them. They
are public for those who build on them:

* the compressions as functions of an array: :func:`magnitude_mask` (the exact top-k
  mask :func:`vcon_jax.prune` uses), :func:`topk_mask`, :func:`quantize_values`
  (:func:`vcon_jax.quantize`'s values), :func:`svd_factors` (:func:`vcon_jax.low_rank`'s
  initial factors);
* the reference blends the tests compare the library's one-pass blend against:
  :func:`blend_weights`, :func:`blend_outputs`, :func:`output_blend_apply`;
* the parts of a :func:`vcon_jax.wrap_optax` state: :class:`WithState` and
  :func:`vcon_state` (what the wrapper keeps inside an ``optax`` state, and how to find it).
"""

from vcon_jax._blend import blend_outputs, blend_weights, output_blend_apply
from vcon_jax._low_rank import svd_factors
from vcon_jax._core import WithState
from vcon_jax._optax_wrapper import vcon_state
from vcon_jax._prune import magnitude_mask, topk_mask
from vcon_jax._quantize import quantize_values

__all__ = ["WithState", "blend_outputs", "blend_weights", "magnitude_mask",
           "output_blend_apply", "quantize_values", "svd_factors", "topk_mask", "vcon_state"]
