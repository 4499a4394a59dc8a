"""cuDNN fused attention with a dense mask built from the intervals (a benchmark baseline).

`jax.nn.dot_product_attention(implementation="cudnn")` has no interval or packed-sample mask on
A100 (its packed layout and score_mod are Hopper-only and private), so this backend materialises
the boolean mask [B, 1, T, S] from the four interval arrays: O(T x S) memory, which is why it is
a comparison point and not the default.  Notes (jax_stack.md section 2.3):
- bf16 / fp16 only; head dim a multiple of 8, at most 128 on Ampere (256 on Hopper);
- a full [B, 1, T, S] mask is passed (a broadcastable one failed, jax#28974);
- T and S are padded to a multiple of 64 (training with a bias needs even lengths);
- cuDNN turns the mask into a large negative bias, so a row that sees nothing would get a mean of
  V: such rows are zeroed afterwards, as the API requires.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bagel_jax.attention import blocks, target
from bagel_jax.attention.registry import BackendUnavailable
from bagel_jax.attention.mask import dense_mask

_PAD = 64


def unavailable_reason(dtype=jnp.bfloat16, head_dim: int = 128, device: target.Device | None = None) -> str | None:
  dev = target.current() if device is None else device
  if dev.platform != "gpu":
    return f"cudnn attention needs an NVIDIA GPU with cuDNN; the target is {dev.platform} ({dev.kind})"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"cudnn attention supports bf16/fp16 only, got {jnp.dtype(dtype).name}"
  if head_dim % 8:
    return f"cudnn attention needs a head dim that is a multiple of 8, got {head_dim}"
  cc = dev.compute_capability
  limit = 256 if cc is not None and cc >= 9.0 else 128
  if head_dim > limit:
    return f"cudnn attention supports head dims up to {limit} on compute capability {cc}, got {head_dim}"
  return None


def attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, scale: float) -> jax.Array:
  reason = unavailable_reason(q.dtype, q.shape[-1])
  if reason:
    raise BackendUnavailable(reason)
  return dense_mask_attention(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale=scale,
                              implementation="cudnn")


def dense_mask_attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, scale: float,
                         implementation: str | None = "cudnn") -> jax.Array:
  """The backend's computation: pad to multiples of 64, the dense mask from the intervals,
  `jax.nn.dot_product_attention(implementation=...)`, rows that see nothing zeroed. With
  implementation="xla" the same padding, mask and zeroing run anywhere (the CPU test)."""
  t, s = q.shape[1], k.shape[1]
  tp, sp = blocks.cdiv(t, _PAD) * _PAD, blocks.cdiv(s, _PAD) * _PAD
  P = blocks.pad_intervals(k_start, k_end, q_start, q_end, q_positions, tp, sp)
  mask = dense_mask(P.k_start, P.k_end, P.q_start, P.q_end, P.q_pos)  # [B, Tp, Sp]
  out = jax.nn.dot_product_attention(
      blocks.pad_seq(q, tp), blocks.pad_seq(k, sp), blocks.pad_seq(v, sp), mask=mask[:, None],
      scale=scale, implementation=implementation)
  seen = jnp.any(mask, axis=-1)[:, :, None, None]
  return jnp.where(seen, out, 0).astype(q.dtype)[:, :t]
