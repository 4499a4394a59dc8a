"""Atomic output folders: written beside the destination, renamed onto it at the end.

`AtomicDir` removes its temporary folder on any error, KeyboardInterrupt or SIGTERM, so a
destination is either absent, untouched, or complete.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import uuid
from typing import Callable

from bagel_jax.weights.errors import CheckpointError
from bagel_jax.weights.orbax_stream import CONVERSION_FILE

class Terminated(KeyboardInterrupt):
  """Raised in the main thread on SIGTERM, so that cleanup runs as for Ctrl-C."""


class AtomicDir:
  """A temporary folder beside `dst`, renamed onto it by `commit()`; removed on failure.

      with AtomicDir(dst, overwrite=False) as out:
        ... write into out.path ...
        out.commit()

  Any exception (KeyboardInterrupt and SIGTERM included) before `commit()` runs the
  registered `on_abort` callbacks (e.g. stopping writer threads) and deletes the folder,
  so the destination is either absent, untouched, or complete.
  """

  def __init__(self, dst, *, overwrite: bool = False):
    self.dst = pathlib.Path(dst).absolute()
    self.overwrite = overwrite
    check_destination(self.dst, overwrite)
    self.path: pathlib.Path | None = None
    self._abort: list[Callable[[], None]] = []
    self._old_term = None

  def on_abort(self, fn: Callable[[], None]) -> None:
    self._abort.append(fn)

  def __enter__(self) -> "AtomicDir":
    self.dst.parent.mkdir(parents=True, exist_ok=True)
    if threading.current_thread() is threading.main_thread():
      def _term(signum, frame):
        raise Terminated(f"terminated by signal {signum}")
      self._old_term = signal.signal(signal.SIGTERM, _term)
    self.path = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(self.path, 0o777 & ~umask)
    return self

  def commit(self) -> None:
    assert self.path is not None
    check_destination(self.dst, self.overwrite)
    if self.dst.exists():
      old = self.dst.parent / f".{self.dst.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(self.dst, old)
      os.rename(self.path, self.dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(self.path, self.dst)
    self.path = None

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if self.path is not None:
        self._cleanup()
    finally:
      if self._old_term is not None:
        signal.signal(signal.SIGTERM, self._old_term)

  def _cleanup(self) -> None:
    # Ignore further SIGTERMs while cleaning up; SIGINT stays as it is.
    if self._old_term is not None:
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for fn in self._abort:
      with contextlib.suppress(Exception):
        fn()
    for _ in range(3):
      shutil.rmtree(self.path, ignore_errors=True)
      if not self.path.exists():
        break
    self.path = None


def check_destination(dst: pathlib.Path, overwrite: bool) -> None:
  if dst.exists() and not overwrite:
    raise CheckpointError(f"{dst}: destination exists (pass --overwrite to replace it)")
  if dst.exists() and not dst.is_dir():
    raise CheckpointError(f"{dst}: destination exists and is not a folder")


# Config and tokenizer files copied beside the weights (everything small a loader may need).
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def side_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in pathlib.Path(folder).iterdir()
                if p.is_file() and p.suffix in SIDE_FILE_SUFFIXES and not p.name.endswith(".safetensors.index.json")
                and p.name != CONVERSION_FILE)


