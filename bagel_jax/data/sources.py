"""Random-access record sources (grain `RandomAccessDataSource`s: `__len__` + `__getitem__`).

- `ParquetSource`: every row of a set of parquet files (upstream's T2I and editing formats),
  read one row group at a time (a small per-process cache of decoded row groups).
- `JsonlSource`: the lines of LLaVA-style jsonl files (byte offsets indexed once).
- `tfds_source`: a TFDS dataset prepared in ArrayRecord (`builder.as_data_source(split)`),
  built without TensorFlow; the shapes builder is prepared on first use.

Missing paths and empty datasets raise `DataError` with the path in the message, before any
model is built or compiled.
"""

from __future__ import annotations

import bisect
import collections
import glob
import json
import os
import pathlib
import threading
from typing import Any, Sequence


class DataError(ValueError):
  """A data configuration that cannot work: missing path, empty dataset, bad format."""


def expand_paths(path: str | Sequence[str], suffixes: tuple[str, ...]) -> list[str]:
  """A file, a folder (its files with these suffixes, sorted), a glob, or a list of those."""
  if isinstance(path, os.PathLike):
    path = os.fspath(path)
  if not isinstance(path, str):
    return [p for one in path for p in expand_paths(one, suffixes)]
  if not path:
    raise DataError("empty data path")
  if any(c in path for c in "*?["):
    files = sorted(glob.glob(path))
    if not files:
      raise DataError(f"{path}: no file matches this pattern")
    return files
  p = pathlib.Path(path)
  if p.is_dir():
    files = sorted(str(f) for f in p.iterdir() if f.is_file() and f.name.endswith(suffixes))
    if not files:
      raise DataError(f"{path}: folder holds no {'/'.join(suffixes)} file")
    return files
  if p.is_file():
    return [str(p)]
  raise DataError(f"{path}: dataset path does not exist")


class ParquetSource:
  """Rows of parquet files as dicts of the requested columns."""

  def __init__(self, path: str | Sequence[str], columns: Sequence[str], cache_row_groups: int = 4):
    import pyarrow.parquet as pq
    self.files = expand_paths(path, (".parquet",))
    self.columns = list(columns)
    self._index: list[tuple[int, int]] = []  # (file, row group) per block
    self._starts: list[int] = []
    n = 0
    for fi, f in enumerate(self.files):
      try:
        meta = pq.ParquetFile(f).metadata
        names = set(pq.read_schema(f).names)
      except Exception as e:  # noqa: BLE001
        raise DataError(f"{f}: not a readable parquet file ({e})") from None
      missing = [c for c in self.columns if c not in names]
      if missing:
        raise DataError(f"{f}: missing column(s) {missing}; has {sorted(names)}")
      for rg in range(meta.num_row_groups):
        rows = meta.row_group(rg).num_rows
        if rows:
          self._index.append((fi, rg)); self._starts.append(n); n += rows
    self._len = n
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._cache_size = cache_row_groups
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._len

  def _block(self, b: int) -> list[dict]:
    with self._lock:
      if b in self._cache:
        self._cache.move_to_end(b)
        return self._cache[b]
    import pyarrow.parquet as pq
    fi, rg = self._index[b]
    rows = pq.ParquetFile(self.files[fi]).read_row_group(rg, columns=self.columns).to_pylist()
    with self._lock:
      self._cache[b] = rows
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    return rows

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self._len:
      raise IndexError(i)
    b = bisect.bisect_right(self._starts, i) - 1
    return self._block(b)[i - self._starts[b]]

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_cache"] = collections.OrderedDict(); d.pop("_lock")
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"ParquetSource({len(self.files)} files, {self._len} rows)"


UNREADABLE = "__unreadable__"


