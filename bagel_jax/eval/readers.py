"""Readers for the benchmarks' data files (JSON, JSON lines, TSV/CSV, Parquet) and their images,
with one-line errors naming the file at fault."""

from __future__ import annotations

import csv
import io
import json
import pathlib
import sys
from typing import Any

from bagel_jax import jsonfile
from bagel_jax.eval.core import EvalError, require_dir, require_file

# pandas' default missing-value strings: upstream reads the TSVs with pandas, so these are "absent".
NA_STRINGS = frozenset(["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"])


def read_json(path, what: str = "JSON file") -> Any:
  return jsonfile.read_json(require_file(path, what), EvalError, what=what, invalid="not valid JSON")


def read_jsonl(path, what: str = "JSON lines file") -> list[dict]:
  path = require_file(path, what)
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise EvalError(f"{path}:{n}: not valid JSON ({e.msg})") from None
  return rows


def read_table(path, delimiter: str = "\t", what: str = "table") -> list[dict[str, str | None]]:
  """A TSV/CSV with a header row; pandas' missing-value strings become None."""
  path = require_file(path, what)
  csv.field_size_limit(sys.maxsize)  # base64 images in MMBench's TSVs
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f, delimiter=delimiter)
    if not reader.fieldnames:
      raise EvalError(f"{path}: empty {what}")
    return [{k: (None if v is None or v in NA_STRINGS else v) for k, v in row.items()} for row in reader]


def read_parquet_rows(folder, split: str, what: str) -> list[dict]:
  """All rows of the Parquet files of one split in a Hugging Face dataset snapshot
  (`{split}-*.parquet` or `{split}/*.parquet` anywhere below `folder`), in file-name order."""
  import pyarrow.parquet as pq
  folder = require_dir(folder, what)
  files = sorted(p for p in folder.rglob("*.parquet")
                 if p.name.startswith(f"{split}-") or p.name == f"{split}.parquet" or p.parent.name == split)
  if not files:
    raise EvalError(f"{folder}: no {split} Parquet files ({split}-*.parquet) for {what}")
  rows = []
  for p in files:
    try:
      rows += pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
      raise EvalError(f"{p}: cannot read Parquet ({type(e).__name__}: {e})") from None
  return rows


def image_bytes(value: Any, where: str) -> bytes:
  """The bytes of a Hugging Face `Image` feature ({"bytes": ..., "path": ...}) or raw bytes."""
  if isinstance(value, dict):
    value = value.get("bytes")
  if not isinstance(value, (bytes, bytearray)):
    raise EvalError(f"{where}: no image bytes")
  return bytes(value)


def open_image(src: str | pathlib.Path | bytes, *, white: bool = False, where: str = ""):
  """An image file or bytes as RGB. white=True: transparency composited on white (upstream
  `pil_img2rgb`); else PIL's `convert('RGB')` (upstream's VLM loaders)."""
  from PIL import Image, UnidentifiedImageError

  from bagel_jax.data.transforms import pil_img2rgb
  name = where or (str(src) if not isinstance(src, (bytes, bytearray)) else "image bytes")
  if not isinstance(src, (bytes, bytearray)) and not pathlib.Path(src).is_file():
    raise EvalError(f"{src}: image file not found")
  try:
    with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
      im.load()
      return pil_img2rgb(im) if white else im.convert("RGB")
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    raise EvalError(f"{name}: cannot read the image ({type(e).__name__})") from None


__all__ = ["NA_STRINGS", "read_json", "read_jsonl", "read_table", "read_parquet_rows", "image_bytes", "open_image"]
