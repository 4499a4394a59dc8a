"""Patch tokens of images and latents, and NaViT position ids.

Convention: images are channels-last, `[..., H, W, C]` (NHWC with optional leading dims).
Upstream works channels-first (`data_utils.patchify` takes `[C, H, W]`); transpose with
`image.transpose(1, 2, 0)` first.  A token is one `patch x patch` square; tokens are in
row-major patch order and each token's `patch*patch*C` features are ordered
(row in patch, column in patch, channel) with the channel fastest, exactly as upstream's
ViT patchify (`data/data_utils.py`) and latent patchify (`bagel.py`,
`(c, h, p, w, q) -> (h, w, p, q, c)`).  Works on numpy and JAX arrays alike.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def patchify(image, patch: int):
  """[..., H, W, C] -> [..., (H/p)*(W/p), p*p*C] (tokens row-major; features row, col, channel)."""
  *lead, h, w, c = image.shape
  if h % patch or w % patch:
    raise ValueError(f"patchify: image size {h}x{w} is not a multiple of the patch size {patch}")
  gh, gw = h // patch, w // patch
  x = image.reshape(*lead, gh, patch, gw, patch, c)
  n = len(lead)
  x = x.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
  return x.reshape(*lead, gh * gw, patch * patch * c)


def unpatchify(tokens, grid_h: int, grid_w: int, patch: int):
  """The inverse of `patchify`: [..., grid_h*grid_w, p*p*C] -> [..., grid_h*p, grid_w*p, C]."""
  *lead, n_tok, feat = tokens.shape
  if n_tok != grid_h * grid_w or feat % (patch * patch):
    raise ValueError(f"unpatchify: tokens {tuple(tokens.shape)} do not fit a {grid_h}x{grid_w} grid "
                     f"of {patch}x{patch} patches")
  c = feat // (patch * patch)
  x = tokens.reshape(*lead, grid_h, grid_w, patch, patch, c)
  n = len(lead)
  x = x.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
  return x.reshape(*lead, grid_h * patch, grid_w * patch, c)


def _torch_cpu_arange_f32(start: float, end: float, step: float) -> np.ndarray:
  """`torch.arange(start, end, step)` (float32) exactly as torch's CPU kernel computes it.

  Length ceil((end - start) / step) in float64.  The kernel (aten/src/ATen/native/cpu/
  RangeFactoriesKernel.cpp) fills blocks of 16 as two 8-float vectors, each starting from
  float32(start + step * i0) and adding k * step in float64; the tail past the last full
  block is start + step * i in float64; every value rounded to float32.  The 8-float
  vectors are what torch 2.13 computes on x86 CPUs (AVX2, AVX-512 and the default build
  alike), checked element for element on thousands of lengths; a plain float32 arange
  differs from it, and those one-ulp differences move bucket boundaries.
  """
  n = max(0, math.ceil((end - start) / step))
  i = np.arange(n, dtype=np.int64)
  base = (i // 8) * 8
  vec = (np.float64(start) + step * base).astype(np.float32).astype(np.float64) + (i - base) * step
  tail = np.float64(start) + step * i
  return np.where(i < (n // 16) * 16, vec, tail).astype(np.float32)


def _interpolated_coords(n: int, max_per_side: int) -> np.ndarray:
  """Upstream's `get_flattened_position_ids_interpolate` along one side (data/data_utils.py):
  bucketize(arange(0, 1 - 1e-6, 1/n), arange(1/M, 1.0, 1/M), right=True), in float32."""
  boundaries = _torch_cpu_arange_f32(1 / max_per_side, 1.0, 1 / max_per_side)
  coords = _torch_cpu_arange_f32(0, 1 - 1e-6, 1 / n)
  return np.searchsorted(boundaries, coords, side="right")  # == torch.bucketize(..., right=True)


def navit_position_ids(grid_h: int, grid_w: int, max_per_side: int, interpolate: bool = False) -> np.ndarray:
  """Position ids of a grid_h x grid_w patch grid in a max_per_side^2 table, row-major, int32.

  interpolate=False: upstream's "extrapolate" ids, row * max_per_side + col (the grid must fit
  the table).  interpolate=True (`interpolate_pos`): each row / column's fractional coordinate
  is bucketed into max_per_side bins, bit for bit as upstream's torch code does; any grid size.
  """
  if grid_h <= 0 or grid_w <= 0:
    raise ValueError(f"patch grid {grid_h}x{grid_w} is empty")
  if interpolate:
    rows, cols = _interpolated_coords(grid_h, max_per_side), _interpolated_coords(grid_w, max_per_side)
  else:
    if grid_h > max_per_side or grid_w > max_per_side:
      raise ValueError(f"patch grid {grid_h}x{grid_w} exceeds {max_per_side} patches per side")
    rows, cols = np.arange(grid_h), np.arange(grid_w)
  return (rows[:, None] * max_per_side + cols[None, :]).reshape(-1).astype(np.int32)


def pack_vit_images(images: Sequence[np.ndarray], patch: int, max_per_side: int, interpolate: bool = False):
  """Packs images [H_i, W_i, C] (in [-1, 1]) into one NaViT token stream.

  Returns numpy arrays (patches [N, p*p*C], position_ids [N], block_start [N], block_end [N]):
  each token's image occupies [block_start, block_end) of the stream (one bidirectional
  attention block per image).
  """
  patches, pos, start, end = [], [], [], []
  offset = 0
  for im in images:
    im = np.asarray(im)
    gh, gw = im.shape[0] // patch, im.shape[1] // patch
    patches.append(patchify(im, patch))
    pos.append(navit_position_ids(gh, gw, max_per_side, interpolate))
    n = gh * gw
    start.append(np.full(n, offset, np.int32))
    end.append(np.full(n, offset + n, np.int32))
    offset += n
  if not patches:
    raise ValueError("pack_vit_images: no images")
  return (np.concatenate(patches), np.concatenate(pos), np.concatenate(start), np.concatenate(end))
