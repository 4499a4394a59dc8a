"""Pallas TPU (Mosaic) flash attention over BAGEL's interval mask.

Same contract as `bagel_jax.attention.api.attention`, forward and backward (jax.custom_vjp).
Layout inside: heads-major `[B, H, T, D]` (the TPU-friendly tiling; the wrapper transposes),
head dim zero-padded to a multiple of 128, T and S padded to whole blocks.

Block skipping, splash-style: the visit schedule of `blocks.py` (per-block min/max of the
intervals, compacted into a list) is scalar-prefetched into SMEM.  The innermost grid axis walks
the list; its length is the largest visit count of any block (a dynamic grid bound), and the
index maps read the list, so a K/V block that is not visited is never copied into VMEM.  Steps
past a block's own count repeat the last index (no new DMA) and do no compute.  A second
prefetched array flags the blocks that are fully visible; those skip computing the mask.

- forward: grid (B, Hq, nq, max visits); online softmax in VMEM scratch; writes O and the
  log-sum-exp [B, Hq, T, 1] (fp32).
- dq: same grid; recomputes P from the saved log-sum-exp.
- dk/dv: grid (B, Hkv, nk, group x max visits): one KV head accumulates over the query heads of
  its group (GQA without repeating K/V); computed transposed (S^T = K Q^T) so that every matmul
  is NN or NT.

On CPU: `interpret=True` (or the module switch `INTERPRET = True`) runs the TPU interpreter
(`pltpu.InterpretParams`); so does `pltpu.force_tpu_interpret_mode()`.  Interpret mode checks
semantics, not Mosaic's tiling rules or VMEM limits; those need a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from bagel_jax.attention import blocks, target, tiles
from bagel_jax.attention.registry import BackendUnavailable

INTERPRET = False  # module switch: run every call in the TPU interpreter (CPU tests)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q: int = 512
  block_k: int = 512
  block_q_bwd: int = 256
  block_k_bwd: int = 256
  vmem_limit_bytes: int | None = 64 * 1024 * 1024


def default_block_sizes(dtype, device: target.Device | None = None) -> BlockSizes:
  """The tiles of the target's TPU generation (`tiles.TPU`, chosen by `bench tiles`; default: the
  active mesh's device)."""
  del dtype
  t = tiles.tpu(device)
  return BlockSizes(block_q=t.block_q, block_k=t.block_k, block_q_bwd=t.block_q_bwd, block_k_bwd=t.block_k_bwd)


def unavailable_reason(device: target.Device | None = None) -> str | None:
  """Why the compiled kernel cannot run on `device` (default: the active mesh's, see `target`)."""
  device = target.current() if device is None else device
  if device.platform != "tpu":
    return f"pallas_tpu needs a TPU; the target is {device.platform} ({device.kind})"
  return None


def _dot(a, b, dims, precision):
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _mask(ks_ref, ke_ref, qp_ref, qs_ref, qe_ref, k0, shape, key_axis):
  kidx = k0 + lax.broadcasted_iota(jnp.int32, shape, key_axis)
  qp = qp_ref[...]
  return (ks_ref[...] <= kidx) & (kidx < ke_ref[...]) & (qs_ref[...] <= qp) & (qp < qe_ref[...])


def _apply_mask(s, full_flag, mask_fn):
  """-inf where masked; fully visible blocks (flag 1 in the schedule) skip the mask."""
  return lax.cond(full_flag == 1, lambda x: x, lambda x: jnp.where(mask_fn(), x, -jnp.inf), s)


# ----------------------------------------------------------------------------- kernels

