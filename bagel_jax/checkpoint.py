"""Orbax checkpoints of the BAGEL parameters: streaming I/O and `load_checkpoint`.

A converted folder (`python -m convert.safetensors_to_orbax`) is self-contained:

    OUT/state/            Orbax PyTree checkpoint (OCDBT + zarr) of {"bagel": {...}, "vae": {...}}
    OUT/llm_config.json, vit_config.json, bagel_config.json, tokenizer files   (copied from the release)
    OUT/conversion.json   what was converted: source, dtypes, counts, the effective BagelConfig

`load_checkpoint(OUT, mesh=...)` restores `state/` straight into target shardings: each
device reads only its own slice of every array, nothing is assembled on the host first.

The pieces the converters stream with live here too, so that host memory stays bounded by
a few upstream tensors whatever the model size:

- `SafetensorsFile`: the header of one .safetensors file, checked (offsets, sizes), and
  tensor reads with `pread` (no memory map: pages of a mapped 29 GB file would count in
  the process's resident set as they are touched).
- `SafetensorsWriter`: writes a .safetensors file tensor by tensor (header first).
- `StreamedArray` + `save_streamed`: an Orbax save whose leaves are written slice by slice
  (one upstream tensor, e.g. one (layer, expert) slice of a stacked kernel, at a time)
  through TensorStore, by a type handler given to Orbax's own PyTreeCheckpointHandler, so
  Orbax writes its usual metadata and the result is a plain Orbax checkpoint.
- `OrbaxState`: reads slices of the arrays of a saved state (for the export).
- `AtomicDir`: a temporary folder beside the destination, renamed onto it at the end and
  removed on any error, KeyboardInterrupt or SIGTERM.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import uuid
from typing import Any, Callable, Sequence

import ml_dtypes
import numpy as np

from bagel_jax.weights import CheckpointError

STATE_DIR = "state"
CONVERSION_FILE = "conversion.json"
FORMAT = "bagel_jax.orbax/1"

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


# ----------------------------------------------------------------------------- safetensors, streamed
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


def release_freed_buffers() -> None:
  """Makes glibc return freed buffers of 1 MB and more to the OS at once (Linux only).

  By default glibc raises its mmap threshold to the largest buffer freed so far (up to 32
  MB), after which such buffers come from per-thread heaps that keep freed memory; with
  the many tensor-sized buffers of a conversion (ours and TensorStore's, from several
  threads) that retention measured ~0.6 GB of extra peak RSS on a 6 GB checkpoint.  A
  fixed 1 MB threshold keeps the resident set at what is in use.  Process-wide; harmless.
  """
  import ctypes
  import sys
  if not sys.platform.startswith("linux"):
    return
  with contextlib.suppress(Exception):
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


# ----------------------------------------------------------------------------- Orbax, streamed
@dataclasses.dataclass(frozen=True)
class Piece:
  """One slice `index` (leading axes) of a streamed leaf, produced on demand by `load()`.

  With `transpose`, `load()` returns the slice's transpose (e.g. a torch Linear weight
  [out, in] for a kernel slice [in, out]); it is written through a transposed TensorStore
  view, so the transposition happens chunk by chunk inside TensorStore's writer, with no
  transposed copy on the host.
  """
  index: tuple[int, ...]
  nbytes: int
  load: Callable[[], np.ndarray]
  name: str = ""
  transpose: bool = False

  @property
  def host_bytes(self) -> int:
    """Host memory while it is written: the loaded array, plus TensorStore's chunk copies
    when it goes through a transposed view (a contiguous slice is written in place)."""
    return self.nbytes * (2 if self.transpose else 1)


class StreamedArray:
  """A pytree leaf for `save_streamed`: shape and dtype now, data slice by slice later.

  `pieces` must tile the array exactly along its first `stack_ndim` axes (every index of
  those axes once); with stack_ndim == 0 there is one piece, the whole array.
  """

  def __init__(self, shape, dtype, pieces: Sequence[Piece], stack_ndim: int):
    self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
    self.pieces, self.stack_ndim = list(pieces), stack_ndim
    want = set(np.ndindex(*self.shape[:stack_ndim]))
    got = [p.index for p in self.pieces]
    if len(got) != len(want) or set(got) != want:
      raise ValueError(f"pieces {sorted(got)[:4]}... do not tile the leading axes {self.shape[:stack_ndim]}")

  ndim = property(lambda self: len(self.shape))
  size = property(lambda self: math.prod(self.shape))
  nbytes = property(lambda self: self.size * self.dtype.itemsize)

  @property
  def write_shape(self) -> tuple[int, ...]:
    return (1,) * self.stack_ndim + self.shape[self.stack_ndim:]


class Cancelled(Exception):
  """The streamed save was cancelled (the run was interrupted)."""


class _DropCancelled(logging.Filter):
  """Orbax logs a failed writer thread with its traceback; a cancellation is not news."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, Cancelled) and _CANCELLED_MSG not in record.getMessage()


