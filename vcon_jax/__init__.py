"""vcon_jax: Vanishing Contributions for JAX/Flax.

Turn a trained network into a pruned, quantised or low-rank one smoothly: every selected
weight is blended as ``beta * W + (1 - beta) * C(W)`` while beta goes from 1 to 0.
"""

from vcon_jax._blend import blend_outputs, blend_weights, output_blend_apply
from vcon_jax._checkpoint import CheckpointManager, CheckpointMismatchError, restore, save
from vcon_jax._losses import Distillation, distill
from vcon_jax.export import (CompressedModel, Summary, export, load_compressed, summary,
                             to_qwix)
from vcon_jax._low_rank import low_rank, svd_factors
from vcon_jax._optax_wrapper import (VconState, WithState, blended_params, compressed_params,
                                     dense_params, vcon_state, wrap_optax)
from vcon_jax._paths import DEFAULT_EXCLUDE
from vcon_jax._prune import magnitude_mask, prune, topk_mask
from vcon_jax._quantize import binarize, quantize, quantize_values
from vcon_jax._spec import LeafSpec
from vcon_jax._coupling import Member, UnitGroup
from vcon_jax._shrink import Shrunk, shrink
from vcon_jax._units import Units, find_units, prune_units
from vcon_jax._replicate import replicate, unreplicate
from vcon_jax._schedules import (check_beta_schedule, constant, cosine_vanish, linear_vanish,
                                 polynomial_ramp)
from vcon_jax._losses import softmax_cross_entropy
from vcon_jax._trace import Discovery, discover
from vcon_jax._train import TrainState, TrainStep, make_train_step
from vcon_jax._transform import Transform, TransformState, chain, compress, identity
from vcon_jax._transform import reselected as reselect

__version__ = "0.1.0"

__all__ = [
    "binarize",
    "blended_params",
    "blend_outputs",
    "blend_weights",
    "chain",
    "check_beta_schedule",
    "compress",
    "compressed_params",
    "dense_params",
    "discover",
    "reselect",
    "Discovery",
    "distill",
    "constant",
    "cosine_vanish",
    "export",
    "find_units",
    "DEFAULT_EXCLUDE",
    "identity",
    "linear_vanish",
    "load_compressed",
    "low_rank",
    "magnitude_mask",
    "make_train_step",
    "output_blend_apply",
    "polynomial_ramp",
    "prune",
    "prune_units",
    "Member",
    "shrink",
    "Shrunk",
    "UnitGroup",
    "Units",
    "quantize",
    "quantize_values",
    "replicate",
    "restore",
    "save",
    "softmax_cross_entropy",
    "summary",
    "svd_factors",
    "to_qwix",
    "topk_mask",
    "vcon_state",
    "wrap_optax",
    "unreplicate",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CompressedModel",
    "Distillation",
    "LeafSpec",
    "Summary",
    "TrainState",
    "TrainStep",
    "Transform",
    "TransformState",
    "VconState",
    "WithState",
]
