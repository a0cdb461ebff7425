"""A run directory: its config, lock, metrics log, checkpoints and atomic result file."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import warnings
from typing import Any

import vcon_jax as vj


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON via a temporary file and ``os.replace``: readers never see half a file."""
  write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def write_text_atomic(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` via a temporary file and ``os.replace``."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class RunLockedError(RuntimeError):
  pass


class RunDir:
  """One run's directory. ``config`` must match the one saved there (if any)."""

  def __init__(self, path: str | os.PathLike, config: dict):
    self.path = pathlib.Path(path)
    self.config = json.loads(json.dumps(config))
    saved = self.path / "config.json"
    if saved.exists():
      old = json.loads(saved.read_text())
      if old != self.config:
        diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
        raise ValueError(
            f"{self.path} holds a run with a different config (differs in: "
            f"{', '.join(diff)}); use another --workdir or delete that directory.")

  # ------------------------------------------------------------------------------ lock
  @contextlib.contextmanager
  def lock(self):
    """Exclusive use of the directory; a lock left by a dead process is taken over."""
    self.path.mkdir(parents=True, exist_ok=True)
    lock = self.path / "LOCK"
    me = f"{socket.gethostname()} {os.getpid()}"
    while True:
      try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        try:
          host, pid = lock.read_text().split()
        except (ValueError, FileNotFoundError):
          host, pid = "", "0"
        if host == socket.gethostname() and not _pid_alive(int(pid)):
          warnings.warn(f"removing stale lock {lock} of dead process {pid}", stacklevel=1)
          lock.unlink(missing_ok=True)
          continue
        raise RunLockedError(
            f"{self.path} is in use by process {pid} on {host or '?'} (lock file {lock}); "
            f"wait for it, or use another --workdir. If that process is gone, delete the "
            f"lock file.") from None
      with os.fdopen(fd, "w") as f:
        f.write(me)
      break
    try:
      write_json_atomic(self.path / "config.json", self.config)
      yield self
    finally:
      lock.unlink(missing_ok=True)

  # --------------------------------------------------------------------------- results
  def result(self) -> dict | None:
    path = self.path / "result.json"
    if not path.exists():
      return None
    try:
      return json.loads(path.read_text())
    except json.JSONDecodeError:
      warnings.warn(f"ignoring unreadable {path}; the run will be redone", stacklevel=1)
      return None

  def write_result(self, result: dict) -> None:
    write_json_atomic(self.path / "result.json", result)

  # --------------------------------------------------------------------------- metrics
  def metrics(self) -> list[dict]:
    path = self.path / "metrics.jsonl"
    if not path.exists():
      return []
    rows = []
    for line in path.read_text().splitlines():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break  # a line cut by a crash ends the log
    return rows

  def truncate_metrics(self, step: int) -> None:
    """Drops rows after ``step`` (logged before a crash, redone after the resume)."""
    rows = [r for r in self.metrics() if r["step"] <= step]
    write_text_atomic(self.path / "metrics.jsonl",
                      "".join(json.dumps(r) + "\n" for r in rows))

  def log(self, row: dict, writer=None) -> None:
    with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    if writer is not None:
      for k, v in row.items():
        if k != "step":
          writer.add_scalar(k, v, row["step"])
      writer.flush()

  def tensorboard(self):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter(str(self.path / "tensorboard"))

  # ----------------------------------------------------------------------- checkpoints
  def restore_latest(self, mgr, target) -> tuple[Any, int] | None:
    """Restores the newest readable checkpoint; a corrupt one is skipped with a warning."""
    for step in sorted(mgr.all_steps(), reverse=True):
      try:
        return mgr.restore(target, step), step
      except vj.CheckpointMismatchError:
        raise  # a different model/transform: older checkpoints will not fit either
      except ValueError as err:
        warnings.warn(f"checkpoint {mgr.directory}/{step} is unreadable ({err}); trying the "
                      f"previous one", stacklevel=1)
      except Exception as err:  # pylint: disable=broad-except
        warnings.warn(f"checkpoint {mgr.directory}/{step} is unreadable ({type(err).__name__}:"
                      f" {err}); trying the previous one", stacklevel=1)
    return None
