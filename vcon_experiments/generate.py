"""Text from an exported compressed language model (``vcon-jax generate``).

The run directory of a ``model=lm`` compression run holds ``config.json`` and the compact
export ``model.npz``; the model is rebuilt from the config and run through
:func:`vcon_jax.load_compressed`, so what is sampled is exactly the served model.

Each new byte is one forward pass of a fixed ``(1, max_len)`` window (one compilation):
the model is causal, so the zero padding after the text changes nothing. There is no KV
cache: with the short windows of the suite a whole-window pass costs little, and the
model's ``__call__`` is the only entry point an export runs.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

import vcon_jax as vj
from vcon_experiments import config as config_lib


def load_served(run_dir: str | pathlib.Path):
  """``(config, jitted tokens -> logits)`` of the exported model in ``run_dir``."""
  from vcon_experiments import runner  # pylint: disable=import-outside-toplevel
  run_dir = pathlib.Path(run_dir)
  for name in ("config.json", "model.npz"):
    if not (run_dir / name).is_file():
      raise FileNotFoundError(f"{run_dir} has no {name}; pass the directory of a finished "
                              f"model=lm compression run (it holds config.json and "
                              f"model.npz).")
  cfg = config_lib.from_dict(json.loads((run_dir / "config.json").read_text()))
  if cfg.model != "lm":
    raise ValueError(f"{run_dir} is a run of model={cfg.model!r}; generate needs a "
                     f"model=lm run.")
  model = runner.build_model(cfg)
  return cfg, vj.load_compressed(run_dir / "model.npz").apply_fn(model)


def generate(served, window: int, prompt: str, n_bytes: int, *, temperature: float = 0.0,
             seed: int = 0) -> bytes:
  """``n_bytes`` bytes after ``prompt`` (fewer if the model ends the text: it predicts
  padding), greedy at ``temperature=0``, else sampled at that temperature."""
  if n_bytes < 0 or temperature < 0:
    raise ValueError(f"n_bytes and temperature must be >= 0, got {n_bytes}, {temperature}.")
  rng = np.random.default_rng(seed)
  ids = [b + 1 for b in prompt.encode("utf-8")]
  out = []
  for _ in range(n_bytes):
    context = ([0] + ids)[-window:]  # 0 at the start, as in training
    x = np.zeros((1, window), np.int32)
    x[0, :len(context)] = context
    logits = np.asarray(served(x), np.float64)[0, len(context) - 1]
    if temperature == 0:
      nxt = int(logits.argmax())
    else:
      p = np.exp((logits - logits.max()) / temperature)
      nxt = int(rng.choice(len(p), p=p / p.sum()))
    if nxt == 0:
      break
    ids.append(nxt)
    out.append(nxt - 1)
  return bytes(out)
