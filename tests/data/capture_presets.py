"""Writes ``presets_frozen.json``: the suites and jobs every preset gave before presets
became files (run once, against the code of commit d2a4975, where they were built in
``vcon_experiments/compare.py``):

    git archive d2a4975 | tar -x -C /tmp/orig
    PYTHONPATH=/tmp/orig python tests/data/capture_presets.py tests/data/presets_frozen.json

``tests/test_presets.py`` checks that the preset files resolve to exactly these configs
(as JSON text, so 4 and 4.0 differ) and run names, for two base configs.
"""

import hashlib
import json
import sys

from vcon_experiments import compare
from vcon_experiments.config import Config

#: The command line's config, and one that changes what presets inherit from it.
BASES = {
    "default": {},
    "changed": {"sparsity": 0.5, "rank": 8, "bits": 3, "steps": 120, "lr": 0.002,
                "eval_every": 10},
    # the full preset's update_every=16 run then has the run name of its low-rank run
    # with another config: an error in the old code once it got there, now up front
    "low-rank": {"compression": "low-rank", "rank": 8},
}


def config_text(cfg: Config) -> str:
  return json.dumps(cfg.to_dict(), sort_keys=True)


def capture() -> dict:
  out = {}
  for base_name, changes in BASES.items():
    base = Config().replace(**changes)
    for name, (suites, seeds) in compare.presets(base).items():
      jobs = compare._jobs(suites, seeds, None)  # pylint: disable=protected-access
      out[f"{base_name}/{name}"] = {
          "seeds": seeds,
          "suites": [{"name": s, "methods": list(m), "config": c.to_dict()}
                     for s, c, m in suites],
          # every job, duplicates included (the dense run of each severity)
          "jobs": [[compare.data_key(c), c.run_name(),
                    hashlib.sha1(config_text(c).encode()).hexdigest()[:12]]
                   for _, c in jobs]}
  return out


def dump(frozen: dict) -> str:
  """JSON with one suite or job a line, so that a change shows as a few lines."""
  lines = ["{\"bases\": " + json.dumps(frozen["bases"], sort_keys=True) + ",",
           " \"presets\": {"]
  for k, (name, p) in enumerate(sorted(frozen["presets"].items())):
    lines.append(f"  {json.dumps(name)}: {{\"seeds\": {p['seeds']}, \"suites\": [")
    lines += [f"   {json.dumps(s, sort_keys=True)}," for s in p["suites"]]
    lines[-1] = lines[-1].rstrip(",")
    lines.append("  ], \"jobs\": [")
    lines += [f"   {json.dumps(j)}," for j in p["jobs"]]
    lines[-1] = lines[-1].rstrip(",")
    lines.append("  ]}" + ("," if k < len(frozen["presets"]) - 1 else ""))
  return "\n".join(lines + [" }", "}", ""])


if __name__ == "__main__":
  with open(sys.argv[1], "w", encoding="utf-8") as f:
    f.write(dump({"bases": BASES, "presets": capture()}))
