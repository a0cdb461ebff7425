"""Test setup: two forced CPU devices so data parallelism is exercised everywhere.

``--xla_cpu_multi_thread_eigen=false``: with forced host devices on a 2-core machine, a
device blocked in an all-reduce can hold one of the two shared Eigen threads the other
device's matmul needs, and XLA aborts the process after 40 s (a rendezvous deadlock).
Single-threaded ops run each device on its own thread; pytest-xdist supplies the
parallelism instead.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=2", "--xla_cpu_multi_thread_eigen=false")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")] +
    [f for f in _FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the XLA flags, which must precede any JAX import)

#: The slowest tests of the fast tier (``pytest -m "not slow" --durations``, measured on
#: the 2-core CPU), each with a sibling that stays in the tier and runs the same code on
#: another format, dtype or model (or a test in CI's full run that covers it): marked ``slow`` so that the tier stays under about 3
#: minutes. CI runs them all.
SLOW_IN_FAST_TIER = {
    "test_native.py::test_native_linen_bfloat16",
    "test_native.py::test_auto_prefers_once_when_some_coded_kernel_is_not_a_site",
    "test_native.py::test_native_equals_once_nnx[prune-bfloat16]",
    "test_native.py::test_native_equals_once_nnx[prune-float32]",
    "test_native.py::test_native_equals_once_linen[prune]",
    "test_native.py::test_native_equals_once_linen[quantize3_g16_asym]",
    "test_native.py::test_native_leaves_other_layers_exact",
    "test_discover.py::test_nnx_vmap_scan_stack_is_found_and_pruned_per_layer",
    "test_discover.py::test_nnx_conv_linear_general_einsum_attention_axes_and_steps",
    "test_discover.py::test_fori_loop_layer_stacks[static]",
    "test_qwix_interop.py::test_linen_asymmetric_and_pruned_codes",
    "test_qwix_interop.py::test_nnx_logits_equal_with_statistics[bfloat16]",
    "test_reselect.py::test_wrap_optax_traces_with_apply_fn_params_example",
    "test_spec.py::test_chain_concatenates_its_members_specs_in_order",
    "test_blend.py::test_train_step_output_blend_is_the_reference_blend[prune]",
    "test_transforms.py::test_blend_endpoints[True-prune]",
    "test_transforms.py::test_straight_through_gradient[chain]",
    "test_transforms.py::test_prune_keeps_exact_count[neuron-None-None]",
    "test_export.py::test_linen_round_trip_and_sizes[prune]",
    "test_export_wrapped.py::test_nnx_optimizer_loop_exports_weights_and_batchnorm_statistics[quantize4_g8]",
    "test_prune_units.py::test_nnx_gated_mlp_shrinks_in_place",
    "test_prune_units.py::test_resume_mid_transition_is_bit_identical",
    "test_reliability.py::test_an_unfinished_pretraining_is_not_the_dense_model",
    "test_lm.py::test_cached_decode_gives_the_forward_pass_logits[float32]",
    "test_wrapper.py::test_adamw_mask_keyed_by_the_params_tree[low_rank]",
    "test_wrapper.py::test_nnx_own_loop_matches_make_train_step[low_rank]",
    "test_wrapper.py::test_init_compiled_or_eager_gives_the_eager_transform_state[stored_mask_chain]",
    "test_wrapper.py::test_linen_own_loop_matches_make_train_step[quantize]",
    "test_train_correctness.py::test_make_train_step_leaves_the_nnx_mode_alone[eval-NNXConvBNDrop]",
    "test_selection.py::test_biases_norms_untouched_on_attention_models[neuron]",
    "test_group_quantize.py::test_export_packs_codes_with_a_scale_per_group_exactly[<lambda>-4-False0-float32]",
    "test_reselect.py::test_linen_scanned_stack_gets_a_threshold_per_layer_from_the_example",
    "test_export.py::test_decode_modes_inputs_and_caching",
    "test_qwix_interop.py::test_refusals",
    "test_lm.py::test_cached_decode_gives_the_forward_pass_logits[bfloat16]",
    "test_lm.py::test_logits_are_causal_and_float32",
    "test_train_correctness.py::test_make_train_step_leaves_the_nnx_mode_alone[train-NNXConvBNDrop]",
    "test_native.py::test_native_equals_once_linen[prune+quantize8]",
    "test_native.py::test_native_equals_once_nnx[prune_2_4-bfloat16]",
    "test_native.py::test_native_equals_once_nnx[quantize3_g16_asym-float32]",
    "test_prune_units.py::test_the_shrunk_model_exports_with_its_smaller_shapes_and_runs_loaded",
    "test_models.py::test_output_shapes_in_train_and_eval_mode[vit]",
    "test_models.py::test_output_shapes_in_train_and_eval_mode[transformer]",
    "test_properties.py::test_prune_n_m_keeps_n_of_every_m",
}


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  found = set()
  for item in items:
    name = f"{item.path.name}::{item.name}"
    if name in SLOW_IN_FAST_TIER:
      item.add_marker(pytest.mark.slow)
      found.add(name)
  if len(items) > 300 and found != SLOW_IN_FAST_TIER:  # a whole-suite run: names must exist
    raise pytest.UsageError(f"conftest.SLOW_IN_FAST_TIER names tests that do not exist: "
                            f"{sorted(SLOW_IN_FAST_TIER - found)}")