class GuardedSource:
  """A source whose unreadable records (a damaged parquet page, a corrupt ArrayRecord chunk, an
  unreadable file) come back as {UNREADABLE: reason}: the parser skips and counts them, never fatal."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int):
    try:
      return self.source[i]
    except IndexError:
      raise
    except Exception as e:  # noqa: BLE001 - pyarrow, array_record and the file system raise many types
      return {UNREADABLE: f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"}

  def __repr__(self) -> str:
    return f"GuardedSource({self.source!r})"


class JsonlSource:
  """Lines of jsonl files, parsed on access (a malformed line raises when read, and is skipped)."""

  def __init__(self, path: str | Sequence[str]):
    self.files = expand_paths(path, (".jsonl", ".json"))
    self._offsets: list[tuple[int, int]] = []
    for fi, f in enumerate(self.files):
      with open(f, "rb") as fh:
        pos = 0
        for line in fh:
          if line.strip():
            self._offsets.append((fi, pos))
          pos += len(line)

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, i: int) -> dict:
    fi, pos = self._offsets[i]
    with open(self.files[fi], "rb") as fh:
      fh.seek(pos)
      return json.loads(fh.readline())

  def __repr__(self) -> str:
    return f"JsonlSource({len(self.files)} files, {len(self)} lines)"


def tfds_source(name: str, split: str, data_dir: str | None, build: bool = False):
  """A TFDS ArrayRecord data source. `name` is a registered builder name (e.g. "bagel_shapes" or
  "bagel_shapes/small") or the folder of a prepared dataset version."""
  import tensorflow_datasets as tfds
  if name.startswith("bagel_shapes"):
    from bagel_jax.data import shapes  # noqa: F401  (registers the builder)
  if os.sep in name and not name.startswith("bagel_shapes"):
    if not pathlib.Path(name).is_dir():
      raise DataError(f"{name}: dataset path does not exist")
    try:
      builder = tfds.builder_from_directory(name)
    except Exception as e:  # noqa: BLE001
      raise DataError(f"{name}: not a prepared TFDS dataset ({e})") from None
  else:
    if data_dir and not build and not pathlib.Path(data_dir).is_dir():
      raise DataError(f"{data_dir}: dataset path does not exist")
    def open_builder():
      try:
        return tfds.builder(name, data_dir=data_dir, file_format="array_record")
      except Exception as e:  # noqa: BLE001
        raise DataError(f"TFDS dataset {name!r}: {e}".splitlines()[0]) from None

    builder = open_builder()
    if build:
      # Processes take turns, so a shared data_dir is built once (the others then find it
      # prepared) and per-host disks are each built by their own process.
      import jax

      from bagel_jax.sharding import barrier
      n = jax.process_count()
      for turn in range(n):
        if turn == jax.process_index() and not _prepared(builder):
          builder.download_and_prepare(file_format="array_record")
        if n > 1:  # a coordination-service barrier: building may take far longer than gloo's 30 s deadline
          barrier(f"tfds_{name}_{turn}")
          builder = open_builder()
    if not _prepared(builder):
      raise DataError(f"TFDS dataset {name!r} is not prepared under {builder.data_dir}")
  if split not in builder.info.splits:
    raise DataError(f"TFDS dataset {name!r} has no split {split!r} (has {sorted(builder.info.splits)})")
  src = builder.as_data_source(split=split)
  check_array_record_files(src)
  return src


def check_array_record_files(src) -> None:
  """Refuses, naming the file, a shard whose ArrayRecord index cannot be read (a truncated or
  overwritten file): none of its records could be. A damaged chunk inside a readable file is
  left to `GuardedSource` (that record is skipped and counted)."""
  import concurrent.futures

  from array_record.python import array_record_module
  instructions = getattr(getattr(src, "data_source", None), "_read_instructions", None) or []

  def check(ins) -> str | None:
    try:
      reader = array_record_module.ArrayRecordReader(os.fspath(ins.filename), "readahead_buffer_size:0")
      try:
        n = reader.num_records()
      finally:
        reader.close()
    except Exception as e:  # noqa: BLE001 - the reader raises RuntimeError, OSError, ValueError
      return f"{ins.filename}: unreadable ArrayRecord file ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]})"
    if n < ins.end:
      return (f"{ins.filename}: unreadable ArrayRecord file (its index lists {n} records, the dataset's metadata "
              f"{ins.end}; the file is truncated or damaged: prepare the dataset again)")
    return None

  with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, max(1, len(instructions)))) as pool:
    for problem in pool.map(check, instructions):
      if problem:
        raise DataError(problem)


def _prepared(builder) -> bool:
  try:
    return bool(builder.is_prepared())
  except Exception:  # noqa: BLE001
    return pathlib.Path(builder.data_dir, "dataset_info.json").is_file()


def describe_record(rec: Any) -> str:
  return ", ".join(f"{k}: {type(v).__name__}" for k, v in rec.items()) if isinstance(rec, dict) else type(rec).__name__