_CANCELLED_MSG = "bagel_jax streamed save cancelled"
_DROP_CANCELLED = _DropCancelled()


def _streamed_handler_cls():
  from orbax.checkpoint import type_handlers as th
  from orbax.checkpoint._src.futures import future
  from orbax.checkpoint._src.serialization import ocdbt_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  from orbax.checkpoint._src.serialization import types as ser_types
  import tensorstore as ts

  class StreamedArrayHandler(th.NumpyHandler):
    """Writes `StreamedArray` leaves one piece at a time into Orbax's TensorStore layout.

    The on-disk format is the numpy handler's (typestr 'np.ndarray'), chunked so that
    every piece is a whole number of chunks of at most `chunk_bytes`; restores use the
    standard handlers.  A piece is loaded only once its host memory (`Piece.host_bytes`)
    and that of the pieces still being written fit in `max_inflight_bytes` (default: the
    largest piece's, at least 256 MB): host memory stays at about 2x the largest tensor.
    """

    def __init__(self, *, chunk_bytes: int, max_inflight_bytes: int, on_piece=None):
      super().__init__(deepcopy_host_arrays=False)
      self.chunk_bytes, self.max_inflight_bytes, self.on_piece = chunk_bytes, max_inflight_bytes, on_piece
      self.cancel = threading.Event()
      self.idle = threading.Event()
      self.idle.set()

    async def _write_all(self, values, infos):
      self.idle.clear()
      inflight: collections.deque = collections.deque()

      async def drain(limit):
        while inflight and sum(c for _, _, c, _ in inflight) > limit:
          if self.cancel.is_set():
            raise Cancelled(_CANCELLED_MSG)
          fut, n, _, name = inflight[0]
          await fut
          inflight.popleft()
          if self.on_piece is not None:
            self.on_piece(name, n)

      async def open_one(v, info):
        await info.await_path_creation()
        spec = ts_utils.build_array_write_spec(
            info=info, arg=ser_types.SaveArgs(chunk_byte_size=self.chunk_bytes), global_shape=v.shape,
            local_shape=v.write_shape, dtype=v.dtype, use_ocdbt=info.is_ocdbt_checkpoint,
            process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint))
        return await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)

      try:
        if self.cancel.is_set():  # after idle.clear(): a cancel from now on waits for us
          raise Cancelled(_CANCELLED_MSG)
        stores = await asyncio.gather(*[open_one(v, info) for v, info in zip(values, infos)])
        for v, t in zip(values, stores):
          for p in v.pieces:
            if self.cancel.is_set():
              raise Cancelled(_CANCELLED_MSG)
            await drain(max(self.max_inflight_bytes - p.host_bytes, 0))
            x = p.load()
            view = t[tuple(p.index) + (Ellipsis,)]
            if p.transpose:
              view = view.T
            if x.shape != tuple(view.shape) or x.dtype != v.dtype:
              raise ValueError(f"{p.name}: piece is {x.dtype}{list(x.shape)}, expected {v.dtype}{list(view.shape)}")
            inflight.append((view.write(x, can_reference_source_data_indefinitely=True), p.nbytes, p.host_bytes,
                             p.name))
            del x, view
        await drain(0)
      except BaseException:
        # Stop and wait for the writes still in flight, so nothing writes into the folder
        # after the caller has removed it.
        for fut, *_ in inflight:
          with contextlib.suppress(Exception):
            fut.cancel()
        for fut, *_ in inflight:
          with contextlib.suppress(BaseException):
            await fut
        raise
      finally:
        self.idle.set()

    async def serialize(self, values, infos, args=None):
      return [future.CommitFutureAwaitingContractedSignals(self._write_all(list(values), list(infos)),
                                                           name="bagel_streamed")]

  return StreamedArrayHandler


