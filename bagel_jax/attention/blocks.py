"""Per-block bookkeeping shared by the Pallas kernels: padding, block bounds and visit schedules.

A kernel works on query blocks of `block_q` rows and key blocks of `block_k` columns.  For
each query block we keep the bounding box of its rows (smallest `k_start`, largest `k_end`,
smallest and largest query position) and for each key block the bounding box of its columns
(smallest `q_start`, largest `q_end`).  Rows and columns whose interval is empty (padding)
are left out of the boxes, so a block made only of padding is never visited.  Block (i, j)
is visited iff the boxes meet:

    kmin[i] < (j + 1) * block_k  and  kmax[i] > j * block_k          (key side)
    qsmin[j] <= pmax[i]          and  qemax[j] > pmin[i]             (query side)

This test never misses a visible (q, k) pair.  For BAGEL layouts (packed samples of causal,
full and noise blocks) it is also tight in practice: the tests compare the visited blocks
with the blocks that intersect the dense mask.

The schedule handed to a kernel is a compacted list per query block (forward, dq) or per key
block (dk/dv): `sched[b, i, 0]` is the number of blocks to visit, `sched[b, i, 1:1 + n]` their
indices in increasing order; entries past the count repeat the last visited index (so a TPU
pipeline that prefetches by index does not fetch anything new), or 0 when nothing is visited.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bagel_jax.attention.mask import dense_mask, default_q_positions

_BIG = 2**30


@dataclasses.dataclass(frozen=True)
class KernelShape:
  """The static shape of one kernel call: batch, lengths, heads, head dim (+ padded), padded lengths,
  forward and backward tiles. Each Pallas backend extends it with its own launch settings."""
  b: int
  t: int
  s: int
  hq: int
  hkv: int
  d: int
  dp: int
  tp: int
  sp: int
  bq: int
  bk: int
  bq_bwd: int
  bk_bwd: int


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Padded:
  """Interval arrays padded to whole blocks. Padded rows and columns see / are seen by nothing."""
  k_start: jax.Array  # [B, Tp]
  k_end: jax.Array
  q_pos: jax.Array
  q_start: jax.Array  # [B, Sp]
  q_end: jax.Array
  t: int
  s: int
  tp: int
  sp: int


def pad_intervals(k_start, k_end, q_start, q_end, q_positions, tp: int, sp: int) -> Padded:
  b, t = k_start.shape
  s = q_start.shape[1]
  qp = default_q_positions(b, t) if q_positions is None else q_positions
  i32 = lambda x: jnp.asarray(x, jnp.int32)
  pad_t = lambda x: jnp.pad(i32(x), ((0, 0), (0, tp - t)))
  pad_s = lambda x: jnp.pad(i32(x), ((0, 0), (0, sp - s)))
  return Padded(pad_t(k_start), pad_t(k_end), pad_t(qp), pad_s(q_start), pad_s(q_end), t, s, tp, sp)


def pad_seq(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
  if x.shape[axis] == n:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, n - x.shape[axis])
  return jnp.pad(x, widths)


def pad_last(x: jax.Array, n: int) -> jax.Array:
  return pad_seq(x, n, axis=x.ndim - 1)


def block_mask(p: Padded, block_q: int, block_k: int) -> jax.Array:
  """bool [B, nq, nk]: which (query block, key block) pairs the kernels visit."""
  b = p.k_start.shape[0]
  nq, nk = p.tp // block_q, p.sp // block_k
  row_ok = p.k_end > p.k_start
  col_ok = p.q_end > p.q_start
  rq = lambda x: x.reshape(b, nq, block_q)
  rk = lambda x: x.reshape(b, nk, block_k)
  kmin = jnp.min(rq(jnp.where(row_ok, p.k_start, _BIG)), axis=-1)
  kmax = jnp.max(rq(jnp.where(row_ok, p.k_end, -_BIG)), axis=-1)
  pmin = jnp.min(rq(jnp.where(row_ok, p.q_pos, _BIG)), axis=-1)
  pmax = jnp.max(rq(jnp.where(row_ok, p.q_pos, -_BIG)), axis=-1)
  qsmin = jnp.min(rk(jnp.where(col_ok, p.q_start, _BIG)), axis=-1)
  qemax = jnp.max(rk(jnp.where(col_ok, p.q_end, -_BIG)), axis=-1)
  j0 = jnp.arange(nk, dtype=jnp.int32) * block_k
  key_side = (kmin[:, :, None] < (j0 + block_k)[None, None]) & (kmax[:, :, None] > j0[None, None])
  query_side = (qsmin[:, None, :] <= pmax[:, :, None]) & (qemax[:, None, :] > pmin[:, :, None])
  return key_side & query_side


def full_mask(p: Padded, block_q: int, block_k: int) -> jax.Array:
  """bool [B, nq, nk]: blocks in which every (q, k) pair is visible (no mask needed there).

  Exact, because each condition separates into a row part and a column part:
  max k_start <= first key, min k_end > last key, max q_start <= min q_pos, min q_end > max q_pos.
  """
  b = p.k_start.shape[0]
  nq, nk = p.tp // block_q, p.sp // block_k
  rq = lambda x: x.reshape(b, nq, block_q)
  rk = lambda x: x.reshape(b, nk, block_k)
  rows_ok = jnp.all(rq(p.k_end > p.k_start), axis=-1)
  cols_ok = jnp.all(rk(p.q_end > p.q_start), axis=-1)
  ks_max, ke_min = jnp.max(rq(p.k_start), axis=-1), jnp.min(rq(p.k_end), axis=-1)
  qp_min, qp_max = jnp.min(rq(p.q_pos), axis=-1), jnp.max(rq(p.q_pos), axis=-1)
  qs_max, qe_min = jnp.max(rk(p.q_start), axis=-1), jnp.min(rk(p.q_end), axis=-1)
  j0 = jnp.arange(nk, dtype=jnp.int32) * block_k
  key_side = (ks_max[:, :, None] <= j0[None, None]) & (ke_min[:, :, None] >= (j0 + block_k)[None, None])
  query_side = (qs_max[:, None, :] <= qp_min[:, :, None]) & (qe_min[:, None, :] > qp_max[:, :, None])
  return rows_ok[:, :, None] & cols_ok[:, None, :] & key_side & query_side


def compact(mask: jax.Array, width: int | None = None, full: jax.Array | None = None) -> jax.Array:
  """bool [B, n, m] -> int32 [B, n, width] schedule (count, then indices; see the module doc).

  With `full` (bool [B, n, m], a subset of `mask`), a fully visible block j is listed as j + m, so
  a kernel can skip computing the mask there."""
  b, n, m = mask.shape
  width = m + 1 if width is None else width
  assert width >= m + 1, (width, m)
  count = jnp.sum(mask, axis=-1, dtype=jnp.int32)
  order = jnp.argsort(jnp.logical_not(mask), axis=-1, stable=True).astype(jnp.int32)
  if full is not None:
    order = order + m * jnp.take_along_axis(full, order, axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  last = jnp.where(count[..., None] > 0, last, 0)
  pos = jnp.arange(m, dtype=jnp.int32)
  idx = jnp.where(pos[None, None] < count[..., None], order, last)
  sched = jnp.concatenate([count[..., None], idx], axis=-1)
  return jnp.pad(sched, ((0, 0), (0, 0), (0, width - m - 1)), constant_values=0)


def visit_schedule(k_start, k_end, q_start, q_end, q_positions=None, *, block_q: int, block_k: int,
                   by: str = "query") -> jax.Array:
  """The schedule the kernels use, for unpadded interval arrays (padding is added here)."""
  t, s = k_start.shape[1], q_start.shape[1]
  p = pad_intervals(k_start, k_end, q_start, q_end, q_positions, cdiv(t, block_q) * block_q,
                    cdiv(s, block_k) * block_k)
  m = block_mask(p, block_q, block_k)
  return compact(m if by == "query" else jnp.swapaxes(m, 1, 2))


def intersecting_blocks(k_start, k_end, q_start, q_end, q_positions=None, *, block_q: int,
                        block_k: int) -> jax.Array:
  """bool [B, nq, nk]: the blocks in which the dense mask has at least one visible pair (oracle)."""
  b, t = k_start.shape
  s = q_start.shape[1]
  m = dense_mask(k_start, k_end, q_start, q_end, q_positions)
  nq, nk = cdiv(t, block_q), cdiv(s, block_k)
  m = jnp.pad(m, ((0, 0), (0, nq * block_q - t), (0, nk * block_k - s)))
  return m.reshape(b, nq, block_q, nk, block_k).any(axis=(2, 4))


def split_full(sched: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """A schedule from `compact(..., full=...)` -> (plain schedule, int32 flags: 1 = fully visible)."""
  idx = sched[..., 1:]
  flags = (idx >= m).astype(jnp.int32)
  plain = jnp.concatenate([sched[..., :1], idx - m * flags], axis=-1)
  return plain, jnp.concatenate([jnp.zeros_like(sched[..., :1]), flags], axis=-1)
