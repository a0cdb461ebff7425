"""Save, restore in a fresh process, continue: bit-identical to an uninterrupted run."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import vcon_jax as vj

SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax, optax, flax.linen as nn
    import vcon_jax as vj

    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))

    mode, ckpt, out, total, stop = sys.argv[1], sys.argv[2], sys.argv[3], 8, 3
    model = MLP()
    rng = np.random.RandomState(0)
    batches = [{"inputs": rng.randn(8, 10).astype(np.float32),
                "labels": rng.randint(0, 4, 8)} for _ in range(total)]
    params = model.init(jax.random.key(0), batches[0]["inputs"])["params"]
    transform = vj.chain(vj.prune(sparsity=0.7, update_every=2), vj.low_rank(rank=3))
    step = vj.make_train_step(model, transform, vj.linear_vanish(5), optax.adamw(1e-2))
    state = step.init(params)
    start = 0
    if mode == "resume":
      state = vj.restore(ckpt, state)
      start = int(state.step)
    betas = []
    for i in range(start, total if mode != "first" else stop):
      state, m = step(state, batches[i])
      betas.append(float(m["beta"]))
    if mode == "first":
      vj.save(state, ckpt)
    leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]
    np.savez(out, *leaves, betas=np.array(betas))
""")


def _run(tmp_path, *args):
  script = tmp_path / "run.py"
  script.write_text(SCRIPT)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  subprocess.run([sys.executable, str(script), *args], check=True, env=env,
                 capture_output=True, text=True)


@pytest.mark.slow
def test_resume_in_fresh_process_is_bit_identical(tmp_path):
  ckpt = str(tmp_path / "ckpt")
  _run(tmp_path, "full", ckpt, str(tmp_path / "full.npz"))
  _run(tmp_path, "first", ckpt, str(tmp_path / "first.npz"))
  _run(tmp_path, "resume", ckpt, str(tmp_path / "resume.npz"))
  full, resumed = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resume.npz")
  assert resumed["betas"][0] == full["betas"][3], "beta resumes at the step it stopped"
  names = [k for k in full.files if k != "betas"]
  assert names and names == [k for k in resumed.files if k != "betas"]
  for k in names:
    np.testing.assert_array_equal(full[k], resumed[k])


def test_restore_into_a_different_model_names_the_first_mismatch(tmp_path):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  state = {"params": {"a": {"kernel": jnp.ones((4, 3))}, "b": {"kernel": jnp.ones((3, 2))}}}
  vj.save(state, tmp_path / "ck", step=1)
  other = {"params": {"a": {"kernel": jnp.ones((4, 3))}, "b": {"kernel": jnp.ones((3, 5))}}}
  with pytest.raises(ValueError, match=r"params\.b\.kernel: saved shape \(3, 2\), expected "
                                       r"shape \(3, 5\)"):
    vj.restore(tmp_path / "ck", other)


def test_save_keeps_the_steps_it_was_not_asked_to_remove(tmp_path):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  for step in range(5):
    vj.save({"w": jnp.full(2, step)}, tmp_path / "ck", step=step)
  assert vj.CheckpointManager(tmp_path / "ck", max_to_keep=None).all_steps() == [0, 1, 2, 3, 4]
  vj.save({"w": jnp.full(2, 5)}, tmp_path / "ck", step=5, max_to_keep=2)  # asked to
  assert vj.CheckpointManager(tmp_path / "ck", max_to_keep=None).all_steps() == [4, 5]
