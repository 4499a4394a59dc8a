"""One JSON file reader for every layer, each failure one line naming the file.

    raw = read_json(path, ConfigError, object_required="invalid JSON (not an object)")

`error` is the caller's error class (ConfigError, CheckpointError, TokenizerError, EvalError);
the messages are `PATH: {what} not found`, `PATH: cannot read it (REASON)`,
`PATH: {invalid} (DECODER'S REASON)` and, where an object is required, `PATH: {object_required}`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable


def read_json(path: str | os.PathLike, error: Callable[[str], Exception], *, what: str = "file",
              invalid: str = "invalid JSON", object_required: str | None = None) -> Any:
  """The parsed contents of the JSON file `path`; raises `error(one line)` when it cannot be."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise error(f"{path}: {what} not found")
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f"{path}: {invalid} ({e})") from None
  except OSError as e:
    raise error(f"{path}: cannot read it ({e.strerror})") from None
  if object_required is not None and not isinstance(raw, dict):
    raise error(f"{path}: {object_required}")
  return raw
