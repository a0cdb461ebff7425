"""The fitted transition of every cell of the suite's maps, without training: the output
jump of the compressed model on a run's first batch and the ``Q`` it gives.

Measured exactly as a run measures it (``runner.train_and_evaluate``: the step of the
cell's VCON run, ``step.init(batch=first batch of the seed)``), from the dense models in
``--workdir`` (pretrained there first if missing). Where the fitted ``Q`` is the fixed
20 % of the budget, the fitted run *is* the committed ``vcon-Q20`` run (same schedule,
same everything else).

    PYTHONPATH=. .venv/bin/python experiments/measure_jumps.py --workdir WORKDIR \
        --presets map units_map lm_map --out experiments/results/fitted_transition/jumps.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

import vcon_jax as vj
from vcon_experiments import compare, methods, presets, pretrain, runner, tasks, training
from vcon_experiments.config import Config


def jump_of(cfg: Config, root: pathlib.Path) -> tuple[float, int]:
  """``(output jump, fitted Q)`` of ``cfg``'s VCON run (seed ``cfg.seed``)."""
  cfg = runner.resolve(cfg.replace(method="vcon", transition_rule="fitted"))
  pretrain.pretrain(cfg, root, progress=False)
  train = tasks.split(cfg, "train")
  model, params = pretrain.dense_model(cfg, root)
  transform, schedule, _ = methods.build(cfg, params, model, train[0][:2])
  loss_fn = tasks.token_loss if tasks.is_lm(cfg) else None
  step = vj.make_train_step(model, transform, schedule,
                            training.optimizer(cfg.lr, cfg.steps), loss_fn=loss_fn)
  step.init(batch=runner.first_batch(cfg, train))
  return step.schedule.jump, step.schedule.transition_steps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--presets", nargs="+", default=["map", "units_map", "lm_map"])
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  out = {}
  for preset in args.presets:
    suites, _ = presets.suites(preset, Config())
    for name, cfg, _ in suites:
      root = pathlib.Path(args.workdir) / compare.data_key(cfg)
      for seed in range(args.seeds):
        jump, q = jump_of(cfg.replace(seed=seed), root)
        steps = runner.resolve(cfg).steps
        # the run directory of the cell without method and seed, as fitted_table.py reads it
        cell = "/".join([compare.data_key(cfg), *runner.resolve(cfg).run_name().split("/")[:3]])
        out.setdefault(f"{preset}|{name}", []).append(
            {"seed": seed, "output_jump": jump, "transition_steps": q, "steps": steps,
             "fixed_steps": int(round(cfg.transition * steps)), "cell": cell})
        print(f"{preset:9s} {name:45s} seed {seed}: jump {jump:.3f} -> Q {q} of {steps}",
              flush=True)
  pathlib.Path(args.out).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
  main()
