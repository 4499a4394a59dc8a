"""Pallas GPU (Triton backend) flash attention over BAGEL's interval mask.

Same contract as `bagel_jax.attention.api.attention`.  The mask is computed in the kernel from
the four interval arrays; a query block only visits the key blocks listed in its schedule
(`blocks.py`: per-block min/max of the intervals, compacted to a list), so fully masked blocks
cost nothing, and blocks that are fully visible skip computing the mask.  GQA is by head index (`kv_head = q_head // group`): K/V are never repeated; the
dk/dv kernel of one KV head loops over the query heads of its group.  Softmax statistics and all
accumulators are fp32; the backward pass (jax.custom_vjp) saves only the output and the
log-sum-exp ([B, Hq, T]) and recomputes probabilities block by block (no T x S tensor).

`forward_split_k` (used by `decode.py`) splits each visit list over several programs and merges
the partial softmaxes (flash-decoding), for a few queries against a long KV cache.
`visit_counts` returns the number of key blocks the forward processed per query block, counted
inside the kernel (the tests compare it with the blocks the dense mask touches).

Head dims that are not a power of two (SigLIP's 72) are zero-padded to one (Triton needs
power-of-two tiles); T and S are padded to whole blocks (padded rows and columns are masked).

The Triton backend of Pallas is deprecated upstream (JAX 0.11) in favour of Mosaic GPU, which
has no Ampere attention kernel yet; this kernel targets A100 and H100 through Triton.  On CPU it
runs with `interpret=True` (or the module switch `INTERPRET = True`), which the tests use.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bagel_jax.attention import blocks, target, tiles
from bagel_jax.attention.registry import BackendUnavailable

INTERPRET = False  # module switch: run every call in the Pallas interpreter (CPU tests)

_LOG2E = math.log2(math.e)
_MIN_BLOCK = 16  # tl.dot needs at least 16 rows/columns


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two). `*_bwd` are used by both backward kernels.

  The class defaults are the generic ones; `default_block_sizes` reads the per-target table
  (`bagel_jax.attention.tiles`, chosen with the target's compiler, see docs/benchmarks.md) and
  halves it for fp32.
  """
  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: int | None = None  # default: 4 for head dim <= 64, else 8
  num_stages: int = 2


