"""Helpers of the fault-injection tests: damaged files, a full disk, read-only folders, snapshots.

- `snapshot(folder)`: {relative path: sha256} of every file, to assert nothing a user owned changed;
- `flip_bytes(path, offset)`, `truncate(path, size)`: damaged copies of the files the project reads;
- `full_disk(root, size)`: a folder on a small tmpfs where the test may mount one (a real ENOSPC),
  else an ordinary folder and a `preexec_fn` that sets RLIMIT_FSIZE (writes past it fail with EFBIG);
- `read_only(folder)`: a folder the child process cannot write: a read-only tmpfs (root), or mode
  0555 (not root), or mode 0555 and a child that drops to user `nobody` (root without mounts);
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
from typing import Callable, Iterator

NOBODY = 65534


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
  if os.geteuid() != 0 or shutil.which("mount") is None:
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
def full_disk(root: pathlib.Path, size: int) -> Iterator[tuple[pathlib.Path, Callable[[], None] | None, str]]:
  """(folder, preexec_fn for the child, the error text the child should report)."""
  folder = pathlib.Path(root)
  folder.mkdir(parents=True, exist_ok=True)
  if _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)):
    try:
      yield folder, None, os.strerror(28)  # ENOSPC
    finally:
      _umount(folder)
  else:
    yield folder, _limit_file_size(size), os.strerror(27)  # EFBIG


def _drop_to_nobody() -> None:
  os.setgid(NOBODY)
  os.setuid(NOBODY)


def open_up(path: pathlib.Path) -> None:
  """Lets user `nobody` reach `path` (x on every parent, r on the path's tree)."""
  path = pathlib.Path(path).absolute()
  for p in [path, *path.parents]:
    with contextlib.suppress(OSError):
      os.chmod(p, os.stat(p).st_mode | 0o011)
  for p in [path, *path.rglob("*")]:
    with contextlib.suppress(OSError):
      os.chmod(p, os.stat(p).st_mode | (0o055 if p.is_dir() else 0o044))


@contextlib.contextmanager
def read_only(folder: pathlib.Path) -> Iterator[Callable[[], None] | None]:
  """Makes `folder` (already filled) read-only for a child process; yields the child's preexec_fn."""
  folder = pathlib.Path(folder)
  if os.geteuid() != 0:
    os.chmod(folder, 0o555)
    try:
      yield None
    finally:
      os.chmod(folder, 0o755)
    return
  if _mount("--bind", str(folder), str(folder)) and _mount("-o", "remount,bind,ro", str(folder)):
    try:
      yield None
    finally:
      _umount(folder)
    return
  os.chmod(folder, 0o555)
  try:
    yield _drop_to_nobody
  finally:
    os.chmod(folder, 0o755)


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
