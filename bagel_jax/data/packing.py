"""Packing samples into fixed-capacity rows: a grain IterDataset that yields whole batches.

Upstream (`PackedDataset`, `data/dataset_base.py`) concatenates samples into one sequence until
it reaches `expected_num_tokens`, or until the next sample would exceed `max_num_tokens`. Here a
batch has `rows` rows, each with the static `Capacity` of the config (tokens, und/gen expert
tokens, ViT and VAE tokens, CE targets, VAE images), so every batch has the same shapes and the
train step compiles once. A row is closed when it reaches `expected_tokens` or when the next
sample does not fit any one of its capacities; that sample starts the next row (or waits for the
next batch). A sample that cannot fit an empty row is skipped and counted (`oversized`), as are
a sample over `max_sample_tokens`, and records the parsers rejected (`Skipped`: corrupt image, bad JSON, ...): neither stops a run.

Exact resume: the iterator holds at most one pending sample. Its state is the parent's state
from *before* that sample was read (or the current parent state if none is pending) plus the
counters, so restoring re-reads the pending sample and yields exactly the batches that would
have come next. The state is a plain JSON-able dict (saved beside the model checkpoint).

Output per batch: `(arrays, info)` with arrays = {"layout": Layout, "vit_patches": [R, Nv, 3*p*p],
"vae_images": [R, Ni, S, S, 3]} (numpy; images top-left aligned and zero-padded to the largest
VAE image side S) and info = {"tokens", "samples", "samples_per_group", "skipped", "oversized",
"skip_reasons"} (cumulative counters, except tokens and samples).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import grain
import numpy as np

from bagel_jax import layout as L
from bagel_jax.config import SpecialTokens
from bagel_jax.data.samples import Sample, Skipped
from bagel_jax.data.sources import DataError
from bagel_jax.image import patchify

MAX_CONSECUTIVE_REJECTS = 1000
NEED_KEYS = ("tokens", "und", "gen", "vit", "vae", "ce", "vae_images")


@dataclasses.dataclass(frozen=True)
class PackSpec:
  rows: int
  capacity: L.Capacity  # every field set
  expected_tokens: int
  vae_side: int  # pixels: padded VAE image side
  vit_patch: int
  vit_channels: int
  latent_downsample: int
  tokens: SpecialTokens
  max_patches_per_side: int
  max_latent_size: int
  reweight_ce: bool = False
  interpolate_pos: bool = False  # BagelConfig.interpolate_pos
  max_sample_tokens: int = 0  # 0: any sample that fits a row (upstream: max_num_tokens_per_sample)

  def cap(self) -> np.ndarray:
    return np.asarray([getattr(self.capacity, k) for k in NEED_KEYS], np.int64)


def needs(plan) -> np.ndarray:
  """Slots of each kind (NEED_KEYS order) one sample uses in a row."""
  tokens = L.plan_num_tokens(plan)
  gen = vit = ce = imgs = 0
  for item in plan:
    if isinstance(item, L.VaeImage):
      gen += item.grid[0] * item.grid[1]; imgs += 1
    elif isinstance(item, L.VitImage):
      vit += item.grid[0] * item.grid[1]
    elif isinstance(item, L.Text) and item.loss:
      ce += len(item.ids) + 1
    if getattr(item, "special_token_loss", False):
      ce += 1
  return np.asarray([tokens, tokens - gen, gen, vit, gen, ce, imgs], np.int64)


def assemble(rows: list[list[Sample]], spec: PackSpec) -> dict[str, Any]:
  """Rows of samples -> the batch arrays (layout, ViT patches, padded VAE images)."""
  cap = spec.capacity
  lay = L.pack([[s.plan for s in row] for row in rows], cap, spec.tokens,
               max_patches_per_side=spec.max_patches_per_side, max_latent_size=spec.max_latent_size,
               reweight_ce=spec.reweight_ce, interpolate_pos=spec.interpolate_pos)
  p, c = spec.vit_patch, spec.vit_channels
  vit = np.zeros((len(rows), cap.vit, p * p * c), np.float32)
  vae = np.zeros((len(rows), cap.vae_images, spec.vae_side, spec.vae_side, 3), np.float32)
  for r, row in enumerate(rows):
    pieces = [patchify(x, p) for s in row for x in s.vit]
    if pieces:
      v = np.concatenate(pieces)
      vit[r, :len(v)] = v
    i = 0
    for s in row:
      for x in s.vae:
        vae[r, i, :x.shape[0], :x.shape[1]] = x
        i += 1
  return {"layout": lay, "vit_patches": vit, "vae_images": vae}


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, spec: PackSpec):
    super().__init__(parent)
    self._spec = spec
    self._cap = spec.cap()
    self._pending: Sample | None = None
    self._pending_state = None
    self._counts = self._zero_counts()

  @staticmethod
  def _zero_counts() -> dict:
    return {"skipped": 0, "oversized": 0, "skip_reasons": {}, "samples_per_group": {}}

  def _read(self):
    state = self._parent.get_state()
    return state, next(self._parent)

  def __next__(self):
    spec = self._spec
    rows: list[list[Sample]] = []
    cur: list[Sample] = []
    used = np.zeros(len(NEED_KEYS), np.int64)
    rejected = 0
    while len(rows) < spec.rows:
      if rejected >= MAX_CONSECUTIVE_REJECTS:
        raise DataError(f"{rejected} samples in a row were skipped or too large for a row "
                        f"(reasons so far: {self._counts['skip_reasons']}, oversized: {self._counts['oversized']}); "
                        "check the data paths, formats and capacities")
      if self._pending is not None:
        state, s = self._pending_state, self._pending
        self._pending = self._pending_state = None
      else:
        state, s = self._read()
      if isinstance(s, Skipped):
        self._counts["skipped"] += 1
        reason = s.reason.split(":")[0][:60]
        self._counts["skip_reasons"][reason] = self._counts["skip_reasons"].get(reason, 0) + 1
        rejected += 1
        continue
      n = needs(s.plan)
      if np.any(n > self._cap) or (spec.max_sample_tokens and n[0] > spec.max_sample_tokens):
        self._counts["oversized"] += 1
        rejected += 1
        continue
      rejected = 0
      if cur and np.any(used + n > self._cap):
        rows.append(cur)
        cur, used = [], np.zeros_like(used)
        if len(rows) == spec.rows:
          self._pending, self._pending_state = s, state
          break
      cur.append(s)
      used += n
      if used[0] >= spec.expected_tokens:
        rows.append(cur)
        cur, used = [], np.zeros_like(used)
    arrays = assemble(rows, spec)
    groups = collections.Counter(str(s.group) for row in rows for s in row)
    for g, k in groups.items():
      self._counts["samples_per_group"][g] = self._counts["samples_per_group"].get(g, 0) + k
    info = {"tokens": int(sum(L.plan_num_tokens(s.plan) for row in rows for s in row)),
            "samples": int(sum(len(r) for r in rows)),
            **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self._counts.items()}}
    return arrays, info

  def get_state(self) -> dict:
    parent = self._pending_state if self._pending is not None else self._parent.get_state()
    return {"parent": parent, "counts": _copy(self._counts)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._pending = self._pending_state = None
    self._counts = _copy(state["counts"])


def _copy(d):
  return {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}


class PackBatches(grain.IterDataset):
  """Samples (or `Skipped`) -> packed batches `(arrays, info)`; see the module docstring."""

  def __init__(self, parent: grain.IterDataset, spec: PackSpec):
    super().__init__(parent)
    self._spec = spec

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._spec)

  def __str__(self) -> str:
    return f"PackBatches(rows={self._spec.rows}, tokens={self._spec.capacity.tokens})"
