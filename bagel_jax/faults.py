"""Faults of the machine, not of the program, as one line: disk full, read-only or missing folders, permissions.

    line = faults.describe(exc)   # "PATH: No space left on device", or None for a real bug

The command-line tools print that line (and exit with status 2) instead of a traceback; an
exception `describe` does not recognise is a bug and keeps its traceback. Set
`BAGEL_TRACEBACK=1` to see the traceback of a recognised fault too.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys

# errno texts that also reach us inside other exceptions' messages (TensorStore, Orbax, grain).
ERRNO_TEXTS = tuple(os.strerror(e) for e in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EFBIG,
                                             errno.EIO, errno.ENOENT, errno.EPERM))


def _first_line(text: str) -> str:
  lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
  return lines[0][:300] if lines else ""


def describe(exc: BaseException) -> str | None:
  """One line for a fault of the environment, or None if `exc` is not one."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
      where = exc.filename if exc.filename is not None else ""
      what = exc.strerror or os.strerror(exc.errno)
      return f"{where}: {what}" if where else what
    if isinstance(exc, MemoryError):
      return "out of host memory (lower data.rows / data.capacity, or the image size)"
    msg = str(exc)
    for text in ERRNO_TEXTS:
      if text in msg:
        paths = re.findall(r'(?:file|path) "([^"]+)"', msg) or re.findall(r"'(/[^']+)'", msg)
        return f"{paths[-1]}: {text}" if paths else f"{text} ({_first_line(msg)[:200]})"
    exc = exc.__cause__ or exc.__context__
  return None


class _DropBackgroundTracebacks(logging.Filter):
  """Drops error records that carry a traceback (Orbax's writer threads log the exception they
  then hand to the caller, who reports it in one line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and (record.exc_info or "Traceback" in record.getMessage()))


_DROP = _DropBackgroundTracebacks()


def _unraisable(info) -> None:
  """Drops TensorStore's callbacks into an Orbax event loop that a failed save already closed
  (printed as 'Exception ignored ... Event loop is closed' tracebacks at exit); others as usual."""
  if isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value):
    return
  sys.__unraisablehook__(info)


def quiet_background_tracebacks() -> None:
  """For command-line tools: no traceback from background threads' log records on stderr."""
  if not show_traceback():
    sys.unraisablehook = _unraisable
  for name in ("absl", ""):
    logger = logging.getLogger(name)
    if _DROP not in logger.filters:
      logger.addFilter(_DROP)
    for h in logger.handlers:
      if _DROP not in h.filters:
        h.addFilter(_DROP)


def show_traceback() -> bool:
  return os.environ.get("BAGEL_TRACEBACK", "") not in ("", "0")
