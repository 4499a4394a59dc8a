"""BAGEL's attention mask as four per-token interval arrays (see DESIGN.md, "Attention").

Query q (at absolute position `q_pos[q]`) may attend key k iff
    k_start[q] <= k < k_end[q]   and   q_start[k] <= q_pos[q] < q_end[k].
Positions are indices into the key sequence; for self-attention over one packed
sequence `q_pos = arange(T)`; a query chunk against a KV cache passes its
absolute positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def default_q_positions(batch: int, length: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))


def dense_mask(k_start: jax.Array, k_end: jax.Array, q_start: jax.Array, q_end: jax.Array,
               q_positions: jax.Array | None = None, key_offset: int | jax.Array = 0) -> jax.Array:
  """Boolean mask [B, T, S] from the interval arrays ([B, T] and [B, S]).

  `key_offset` is the absolute index of key column 0 (for chunked evaluation).
  """
  b, t = k_start.shape
  s = q_start.shape[1]
  qp = default_q_positions(b, t) if q_positions is None else q_positions
  kidx = key_offset + jnp.arange(s, dtype=jnp.int32)
  in_k = (k_start[:, :, None] <= kidx[None, None, :]) & (kidx[None, None, :] < k_end[:, :, None])
  in_q = (q_start[:, None, :] <= qp[:, :, None]) & (qp[:, :, None] < q_end[:, None, :])
  return in_k & in_q
