"""Atomic output folders: written beside the destination, swapped onto it at the end.

A destination is always either absent, untouched, or complete, and nothing a user owns is
ever deleted:

- every folder the project writes holds a marker file (`MARKER`, JSON) listing each file it
  wrote; `--overwrite` (and any clean-up) removes a folder only when everything in it is
  listed there (or, for folders converted before markers existed, when it has the converted
  Orbax layout), or when it is empty. Anything else is refused in one line naming the folder
  and the first foreign file;
- `AtomicDir` writes into `.NAME.tmp-XXXX` beside the destination, marked with this
  process's id, and swaps it onto the destination in one `renameat2(RENAME_EXCHANGE)` (two
  renames where the file system cannot); an error, Ctrl-C or SIGTERM removes the temporary
  folder, and a run killed with SIGKILL or by a power cut leaves it for the next run, which
  removes the temporary folders of processes that no longer exist (and only those).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import tempfile
import threading
import uuid
from typing import Callable

from bagel_jax.weights.errors import CheckpointError
from bagel_jax.weights.orbax_stream import CONVERSION_FILE, FORMAT

MARKER = ".bagel_jax"  # no suffix: never taken for a config or tokenizer side file


class Terminated(KeyboardInterrupt):
  """Raised in the main thread on SIGTERM, so that cleanup runs as for Ctrl-C."""


# ----------------------------------------------------------------------------- the marker
def write_marker(folder: pathlib.Path, kind: str, files: list[str] | None = None) -> None:
  """Marks `folder` as written by this process (`files`: every file in it, once complete)."""
  info = {"written_by": "bagel_jax", "kind": kind, "host": socket.gethostname(), "pid": os.getpid()}
  if files is not None:
    info["files"] = sorted(files)
  (pathlib.Path(folder) / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def read_marker(folder: pathlib.Path) -> dict | None:
  try:
    info = json.loads((pathlib.Path(folder) / MARKER).read_text())
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) and info.get("written_by") == "bagel_jax" else None


def files_under(folder: pathlib.Path) -> list[str]:
  """Every file (and symlink) under `folder`, as paths relative to it."""
  folder = pathlib.Path(folder)
  out = []
  for root, dirs, files in os.walk(folder):
    rel = pathlib.Path(root).relative_to(folder)
    out += [str(rel / f) for f in files]
    out += [str(rel / d) for d in dirs if os.path.islink(os.path.join(root, d))]
  return [p[2:] if p.startswith("./") else p for p in out]


def _legacy_converted(folder: pathlib.Path, rel: str) -> bool:
  """A folder converted before markers existed: conversion.json of our format, state/, side files."""
  top = rel.split(os.sep, 1)[0]
  return top in ("state", CONVERSION_FILE) or ("/" not in rel and top.endswith(SIDE_FILE_SUFFIXES))


def foreign_file(folder: pathlib.Path) -> str | None:
  """The first file under `folder` the project did not write there, or None (ours, or empty)."""
  folder = pathlib.Path(folder)
  present = sorted(files_under(folder))
  if not present:
    return None
  marker = read_marker(folder)
  if marker is not None and isinstance(marker.get("files"), list):
    allowed = set(marker["files"]) | {MARKER}
    return next((f for f in present if f not in allowed), None)
  try:
    legacy = json.loads((folder / CONVERSION_FILE).read_text()).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    legacy = False
  if legacy:
    return next((f for f in present if not _legacy_converted(folder, f)), None)
  return present[0]


def check_removable(folder: pathlib.Path) -> None:
  """Refuses (one line) to replace or remove a folder holding anything the project did not write."""
  folder = pathlib.Path(folder)
  if folder.is_symlink() or not folder.is_dir():
    raise CheckpointError(f"{folder}: refusing to replace it: it is not a folder the project wrote")
  found = foreign_file(folder)
  if found is not None:
    raise CheckpointError(f"{folder}: refusing to replace it: {found} was not written by bagel_jax "
                          "(move it away, or choose another destination)")


def remove_owned(folder: pathlib.Path) -> None:
  """Removes a folder the project wrote (checked first), or an empty one."""
  check_removable(folder)
  shutil.rmtree(folder)


# ----------------------------------------------------------------------------- stale temporary folders
def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def is_stale_temp(path: pathlib.Path) -> bool:
  """A temporary folder of ours whose writer (on this host) no longer runs; or an empty one."""
  if not path.is_dir() or path.is_symlink():
    return False
  marker = read_marker(path)
  if marker is None:
    return not any(path.iterdir())
  return marker.get("host") == socket.gethostname() and not _alive(int(marker.get("pid", -1)))


def remove_stale_temps(dst: pathlib.Path) -> list[pathlib.Path]:
  """Removes the temporary folders (`.NAME.tmp-*`, `.NAME.old-*`) that dead runs left beside `dst`."""
  dst = pathlib.Path(dst).absolute()
  removed = []
  if not dst.parent.is_dir():
    return removed
  for p in sorted(dst.parent.iterdir()):
    if not (p.name.startswith(f".{dst.name}.tmp-") or p.name.startswith(f".{dst.name}.old-")) or not is_stale_temp(p):
      continue
    marker = read_marker(p)
    if p.name.startswith(f".{dst.name}.old-") and not dst.exists() and marker and "files" in marker:
      os.rename(p, dst)  # a run died between its two renames: the old complete output goes back
      continue
    shutil.rmtree(p, ignore_errors=True)
    removed.append(p)
  return removed


# ----------------------------------------------------------------------------- swapping
def exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), str(b))


class AtomicDir:
  """A temporary folder beside `dst`, swapped onto it by `commit()`; removed on failure.

      with AtomicDir(dst, overwrite=False, kind="orbax") as out:
        ... write into out.path ...
        out.commit()

  Any exception (KeyboardInterrupt and SIGTERM included) before `commit()` runs the
  registered `on_abort` callbacks (e.g. stopping writer threads) and deletes the folder,
  so the destination is either absent, untouched, or complete. `commit()` lists every file
  written in the marker, so a later `--overwrite` can tell the project's files from a user's.
  """

  def __init__(self, dst, *, overwrite: bool = False, kind: str = "output"):
    self.dst = pathlib.Path(dst).absolute()
    self.overwrite, self.kind = overwrite, kind
    check_destination(self.dst, overwrite)
    self.path: pathlib.Path | None = None
    self._abort: list[Callable[[], None]] = []
    self._old_term = None

  def on_abort(self, fn: Callable[[], None]) -> None:
    self._abort.append(fn)

  def __enter__(self) -> "AtomicDir":
    self.dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(self.dst)
    if threading.current_thread() is threading.main_thread():
      def _term(signum, frame):
        raise Terminated(f"terminated by signal {signum}")
      self._old_term = signal.signal(signal.SIGTERM, _term)
    self.path = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(self.path, 0o777 & ~umask)
    write_marker(self.path, self.kind)
    return self

  def commit(self) -> None:
    assert self.path is not None
    write_marker(self.path, self.kind, [f for f in files_under(self.path) if f != MARKER])
    check_destination(self.dst, self.overwrite)
    if not self.dst.exists():
      os.rename(self.path, self.dst)
    elif exchange(self.path, self.dst):
      # self.path now holds the old output: mark it ours, so that if this process dies while
      # removing it, the next run knows it for a dead run's temporary folder.
      with contextlib.suppress(OSError):
        write_marker(self.path, self.kind)
      shutil.rmtree(self.path, ignore_errors=True)
    else:
      old = self.dst.parent / f".{self.dst.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(self.dst, old)
      os.rename(self.path, self.dst)
      shutil.rmtree(old, ignore_errors=True)
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
  """A destination may be absent, or (with overwrite) a folder holding only what the project wrote."""
  if not (dst.exists() or dst.is_symlink()):
    return
  if not overwrite:
    raise CheckpointError(f"{dst}: destination exists (pass --overwrite to replace it)")
  if dst.is_symlink() or not dst.is_dir():
    raise CheckpointError(f"{dst}: destination exists and is not a folder")
  check_removable(dst)


# Config and tokenizer files copied beside the weights (everything small a loader may need).
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def side_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in pathlib.Path(folder).iterdir()
                if p.is_file() and p.suffix in SIDE_FILE_SUFFIXES and not p.name.endswith(".safetensors.index.json")
                and p.name != CONVERSION_FILE)
