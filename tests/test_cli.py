"""The vcon-jax command line end to end: quick compare, bad input, resume after SIGKILL."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import vcon_jax as vj
from vcon_experiments import cli

TINY = ["--model", "mlp", "--model-kwargs", '{"hidden": [32]}', "--train-limit", "1024",
        "--test-limit", "256", "--pretrain-steps", "30", "--steps", "24", "--eval-every", "8",
        "--eval-examples", "128", "--checkpoint-every", "4", "--batch-size", "64",
        "--no-progress"]


def _cli(*args, check=True):
  out = subprocess.run([sys.executable, "-m", "vcon_experiments", *args], capture_output=True,
                       text=True, timeout=1800, check=False)  # hang-only
  if check and out.returncode:
    raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
  return out


@pytest.mark.parametrize("argv, needle", [
    (["compress", "--sparsity", "1.5"], "sparsity=1.5"),
    (["compress", "--rank", "0"], "rank=0"),
    (["compress", "--transition", "-0.1"], "transition=-0.1"),
    (["compress", "--steps", "0"], "steps=0"),
    (["compress", "--data-dir", "/nonexistent/dir"], "data_dir='/nonexistent/dir'"),
    (["compress", "--dataset", "no_such_set"], "no_such_set"),
    (["compare", "--seeds", "0"], "--seeds=0"),
    (["compress", "--config", "/nonexistent.json"], "does not exist"),
])
def test_bad_options_exit_with_one_clear_line(argv, needle, capsys, tmp_path):
  with pytest.raises(SystemExit) as exc:
    cli.main(argv + ["--workdir", str(tmp_path / "w")])
  assert exc.value.code == 2
  err = capsys.readouterr().err
  assert needle in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "w").exists()  # no work started


def test_unknown_config_key_suggests_the_closest(tmp_path, capsys):
  path = tmp_path / "c.json"
  path.write_text(json.dumps({"sparsty": 0.5}))
  with pytest.raises(SystemExit):
    cli.main(["compress", "--config", str(path)])
  assert "did you mean 'sparsity'" in capsys.readouterr().err


def test_help_documents_every_option():
  text = cli._parser()._subparsers._group_actions[0].choices["compare"].format_help()  # pylint: disable=protected-access
  for opt in ("--preset", "--quick", "--seeds", "--transition", "--beta-schedule",
              "--compression", "--workdir", "--lr", "--steps"):
    assert opt in text


@pytest.mark.slow
def test_compare_quick_writes_table_json_plots(tmp_path):
  out = tmp_path / "results"
  _cli("compare", "--quick", "--seeds", "1", "--workdir", str(tmp_path / "w"),
       "--out", str(out), "--no-progress")
  results = json.loads((out / "results.json").read_text())
  (suite,) = results["suites"].values()
  assert set(suite["runs"]) == {"post-shot", "gradual", "vcon", "vcon-distill"}
  for runs in suite["runs"].values():
    for r in runs:
      assert 0.0 <= r["test_accuracy"] <= 1.0 and np.isfinite(r["test_accuracy"])
      assert r["curve"] and all("beta" in row for row in r["curve"])
  assert "| vcon |" in (out / "table.md").read_text()
  assert list(out.glob("*.png"))
  run = next((tmp_path / "w").glob("*/same-task/s*/prune90/vcon-fitQ20/seed0"))
  assert (run / "config.json").exists() and list((run / "tensorboard").iterdir())
  # the default transition is fitted: the run records what it measured and chose
  fitted = json.loads((run / "result.json").read_text())
  assert fitted["output_jump"] > 0
  assert fitted["transition_steps"] == vj.fitted_transition(
      fitted["output_jump"], fitted["steps"])
  # a second call reuses every finished run: nothing a run writes is written again
  written = lambda: {f: f.stat().st_mtime_ns for f in (tmp_path / "w").rglob("*")
                     if f.is_file() and f.name in ("result.json", "metrics.jsonl")}
  before = written()
  assert before
  _cli("compare", "--quick", "--seeds", "1", "--workdir", str(tmp_path / "w"),
       "--out", str(out), "--no-progress")
  assert written() == before


def _final(workdir):
  run = next(pathlib.Path(workdir).glob("*/same-task/s*/prune90/vcon-fitQ20/seed0"))
  result = json.loads((run / "result.json").read_text())
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  return result, rows


@pytest.mark.slow
def test_compress_resumes_after_sigkill_like_an_uninterrupted_run(tmp_path):
  ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
  _cli("compress", "--method", "vcon", *TINY, "--workdir", str(ref_dir))
  _cli("pretrain", *TINY, "--workdir", str(cut_dir))
  proc = subprocess.Popen([sys.executable, "-m", "vcon_experiments", "compress", "--method", "vcon",
                           *TINY, "--workdir", str(cut_dir)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 1200  # only a hang reaches it
  ckpt = None
  while time.time() < deadline and proc.poll() is None:
    found = list(cut_dir.glob("*/same-task/s*/prune90/vcon-fitQ20/seed0/checkpoints/12"))
    if found:
      ckpt = found[0]
      break
    time.sleep(0.05)
  if proc.poll() is None:
    os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert ckpt is not None, "the run never reached its step-12 checkpoint"
  run = ckpt.parents[1]
  assert not (run / "result.json").exists()  # killed before the end
  _cli("compress", "--method", "vcon", *TINY, "--workdir", str(cut_dir))
  (ref, ref_rows), (got, got_rows) = _final(ref_dir), _final(cut_dir)
  assert got["test_accuracy"] == ref["test_accuracy"]
  strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]
  assert strip(got_rows) == strip(ref_rows)  # same steps, losses and beta, bit for bit


@pytest.mark.slow
def test_compress_killed_during_a_checkpoint_write_resumes(tmp_path):
  """SIGKILL as soon as Orbax's temporary checkpoint directory appears (best effort: if
  the write finished first the kill lands just after it); the rerun must still match."""
  ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
  _cli("compress", "--method", "vcon", *TINY, "--workdir", str(ref_dir))
  _cli("pretrain", *TINY, "--workdir", str(cut_dir))
  proc = subprocess.Popen([sys.executable, "-m", "vcon_experiments", "compress", "--method", "vcon",
                           *TINY, "--workdir", str(cut_dir)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline, hit = time.time() + 1200, None  # only a hang reaches the deadline
  while time.time() < deadline and proc.poll() is None and hit is None:
    for ck in cut_dir.glob("*/same-task/s*/prune90/vcon-fitQ20/seed0/checkpoints/*"):
      if not ck.name.isdigit() and int(ck.name.split(".")[0] or 0) >= 8:
        hit = ck.name
        break
    time.sleep(0.002)
  if proc.poll() is None:
    os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  _cli("compress", "--method", "vcon", *TINY, "--workdir", str(cut_dir))
  (ref, ref_rows), (got, got_rows) = _final(ref_dir), _final(cut_dir)
  assert got["test_accuracy"] == ref["test_accuracy"]
  strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]
  assert strip(got_rows) == strip(ref_rows)


@pytest.mark.parametrize("content, needle", [
    ({"steps": "10"}, "steps='10'"),
    ({"method": "vcon2"}, "did you mean 'vcon'"),
    ({"model_kwargs": [1]}, "model_kwargs"),
])
def test_bad_config_values(tmp_path, capsys, content, needle):
  path = tmp_path / "c.json"
  path.write_text(json.dumps(content))
  with pytest.raises(SystemExit) as exc:
    cli.main(["compress", "--config", str(path), "--workdir", str(tmp_path / "w")])
  assert exc.value.code == 2 and needle in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_config_flags_come_in_the_config_sections():
  from vcon_experiments import config as config_lib  # pylint: disable=import-outside-toplevel
  commands = cli._parser()._subparsers._group_actions[0].choices  # pylint: disable=protected-access
  for command in ("pretrain", "compress", "compare"):
    groups = {g.title: [a.dest for a in g._group_actions]  # pylint: disable=protected-access
              for g in commands[command]._action_groups}  # pylint: disable=protected-access
    for name, section in config_lib.SECTIONS.items():
      assert groups[name] == [n for n in section.fields if n not in ("method", "seed")], name
    assert ("method" in groups["options"]) == (command == "compress")
  text = " ".join(commands["compress"].format_help().split())
  assert "--pattern N:M" in text and "(default: vcon)" in text