def default_block_sizes(dtype, device: target.Device | None = None) -> BlockSizes:
  """The tiles of the target's compute capability (`tiles.GPU`, chosen by `bench tiles`; default: the
  active mesh's device); halved for fp32 (twice the bytes per element)."""
  t = tiles.gpu(device)
  bs = BlockSizes(block_q=t.block_q, block_k=t.block_k, block_q_bwd=t.block_q_bwd, block_k_bwd=t.block_k_bwd,
                  num_warps=t.num_warps, num_stages=t.num_stages)
  if jnp.dtype(dtype).itemsize >= 4:
    half = lambda n: max(n // 2, _MIN_BLOCK)
    bs = dataclasses.replace(bs, block_q=half(bs.block_q), block_k=half(bs.block_k), block_q_bwd=half(bs.block_q_bwd),
                             block_k_bwd=half(bs.block_k_bwd))
  return bs


def unavailable_reason(device: target.Device | None = None) -> str | None:
  """Why the compiled kernel cannot run on `device` (default: the active mesh's, see `target`)."""
  device = target.current() if device is None else device
  if device.platform != "gpu":
    return f"pallas_gpu needs an NVIDIA GPU (Triton); the target is {device.platform} ({device.kind})"
  cc = device.compute_capability
  if "nvidia" not in device.kind.lower() and cc is None:
    return f"pallas_gpu needs an NVIDIA GPU, found {device.kind!r}"
  if cc is not None and cc < 8.0:
    return f"pallas_gpu needs compute capability >= 8.0 (A100 or newer), found {cc}"
  return None


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _mask(ks, ke, qp, qs, qe, k0, block_k):
  """[bq, bk] visibility from the row intervals (ks, ke, qp: [bq]) and column ones (qs, qe: [bk])."""
  kidx = k0 + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  return ((ks[:, None] <= kidx) & (kidx < ke[:, None]) & (qs[None, :] <= qp[:, None]) &
          (qp[:, None] < qe[None, :]))


def _entry(raw, n):
  """A schedule entry: block index and whether the block is fully visible (listed as index + n)."""
  full = raw >= n
  return jnp.where(full, raw - n, raw), full


def _apply_mask(s, full, mask_fn):
  """-inf where masked; blocks that are fully visible skip computing the mask."""
  return lax.cond(full, lambda x: x, lambda x: jnp.where(mask_fn(), x, -jnp.inf), s)


# ----------------------------------------------------------------------------- forward kernel

def _fwd_kernel(sched_ref, ks_ref, ke_ref, qp_ref, qs_ref, qe_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                *visits_ref, scale2: float, block_q: int, block_k: int, num_splits: int, num_k_blocks: int,
                precision):
  dp = q_ref.shape[-1]
  q = q_ref[...]
  ks, ke, qp = ks_ref[...], ke_ref[...], qp_ref[...]
  n = sched_ref[0]
  if num_splits == 1:
    lo, hi = 0, n
  else:  # split-K (decode): this program takes one contiguous share of the visit list
    per = (n + num_splits - 1) // num_splits
    lo = (pl.program_id(0) % num_splits) * per
    hi = jnp.minimum(n, lo + per)

  def body(jj, carry):
    acc, m, l = carry
    j, full = _entry(sched_ref[jj + 1], num_k_blocks)
    k0 = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(k0, block_k), :]
    v = v_ref[pl.ds(k0, block_k), :]
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale2  # log2 domain, fp32
    s = _apply_mask(s, full, lambda: _mask(ks, ke, qp, qs_ref[pl.ds(k0, block_k)], qe_ref[pl.ds(k0, block_k)],
                                           k0, block_k))
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s - m_safe[:, None])  # masked entries: exp2(-inf) = 0
    corr = jnp.exp2(m - m_safe)
    l = l * corr + jnp.sum(p, axis=1)
    acc = acc * corr[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
    return acc, m_new, l

  init = (jnp.zeros((block_q, dp), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(lo, hi, body, init)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  # log2-sum-exp2; +inf for rows that see nothing, so the backward gives them p = 0.
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))
  if visits_ref:  # debug output: key blocks this program processed (counted in the loop)
    visits_ref[0][...] = lax.fori_loop(lo, hi, lambda _, c: c + 1, jnp.int32(0))


# ----------------------------------------------------------------------------- backward kernels

def _dq_kernel(sched_ref, ks_ref, ke_ref, qp_ref, qs_ref, qe_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, scale: float, scale2: float, block_q: int, block_k: int, num_k_blocks: int,
               precision):
  dp = q_ref.shape[-1]
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  ks, ke, qp = ks_ref[...], ke_ref[...], qp_ref[...]

  def body(jj, dq):
    j, full = _entry(sched_ref[jj + 1], num_k_blocks)
    k0 = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(k0, block_k), :]
    v = v_ref[pl.ds(k0, block_k), :]
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale2
    s = _apply_mask(s, full, lambda: _mask(ks, ke, qp, qs_ref[pl.ds(k0, block_k)], qe_ref[pl.ds(k0, block_k)],
                                           k0, block_k))
    p = jnp.exp2(s - lse[:, None])
    dpv = plgpu.dot(do, v, trans_b=True, precision=precision)
    ds = p * (dpv - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

  dq = lax.fori_loop(0, sched_ref[0], body, jnp.zeros((block_q, dp), jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(sched_ref, ks_ref, ke_ref, qp_ref, qs_ref, qe_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, scale: float, scale2: float, block_q: int, block_k: int,
                group: int, num_q_blocks: int, precision):
  dp = k_ref.shape[-1]
  k, v = k_ref[...], v_ref[...]
  qs, qe = qs_ref[...], qe_ref[...]
  k0 = pl.program_id(0) * block_k
  n = sched_ref[0]

  def head(g, carry):
    def body(ii, carry):
      dk, dv = carry
      i, full = _entry(sched_ref[ii + 1], num_q_blocks)
      q0 = pl.multiple_of(i * block_q, block_q)
      q = q_ref[pl.ds(q0, block_q), g, :]
      do = do_ref[pl.ds(q0, block_q), g, :]
      lse = lse_ref[g, pl.ds(q0, block_q)]
      delta = delta_ref[g, pl.ds(q0, block_q)]
      s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale2
      s = _apply_mask(s, full, lambda: _mask(ks_ref[pl.ds(q0, block_q)], ke_ref[pl.ds(q0, block_q)],
                                             qp_ref[pl.ds(q0, block_q)], qs, qe, k0, block_k))
      p = jnp.exp2(s - lse[:, None])  # [bq, bk]
      dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
      dpv = plgpu.dot(do, v, trans_b=True, precision=precision)
      ds = p * (dpv - delta[:, None])
      dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
      return dk, dv

    return lax.fori_loop(0, n, body, carry)

  zeros = jnp.zeros((block_k, dp), jnp.float32)
  dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrappers

@dataclasses.dataclass(frozen=True)
class _Plan(blocks.KernelShape):
  num_warps: int
  num_stages: int


def _fit(block: int, n: int) -> int:
  return max(_MIN_BLOCK, min(block, blocks.next_pow2(n)))


def _plan(q, k, bs: BlockSizes) -> _Plan:
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  for name, x in (("block_q", bs.block_q), ("block_k", bs.block_k), ("block_q_bwd", bs.block_q_bwd),
                  ("block_k_bwd", bs.block_k_bwd)):
    if x != blocks.next_pow2(x):
      raise ValueError(f"pallas_gpu: {name}={x} must be a power of two")
  bq, bk = _fit(bs.block_q, t), _fit(bs.block_k, s)
  bq_bwd, bk_bwd = _fit(bs.block_q_bwd, t), _fit(bs.block_k_bwd, s)
  tp = blocks.cdiv(t, max(bq, bq_bwd)) * max(bq, bq_bwd)
  sp = blocks.cdiv(s, max(bk, bk_bwd)) * max(bk, bk_bwd)
  dp = max(_MIN_BLOCK, blocks.next_pow2(d))
  nw = bs.num_warps if bs.num_warps is not None else (4 if dp <= 64 else 8)
  return _Plan(b, t, s, hq, hkv, d, dp, tp, sp, bq, bk, bq_bwd, bk_bwd, nw, bs.num_stages)


def _prepare(pl_: _Plan, q, k, v, ints):
  qq = blocks.pad_last(blocks.pad_seq(q, pl_.tp), pl_.dp)
  kk = blocks.pad_last(blocks.pad_seq(k, pl_.sp), pl_.dp)
  vv = blocks.pad_last(blocks.pad_seq(v, pl_.sp), pl_.dp)
  padded = blocks.pad_intervals(*ints, pl_.tp, pl_.sp)
  return qq, kk, vv, padded


def _forward(pl_: _Plan, q, k, v, ints, scale, interpret, debug_visits=False, num_splits=1):
  """Returns (o [B, Tp, Hq, Dp], lse2 [B, Hq, Tp]) or, with num_splits > 1, per-split partial
  results (o [n, B, Tp, Hq, Dp] fp32, lse2 [n, B, Hq, Tp]); plus visits if asked."""
  qq, kk, vv, P = _prepare(pl_, q, k, v, ints)
  b, hq, g, ns = pl_.b, pl_.hq, pl_.hq // pl_.hkv, num_splits
  nq, nk = pl_.tp // pl_.bq, pl_.sp // pl_.bk
  width = blocks.next_pow2(nk + 1)
  sched = blocks.compact(blocks.block_mask(P, pl_.bq, pl_.bk), width, full=blocks.full_mask(P, pl_.bq, pl_.bk))
  row = pl.BlockSpec((None, pl_.bq), lambda p, b_, h: (b_, p // ns))
  col = pl.BlockSpec((None, pl_.sp), lambda p, b_, h: (b_, 0))
  in_specs = [
      pl.BlockSpec((None, None, width), lambda p, b_, h: (b_, p // ns, 0)),
      row, row, row, col, col,
      pl.BlockSpec((None, pl_.bq, None, pl_.dp), lambda p, b_, h: (b_, p // ns, h, 0)),
      pl.BlockSpec((None, pl_.sp, None, pl_.dp), lambda p, b_, h: (b_, 0, h // g, 0)),
      pl.BlockSpec((None, pl_.sp, None, pl_.dp), lambda p, b_, h: (b_, 0, h // g, 0)),
  ]
  if ns == 1:
    out_shape = [jax.ShapeDtypeStruct(qq.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, pl_.tp), jnp.float32)]
    out_specs = [pl.BlockSpec((None, pl_.bq, None, pl_.dp), lambda p, b_, h: (b_, p, h, 0)),
                 pl.BlockSpec((None, None, pl_.bq), lambda p, b_, h: (b_, h, p))]
  else:
    out_shape = [jax.ShapeDtypeStruct((ns,) + qq.shape, jnp.float32),
                 jax.ShapeDtypeStruct((ns, b, hq, pl_.tp), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, pl_.bq, None, pl_.dp), lambda p, b_, h: (p % ns, b_, p // ns, h, 0)),
                 pl.BlockSpec((None, None, None, pl_.bq), lambda p, b_, h: (p % ns, b_, h, p // ns))]
  if debug_visits:
    out_shape.append(jax.ShapeDtypeStruct((b, hq, nq * ns), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None), lambda p, b_, h: (b_, h, p)))
  kernel = functools.partial(_fwd_kernel, scale2=scale * _LOG2E, block_q=pl_.bq, block_k=pl_.bk,
                             num_splits=ns, num_k_blocks=nk, precision=_precision(q.dtype))
  return pl.pallas_call(
      kernel, grid=(nq * ns, b, hq), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=pl_.num_warps, num_stages=pl_.num_stages),
      interpret=interpret, name="bagel_interval_attention_fwd",
  )(sched, P.k_start, P.k_end, P.q_pos, P.q_start, P.q_end, qq, kk, vv)


def _backward(pl_: _Plan, q, k, v, ints, o_p, lse, do, scale, interpret):
  qq, kk, vv, P = _prepare(pl_, q, k, v, ints)
  b, hq, hkv, g = pl_.b, pl_.hq, pl_.hkv, pl_.hq // pl_.hkv
  bq, bk, tp, sp, dp = pl_.bq_bwd, pl_.bk_bwd, pl_.tp, pl_.sp, pl_.dp
  nq, nk = tp // bq, sp // bk
  dop = blocks.pad_last(blocks.pad_seq(do, tp), dp)
  # delta = rowsum(dO * O): O(T) memory, done by XLA.
  delta = jnp.einsum("bthd,bthd->bht", dop.astype(jnp.float32), o_p.astype(jnp.float32))
  mask, full = blocks.block_mask(P, bq, bk), blocks.full_mask(P, bq, bk)
  precision = _precision(q.dtype)
  params = plgpu.CompilerParams(num_warps=pl_.num_warps, num_stages=pl_.num_stages)

  width_q = blocks.next_pow2(nk + 1)
  row = pl.BlockSpec((None, bq), lambda i, b_, h: (b_, i))
  col = pl.BlockSpec((None, sp), lambda i, b_, h: (b_, 0))
  qblk = pl.BlockSpec((None, bq, None, dp), lambda i, b_, h: (b_, i, h, 0))
  kfull = pl.BlockSpec((None, sp, None, dp), lambda i, b_, h: (b_, 0, h // g, 0))
  stat = pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, scale2=scale * _LOG2E, block_q=bq, block_k=bk,
                        num_k_blocks=nk, precision=precision),
      grid=(nq, b, hq),
      in_specs=[pl.BlockSpec((None, None, width_q), lambda i, b_, h: (b_, i, 0)), row, row, row, col, col,
                qblk, kfull, kfull, qblk, stat, stat],
      out_specs=qblk, out_shape=jax.ShapeDtypeStruct(qq.shape, q.dtype), compiler_params=params,
      interpret=interpret, name="bagel_interval_attention_dq",
  )(blocks.compact(mask, width_q, full=full), P.k_start, P.k_end, P.q_pos, P.q_start, P.q_end, qq, kk, vv, dop, lse,
    delta)

  width_k = blocks.next_pow2(nq + 1)
  rowf = pl.BlockSpec((None, tp), lambda j, b_, h: (b_, 0))
  colb = pl.BlockSpec((None, bk), lambda j, b_, h: (b_, j))
  qgrp = pl.BlockSpec((None, tp, None, g, dp), lambda j, b_, h: (b_, 0, h, 0, 0))
  kblk = pl.BlockSpec((None, bk, None, dp), lambda j, b_, h: (b_, j, h, 0))
  statg = pl.BlockSpec((None, None, g, tp), lambda j, b_, h: (b_, h, 0, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, scale2=scale * _LOG2E, block_q=bq, block_k=bk, group=g,
                        num_q_blocks=nq, precision=precision),
      grid=(nk, b, hkv),
      in_specs=[pl.BlockSpec((None, None, width_k), lambda j, b_, h: (b_, j, 0)), rowf, rowf, rowf, colb, colb,
                qgrp, kblk, kblk, qgrp, statg, statg],
      out_specs=[kblk, kblk],
      out_shape=[jax.ShapeDtypeStruct(kk.shape, k.dtype), jax.ShapeDtypeStruct(vv.shape, v.dtype)],
      compiler_params=params, interpret=interpret, name="bagel_interval_attention_dkv",
  )(blocks.compact(jnp.swapaxes(mask, 1, 2), width_k, full=jnp.swapaxes(full, 1, 2)), P.k_start, P.k_end,
    P.q_pos, P.q_start, P.q_end,
    qq.reshape(b, tp, hkv, g, dp), kk, vv, dop.reshape(b, tp, hkv, g, dp), lse.reshape(b, hkv, g, tp),
    delta.reshape(b, hkv, g, tp))
  t, s, d = pl_.t, pl_.s, pl_.d
  return dq[:, :t, :, :d], dk[:, :s, :, :d], dv[:, :s, :, :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _attention(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale, bs, interpret):
  return _attention_fwd(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale, bs, interpret)[0]


def _attention_fwd(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale, bs, interpret):
  pl_ = _plan(q, k, bs)
  ints = (k_start, k_end, q_start, q_end, q_positions)
  o_p, lse = _forward(pl_, q, k, v, ints, scale, interpret)
  return o_p[:, :pl_.t, :, :pl_.d], (q, k, v, ints, o_p, lse)


def _attention_bwd(scale, bs, interpret, res, do):
  q, k, v, ints, o_p, lse = res
  dq, dk, dv = _backward(_plan(q, k, bs), q, k, v, ints, o_p, lse, do, scale, interpret)
  return (dq, dk, dv) + (None,) * 5


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check(q, k, v, interpret):
  if not interpret:
    reason = unavailable_reason()
    if reason:
      raise BackendUnavailable(reason + " (pass interpret=True, or set pallas_gpu.INTERPRET, to run on CPU)")
  for x in (q, k, v):
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise TypeError(f"pallas_gpu: unsupported dtype {x.dtype}")


def attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, scale: float,
              block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
  """Interval-mask attention (see `bagel_jax.attention.api`), differentiable wrt q, k, v."""
  interpret = INTERPRET if interpret is None else bool(interpret)
  _check(q, k, v, interpret)
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32)[None], q.shape[:2])
  return _attention(q, k, v, k_start, k_end, q_start, q_end, q_positions, float(scale),
                    block_sizes or default_block_sizes(q.dtype), interpret)


def visit_counts(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, scale: float,
                 block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
  """int32 [B, Hq, nq]: key blocks the forward kernel processed per query block (counted in-kernel)."""
  interpret = INTERPRET if interpret is None else bool(interpret)
  _check(q, k, v, interpret)
  pl_ = _plan(q, k, block_sizes or default_block_sizes(q.dtype))
  run = jax.jit(lambda q, k, v, ints: _forward(pl_, q, k, v, ints, float(scale), interpret, debug_visits=True)[2])
  return run(q, k, v, (k_start, k_end, q_start, q_end, q_positions))


def forward_split_k(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, scale: float,
                    num_splits: int = 8, block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None) -> jax.Array:
  """Forward only, flash-decoding style: each query block's visit list is cut into `num_splits`
  shares run by separate programs, and the partial softmaxes are merged here.  For a short query
  chunk against a long cache, where (query blocks x batch x heads) alone leaves the GPU idle."""
  interpret = INTERPRET if interpret is None else bool(interpret)
  _check(q, k, v, interpret)
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32)[None], q.shape[:2])
  pl_ = _plan(q, k, block_sizes or default_block_sizes(q.dtype))
  o, lse = _forward(pl_, q, k, v, (k_start, k_end, q_start, q_end, q_positions), float(scale), interpret,
                    num_splits=num_splits)
  lse = jnp.where(lse == jnp.inf, -jnp.inf, lse)  # empty share: weight 0
  top = jnp.max(lse, axis=0)
  top = jnp.where(top == -jnp.inf, 0.0, top)
  w = jnp.exp2(lse - top[None])  # [n, B, Hq, Tp]
  den = jnp.sum(w, axis=0)
  w = w / jnp.where(den == 0, 1.0, den)[None]
  out = jnp.einsum("nbht,nbthd->bthd", w, o)
  return out[:, :pl_.t, :, :pl_.d].astype(q.dtype)
