"""`flash_xla`: exact interval-mask attention in plain XLA with a flash-style custom VJP.

Runs anywhere XLA does. The memory planner compiles with it on CPU as the stand-in for the Pallas
kernels, whose memory profile it shares (only q, k, v, the output and the log-sum-exp are saved).
The function is one custom-VJP unit (chunking, forward, backward share their closures), so it is
kept whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bagel_jax.attention.mask import default_q_positions, dense_mask


def attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, scale: float,
                        chunk: int = 256):
  """Exact interval-mask attention in plain XLA with a flash-style custom VJP.

  The stand-in for the Pallas kernels when the plan compiles on CPU: like them it saves only
  q, k, v, the output and the log-sum-exp, and the backward pass recomputes probabilities one
  key chunk at a time, so no [T, S] tensor and no per-chunk accumulator stack is kept.
  (`xla_chunked` differentiates through its key-chunk scan and saves every chunk's fp32
  accumulator: ~T x Hq x D x 4 bytes per chunk.)

  Kept whole: the chunking, the forward and the custom-VJP backward share their closures.
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  c = min(chunk, s)
  n = -(-s // c)
  pad = n * c - s
  qp = default_q_positions(b, t) if q_positions is None else q_positions

  def chunks(x):
    if pad:
      x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape((b, n, c) + x.shape[2:]).swapaxes(0, 1)

  def scores(qg, kc, i, qsc, qec, ints):
    ks, ke, qpos = ints
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, kc, preferred_element_type=jnp.float32) * scale
    mask = dense_mask(ks, ke, qsc, qec, qpos, key_offset=i * c)[:, None, None]
    return logits, mask

  def fwd(q, k, v, ints, qs, qe):
    qg = q.reshape(b, t, hkv, g, d)
    xs = (jnp.arange(n, dtype=jnp.int32), chunks(k), chunks(v), chunks(qs), chunks(qe))

    def body(carry, x):
      m, l, acc = carry
      i, kc, vc, qsc, qec = x
      logits, mask = scores(qg, kc, i, qsc, qec, ints)
      logits = jnp.where(mask, logits, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.where(mask, jnp.exp(logits - m_safe[..., None]), 0.0)
      corr = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
      acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), vc,
                                               preferred_element_type=jnp.float32)
      return (m_new, l * corr + jnp.sum(p, axis=-1), acc), None

    init = (jnp.full((b, hkv, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, t), jnp.float32),
            jnp.zeros((b, hkv, g, t, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(body, init, xs)
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    lse = jnp.where(l == 0, jnp.inf, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(l == 0, 1.0, l)))
    o = jnp.einsum("bkgtd->btkgd", out).reshape(b, t, hq, d).astype(q.dtype)
    return o, lse

  # The interval arrays are loop-invariant across the decoder's layer scan and do not depend on
  # anything differentiated, so JAX's scan partial evaluation would hoist every chunk's mask out
  # of the layer loop as one [chunks, B, Hkv, G, T, chunk] boolean (T^2 x Hq bytes). Tying them
  # to q / do with an optimization barrier keeps the mask inside the chunk loop.
  def tie(ints, x):
    return jax.lax.optimization_barrier((ints, x))[0]

  @jax.custom_vjp
  def attn(q, k, v, ks, ke, qs, qe, qpos):
    ks, ke, qs, qe, qpos = tie((ks, ke, qs, qe, qpos), q)
    return fwd(q, k, v, (ks, ke, qpos), qs, qe)[0]

  def attn_fwd(q, k, v, ks, ke, qs, qe, qpos):
    ks, ke, qs, qe, qpos = tie((ks, ke, qs, qe, qpos), q)
    o, lse = fwd(q, k, v, (ks, ke, qpos), qs, qe)
    return o, (q, k, v, o, lse, ks, ke, qs, qe, qpos)

  def attn_bwd(res, do):
    q, k, v, o, lse, ks, ke, qs, qe, qpos = res
    ks, ke, qs, qe, qpos = tie((ks, ke, qs, qe, qpos), do)
    qg = q.reshape(b, t, hkv, g, d)
    dog = do.reshape(b, t, hkv, g, d)
    delta = jnp.einsum("btkgd,btkgd->bkgt", dog.astype(jnp.float32), o.reshape(b, t, hkv, g, d).astype(jnp.float32))

    def body(dq, x):
      i, kc, vc, qsc, qec = x
      logits, mask = scores(qg, kc, i, qsc, qec, (ks, ke, qpos))
      p = jnp.where(mask, jnp.exp(logits - lse[..., None]), 0.0)  # lse = inf on empty rows -> 0
      dv = jnp.einsum("bkgts,btkgd->bskd", p.astype(do.dtype), dog, preferred_element_type=jnp.float32)
      dp = jnp.einsum("btkgd,bskd->bkgts", dog, vc, preferred_element_type=jnp.float32)
      ds = p * (dp - delta[..., None]) * scale
      dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds.astype(kc.dtype), kc, preferred_element_type=jnp.float32)
      dk = jnp.einsum("bkgts,btkgd->bskd", ds.astype(q.dtype), qg, preferred_element_type=jnp.float32)
      return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    xs = (jnp.arange(n, dtype=jnp.int32), chunks(k), chunks(v), chunks(qs), chunks(qe))
    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros((b, t, hkv, g, d), jnp.float32), xs)
    unchunk = lambda x: x.swapaxes(0, 1).reshape((b, n * c) + x.shape[3:])[:, :s]
    return (dq.reshape(b, t, hq, d).astype(q.dtype), unchunk(dk), unchunk(dv), None, None, None, None, None)

  attn.defvjp(attn_fwd, attn_bwd)
  return attn(q, k, v, k_start, k_end, q_start, q_end, qp)
