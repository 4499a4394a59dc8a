"""The weights table's tensors as a tree of `StreamedArray`s: each parameter written slice by slice.

`streamed_tree(abstract, table, ref)` groups the table's rules by parameter; every upstream
tensor becomes one `Piece` (its (layer, expert) slot of a stacked parameter, or the whole
parameter), loaded only when Orbax writes it.  A torch Linear weight [out, in] goes as read
through a transposed view of its [in, out] slot (TensorStore transposes chunk by chunk): the
same bytes as `to_ours(LINEAR, x)` without a transposed copy on the host.  The release
converter and the Hugging Face initialisation both save through it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from bagel_jax.weights.errors import CheckpointError
from bagel_jax.weights.orbax_stream import Piece, StreamedArray, save_streamed
from bagel_jax.weights.safetensors_io import ST_DTYPES, np_dtype
from bagel_jax.weights.table import LINEAR, Rule, _get, _paths, _set, rules, to_ours


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """One upstream tensor: shape, stored dtype (safetensors name) and a reader of the whole tensor."""
  shape: tuple[int, ...]
  dtype: str
  read: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * ST_DTYPES[self.dtype].itemsize


def _piece(r: Rule, ref: TensorRef, slot_shape: tuple[int, ...], leaf_dtype: np.dtype) -> Piece:
  via_view = r.kind == LINEAR and len(ref.shape) == 2

  def load() -> np.ndarray:
    x = ref.read()
    if not via_view:
      x = to_ours(r.kind, x)
    return x if x.dtype == leaf_dtype else x.astype(leaf_dtype)
  return Piece(r.index, math.prod(slot_shape) * leaf_dtype.itemsize, load, r.upstream, transpose=via_view)


def streamed_tree(abstract: dict, table: list[Rule], ref: Callable[[Rule], TensorRef], dtype=None,
                  where: str = "checkpoint") -> tuple[dict, int]:
  """{path: StreamedArray} for every parameter of `abstract`, and the upstream bytes read.

  `dtype`: the stored dtype of every array (None: each parameter keeps its upstream tensors' dtype).
  """
  by_leaf: dict[tuple, list[tuple[Rule, TensorRef]]] = {}
  for r in table:
    by_leaf.setdefault(r.path, []).append((r, ref(r)))
  tree: dict = {}
  n_bytes = 0
  for leaf_path in _paths(abstract):
    name = "/".join(map(str, leaf_path))
    if leaf_path not in by_leaf:
      raise CheckpointError(f"{where}: no upstream tensor provides parameter {name}")
    group = sorted(by_leaf[leaf_path], key=lambda g: g[0].index)
    shape = tuple(_get(abstract, leaf_path).shape)
    stack = len(group[0][0].index)
    leaf_dtype = np_dtype(dtype) if dtype is not None else np_dtype(group[0][1].dtype)
    pieces = [_piece(r, t, shape[stack:], leaf_dtype) for r, t in group]
    n_bytes += sum(t.nbytes for _, t in group)
    try:
      _set(tree, leaf_path, StreamedArray(shape, leaf_dtype, pieces, stack))
    except ValueError as e:
      raise CheckpointError(f"{where}: parameter {name}: {e}") from None
  return tree, n_bytes


def save_source_orbax(files, cfg, path, *, dtype=None, register_cancel=None, on_piece=None,
                      chunk_bytes: int = 32 << 20) -> int:
  """Saves the tensors of `files` (the `UpstreamFiles` interface: shape_dtype, read) as an Orbax state."""
  from bagel_jax.api import BagelModel

  def ref(r: Rule) -> TensorRef:
    shape, st = files.shape_dtype(r.file, r.upstream)
    return TensorRef(tuple(shape), st, lambda: files.read(r.file, r.upstream))

  tree, n = streamed_tree(BagelModel(cfg).abstract_params(), rules(cfg), ref, dtype, str(getattr(files, "folder", "")))
  save_streamed(path, tree, chunk_bytes=chunk_bytes, on_piece=on_piece, register_cancel=register_cancel)
  return n


__all__ = ["TensorRef", "streamed_tree", "save_source_orbax"]