def save_streamed(path, tree, *, chunk_bytes: int = 32 << 20, max_inflight_bytes: int | None = None,
                  on_piece=None, register_cancel=None) -> None:
  """Saves a pytree of `StreamedArray`s as an Orbax PyTree checkpoint at `path`.

  `on_piece(name, nbytes)` is called (from Orbax's writer thread) after each piece is
  written; `register_cancel(fn)` receives a function that stops the writer and waits for
  it, for the caller to run on interrupt.
  """
  import orbax.checkpoint as ocp
  from orbax.checkpoint import type_handlers as th

  leaves = [x for x in _leaves(tree)]
  biggest = max((p.host_bytes for v in leaves for p in v.pieces), default=0)
  if max_inflight_bytes is None:
    max_inflight_bytes = max(biggest, 256 << 20)
  handler = _streamed_handler_cls()(chunk_bytes=chunk_bytes, max_inflight_bytes=max_inflight_bytes,
                                    on_piece=on_piece)

  def cancel(timeout: float = 120.0) -> None:
    handler.cancel.set()
    handler.idle.wait(timeout)

  if register_cancel is not None:
    register_cancel(cancel)
  for name in ("absl", ""):
    if _DROP_CANCELLED not in logging.getLogger(name).filters:
      logging.getLogger(name).addFilter(_DROP_CANCELLED)
  import jax
  registry = th.create_type_handler_registry((StreamedArray, handler), (jax.Array, th.ArrayHandler()))
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))
  try:
    ckptr.save(pathlib.Path(path).absolute(), args=ocp.args.PyTreeSave(tree))
  finally:
    ckptr.close()


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


class OrbaxState:
  """The arrays of a saved PyTree checkpoint, read slice by slice with TensorStore."""

  def __init__(self, state_dir):
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.path import format_utils

    self.dir = pathlib.Path(state_dir).absolute()
    if not (self.dir / "_METADATA").is_file():
      raise CheckpointError(f"{self.dir}: not an Orbax checkpoint (no _METADATA)")
    try:
      meta = ocp.PyTreeCheckpointer().metadata(self.dir)
    except Exception as e:  # noqa: BLE001 - Orbax raises many types here
      raise CheckpointError(f"{self.dir}: cannot read Orbax metadata ({str(e).splitlines()[0]})") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    self.tree = _plain(tree)
    self.use_ocdbt = format_utils.is_ocdbt_checkpoint(self.dir)
    self.use_zarr3 = bool(getattr(getattr(meta, "item_metadata", None), "use_zarr3", False))
    self._open: dict[str, Any] = {}
    self._ctx = None

  def get(self, path: tuple):
    node = self.tree
    for p in path:
      if not isinstance(node, dict) or str(p) not in node:
        raise CheckpointError(f"{self.dir}: no array {'/'.join(map(str, path))} in the checkpoint")
      node = node[str(p)]
    if isinstance(node, dict):
      raise CheckpointError(f"{self.dir}: {'/'.join(map(str, path))} is a subtree, not an array")
    return node

  def store(self, path: tuple):
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    name = ".".join(map(str, path))
    if name not in self._open:
      self.get(path)
      if self._ctx is None:
        self._ctx = ts_utils.get_ts_context(use_ocdbt=self.use_ocdbt)
      spec = {"driver": "zarr3" if self.use_zarr3 else "zarr",
              "kvstore": ts_utils.build_kvstore_tspec(str(self.dir), name=name, use_ocdbt=self.use_ocdbt)}
      try:
        self._open[name] = ts.open(spec, open=True, read=True, context=self._ctx).result()
      except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{self.dir}: cannot open array {name} ({str(e).splitlines()[0]})") from None
    return self._open[name]

  def read_async(self, path: tuple, index: tuple = (), *, transpose: bool = False):
    """A TensorStore read future of slice `index` (leading axes) of an array, transposed if asked."""
    view = self.store(path)[tuple(index) + (Ellipsis,)]
    return (view.T if transpose else view).read()


