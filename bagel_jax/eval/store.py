"""Atomic output files: every file is written beside its destination and renamed onto it, so a file
that exists is complete (a rerun trusts it and never rewrites it)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import threading
from typing import Any, Callable

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def atomic_write(path: str | pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """Calls write(tmp) on a temporary path beside `path`, then renames it onto `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def write_text(path, text: str) -> pathlib.Path:
  return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path, obj: Any, **kw) -> pathlib.Path:
  return write_text(path, json.dumps(obj, **kw))


def write_png(path, image) -> pathlib.Path:
  """A PIL image as PNG."""
  return atomic_write(path, lambda p: image.save(p, format="PNG"))


def safe_name(key: str) -> str:
  """A file name for an item key: the key itself when it is safe, else a cleaned key + a short hash."""
  clean = _SAFE.sub("_", key)
  if clean == key and key not in ("", ".", ".."):
    return key
  return f"{clean}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


class RecordStore:
  """One JSON record per finished item: OUT/items/{key}.json."""

  def __init__(self, out: pathlib.Path):
    self.dir = pathlib.Path(out) / "items"

  def path(self, key: str) -> pathlib.Path:
    return self.dir / f"{safe_name(key)}.json"

  def has(self, key: str) -> bool:
    return self.path(key).is_file()

  def put(self, key: str, record: dict) -> None:
    write_json(self.path(key), record, ensure_ascii=False)

  def get(self, key: str) -> dict | None:
    p = self.path(key)
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


__all__ = ["atomic_write", "write_text", "write_json", "write_png", "safe_name", "RecordStore"]
