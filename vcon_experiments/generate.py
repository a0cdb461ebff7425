"""Text from an exported compressed language model (``vcon-jax generate``).

The run directory of a ``model=lm`` compression run holds ``config.json`` and the compact
export ``model.npz``; the model is rebuilt from the config and run through
:func:`vcon_jax.load_compressed`, so what is sampled is exactly the served model.

Two loops, the same text: :func:`generate_cached` (what ``vcon-jax generate`` runs) puts
the export's weights into the LM (``CompressedModel.update``) and decodes one byte per
step against a key / value cache (``CausalLM.decode``: one token's work per step);
:func:`generate` runs the export's own jitted forward pass on a fixed ``(1, max_len)``
window per byte (the model is causal, so the zero padding after the text changes
nothing), the reference the cached loop is tested against.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

import vcon_jax as vj
from vcon_experiments import config as config_lib
from vcon_experiments import models


def load_served(run_dir: str | pathlib.Path):
  """``(config, jitted tokens -> logits)`` of the exported model in ``run_dir``."""
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
  model = models.build_model(cfg)
  return cfg, vj.load_compressed(run_dir / "model.npz").apply_fn(model)


def load_cached(run_dir: str | pathlib.Path):
  """``(config, CausalLM)`` holding the export in ``run_dir`` (weights and state put in by
  :meth:`vcon_jax.CompressedModel.update`), for :func:`generate_cached`."""
  cfg, _ = load_served(run_dir)
  model = models.build_model(cfg)
  vj.load_compressed(pathlib.Path(run_dir) / "model.npz").update(model)
  return cfg, model


def _pick(logits, temperature, rng) -> int:
  logits = np.asarray(logits, np.float64)
  if temperature == 0:
    return int(logits.argmax())
  p = np.exp((logits - logits.max()) / temperature)
  return int(rng.choice(len(p), p=p / p.sum()))


def generate_cached(model, window: int, prompt: str, n_bytes: int, *,
                    temperature: float = 0.0, seed: int = 0) -> bytes:
  """As :func:`generate`, decoding one byte per step against a key / value cache
  (``model``: a ``CausalLM`` holding the served weights, from :func:`load_cached`); the
  text stops at ``window`` positions (the cache's length), as the window loop's does."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if n_bytes < 0 or temperature < 0:
    raise ValueError(f"n_bytes and temperature must be >= 0, got {n_bytes}, {temperature}.")
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda st, tok, pos, cache: nnx.merge(graphdef, st).decode(tok, pos, cache))
  rng = np.random.default_rng(seed)
  ids = ([0] + [b + 1 for b in prompt.encode("utf-8")])[-window:]  # 0 starts a text
  cache = model.init_cache(1, window)
  logits = None
  for pos, tok in enumerate(ids):  # the prompt, one position at a time
    logits, cache = step(state, np.array([tok], np.int32), pos, cache)
  out = []
  for _ in range(n_bytes):
    nxt = _pick(np.asarray(logits)[0], temperature, rng)
    if nxt == 0:
      break
    ids.append(nxt)
    out.append(nxt - 1)
    if len(ids) > window:  # the cache is full (the window loop would start sliding)
      break
    logits, cache = step(state, np.array([nxt], np.int32), len(ids) - 1, cache)
  return bytes(out)


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
    nxt = _pick(np.asarray(served(x))[0, len(context) - 1], temperature, rng)
    if nxt == 0:
      break
    ids.append(nxt)
    out.append(nxt - 1)
  return bytes(out)
