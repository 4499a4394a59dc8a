"""A short query chunk against a long KV cache (text decoding, flow steps, prefill-extend).

Same interval contract as `bagel_jax.attention.api` (q_positions are absolute).  The cache is
preallocated to a capacity S with per-sample valid lengths (`inference/kv_cache.py`: slots at
or past a row's length have an empty query interval), so most key chunks of a short-context
row are invisible; both paths here walk only the key chunks that the schedule of `blocks.py`
marks visible for the whole query chunk, and never copy or pad the cache.

- `attention(..., impl="xla")` (the default, `impl="auto"`, except on GPU targets): per sample, a loop over the visible key chunks with
  an online softmax; GQA query heads share one K/V chunk read.  Forward only (a while loop with
  a data-dependent trip count has no reverse-mode derivative); training uses the other backends.
- `attention(..., impl="pallas_gpu")` (`impl="auto"` on an NVIDIA GPU target): the Triton kernel of `pallas_gpu`, with the query heads
  of a KV head packed as rows of one query block (so T = 1 still fills a 16-row tile and K/V are
  read once per KV head) and split-K over the visit list (flash-decoding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bagel_jax.attention import blocks
from bagel_jax.attention.mask import default_q_positions


def attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, scale: float,
              impl: str = "auto", chunk_size: int = 256, num_splits: int = 8, interpret: bool | None = None):
  if q_positions is None:
    q_positions = default_q_positions(q.shape[0], q.shape[1])
  if impl == "auto":  # the Triton split-K kernel where the target is a GPU it supports, else XLA
    from bagel_jax.attention import pallas_gpu
    impl = "pallas_gpu" if pallas_gpu.unavailable_reason() is None else "xla"
  if impl == "xla":
    return _xla(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale=scale, chunk=chunk_size)
  if impl == "pallas_gpu":
    return _pallas_gpu(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale=scale,
                       num_splits=num_splits, interpret=interpret)
  raise ValueError(f"decode attention: unknown impl {impl!r} (xla, pallas_gpu)")


def unavailable_reason() -> str | None:
  return None  # the XLA path runs everywhere


def pack_gqa(q, k_start, k_end, q_positions, num_kv_heads: int):
  """q [B, T, Hq, D] -> [B, T*G, Hkv, D] whose rows are (t, g) pairs, and row intervals to match."""
  b, t, hq, d = q.shape
  g = hq // num_kv_heads
  qr = q.reshape(b, t, num_kv_heads, g, d).transpose(0, 1, 3, 2, 4).reshape(b, t * g, num_kv_heads, d)
  rep = lambda x: jnp.repeat(x, g, axis=1)
  return qr, rep(k_start), rep(k_end), rep(q_positions)


def unpack_gqa(o, t: int, num_q_heads: int):
  b, _, hkv, d = o.shape
  g = num_q_heads // hkv
  return o.reshape(b, t, g, hkv, d).transpose(0, 1, 3, 2, 4).reshape(b, t, num_q_heads, d)


def _pallas_gpu(q, k, v, k_start, k_end, q_start, q_end, q_positions, *, scale, num_splits, interpret):
  from bagel_jax.attention import pallas_gpu

  t, hq, hkv = q.shape[1], q.shape[2], k.shape[2]
  qr, ks, ke, qp = pack_gqa(q, k_start, k_end, q_positions, hkv)
  bs = pallas_gpu.BlockSizes(block_q=64, block_k=64)
  o = pallas_gpu.forward_split_k(qr, k, v, ks, ke, q_start, q_end, qp, scale=scale, num_splits=num_splits,
                                 block_sizes=bs, interpret=interpret)
  return unpack_gqa(o, t, hq)


def _xla(q, k, v, k_start, k_end, q_start, q_end, q_positions, *, scale, chunk):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  c = min(chunk, s)
  nk = blocks.cdiv(s, c)
  # One query block holding the whole chunk: the key chunks any of its rows can see.
  P = blocks.pad_intervals(k_start, k_end, q_start, q_end, q_positions, t, nk * c)
  sched = blocks.compact(blocks.block_mask(P, t, c))[:, 0]  # [B, 1 + nk]
  qg = q.reshape(b, t, hkv, g, d)

  def one(qb, kb, vb, ksb, keb, qpb, qsb, qeb, schedb):
    def body(jj, carry):
      m, l, acc = carry
      j = schedb[1 + jj]
      start = jnp.minimum(j * c, s - c)  # the last chunk is shifted back, never padded
      kidx = start + jnp.arange(c, dtype=jnp.int32)
      kc = lax.dynamic_slice_in_dim(kb, start, c, axis=0)
      vc = lax.dynamic_slice_in_dim(vb, start, c, axis=0)
      qsc = lax.dynamic_slice_in_dim(qsb, start, c)
      qec = lax.dynamic_slice_in_dim(qeb, start, c)
      mask = ((kidx[None] >= j * c) & (ksb[:, None] <= kidx[None]) & (kidx[None] < keb[:, None]) &
              (qsc[None] <= qpb[:, None]) & (qpb[:, None] < qec[None]))  # [T, c]
      logits = jnp.einsum("tkgd,skd->kgts", qb, kc, preferred_element_type=jnp.float32) * scale
      logits = jnp.where(mask[None, None], logits, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(logits - m_safe[..., None])
      corr = jnp.exp(m - m_safe)
      l = l * corr + jnp.sum(p, axis=-1)
      acc = acc * corr[..., None] + jnp.einsum("kgts,skd->kgtd", p.astype(vb.dtype), vc,
                                               preferred_element_type=jnp.float32)
      return m_new, l, acc

    init = (jnp.full((hkv, g, t), -jnp.inf, jnp.float32), jnp.zeros((hkv, g, t), jnp.float32),
            jnp.zeros((hkv, g, t, d), jnp.float32))
    _, l, acc = lax.fori_loop(0, schedb[0], body, init)
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    return jnp.einsum("kgtd->tkgd", out).reshape(t, hq, d)

  out = jax.vmap(one)(qg, k, v, P.k_start, P.k_end, P.q_pos, jnp.asarray(q_start, jnp.int32),
                      jnp.asarray(q_end, jnp.int32), sched)
  return out.astype(q.dtype)
