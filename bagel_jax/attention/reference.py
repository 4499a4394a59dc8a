"""XLA attention backends: `reference` (dense, the oracle) and `xla_chunked` (memory-bounded)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bagel_jax.attention.mask import dense_mask


def _group(q: jax.Array, num_kv_heads: int) -> jax.Array:
  b, t, hq, d = q.shape
  return q.reshape(b, t, num_kv_heads, hq // num_kv_heads, d)


def reference_attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, scale: float):
  """Dense attention: materialises [B, Hkv, G, T, S] scores. Softmax in float32."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qg = _group(q, hkv)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  mask = dense_mask(k_start, k_end, q_start, q_end, q_positions)[:, None, None]
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)  # rows with nothing visible give zeros
  out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, hq, d).astype(q.dtype)


def xla_chunked_attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, scale: float,
                          chunk_size: int = 512):
  """Online-softmax attention over key chunks: O(T * chunk) memory, differentiable."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  chunk = min(chunk_size, s)
  n_chunks = -(-s // chunk)
  pad = n_chunks * chunk - s
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    # padded keys are invisible: empty query interval
    q_start = jnp.pad(q_start, ((0, 0), (0, pad)), constant_values=0)
    q_end = jnp.pad(q_end, ((0, 0), (0, pad)), constant_values=0)
  qg = _group(q, hkv)
  ks = k.reshape(b, n_chunks, chunk, hkv, d).swapaxes(0, 1)
  vs = v.reshape(b, n_chunks, chunk, hkv, d).swapaxes(0, 1)
  qss = q_start.reshape(b, n_chunks, chunk).swapaxes(0, 1)
  qes = q_end.reshape(b, n_chunks, chunk).swapaxes(0, 1)
  g = hq // hkv

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(carry, xs):
    m_prev, l_prev, acc = carry
    i, kc, vc, qsc, qec = xs
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, kc, preferred_element_type=jnp.float32) * scale
    mask = dense_mask(k_start, k_end, qsc, qec, q_positions, key_offset=i * chunk)[:, None, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(mask, jnp.exp(logits - m_safe[..., None]), 0.0)
    corr = jnp.exp(jnp.where(jnp.isfinite(m_prev), m_prev, m_safe) - m_safe)
    l_new = l_prev * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), vc,
                                             preferred_element_type=jnp.float32)
    return (m_new, l_new, acc), None

  init = (jnp.full((b, hkv, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, t), jnp.float32),
          jnp.zeros((b, hkv, g, t, d), jnp.float32))
  (_, l, acc), _ = jax.lax.scan(body, init, (jnp.arange(n_chunks, dtype=jnp.int32), ks, vs, qss, qes))
  out = acc / jnp.where(l == 0, 1.0, l)[..., None]
  return jnp.einsum("bkgtd->btkgd", out).reshape(b, t, hq, d).astype(q.dtype)