def _fwd_kernel(sched_ref, full_ref, ks_ref, ke_ref, qp_ref, qs_ref, qe_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, scale, nq, width, block_k, precision):
  b, i, jj = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  base = (b * nq + i) * width

  @pl.when(jj == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(jj < sched_ref[base])
  def _step():
    k0 = sched_ref[base + 1 + jj] * block_k
    s = _dot(q_ref[...], k_ref[...], _NT, precision) * scale  # [bq, bk]
    s = _apply_mask(s, full_ref[base + 1 + jj],
                    lambda: _mask(ks_ref, ke_ref, qp_ref, qs_ref, qe_ref, k0, s.shape, 1))
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    corr = jnp.exp(m_prev - m_safe)
    l_sc[...] = l_sc[...] * corr + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = acc_sc[...] * corr + _dot(p.astype(v_ref.dtype), v_ref[...], _NN, precision)
    m_sc[...] = m_new

  @pl.when(jj == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...]
    empty = l == 0.0
    o_ref[...] = (acc_sc[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m_sc[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(sched_ref, full_ref, ks_ref, ke_ref, qp_ref, qs_ref, qe_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, dq_sc, *, scale, nq, width, block_k, precision):
  b, i, jj = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  base = (b * nq + i) * width

  @pl.when(jj == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(jj < sched_ref[base])
  def _step():
    k0 = sched_ref[base + 1 + jj] * block_k
    k = k_ref[...]
    s = _dot(q_ref[...], k, _NT, precision) * scale
    s = _apply_mask(s, full_ref[base + 1 + jj],
                    lambda: _mask(ks_ref, ke_ref, qp_ref, qs_ref, qe_ref, k0, s.shape, 1))
    p = jnp.exp(s - lse_ref[...])
    dp = _dot(do_ref[...], v_ref[...], _NT, precision)
    ds = p * (dp - delta_ref[...])
    dq_sc[...] += _dot(ds.astype(k.dtype), k, _NN, precision)

  @pl.when(jj == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- wrappers

@dataclasses.dataclass(frozen=True)
class _Plan(blocks.KernelShape):
  vmem: int | None


def _fit(block: int, n: int, multiple: int) -> int:
  return min(block, blocks.cdiv(n, multiple) * multiple)


def _plan(q, k, bs: BlockSizes, interpret) -> _Plan:
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  row_mult, col_mult = (8, 128) if not interpret else (8, 8)  # interpreters accept any tile
  bq, bk = _fit(bs.block_q, t, row_mult), _fit(bs.block_k, s, col_mult)
  bq_bwd, bk_bwd = _fit(bs.block_q_bwd, t, col_mult), _fit(bs.block_k_bwd, s, col_mult)
  if not interpret:
    for name, x, mult in (("block_q", bq, 8), ("block_k", bk, 128), ("block_q_bwd", bq_bwd, 128),
                          ("block_k_bwd", bk_bwd, 128)):
      if x % mult:
        raise ValueError(f"pallas_tpu: {name}={x} must be a multiple of {mult}")
  lq, lk = math.lcm(bq, bq_bwd), math.lcm(bk, bk_bwd)
  tp, sp = blocks.cdiv(t, lq) * lq, blocks.cdiv(s, lk) * lk
  dp = blocks.cdiv(d, 128) * 128
  return _Plan(b, t, s, hq, hkv, d, dp, tp, sp, bq, bk, bq_bwd, bk_bwd, bs.vmem_limit_bytes)


def _heads_major(x, n, dp):
  """[B, L, H, D] -> [B, H, n, dp] zero-padded."""
  return blocks.pad_last(blocks.pad_seq(x, n), dp).transpose(0, 2, 1, 3)


def _forced_interpret() -> bool:
  """True inside `pltpu.force_tpu_interpret_mode()` (private config; False if it moved)."""
  try:
    from jax._src import config as jax_config
    return jax_config.pallas_tpu_interpret_mode_context_manager.value is not None
  except (ImportError, AttributeError):  # pragma: no cover
    return False


def _interpret_arg(interpret):
  """What pallas_call gets: True (the fast generic interpreter), an InterpretParams (the TPU
  interpreter, which also simulates DMAs and checks bounds), or False (compile, or let
  `force_tpu_interpret_mode()` decide)."""
  if interpret == "forced":
    return False
  return interpret


def _params(pl_: _Plan):
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                              vmem_limit_bytes=pl_.vmem)


def _forward(pl_: _Plan, q, k, v, ints, scale, interpret):
  P = blocks.pad_intervals(*ints, pl_.tp, pl_.sp)
  qq, kk, vv = _heads_major(q, pl_.tp, pl_.dp), _heads_major(k, pl_.sp, pl_.dp), _heads_major(v, pl_.sp, pl_.dp)
  b, hq, g = pl_.b, pl_.hq, pl_.hq // pl_.hkv
  bq, bk, dp = pl_.bq, pl_.bk, pl_.dp
  nq, nk = pl_.tp // bq, pl_.sp // bk
  width = nk + 1
  sched, full = blocks.split_full(blocks.compact(blocks.block_mask(P, bq, bk), width,
                                                 full=blocks.full_mask(P, bq, bk)), nk)
  steps = jnp.maximum(jnp.max(sched[..., 0]), 1)

  def kv_block(b_, h, i, jj, s_ref, f_ref):
    return s_ref[(b_ * nq + i) * width + 1 + jj]

  row = pl.BlockSpec((None, bq, 1), lambda b_, h, i, jj, *r: (b_, i, 0))
  col = pl.BlockSpec((None, 1, bk), lambda b_, h, i, jj, *r: (b_, 0, kv_block(b_, h, i, jj, *r)))
  qblk = pl.BlockSpec((None, None, bq, dp), lambda b_, h, i, jj, *r: (b_, h, i, 0))
  kblk = pl.BlockSpec((None, None, bk, dp), lambda b_, h, i, jj, *r: (b_, h // g, kv_block(b_, h, i, jj, *r), 0))
  lse_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h, i, jj, *r: (b_, h, i, 0))
  col3 = lambda x: x[:, None, :]
  row3 = lambda x: x[:, :, None]
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, nq=nq, width=width, block_k=bk,
                        precision=_precision(q.dtype)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, hq, nq, steps),
          in_specs=[row, row, row, col, col, qblk, kblk, kblk],
          out_specs=[qblk, lse_spec],
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, dp), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(qq.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, pl_.tp, 1), jnp.float32)],
      compiler_params=_params(pl_), interpret=_interpret_arg(interpret), name="bagel_interval_attention_fwd",
  )(sched.reshape(-1), full.reshape(-1), row3(P.k_start), row3(P.k_end), row3(P.q_pos), col3(P.q_start),
    col3(P.q_end), qq, kk, vv)
  return o, lse


def _backward(pl_: _Plan, q, k, v, ints, o, lse, do, scale, interpret):
  P = blocks.pad_intervals(*ints, pl_.tp, pl_.sp)
  qq, kk, vv = _heads_major(q, pl_.tp, pl_.dp), _heads_major(k, pl_.sp, pl_.dp), _heads_major(v, pl_.sp, pl_.dp)
  dd = _heads_major(do, pl_.tp, pl_.dp)
  b, hq, hkv, g = pl_.b, pl_.hq, pl_.hkv, pl_.hq // pl_.hkv
  bq, bk, dp, tp, sp = pl_.bq_bwd, pl_.bk_bwd, pl_.dp, pl_.tp, pl_.sp
  nq, nk = tp // bq, sp // bk
  precision = _precision(q.dtype)
  delta = jnp.sum(dd.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # [B, Hq, Tp, 1]
  mask, full = blocks.block_mask(P, bq, bk), blocks.full_mask(P, bq, bk)
  col3 = lambda x: x[:, None, :]
  row3 = lambda x: x[:, :, None]

  # dq: grid over query blocks, walking their key-block lists.
  width = nk + 1
  sched, sfull = blocks.split_full(blocks.compact(mask, width, full=full), nk)
  steps = jnp.maximum(jnp.max(sched[..., 0]), 1)

  def kv_block(b_, i, jj, s_ref, f_ref):
    return s_ref[(b_ * nq + i) * width + 1 + jj]

  row = pl.BlockSpec((None, bq, 1), lambda b_, h, i, jj, *r: (b_, i, 0))
  col = pl.BlockSpec((None, 1, bk), lambda b_, h, i, jj, *r: (b_, 0, kv_block(b_, i, jj, *r)))
  qblk = pl.BlockSpec((None, None, bq, dp), lambda b_, h, i, jj, *r: (b_, h, i, 0))
  kblk = pl.BlockSpec((None, None, bk, dp), lambda b_, h, i, jj, *r: (b_, h // g, kv_block(b_, i, jj, *r), 0))
  stat = pl.BlockSpec((None, None, bq, 1), lambda b_, h, i, jj, *r: (b_, h, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, nq=nq, width=width, block_k=bk, precision=precision),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, hq, nq, steps),
          in_specs=[row, row, row, col, col, qblk, kblk, kblk, qblk, stat, stat],
          out_specs=qblk, scratch_shapes=[pltpu.VMEM((bq, dp), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(qq.shape, q.dtype),
      compiler_params=_params(pl_), interpret=_interpret_arg(interpret), name="bagel_interval_attention_dq",
  )(sched.reshape(-1), sfull.reshape(-1), row3(P.k_start), row3(P.k_end), row3(P.q_pos), col3(P.q_start),
    col3(P.q_end), qq, kk, vv, dd, lse, delta)

  # dk/dv: grid over key blocks and KV heads, walking (query head of the group, query block).
  width_t = nq + 1
  sched_t, full_t = blocks.split_full(blocks.compact(jnp.swapaxes(mask, 1, 2), width_t,
                                                     full=jnp.swapaxes(full, 1, 2)), nq)
  steps_t = jnp.maximum(jnp.max(sched_t[..., 0]), 1)

  # Scalar-prefetch operands: the schedule, its full-block flags and `steps_t` (a traced value the
  # index maps need to split the last grid axis into (query head of the group, list position)).
  def q_block(b_, j, t, s_ref, f_ref, n_ref):
    return s_ref[(b_ * nk + j) * width_t + 1 + t % n_ref[0]]

  def q_head(h, t, n_ref):
    return h * g + t // n_ref[0]

  rowt = pl.BlockSpec((None, 1, bq), lambda b_, h, j, t, *r: (b_, 0, q_block(b_, j, t, *r)))
  colt = pl.BlockSpec((None, bk, 1), lambda b_, h, j, t, *r: (b_, j, 0))
  qgrp = pl.BlockSpec((None, None, bq, dp), lambda b_, h, j, t, *r: (b_, q_head(h, t, r[2]), q_block(b_, j, t, *r), 0))
  kown = pl.BlockSpec((None, None, bk, dp), lambda b_, h, j, t, *r: (b_, h, j, 0))
  statt = pl.BlockSpec((None, None, 1, bq), lambda b_, h, j, t, *r: (b_, q_head(h, t, r[2]), 0, q_block(b_, j, t, *r)))

  def dkv_kernel(s_ref, f_ref, n_ref, *refs):
    _dkv_kernel(s_ref, f_ref, n_ref[0], *refs, scale=scale, nk=nk, width=width_t, block_k=bk, precision=precision)

  dk, dv = pl.pallas_call(
      dkv_kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, hkv, nk, g * steps_t),
          in_specs=[rowt, rowt, rowt, colt, colt, qgrp, kown, kown, qgrp, statt, statt],
          out_specs=[kown, kown],
          scratch_shapes=[pltpu.VMEM((bk, dp), jnp.float32), pltpu.VMEM((bk, dp), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(kk.shape, k.dtype), jax.ShapeDtypeStruct(vv.shape, v.dtype)],
      compiler_params=_params(pl_), interpret=_interpret_arg(interpret), name="bagel_interval_attention_dkv",
  )(sched_t.reshape(-1), full_t.reshape(-1), steps_t.reshape(1).astype(jnp.int32), col3(P.k_start),
    col3(P.k_end), col3(P.q_pos), row3(P.q_start), row3(P.q_end), qq, kk, vv, dd, lse.reshape(b, hq, 1, tp),
    delta.reshape(b, hq, 1, tp))

  t, s, d = pl_.t, pl_.s, pl_.d
  back = lambda x, n: x.transpose(0, 2, 1, 3)[:, :n, :, :d]
  return back(dq, t), back(dk, s), back(dv, s)


def _dkv_kernel(sched_ref, full_ref, steps, ks_ref, ke_ref, qp_ref, qs_ref, qe_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, nk, width, block_k, precision):
  b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  base = (b * nk + j) * width
  ii = t % steps

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(ii < sched_ref[base])
  def _step():
    q, do = q_ref[...], do_ref[...]
    st = _dot(k_ref[...], q, _NT, precision) * scale  # S^T [bk, bq]
    # transposed: query-side intervals are rows [1, bq], key-side ones columns [bk, 1]
    st = _apply_mask(st, full_ref[base + 1 + ii],
                     lambda: _mask(ks_ref, ke_ref, qp_ref, qs_ref, qe_ref, j * block_k, st.shape, 0))
    pt = jnp.exp(st - lse_ref[...])  # P^T [bk, bq]
    dv_sc[...] += _dot(pt.astype(do.dtype), do, _NN, precision)
    dpt = _dot(v_ref[...], do, _NT, precision)  # dP^T [bk, bq]
    dst = pt * (dpt - delta_ref[...])
    dk_sc[...] += _dot(dst.astype(q.dtype), q, _NN, precision)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _attention(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale, bs, interpret):
  return _attention_fwd(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale, bs, interpret)[0]


def _attention_fwd(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale, bs, interpret):
  pl_ = _plan(q, k, bs, interpret)
  ints = (k_start, k_end, q_start, q_end, q_positions)
  o, lse = _forward(pl_, q, k, v, ints, scale, interpret)
  out = o.transpose(0, 2, 1, 3)[:, :pl_.t, :, :pl_.d]
  return out, (q, k, v, ints, o, lse)


def _attention_bwd(scale, bs, interpret, res, do):
  q, k, v, ints, o, lse = res
  dq, dk, dv = _backward(_plan(q, k, bs, interpret), q, k, v, ints, o, lse, do, scale, interpret)
  return (dq, dk, dv) + (None,) * 5


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, scale: float,
              block_sizes: BlockSizes | None = None, interpret=None) -> jax.Array:
  """Interval-mask attention (see `bagel_jax.attention.api`), differentiable wrt q, k, v.

  interpret: None (the module switch `INTERPRET`), False, True (Pallas' generic interpreter: fast,
  used by the tests) or a `pltpu.InterpretParams` (the TPU interpreter).  Inside
  `pltpu.force_tpu_interpret_mode()` the kernels run in that mode.
  """
  interpret = INTERPRET if interpret is None else interpret
  if not interpret and _forced_interpret():
    interpret = "forced"
  if not interpret:
    reason = unavailable_reason()
    if reason:
      raise BackendUnavailable(reason + " (pass interpret=True, or set pallas_tpu.INTERPRET, to run on CPU)")
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32)[None], q.shape[:2])
  return _attention(q, k, v, k_start, k_end, q_start, q_end, q_positions, float(scale),
                    block_sizes or default_block_sizes(q.dtype), interpret)
