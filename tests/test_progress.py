"""Progress output: bars on a terminal, whole lines in a log file (nohup, schedulers)."""

import io
import subprocess
import sys

import pytest

from vcon_experiments import progress as vprogress
from tests.test_cli import TINY


class _Tty(io.StringIO):
  def isatty(self):
    return True


def _drive(bar, total):
  for done in range(10, total + 1, 10):
    bar.set_postfix(loss="0.500", beta="0.25")
    bar.update(done - bar.n)
  bar.close()


def test_a_log_file_gets_a_line_per_tenth_of_the_run_and_no_carriage_returns():
  out = io.StringIO()
  _drive(vprogress.progress(200, 0, "vcon-Q20", True, stream=out), 200)
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue()
  assert lines[0] == "vcon-Q20: start, 200 steps"
  assert lines[-1].startswith("vcon-Q20: done at step 200/200 loss=0.500 beta=0.25 (")
  assert len(lines) == 2 + 9  # start, steps 20, 40, ..., 180, done
  assert "step 100/200 loss=0.500 beta=0.25" in lines[5]


def test_a_resumed_run_says_where_it_starts_and_a_stopped_one_says_so():
  out = io.StringIO()
  bar = vprogress.progress(100, 40, "dense", True, stream=out)
  bar.update(10)
  bar.close()
  lines = out.getvalue().splitlines()
  assert lines[0] == "dense: start at step 40/100"
  assert lines[1].startswith("dense: step 50/100")
  assert lines[2].startswith("dense: stopped at step 50/100") and len(lines) == 3


def test_a_terminal_gets_a_bar_and_disabled_prints_nothing():
  tty = _Tty()
  bar = vprogress.progress(50, 0, "run", True, stream=tty)
  assert type(bar).__module__.startswith("tqdm")
  _drive(bar, 50)
  assert "\r" in tty.getvalue()
  quiet = io.StringIO()
  _drive(vprogress.progress(50, 0, "run", False, stream=quiet), 50)
  assert quiet.getvalue() == ""


@pytest.mark.slow
def test_cli_output_redirected_to_a_file_has_lines_not_bars(tmp_path):
  args = [a for a in TINY if a != "--no-progress"]
  log = tmp_path / "log"
  with open(log, "w") as f:
    subprocess.run([sys.executable, "-m", "vcon_experiments", "compress", "--method", "vcon",
                    *args, "--workdir", str(tmp_path / "w")], stdout=f,
                   stderr=subprocess.STDOUT, check=True, timeout=1800)
  text = log.read_text()
  assert "\r" not in text, text[-2000:]
  assert "pretrain: start, 30 steps" in text and "pretrain: done at step 30/30" in text
  assert "done at step 24/24" in text
  assert len(text) < 20_000, len(text)
