"""vcon_jax: Vanishing Contributions for JAX/Flax.

Turn a trained network into a pruned, quantised or low-rank one smoothly: every selected
weight is blended as ``beta * W + (1 - beta) * C(W)`` while beta goes from 1 to 0.
"""

from vcon_jax import ops
from vcon_jax._checkpoint import CheckpointManager, CheckpointMismatchError, restore, save
from vcon_jax._coupling import Member, UnitGroup
from vcon_jax._losses import Distillation, distill, softmax_cross_entropy
from vcon_jax._low_rank import low_rank
from vcon_jax._core import TrainState, VconState
from vcon_jax._fitted import FittedVanish, fitted_transition, fitted_vanish, output_jump
from vcon_jax._optax_wrapper import blended_params, compressed_params, dense_params, wrap_optax
from vcon_jax._paths import DEFAULT_EXCLUDE
from vcon_jax._prune import prune
from vcon_jax._quantize import binarize, quantize
from vcon_jax._replicate import replicate, unreplicate
from vcon_jax._selection import Selection
from vcon_jax._schedules import constant, cosine_vanish, linear_vanish, polynomial_ramp
from vcon_jax._shrink import Shrunk, shrink
from vcon_jax._spec import LeafSpec
from vcon_jax._step_options import BatchKeys, ModelKwargs, Parallel
from vcon_jax._trace import Discovery, discover
from vcon_jax._train import TrainStep, make_train_step
from vcon_jax._transform import (LeafRule, RuleCompress, RuleDescribe, RuleInit, RuleRefresh,
                                  Transform, TransformState, blend_leaf, chain, compress,
                                  identity, leafwise)
from vcon_jax._transform import reselected as reselect
from vcon_jax._units import Units, find_units, prune_units
from vcon_jax._validate import check_beta_schedule
from vcon_jax.export import (CompressedModel, Summary, export, load_compressed, summary,
                             to_qwix)

__version__ = "0.3.0"

# Grouped as optax groups its API; the pure functions, reference blends and wrap_optax's
# state parts are in the `vcon_jax.ops` submodule.
__all__ = [
    # transforms
    "prune", "quantize", "binarize", "low_rank", "prune_units", "chain", "identity",
    # beta schedules
    "fitted_vanish", "output_jump", "fitted_transition", "FittedVanish",
    "linear_vanish", "cosine_vanish", "polynomial_ramp", "constant", "check_beta_schedule",
    # training
    "make_train_step", "Parallel", "BatchKeys", "ModelKwargs", "wrap_optax", "TrainStep",
    "TrainState", "distill", "Distillation",
    "softmax_cross_entropy", "compressed_params", "blended_params", "dense_params",
    "compress", "replicate", "unreplicate",
    # selecting what to compress
    "Selection", "discover", "Discovery", "reselect", "find_units", "Units", "UnitGroup", "Member",
    "DEFAULT_EXCLUDE",
    # export and serving
    "export", "load_compressed", "summary", "Summary", "CompressedModel", "to_qwix",
    "shrink", "Shrunk",
    # checkpoints
    "save", "restore", "CheckpointManager", "CheckpointMismatchError",
    # extending: a new compression as a rule on one leaf (ARCHITECTURE.md)
    "leafwise", "LeafRule", "RuleInit", "RuleCompress", "RuleRefresh", "RuleDescribe",
    "blend_leaf",
    # types
    "Transform", "TransformState", "LeafSpec", "VconState",
    # the rest
    "ops",
]

_MOVED = set(ops.__all__)


def __getattr__(name):
  if name in _MOVED:  # the old spelling works for now, and says where the name went
    import warnings  # pylint: disable=import-outside-toplevel
    warnings.warn(f"vcon_jax.{name} moved to vcon_jax.ops.{name} (the pure functions, "
                  f"reference blends and wrap_optax state parts live there); the old name "
                  f"will go.", DeprecationWarning, stacklevel=2)
    return getattr(ops, name)
  raise AttributeError(f"module 'vcon_jax' has no attribute {name!r}")
