"""safetensors, streamed: checked headers, tensor reads with `pread`, tensor-by-tensor writes.

- `SafetensorsFile`: the header of one .safetensors file, checked (offsets, sizes), and
  tensor reads with `pread` (no memory map: pages of a mapped 29 GB file would count in
  the process's resident set as they are touched).
- `SafetensorsWriter`: writes a .safetensors file tensor by tensor (header first).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from bagel_jax.weights.errors import CheckpointError

# safetensors dtype names <-> numpy
ST_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "I16": np.dtype(np.int16), "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}


def np_dtype(name) -> np.dtype:
  """'bfloat16' / 'BF16' / np.float32 / jnp.bfloat16 -> numpy dtype."""
  if isinstance(name, str) and name in ST_DTYPES:
    return ST_DTYPES[name]
  if isinstance(name, str) and name == "bfloat16":
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)



@dataclasses.dataclass(frozen=True)
class TensorEntry:
  key: str
  dtype: str  # safetensors name, e.g. "BF16"
  shape: tuple[int, ...]
  begin: int  # absolute byte offset in the file
  nbytes: int


class SafetensorsFile:
  """One .safetensors file: its header, checked against the file, and `pread` reads.

  Every inconsistency is a one-line `CheckpointError` naming the file (and the key).
  """

  def __init__(self, path):
    self.path = pathlib.Path(path)
    try:
      size = self.path.stat().st_size
    except FileNotFoundError:
      raise CheckpointError(f"{self.path}: file not found") from None
    if size < 8:
      raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
    with open(self.path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      if n > size - 8:
        raise CheckpointError(f"{self.path}: truncated safetensors file (header of {n} bytes, file of {size})")
      raw = f.read(n)
    try:
      header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{self.path}: invalid safetensors header ({e})") from None
    if not isinstance(header, dict):
      raise CheckpointError(f"{self.path}: invalid safetensors header (not a JSON object)")
    self.metadata = header.pop("__metadata__", None) or {}
    start, data_len = 8 + n, size - 8 - n
    self.entries: dict[str, TensorEntry] = {}
    spans = []
    for key, info in header.items():
      try:
        dtype, shape, (b, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
      except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{self.path}: key {key} has a malformed header entry {info!r}") from None
      if dtype not in ST_DTYPES:
        raise CheckpointError(f"{self.path}: key {key} has unsupported dtype {dtype}")
      want = math.prod(shape) * ST_DTYPES[dtype].itemsize
      if not (isinstance(b, int) and isinstance(e, int)) or e - b != want or b < 0:
        raise CheckpointError(f"{self.path}: key {key} has header offsets [{b}, {e}] that do not match its "
                              f"shape {list(shape)} and dtype {dtype} ({want} bytes)")
      if e > data_len:
        raise CheckpointError(f"{self.path}: truncated safetensors file (key {key} ends at data byte {e}, "
                              f"the file holds {data_len})")
      spans.append((b, e, key))
      self.entries[key] = TensorEntry(key, dtype, shape, start + b, want)
    spans.sort()
    pos = 0
    for b, e, key in spans:
      if b != pos:
        raise CheckpointError(f"{self.path}: key {key} has header offsets [{b}, {e}] that "
                              + ("overlap the previous tensor" if b < pos else f"leave a gap after byte {pos}"))
      pos = e
    if pos != data_len:
      raise CheckpointError(f"{self.path}: header offsets end at data byte {pos} but the file holds {data_len} "
                            "bytes of data")

  def _pread(self, fd: int, out: np.ndarray, offset: int, key: str) -> None:
    view, done, n = memoryview(out.reshape(-1).view(np.uint8)), 0, out.nbytes
    while done < n:
      got = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
      if got <= 0:
        raise CheckpointError(f"{self.path}: truncated safetensors file (key {key} cut short)")
      done += got

  def read(self, key: str) -> np.ndarray:
    ent = self.entries[key]
    out = np.empty(ent.shape, ST_DTYPES[ent.dtype])
    fd = os.open(self.path, os.O_RDONLY)
    try:
      self._pread(fd, out, ent.begin, key)
    finally:
      os.close(fd)
    return out


class SafetensorsWriter:
  """Writes one .safetensors file tensor by tensor, in the order of `entries`.

  `entries` is [(key, shape, safetensors dtype)]; the header (sorted keys, padded to 8
  bytes as the safetensors library does) is written first, then each `write(key, x)`
  appends that tensor's bytes.
  """

  def __init__(self, path, entries: Sequence[tuple[str, tuple[int, ...], str]], metadata=None):
    self.path = pathlib.Path(path)
    self._order = [k for k, _, _ in entries]
    self._spec = {k: (tuple(s), d) for k, s, d in entries}
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    pos = 0
    for k, s, d in entries:
      n = math.prod(s) * ST_DTYPES[d].itemsize
      header[k] = {"dtype": d, "shape": list(s), "data_offsets": [pos, pos + n]}
      pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()  # the safetensors library's key order
    raw += b" " * (-len(raw) % 8)
    self.nbytes = pos
    self._f = open(self.path, "wb")
    self._f.write(len(raw).to_bytes(8, "little") + raw)
    self._next = 0

  def write(self, key: str, x: np.ndarray) -> None:
    if self._next >= len(self._order) or self._order[self._next] != key:
      raise ValueError(f"{self.path}: tensor {key} written out of order")
    shape, d = self._spec[key]
    if tuple(x.shape) != shape or np.dtype(x.dtype) != ST_DTYPES[d]:
      raise ValueError(f"{self.path}: tensor {key} is {x.dtype}{list(x.shape)}, header says {d}{list(shape)}")
    self._f.write(memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))
    self._next += 1

  def write_transposed(self, key: str, x: np.ndarray, block_bytes: int = 1 << 20) -> None:
    """Writes `x.T` (x 2-D) for `key`, a block of rows at a time: no full transposed copy, and
    blocks small enough for the cache (several times faster than numpy's whole-array transpose)."""
    if self._next >= len(self._order) or self._order[self._next] != key:
      raise ValueError(f"{self.path}: tensor {key} written out of order")
    shape, d = self._spec[key]
    if x.ndim != 2 or tuple(x.shape[::-1]) != shape or np.dtype(x.dtype) != ST_DTYPES[d]:
      raise ValueError(f"{self.path}: tensor {key} is {x.dtype}{list(x.shape[::-1])}, header says {d}{list(shape)}")
    step = max(1, block_bytes // max(1, x.shape[0] * x.dtype.itemsize))
    for c0 in range(0, x.shape[1], step):
      blk = np.ascontiguousarray(x[:, c0:c0 + step].T)
      self._f.write(memoryview(blk.reshape(-1).view(np.uint8)))
    self._next += 1

  def close(self) -> None:
    if self._next != len(self._order):
      raise ValueError(f"{self.path}: {len(self._order) - self._next} tensors not written")
    self._f.flush()
    os.fsync(self._f.fileno())
    self._f.close()


def read_safetensors(path) -> dict[str, np.ndarray]:
  """Every tensor of a file (for tests and small files)."""
  f = SafetensorsFile(path)
  return {k: f.read(k) for k in f.entries}
