"""Two processes on localhost (jax.distributed, CPU collectives through gloo), 2 CPU
devices each, params split over all 4 devices: train, checkpoint with Orbax, restore in
2 new processes, continue; the result equals one process with 4 devices.
"""

import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # several processes, each starting JAX

WORKER = textwrap.dedent('''
    import json, sys
    mode, ckpt, out, port, pid, nproc = sys.argv[1:7]
    pid, nproc = int(pid), int(nproc)
    import numpy as np, jax, optax, flax.linen as nn
    if nproc > 1:
      # everything given: no cluster detection (a CI runner's environment must not count)
      jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid,
                                 initialization_timeout=600,
                                 cluster_detection_method="deactivate")
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import vcon_jax as vj

    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(8)(nn.relu(nn.Dense(32)(x)))

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    model = MLP()
    rng = np.random.RandomState(0)
    batches = [{"inputs": rng.randn(16, 16).astype(np.float32),
                "labels": rng.randint(0, 8, 16)} for _ in range(20)]
    params = model.init(jax.random.key(0), batches[0]["inputs"])["params"]
    # every kernel split over all 4 devices (rows over 'data', columns over 'model')
    spec = lambda x: P("data", "model") if x.ndim == 2 else P("model")
    params = jax.tree.map(lambda x: jax.make_array_from_callback(
        x.shape, NamedSharding(mesh, spec(x)), lambda idx: np.asarray(x)[idx]), params)
    step = vj.make_train_step(model, vj.chain(vj.prune(sparsity=0.8), vj.quantize(bits=4)),
                              vj.linear_vanish(8), optax.adam(1e-2), mesh=mesh)
    state = step.init(params)
    if mode == "resume":
      state = vj.restore(ckpt, state)
    start, stop = {"ref": (0, 20), "first": (0, 10), "resume": (10, 20)}[mode]
    assert int(state.step) == start
    batch_sharding = NamedSharding(mesh, P("data"))
    losses = []
    for i in range(start, stop):
      # each process loads only its own rows of the global batch
      rows = slice(pid * 16 // nproc, (pid + 1) * 16 // nproc)
      local = {k: v[rows] for k, v in batches[i].items()}
      batch = jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(batch_sharding, x), local)
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
    if mode == "first":
      vj.save(state, ckpt)
    kept = all(x.sharding.spec == spec(x) for x in jax.tree.leaves(state.params))
    full = multihost_utils.process_allgather(state.params, tiled=True)
    comp = multihost_utils.process_allgather(step.compressed_params(state), tiled=True)
    if pid == 0:
      leaves = {f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(full))}
      leaves.update({f"c{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(comp))})
      np.savez(out, losses=np.array(losses), kept=np.array(kept), **leaves)
''')


# A deadline per launch that only a hang reaches (a worker waiting forever in a collective
# for a peer that died): correctness never depends on how busy the machine is.
HANG_S = 900


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _wait(procs, deadline):
  """Until all exit, one fails (its peers would wait for it in a collective) or time is up."""
  while time.time() < deadline:
    codes = [p.poll() for p in procs]
    if None not in codes or any(c not in (None, 0) for c in codes):
      return
    time.sleep(0.2)


def _launch(tmp, mode, nproc, deadline):
  script = tmp / "worker.py"
  script.write_text(WORKER)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // nproc} "
                      "--xla_cpu_multi_thread_eigen=false"}
  port, out = _free_port(), tmp / f"{mode}.npz"
  logs = [tmp / f"{mode}.{i}.log" for i in range(nproc)]
  start, procs = time.time(), []
  try:
    for i, log in enumerate(logs):  # output to files: a full pipe would block a worker
      with open(log, "w") as f:
        procs.append(subprocess.Popen(
            [sys.executable, str(script), mode, str(tmp / "ckpt"), str(out), str(port),
             str(i), str(nproc)], env=env, stdout=f, stderr=subprocess.STDOUT))
    _wait(procs, deadline)
  finally:
    for p in procs:  # only the processes this test started
      if p.poll() is None:
        p.kill()
      p.wait()
  if not all(p.returncode == 0 for p in procs):
    # "[Gloo] Rank i is connected to 1 peer ranks" is gloo's note of a good connection
    text = ["\n".join(line for line in log.read_text().splitlines()
                       if not line.startswith("[Gloo] Rank"))[-3000:] for log in logs]
    pytest.fail(f"{mode}: exit codes {[p.returncode for p in procs]} after "
                f"{time.time() - start:.0f} s (-9: killed at the {HANG_S} s deadline, which "
                "only a hang reaches: a launch takes ~20 s on 2 quiet cores)\n" +
                "\n---\n".join(text))
  return np.load(out)


def test_two_processes_checkpoint_resume_equal_one_process(tmp_path):
  first = _launch(tmp_path, "first", 2, time.time() + HANG_S)
  resumed = _launch(tmp_path, "resume", 2, time.time() + HANG_S)
  ref = _launch(tmp_path, "ref", 1, time.time() + HANG_S)
  assert first["kept"] and resumed["kept"] and ref["kept"]
  np.testing.assert_allclose(np.concatenate([first["losses"], resumed["losses"]]),
                             ref["losses"], atol=1e-5)
  names = [k for k in ref.files if k[0] in "pc"]
  assert names
  for k in names:
    np.testing.assert_allclose(resumed[k], ref[k], atol=1e-5)
