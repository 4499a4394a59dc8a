"""Block-sparse attention in plain XLA: only (query block, key block) pairs that can see each other.

For CPU training and prefill.  The packed row is cut into blocks of `block_q` queries and
`block_k` keys; `blocks.block_mask` (the test the Pallas kernels use) lists the pairs with at
least one possibly visible (q, k), so cross-sample pairs and fully masked ones (a later sample's
queries against an earlier sample's noisy latents, the future of a causal text span) are never
computed.  One `while` loop walks the list of visited (row, query block, key block) triples with
an online softmax (forward) and a flash-attention backward under `jax.custom_vjp`: the backward
recomputes each visited block's probabilities from the saved log-sum-exp, so nothing of size
T x S is stored, transposed or zero-filled, and per layer only the output and one float per
query row are kept for the backward.

Queries are laid out head-major with the G query heads of a KV head next to each other
([B, Hkv, T*G, D], row = t*G + g), so each visited block is one [block_q*G, D] x [D, block_k]
matmul per KV head and K/V are never repeated.  Softmax statistics are float32.  Rows with
nothing visible return zeros (and get zero gradients).  The loop's trip count is the number of
visited blocks (dynamic); shapes are static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bagel_jax.attention import blocks
from bagel_jax.attention.mask import default_q_positions

BLOCK = 64


def unavailable_reason() -> str | None:
  return None  # plain XLA: runs everywhere


def _heads_major(q: jax.Array, num_kv_heads: int, tp: int) -> jax.Array:
  """[B, T, Hq, D] -> [B, Hkv, Tp*G, D] with row t*G + g (zero rows past T)."""
  b, t, hq, d = q.shape
  q = blocks.pad_seq(q, tp).reshape(b, tp, num_kv_heads, hq // num_kv_heads, d)
  return q.transpose(0, 2, 1, 3, 4).reshape(b, num_kv_heads, tp * (hq // num_kv_heads), d)


def _from_heads_major(x: jax.Array, t: int, hq: int) -> jax.Array:
  """Inverse of `_heads_major`: [B, Hkv, Tp*G, D] -> [B, T, Hq, D]."""
  b, hkv, m, d = x.shape
  g = hq // hkv
  x = x.reshape(b, hkv, m // g, g, d).transpose(0, 2, 1, 3, 4)
  return x.reshape(b, m // g, hq, d)[:, :t]


def _kv_major(k: jax.Array, sp: int) -> jax.Array:
  """[B, S, Hkv, D] -> [B, Hkv, Sp, D]."""
  return blocks.pad_seq(k, sp).transpose(0, 2, 1, 3)


def _from_kv_major(x: jax.Array, s: int) -> jax.Array:
  return x.transpose(0, 2, 1, 3)[:, :s]


def _visits(p: blocks.Padded, bq: int, bk: int):
  """(count, row, query block, key block): the visited triples first, in (row, i, j) order."""
  m = blocks.block_mask(p, bq, bk)
  b, nq, nk = m.shape
  flat = m.reshape(-1)
  order = jnp.argsort(jnp.logical_not(flat), stable=True).astype(jnp.int32)
  return jnp.sum(flat, dtype=jnp.int32), order // (nq * nk), (order // nk) % nq, order % nk


class _Ctx:
  """Static sizes and the padded operands shared by the forward and backward loops."""

  def __init__(self, q, k, k_start, k_end, q_start, q_end, q_positions, bq: int, bk: int):
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    self.t, self.s, self.hq, self.hkv, self.g, self.d = t, s, hq, hkv, hq // hkv, d
    self.bq, self.bk = bq, bk
    self.tp, self.sp = blocks.cdiv(t, bq) * bq, blocks.cdiv(s, bk) * bk
    self.p = blocks.pad_intervals(k_start, k_end, q_start, q_end, q_positions, self.tp, self.sp)
    self.visits = _visits(self.p, bq, bk)

  def block_mask(self, b, i, j) -> jax.Array:
    """bool [bq*G, bk] for visited block (b, i, j), rows repeated for the G heads."""
    p, bq, bk = self.p, self.bq, self.bk
    row = lambda x: jax.lax.dynamic_slice(x, (b, i * bq), (1, bq))[0][:, None]
    col = lambda x: jax.lax.dynamic_slice(x, (b, j * bk), (1, bk))[0][None, :]
    kidx = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
    qp = row(p.q_pos)
    m = (row(p.k_start) <= kidx) & (kidx < row(p.k_end)) & (col(p.q_start) <= qp) & (qp < col(p.q_end))
    return jnp.repeat(m, self.g, axis=0)

  def rows(self, x: jax.Array, b, i) -> jax.Array:
    """Query-block slice of a [B, Hkv, Tp*G, ...] array -> [Hkv, bq*G, ...]."""
    n = self.bq * self.g
    start = (b, 0, i * n) + (0,) * (x.ndim - 3)
    return jax.lax.dynamic_slice(x, start, (1, x.shape[1], n) + x.shape[3:])[0]

  def cols(self, x: jax.Array, b, j) -> jax.Array:
    """Key-block slice of a [B, Hkv, Sp, D] array -> [Hkv, bk, D]."""
    return jax.lax.dynamic_slice(x, (b, 0, j * self.bk, 0), (1, x.shape[1], self.bk, x.shape[3]))[0]

  def put_rows(self, x: jax.Array, val: jax.Array, b, i) -> jax.Array:
    start = (b, 0, i * self.bq * self.g) + (0,) * (x.ndim - 3)
    return jax.lax.dynamic_update_slice(x, val[None].astype(x.dtype), start)

  def put_cols(self, x: jax.Array, val: jax.Array, b, j) -> jax.Array:
    return jax.lax.dynamic_update_slice(x, val[None].astype(x.dtype), (b, 0, j * self.bk, 0))


def _scores(qb, kb, scale):
  return jnp.einsum("kmd,ksd->kms", qb, kb, preferred_element_type=jnp.float32) * scale


def _forward(c: _Ctx, qh, kh, vh, scale):
  """Online softmax over the visited blocks: (out [B, Hkv, Tp*G, D] f32, lse [B, Hkv, Tp*G] f32)."""
  count, vb_, vi, vj = c.visits
  b, m = qh.shape[0], c.tp * c.g

  def body(n, carry):
    acc, mx, l = carry
    bb, i, j = vb_[n], vi[n], vj[n]
    mask = c.block_mask(bb, i, j)
    s = jnp.where(mask, _scores(c.rows(qh, bb, i), c.cols(kh, bb, j), scale), -jnp.inf)
    m_old, l_old, a_old = c.rows(mx, bb, i), c.rows(l, bb, i), c.rows(acc, bb, i)
    m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    pr = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
    corr = jnp.exp(jnp.where(jnp.isfinite(m_old), m_old, m_safe) - m_safe)
    pv = jnp.einsum("kms,ksd->kmd", pr.astype(vh.dtype), c.cols(vh, bb, j), preferred_element_type=jnp.float32)
    acc = c.put_rows(acc, a_old * corr[..., None] + pv, bb, i)
    return acc, c.put_rows(mx, m_new, bb, i), c.put_rows(l, l_old * corr + jnp.sum(pr, axis=-1), bb, i)

  init = (jnp.zeros((b, c.hkv, m, c.d), jnp.float32), jnp.full((b, c.hkv, m), -jnp.inf, jnp.float32),
          jnp.zeros((b, c.hkv, m), jnp.float32))
  acc, mx, l = jax.lax.fori_loop(0, count, body, init)
  seen = l > 0
  out = acc / jnp.where(seen, l, 1.0)[..., None]
  lse = jnp.where(seen, mx + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
  return out, lse


def _backward(c: _Ctx, qh, kh, vh, doh, lse, delta, scale):
  """Flash-attention backward over the visited blocks: (dq, dk, dv) head-major, float32."""
  count, vb_, vi, vj = c.visits

  def body(n, carry):
    dq, dk, dv = carry
    bb, i, j = vb_[n], vi[n], vj[n]
    mask = c.block_mask(bb, i, j)
    qb, kb, vb, dob = c.rows(qh, bb, i), c.cols(kh, bb, j), c.cols(vh, bb, j), c.rows(doh, bb, i)
    s = _scores(qb, kb, scale)
    pr = jnp.where(mask, jnp.exp(s - c.rows(lse, bb, i)[..., None]), 0.0)
    dv_b = jnp.einsum("kms,kmd->ksd", pr.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
    dp = jnp.einsum("kmd,ksd->kms", dob, vb, preferred_element_type=jnp.float32)
    ds = pr * (dp - c.rows(delta, bb, i)[..., None]) * scale
    dq_b = jnp.einsum("kms,ksd->kmd", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
    dk_b = jnp.einsum("kms,kmd->ksd", ds.astype(qb.dtype), qb, preferred_element_type=jnp.float32)
    dq = c.put_rows(dq, c.rows(dq, bb, i) + dq_b, bb, i)
    dk = c.put_cols(dk, c.cols(dk, bb, j) + dk_b, bb, j)
    dv = c.put_cols(dv, c.cols(dv, bb, j) + dv_b, bb, j)
    return dq, dk, dv

  init = (jnp.zeros(qh.shape, jnp.float32), jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32))
  return jax.lax.fori_loop(0, count, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _attention(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale, bq, bk):
  return _fwd(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale, bq, bk)[0]


def _fwd(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale, bq, bk):
  c = _Ctx(q, k, k_start, k_end, q_start, q_end, q_positions, bq, bk)
  out, lse = _forward(c, _heads_major(q, c.hkv, c.tp), _kv_major(k, c.sp), _kv_major(v, c.sp), scale)
  o = _from_heads_major(out, c.t, c.hq).astype(q.dtype)
  return o, (q, k, v, k_start, k_end, q_start, q_end, q_positions, o, lse)


def _bwd(scale, bq, bk, res, do):
  q, k, v, k_start, k_end, q_start, q_end, q_positions, o, lse = res
  c = _Ctx(q, k, k_start, k_end, q_start, q_end, q_positions, bq, bk)
  doh = _heads_major(do, c.hkv, c.tp)
  delta = jnp.sum(doh.astype(jnp.float32) * _heads_major(o, c.hkv, c.tp).astype(jnp.float32), axis=-1)
  dq, dk, dv = _backward(c, _heads_major(q, c.hkv, c.tp), _kv_major(k, c.sp), _kv_major(v, c.sp), doh,
                         lse, delta, scale)
  return (_from_heads_major(dq, c.t, c.hq).astype(q.dtype), _from_kv_major(dk, c.s).astype(k.dtype),
          _from_kv_major(dv, c.s).astype(v.dtype), None, None, None, None, None)


_attention.defvjp(_fwd, _bwd)


def attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, scale: float,
              block_q: int = BLOCK, block_k: int = BLOCK) -> jax.Array:
  """Same contract as `reference.reference_attention`; differentiable in q, k, v."""
  b, t = q.shape[:2]
  qp = default_q_positions(b, t) if q_positions is None else jnp.asarray(q_positions, jnp.int32)
  i32 = lambda x: jnp.asarray(x, jnp.int32)
  return _attention(q, k, v, i32(k_start), i32(k_end), i32(q_start), i32(q_end), qp, float(scale),
                    int(block_q), int(block_k))
