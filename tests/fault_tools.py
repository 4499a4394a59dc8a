"""Helpers of the fault-injection tests: damaged files, a full disk, read-only folders, snapshots.

- `snapshot(folder)`: {relative path: sha256} of every file, to assert nothing a user owned changed;
- `flip_bytes(path, offset)`, `truncate(path, size)`: damaged copies of the files the project reads;
- `full_disk(root, size)`: a folder on a small tmpfs where the test may mount one (a real ENOSPC),
  else an ordinary folder and a `preexec_fn` that sets RLIMIT_FSIZE (writes past it fail with EFBIG);
- `read_only(folder)`: a folder the child process cannot write: a read-only bind mount (root), mode
  0555 (not root), else a `sitecustomize` shim in the child that fails Python's writes there (EROFS);
- `assert_one_line(stderr, prefix)`: the last line is the error, and there is no traceback;
- `tb_scalars(logdir, tag)`: TensorBoard scalars as TensorBoard shows them (purged steps dropped).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import resource
import shutil
import signal
import struct
import subprocess
import tempfile
from typing import Callable, Iterator

def snapshot(folder: pathlib.Path) -> dict[str, str]:
  folder = pathlib.Path(folder)
  return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_bytes(path: pathlib.Path, offset: int | None = None, n: int = 4) -> None:
  """Inverts `n` bytes at `offset` (default: the middle of the file)."""
  b = bytearray(pathlib.Path(path).read_bytes())
  i = len(b) // 2 if offset is None else offset
  for j in range(i, min(i + n, len(b))):
    b[j] ^= 0xFF
  pathlib.Path(path).write_bytes(bytes(b))


def truncate(path: pathlib.Path, size: int) -> None:
  with open(path, "r+b") as f:
    f.truncate(size)


def assert_one_line(stderr: str, prefix: str) -> str:
  """The error is the last line of stderr, starts with `prefix`, and no traceback was printed."""
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
  assert lines, "nothing on stderr"
  assert lines[-1].startswith(prefix), stderr[-3000:]
  return lines[-1]


def _mount(*args: str) -> bool:
  """Runs `mount` where the test may (root); BAGEL_TEST_NO_MOUNT=1 tries the fallbacks instead."""
  if os.geteuid() != 0 or shutil.which("mount") is None or os.environ.get("BAGEL_TEST_NO_MOUNT"):
    return False
  return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _umount(path: pathlib.Path) -> None:
  subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _limit_file_size(limit: int) -> Callable[[], None]:
  def preexec() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return preexec


@contextlib.contextmanager
def full_disk(root: pathlib.Path, size: int,
              file_limit: int | None = None) -> Iterator[tuple[pathlib.Path, Callable[[], None] | None, str]]:
  """(folder, preexec_fn for the child, the error text the child should report): a tmpfs of `size`
  bytes (ENOSPC), else a limit of `file_limit` bytes per file in the child (EFBIG)."""
  folder = pathlib.Path(root)
  folder.mkdir(parents=True, exist_ok=True)
  if _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)):
    try:
      yield folder, None, os.strerror(28)  # ENOSPC
    finally:
      _umount(folder)
  else:
    yield folder, _limit_file_size(file_limit or size), os.strerror(27)  # EFBIG


# A child-side stand-in for a read-only mount where the test can neither mount nor rely on file
# modes (root without CAP_SYS_ADMIN): Python's file-creating calls on paths inside the folder fail
# with EROFS. The tools' first writes to a destination are Python's (mkdtemp, mkdir, open).
_READ_ONLY_SHIM = '''
import builtins, errno, io, os
_RO = os.path.abspath(os.environ["BAGEL_TEST_READ_ONLY"])


def _inside(p):
  try:
    p = os.path.abspath(os.fsdecode(p))
  except TypeError:
    return False
  return p == _RO or p.startswith(_RO + os.sep)


def _deny(p):
  raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p))


_open, _os_open = builtins.open, os.open


def _guarded_open(file, mode="r", *a, **k):
  if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and _inside(file):
    _deny(file)
  return _open(file, mode, *a, **k)


def _guarded_os_open(path, flags, *a, **k):
  if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _inside(path):
    _deny(path)
  return _os_open(path, flags, *a, **k)


builtins.open = io.open = _guarded_open
os.open = _guarded_os_open
for _name in ("mkdir", "rename", "replace", "remove", "unlink", "rmdir"):
  def _wrap(*a, _f=getattr(os, _name), **k):
    for x in a[:2]:
      if isinstance(x, (str, bytes, os.PathLike)) and _inside(x):
        _deny(x)
    return _f(*a, **k)
  setattr(os, _name, _wrap)
'''


def _read_only_env(folder: pathlib.Path) -> dict[str, str]:
  shim = pathlib.Path(tempfile.mkdtemp(prefix="bagel_ro_shim_"))
  (shim / "sitecustomize.py").write_text(_READ_ONLY_SHIM)
  path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
  return {"PYTHONPATH": path, "BAGEL_TEST_READ_ONLY": str(folder)}


@contextlib.contextmanager
def read_only(folder: pathlib.Path) -> Iterator[dict[str, str]]:
  """Makes `folder` (already filled) read-only for a child process; yields environment variables
  for the child: a read-only bind mount (root), mode 0555 (not root), else a Python-level shim."""
  folder = pathlib.Path(folder)
  if os.geteuid() != 0:
    os.chmod(folder, 0o555)
    try:
      yield {}
    finally:
      os.chmod(folder, 0o755)
    return
  if _mount("--bind", str(folder), str(folder)):
    if _mount("-o", "remount,bind,ro", str(folder)):
      try:
        yield {}
      finally:
        _umount(folder)
      return
    _umount(folder)
  yield _read_only_env(folder)


def tb_scalars(logdir: pathlib.Path, tag: str) -> dict[int, list[float]]:
  """step -> values of `tag` over the event files in write order, dropping steps a later
  SessionLog START purged (TensorBoard's `purge_orphaned_data`)."""
  from tensorboardX.proto import event_pb2
  out: dict[int, list[float]] = {}
  for f in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
    data = f.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
        out = {s: v for s, v in out.items() if s < ev.step}
      for v in ev.summary.value:
        if v.tag == tag:
          out.setdefault(ev.step, []).append(v.simple_value)
  return out
