"""Parameters placed straight into their shardings from upstream-layout tensors, slice by slice.

`place_params(files, cfg, abstract, shardings)` builds every parameter with
`jax.make_array_from_callback`: for each device's slice it reads the upstream tensors that
cover it (one at a time, through the weights table), converts them to our layout and keeps
only that slice.  No parameter is ever assembled whole on the host; host memory is about one
upstream tensor plus one device slice.  `files` is anything with the `UpstreamFiles` interface
(`read(file_id, key)`), e.g. `hf_init.HFInit`.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from bagel_jax.weights.table import Rule, _get, _paths, _set, rules, to_ours


class _LastRead:
  """Keeps the most recent upstream tensor: devices sharing a slice re-read it from here."""

  def __init__(self, files, size: int = 2):
    self.files, self.size = files, size
    self.cache: collections.OrderedDict = collections.OrderedDict()

  def __call__(self, r: Rule) -> np.ndarray:
    key = (r.file, r.upstream)
    if key not in self.cache:
      self.cache[key] = to_ours(r.kind, self.files.read(r.file, r.upstream))
      while len(self.cache) > self.size:
        self.cache.popitem(last=False)
    return self.cache[key]


def _slice_maker(group: list[Rule], shape: tuple[int, ...], dtype, read: _LastRead):
  """The callback for one parameter: index (tuple of slices) -> that slice, from its rules."""
  stack = len(group[0].index)
  by_index = {r.index: r for r in group}

  def make(index: tuple[slice, ...]) -> np.ndarray:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    ranges = [range(*s.indices(n)) for s, n in zip(index[:stack], shape[:stack])]
    out = np.empty(tuple(len(r) for r in ranges) + tuple(len(range(*s.indices(n))) for s, n in
                                                       zip(index[stack:], shape[stack:])), dtype)
    for pos in np.ndindex(*out.shape[:stack]):
      r = by_index[tuple(rg[p] for rg, p in zip(ranges, pos))]
      out[pos] = read(r)[index[stack:]]
    return out
  return make


def place_params(files, cfg, abstract: dict, shardings: dict, dtype=None) -> dict[str, Any]:
  """{"bagel": ..., "vae": ...} of jax.Arrays in `shardings` (a matching tree), cast to `dtype` or the abstract's."""
  import jax

  groups: dict[tuple, list[Rule]] = {}
  for r in rules(cfg):
    groups.setdefault(r.path, []).append(r)
  read = _LastRead(files)
  out: dict = {}
  for path in _paths(abstract):
    leaf, sh = _get(abstract, path), _get(shardings, path)
    want = np.dtype(dtype or leaf.dtype)
    make = _slice_maker(groups[path], tuple(leaf.shape), want, read)
    _set(out, path, jax.make_array_from_callback(tuple(leaf.shape), sh, make))
  return out


__all__ = ["place_params"]
