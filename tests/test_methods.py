"""Every (method, compression) of the experiments builds and initialises on the models."""

import numpy as np
import pytest
from flax import nnx

import vcon_jax as vj
from vcon_experiments import compressions
from vcon_experiments import config as config_lib
from vcon_experiments import method_registry, methods
from vcon_experiments.models import get_model


@pytest.mark.parametrize("compression", tuple(compressions.REGISTRY))
@pytest.mark.parametrize("method", method_registry.HEADLINE)
@pytest.mark.parametrize("model", ["cnn"])
def test_method_builds_on_model(method, compression, model):
  kwargs = {"features": (16, 32), "hidden": 64} if model == "cnn" else {}
  module = get_model(model, rngs=nnx.Rngs(0), **kwargs)
  params = nnx.state(module, nnx.Param).to_pure_dict()
  cfg = config_lib.Config(model=model, method=method, compression=compression, steps=100)
  example = np.zeros((2, 28, 28, 1), np.float32)
  transform, schedule, distill = methods.build(cfg, params, module, example)
  state = transform.init(params)
  if method.startswith("vcon"):  # the default: fitted at init, a big jump here
    assert schedule == vj.fitted_vanish(100)
    schedule = schedule.measured(2.0)
  assert float(schedule(0)) == (1.0 if method.startswith("vcon") else 0.0)
  assert float(schedule(100)) == 0.0
  assert (distill > 0) == (method == "vcon-distill")
  assert state is not None


@pytest.mark.slow
def test_prune_units_in_the_suite_removes_whole_channels_of_the_cnn():
  module = get_model("cnn", rngs=nnx.Rngs(0), features=(16, 32), hidden=64)
  params = nnx.state(module, nnx.Param).to_pure_dict()
  cfg = config_lib.Config(model="cnn", method="post-shot", compression="prune-units",
                          sparsity=0.5, steps=100)
  assert cfg.run_name().startswith("same-task/s100/units50/")
  assert config_lib.severity_name(cfg) == "units 50%"
  transform, _, _ = methods.build(cfg, params, module, np.zeros((2, 28, 28, 1), np.float32))
  import vcon_jax as vj  # pylint: disable=import-outside-toplevel
  c = vj.compress(transform, params, transform.init(params))
  # every convolution's channels (through BatchNorm, max pooling and the flatten into fc)
  # and the fc units
  conv0 = np.asarray(c["convs"][0]["kernel"])  # (3, 3, 1, 16)
  assert np.sum(np.any(conv0 != 0, axis=(0, 1, 2))) == 8
  conv1 = np.asarray(c["convs"][1]["kernel"])  # (3, 3, 16, 32)
  assert np.sum(np.any(conv1 != 0, axis=(0, 1, 3))) == 8
  assert np.sum(np.any(conv1 != 0, axis=(0, 1, 2))) == 16
  fc = np.asarray(c["fc"]["kernel"])  # (7 * 7 * 32, 64): channel c is every 32nd row
  assert np.sum(np.any(fc != 0, axis=0)) == 32
  rows = np.any(fc != 0, axis=1).reshape(49, 32)
  assert np.all(rows == rows[0]) and rows[0].sum() == 16
  with pytest.raises(ValueError, match="needs the model"):
    methods.build(cfg, params)


def test_beta_hold_and_lr_restart_levers():
  """The study's levers: beta held at 1 for a share of the budget, then the transition;
  the learning rate restarts its warm-up + cosine where beta reaches 0; both named in the
  run directory and left out of the config dict at their defaults (old runs stay valid)."""
  from vcon_experiments import training  # pylint: disable=import-outside-toplevel
  cfg = config_lib.Config(method="vcon", steps=100, transition=0.2, beta_hold=0.1,
                          lr_schedule="restart", transition_rule="fixed")
  assert cfg.run_name() == "same-task/s100/prune90/vcon-Q20-hold10-lrrestart/seed0"
  assert "beta_hold" not in config_lib.Config().to_dict()
  assert "lr_schedule" not in config_lib.Config().to_dict()
  _, schedule, _ = methods.build(cfg, {"w": np.zeros((4, 4), np.float32)})
  assert [float(schedule(t)) for t in (0, 10, 20, 30, 40)] == [1.0, 1.0, 0.5, 0.0, 0.0]
  assert methods.transition_end(cfg) == 30
  assert methods.transition_end(cfg.replace(method="post-shot")) == 0
  tx = training.optimizer(1.0, 100, restart_at=30)
  lr = [float(s) for s in _learning_rates(tx, 100)]
  assert lr[29] < 0.05 and abs(lr[33] - 1.0) < 0.05 and lr[99] < 0.05
  with pytest.raises(ValueError, match="beta_hold"):
    cfg.replace(beta_hold=0.9)
  with pytest.raises(ValueError, match="lr_schedule"):
    cfg.replace(lr_schedule="step")


def _learning_rates(tx, steps):
  """The learning rate of each step of an AdamW + schedule: the update of a unit gradient
  after Adam's normalisation is -lr (to rounding), from a fresh state each step."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  out = []
  state = tx.init(jnp.zeros(()))
  for _ in range(steps):
    u, state = tx.update(jnp.ones(()), state, jnp.zeros(()))
    out.append(-u)
  return out


def test_post_shot_distill_is_post_shot_with_the_distillation_term():
  cfg = config_lib.Config(method="post-shot-distill", steps=100, distill_weight=1.0)
  assert cfg.run_name() == "same-task/s100/prune90/post-shot-distill-kd1/seed0"
  assert "post-shot-distill" not in method_registry.HEADLINE  # no preset runs it by default
  _, schedule, distill = methods.build(cfg, {"w": np.zeros((4, 4), np.float32)})
  assert float(schedule(0)) == 0.0 and distill == 1.0
  assert methods.transition_end(cfg.replace(lr_schedule="restart")) == 0


@pytest.mark.parametrize("method, run, end, beta0, distill", [
    ("post-shot", "prune90/post-shot", 0, 0.0, 0.0),
    ("gradual", "prune90/gradual-Q20-lrrestart", 20, 0.0, 0.0),
    ("vcon", "prune90/vcon-Q20-cosine-hold10-lrrestart", 30, 1.0, 0.0),
    ("vcon-distill", "prune90/vcon-distill-Q20-cosine-hold10-lrrestart-kd0.7", 30, 1.0, 0.7),
    ("dense", "dense", 0, 1.0, 0.0),
    ("post-shot-distill", "prune90/post-shot-distill-kd0.7", 0, 0.0, 0.7),
])
def test_each_method_entry_decides_its_run_name_transition_and_distillation(
    method, run, end, beta0, distill):
  """A method's transition names Q and the LR schedule (beta's shape and hold only where
  beta vanishes), its distillation the weight; one without compression no severity."""
  cfg = config_lib.Config(method=method, steps=100, beta_hold=0.1, beta_schedule="cosine",
                          lr_schedule="restart", distill_weight=0.7,
                          transition_rule="fixed").replace()
  assert cfg.run_name() == f"same-task/s100/{run}/seed0"
  assert methods.transition_end(cfg) == end
  _, schedule, weight = methods.build(cfg, {"w": np.zeros((4, 4), np.float32)})
  assert (float(schedule(0)), weight) == (beta0, distill)
  assert method_registry.fits_regime(method, "transfer") == (distill == 0.0)


def test_the_method_flag_describes_every_registered_method():
  text = config_lib.INFO["method"].help
  assert all(f"{name}: {m.label}" in text for name, m in method_registry.REGISTRY.items())
  assert config_lib.CHOICES["method"] == tuple(method_registry.REGISTRY)
