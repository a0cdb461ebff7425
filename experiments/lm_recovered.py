"""The LM results in the field's terms: the share of the round-to-nearest gap recovered.

QAT papers report, beside the metric, how much of the degradation of round-to-nearest
(RTN: the compressed start, no training) a method wins back:

    recovered = (RTN - method) / (RTN - dense),

in test bits per byte, ``dense`` being the pretrained model the fine-tuning starts from.
100 % is the dense model's quality, 0 % no better than RTN, below 0 worse than RTN.

All three numbers must come from the same dense model and the same test texts. This
script therefore reads the studies of one dense LM: ``experiments/results/lm_baselines``
(its ``runs/<key>/dense/result.json``; the suite's runs of every method,
``runs/.../<method>/seed<k>/result.json``) and the fitted VCON runs of
``experiments/results/fitted_transition`` (same dense result, checked), with the RTN of
each format measured by ``experiments/lm_gptq.py`` on the same ``test_limit`` texts as every ``test_bpb``
(``rtn_ours_bpb``: our quantiser, the start of the QAT / VCON runs). A run's own
``compressed_at_start`` is measured on the first ``eval_examples`` texts only; it is used
(and the row marked) only where no GPTQ run gives the RTN. ``lm_map``'s 0.04-epoch runs
come from the same dense LM (they reproduce bit for bit), but its dense row was scored on
all 11,790 test texts (1.7678) instead of the runs' 4000 (1.7754); its 0.16-epoch runs
and ``levers_study`` came from other pretrainings. None of them is mixed in.

Mean +- std over the seeds each cell has; a method without committed runs is absent, not
guessed. Command (seconds, any machine):
    .venv/bin/python experiments/lm_recovered.py
Writes ``experiments/results/lm_baselines/recovered.md`` and ``recovered.json``.
"""

from __future__ import annotations

import json
import pathlib
import re
import statistics

STUDY = pathlib.Path(__file__).resolve().parent / "results" / "lm_baselines"
# the field's comparison, as the suite (and lm_gptq.py) name their run directories
METHODS = {"gptq": "GPTQ (qwix, no training)", "post-shot": "QAT (post-shot)",
           "post-shot-distill": "QAT + KD", "vcon-fitQ20": "VCON (fitted, the default)",
           "vcon-distill-fitQ20": "VCON + KD (fitted)", "vcon-Q20": "VCON (fixed Q = 20 %)",
           "vcon-distill-Q20": "VCON + KD (fixed Q = 20 %)"}
#: The fitted-transition study (issue 32) trained the fitted VCON runs from the same dense
#: LM; its dense result must equal this study's.
FITTED = STUDY.parent / "fitted_transition"
COMPRESSIONS = {"quantize4g128": "int4 g128", "quantize4g32": "int4 g32",
                "quantize3g32": "int3 g32", "quantize2g32": "int2 g32"}
RUN = re.compile(r"same-task/e(?P<budget>[\d.]+)/(?P<comp>[^/]+)/(?P<method>[^/]+)/"
                 r"seed(?P<seed>\d+)/result\.json$")


def _stat(xs: list[float]) -> tuple[float, float]:
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def collect(studies=(STUDY, FITTED)) -> tuple[float, dict]:
  """``(dense bpb, {(budget, compression, method): {seed: result}})`` of the studies
  trained from one dense LM (refused if their dense results differ)."""
  dense, runs = None, {}
  for study in studies:
    if not study.exists():
      continue
    key = sorted(p.parent.parent.name for p in study.glob("runs/*/dense/result.json"))
    for name in key:
      d = json.loads((study / "runs" / name / "dense" / "result.json").read_text())["test_bpb"]
      if dense is not None and d != dense:
        raise ValueError(f"{study} holds another dense LM ({d} != {dense})")
      dense = d
    for path in sorted(study.glob("runs/*/same-task/**/result.json")):
      m = RUN.search(path.as_posix())
      if m and m["method"] in METHODS and m["comp"] in COMPRESSIONS:
        runs.setdefault((m["budget"], m["comp"], m["method"]), {})[int(m["seed"])] = \
            json.loads(path.read_text())
  return dense, runs


def rtn_of(runs: dict) -> dict:
  """``{(budget, compression): (RTN bpb, on the test texts?)}``: ``rtn_ours_bpb`` of the
  GPTQ runs of that format (same texts as ``test_bpb``; no training, so any budget),
  else the runs' ``compressed_at_start``."""
  out, rtn = {}, {}
  for (_, comp, method), seeds in runs.items():
    if method == "gptq":  # RTN needs no training: the same at every budget
      rtn[comp] = (_stat([r["rtn_ours_bpb"] for r in seeds.values()])[0], True)
  for budget, comp, _ in runs:
    if comp in rtn:
      out[(budget, comp)] = rtn[comp]
  for (budget, comp, method), seeds in runs.items():
    if (budget, comp) not in out and method in ("post-shot", "post-shot-distill"):
      out[(budget, comp)] = (_stat([r["compressed_at_start"] for r in seeds.values()])[0],
                             False)
  return out


def table(dense: float, runs: dict) -> tuple[list[dict], str]:
  rtn = rtn_of(runs)
  rows = []
  order = lambda kv: (float(kv[0][0]), list(COMPRESSIONS).index(kv[0][1]),  # noqa: E731
                      list(METHODS).index(kv[0][2]))
  for (budget, comp, method), seeds in sorted(runs.items(), key=order):
    if (budget, comp) not in rtn:
      continue
    start, same_texts = rtn[(budget, comp)]
    bpb = [r["test_bpb"] for r in seeds.values()]
    rows.append({"budget_epochs": float(budget), "compression": COMPRESSIONS[comp],
                 "method": METHODS[method], "seeds": sorted(seeds), "rtn_bpb": start,
                 "rtn_on_test_texts": same_texts, "bpb": _stat(bpb),
                 "recovered": _stat([(start - b) / (start - dense) for b in bpb])})
  lines = [f"Share of the RTN-to-dense gap recovered, `(RTN - method) / (RTN - dense)` in "
           f"test bits per byte; one dense LM ({dense:.4f}), RTN = our quantiser's "
           f"compressed start scored on the same test texts (`lm_gptq.py`'s "
           f"`rtn_ours_bpb`; `*`: only the runs' first-1000-texts value was available); "
           f"mean +- std over the seeds listed. Generated by `experiments/lm_recovered.py` "
           f"from committed runs.", "",
           "| budget | format | RTN bpb | method | bpb | recovered | seeds |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    (b, bs), (s, ss) = r["bpb"], r["recovered"]
    mark = "" if r["rtn_on_test_texts"] else "*"
    lines.append(f"| {r['budget_epochs']:g} ep | {r['compression']} | "
                 f"{r['rtn_bpb']:.4f}{mark} | {r['method']} | {b:.4f} +- {bs:.4f} | "
                 f"{100 * s:.1f} +- {100 * ss:.1f} % | {len(r['seeds'])} |")
  return rows, "\n".join(lines) + "\n"


def main() -> None:
  dense, runs = collect()
  rows, text = table(dense, runs)
  (STUDY / "recovered.json").write_text(json.dumps({"dense_bpb": dense, "rows": rows},
                                                   indent=1, sort_keys=True) + "\n")
  (STUDY / "recovered.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
