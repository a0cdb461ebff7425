"""What happens when things go wrong: non-finite steps, locks, corrupt checkpoints."""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import vcon_jax as vj
from vcon_experiments import config as config_lib
from vcon_experiments import pretrain, runner, tasks
from vcon_experiments.io import RunDir, RunLockedError

TINY = config_lib.Config(model="mlp", model_kwargs={"hidden": (16,)}, train_limit=512,
                         test_limit=128, pretrain_steps=8, steps=12, eval_every=4,
                         eval_examples=64, checkpoint_every=4, batch_size=32)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def test_skip_nonfinite_leaves_state_and_flags_the_step():
  model = MLP()
  x = np.ones((4, 5), np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  step = vj.make_train_step(model, vj.prune(sparsity=0.5), vj.linear_vanish(4),
                            optax.adam(1e-2), skip_nonfinite=True)
  state = step.init(params)
  state, m = step(state, {"inputs": x, "labels": np.zeros(4, np.int32)})
  assert float(m["nonfinite"]) == 0.0
  before = jax.device_get(state.params)
  bad = x.copy()
  bad[0, 0] = np.nan
  state, m = step(state, {"inputs": bad, "labels": np.zeros(4, np.int32)})
  assert float(m["nonfinite"]) == 1.0 and int(state.step) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_and_keeps_checkpoint(tmp_path, monkeypatch):
  real = tasks.batch_at

  def poisoned(arrays, step, batch_size, seed):
    b = real(arrays, step, batch_size, seed)
    if step == 5:  # the 6th step
      b = {**b, "inputs": np.full_like(b["inputs"], np.nan)}
    return b

  pretrain.pretrain(TINY, tmp_path, progress=False)
  monkeypatch.setattr(tasks, "batch_at", poisoned)
  with pytest.raises(FloatingPointError, match=r"at step 6 .*checkpoint \(step 4\)"):
    runner.train_and_evaluate(TINY, tmp_path, progress=False)
  run = tmp_path / TINY.run_name()
  assert sorted(os.listdir(run / "checkpoints")) == ["4"]
  assert not (run / "result.json").exists() and not (run / "LOCK").exists()
  # with the skip option the same data finishes and counts the bad step
  result = runner.train_and_evaluate(TINY.replace(seed=1), tmp_path, progress=False,
                                     on_nonfinite="skip")
  rows = \
      [json.loads(line) for line in (tmp_path / TINY.replace(seed=1).run_name() /
                               "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["nonfinite_total"] == 1.0 and np.isfinite(result["test_accuracy"])


def test_second_run_on_the_same_directory_refuses(tmp_path):
  run = RunDir(tmp_path / "r", {"a": 1})
  with run.lock():
    with pytest.raises(RunLockedError, match="in use by process"):
      with RunDir(tmp_path / "r", {"a": 1}).lock():
        pass
  # a lock left by a dead process is taken over (with a warning)
  (tmp_path / "r" / "LOCK").write_text(f"{os.uname().nodename} 999999999")
  with pytest.warns(UserWarning, match="stale lock"):
    with run.lock():
      pass


def test_different_config_in_the_same_directory_is_refused(tmp_path):
  with RunDir(tmp_path / "r", {"lr": 0.1, "steps": 3}).lock():
    pass
  with pytest.raises(ValueError, match="differs in: lr"):
    RunDir(tmp_path / "r", {"lr": 0.2, "steps": 3})


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_skipped_with_a_warning(tmp_path):
  pretrain.pretrain(TINY, tmp_path, progress=False)
  cfg = TINY.replace(steps=8)
  run = tmp_path / cfg.run_name()
  # run the first 8 steps, then pretend the last checkpoint write was torn
  result = runner.train_and_evaluate(cfg, tmp_path, progress=False)
  os.remove(run / "result.json")
  for f in (run / "checkpoints" / "8").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.warns(UserWarning, match="checkpoints/8 is unreadable"):
    again = runner.train_and_evaluate(cfg, tmp_path, progress=False)
  assert again["test_accuracy"] == result["test_accuracy"]  # redone from step 4, same
  shutil.rmtree(run)


@pytest.mark.slow
def test_a_dense_result_committed_without_its_checkpoint_is_pretrained_again(tmp_path):
  """Results are committed without checkpoints: a fresh clone must still be able to run
  the compressions that need the dense model, and get the same dense model."""
  first = pretrain.pretrain(TINY, tmp_path, progress=False)
  run = next(tmp_path.glob("dense"))
  shutil.rmtree(run / "checkpoints")
  again = pretrain.pretrain(TINY, tmp_path, progress=False)
  assert again["test_accuracy"] == first["test_accuracy"]  # seeded: the same weights
  r = runner.train_and_evaluate(TINY.replace(method="post-shot"), tmp_path, progress=False)
  assert 0.0 <= r["test_accuracy"] <= 1.0


def test_an_unfinished_pretraining_is_not_the_dense_model(tmp_path):
  """While another process pretrains again (a fresh clone, two --shard processes), the
  committed dense result and that process's earlier checkpoints are on disk: they must not
  pass for the finished dense model (a run would start from a half-trained one)."""
  first = pretrain.pretrain(TINY, tmp_path, progress=False)
  run = RunDir(tmp_path / "dense", TINY.dense_key())
  final = run.path / "checkpoints" / str(first["steps"])
  assert pretrain._has_checkpoint(run, first["steps"])  # pylint: disable=protected-access
  final.rename(run.path / "checkpoints" / "1")
  assert not pretrain._has_checkpoint(run, first["steps"])  # pylint: disable=protected-access
