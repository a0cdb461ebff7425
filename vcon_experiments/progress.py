"""Progress of a training loop: a tqdm bar on a terminal, plain lines in a log file.

Under ``nohup``, a batch scheduler or ``> log 2>&1`` every tqdm refresh would be written
as a carriage-return line; there a run prints one line when it starts, one every tenth of
its steps and one when it ends.
"""

import sys
import time


class LineProgress:
  """The part of tqdm's interface the loop uses, printing whole lines to ``stream``."""

  def __init__(self, total: int, initial: int, desc: str, stream, every: int | None = None):
    self.total, self.n, self.desc, self.stream = total, initial, desc, stream
    self.every = every or max(1, -(-total // 10))
    self.postfix = ""
    self._t0 = time.time()
    self._next = (initial // self.every + 1) * self.every
    self._closed = False
    self._print(f"start at step {initial}/{total}" if initial else f"start, {total} steps")

  def _print(self, text: str) -> None:
    print(f"{self.desc}: {text}", file=self.stream, flush=True)

  def set_postfix(self, **values) -> None:
    self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

  def update(self, n: int = 1) -> None:
    self.n += n
    if self.n >= self._next and self.n < self.total:
      self._next = (self.n // self.every + 1) * self.every
      self._print(f"step {self.n}/{self.total} {self.postfix} "
                  f"({time.time() - self._t0:.0f} s)".replace("  ", " "))

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    state = "done" if self.n >= self.total else "stopped"
    self._print(f"{state} at step {self.n}/{self.total} {self.postfix} "
                f"({time.time() - self._t0:.0f} s)".replace("  ", " "))


class _Off:
  n = 0

  def set_postfix(self, **_):
    pass

  def update(self, n: int = 1):
    self.n += n

  def close(self):
    pass


def progress(total: int, initial: int, desc: str, enabled: bool, stream=None):
  """A tqdm bar when ``stream`` (default stderr) is a terminal, else a ``LineProgress``;
  nothing when ``enabled`` is false."""
  stream = sys.stderr if stream is None else stream
  if not enabled:
    off = _Off()
    off.n = initial
    return off
  if getattr(stream, "isatty", lambda: False)():
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True,
                file=stream)
  return LineProgress(total, initial, desc, stream)