def _plain(tree):
  """Orbax metadata tree -> nested dict with str keys, leaves with .shape/.dtype."""
  if isinstance(tree, dict):
    return {str(k): _plain(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return {str(i): _plain(v) for i, v in enumerate(tree)}
  return tree


# ----------------------------------------------------------------------------- atomic output folders
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


# ----------------------------------------------------------------------------- restoring
def fsdp_shardings(abstract, mesh, axis: str | tuple[str, ...] | None = None):
  """NamedShardings that split each leaf's largest divisible axis over `axis`.

  `axis` defaults to 'fsdp' if the mesh has it, else all mesh axes together.  Leaves with
  no axis divisible by that many devices are replicated.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  if axis is None:
    axis = "fsdp" if "fsdp" in mesh.axis_names else tuple(mesh.axis_names)
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  n = math.prod(mesh.shape[a] for a in names)
  spec_axis = names[0] if len(names) == 1 else names

  def one(x):
    dims = [i for i in range(len(x.shape)) if x.shape[i] % n == 0 and x.shape[i] >= n]
    if n == 1 or not dims:
      return NamedSharding(mesh, P())
    best = max(dims, key=lambda i: (x.shape[i], i))
    spec = [None] * len(x.shape)
    spec[best] = spec_axis
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(one, abstract)


def read_conversion_info(folder) -> dict:
  p = pathlib.Path(folder) / CONVERSION_FILE
  return json.loads(p.read_text()) if p.is_file() else {}


def load_checkpoint(dir, mesh=None, dtype=None, shardings=None):
  """Restores a converted folder's parameters {"bagel": ..., "vae": ...} as jax.Arrays.

  Shapes come from the folder's configs (`BagelModel(load_config(dir))`), checked against
  the checkpoint.  Each array is restored straight into its target sharding, reading only
  the slices each device holds:
    - `shardings`: a pytree of `jax.sharding.Sharding` matching the parameters, or a
      function (path tuple, ShapeDtypeStruct) -> Sharding;
    - else `mesh`: the project's rules (`bagel_jax.sharding.param_shardings`) on a mesh
      with axes among ('data', 'fsdp', 'tensor'), else `fsdp_shardings` on that mesh;
    - else the first device.
  `dtype` casts every array on restore (default: the stored dtype, bf16 for the LLM/ViT
  weights of the release and f32 for the VAE).
  """
  import jax
  import orbax.checkpoint as ocp

  from bagel_jax.api import BagelModel
  from bagel_jax.config import load_config

  folder = pathlib.Path(dir).absolute()
  state_dir = folder / STATE_DIR if (folder / STATE_DIR).is_dir() else folder
  cfg = load_config(folder if (folder / "llm_config.json").is_file() else state_dir.parent)
  model_abstract = BagelModel(cfg).abstract_params()
  stored = OrbaxState(state_dir)

  def target(path, x):
    keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    meta = stored.get(keys)
    name = "/".join(map(str, keys))
    if tuple(meta.shape) != tuple(x.shape):
      raise CheckpointError(f"{state_dir}: array {name} has shape {list(meta.shape)}, the config "
                            f"expects {list(x.shape)}")
    return jax.ShapeDtypeStruct(x.shape, np_dtype(dtype) if dtype is not None else meta.dtype)

  abstract = jax.tree_util.tree_map_with_path(target, model_abstract)
  if shardings is None:
    if mesh is not None:
      from bagel_jax import sharding as S
      if set(mesh.axis_names) <= set(S.MESH_AXES):
        shardings = S.param_shardings(abstract, mesh)  # the project's logical-axis rules
      else:
        shardings = fsdp_shardings(abstract, mesh)
    else:
      dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: dev, abstract)
  elif callable(shardings):
    fn = shardings
    shardings = jax.tree_util.tree_map_with_path(
        lambda p, x: fn(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p), x), abstract)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype, global_shape=x.shape), abstract)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))


__all__ = ["load_checkpoint", "fsdp_shardings", "SafetensorsFile", "SafetensorsWriter", "StreamedArray", "Piece",
           "save_streamed", "OrbaxState", "AtomicDir", "CheckpointError", "STATE_DIR", "CONVERSION_FILE"]
