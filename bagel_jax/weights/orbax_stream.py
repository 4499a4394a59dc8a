"""Orbax checkpoints of the BAGEL parameters, written and read slice by slice.

A converted folder (`python -m convert.safetensors_to_orbax`) is self-contained:

    OUT/state/            Orbax PyTree checkpoint (OCDBT + zarr) of {"bagel": {...}, "vae": {...}}
    OUT/llm_config.json, vit_config.json, bagel_config.json, tokenizer files   (copied from the release)
    OUT/conversion.json   what was converted: source, dtypes, counts, the effective BagelConfig

- `StreamedArray` + `save_streamed`: an Orbax save whose leaves are written slice by slice
  (one upstream tensor, e.g. one (layer, expert) slice of a stacked kernel, at a time)
  through TensorStore, by a type handler given to Orbax's own PyTreeCheckpointHandler, so
  Orbax writes its usual metadata and the result is a plain Orbax checkpoint.  Host memory
  stays bounded by a few upstream tensors whatever the model size.
- `OrbaxState`: reads slices of the arrays of a saved state (for the export and restore).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import pathlib
import threading
from typing import Any, Callable, Sequence

import numpy as np

from bagel_jax.weights.errors import CheckpointError

STATE_DIR = "state"
CONVERSION_FILE = "conversion.json"
FORMAT = "bagel_jax.orbax/1"


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
  """The Orbax type handler class for `StreamedArray` leaves (a factory: Orbax is imported only when a
  save runs; its length is the class it returns)."""
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


