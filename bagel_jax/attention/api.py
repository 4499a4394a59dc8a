"""One attention API over BAGEL's interval mask, several backends.

    attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, impl="auto", scale=None)

q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq % Hkv == 0 (GQA by head count, K/V are
never repeated); k_start, k_end: [B, T] int32; q_start, q_end: [B, S] int32;
q_positions: [B, T] int32 absolute query positions (default arange(T)).
Rows with nothing visible return zeros.

Backends (`registry.BACKENDS`): `reference` (dense XLA, the oracle), `xla_chunked` (online
softmax over key chunks), `flash_xla` (XLA with a flash-style custom VJP), `pallas_gpu` (Triton),
`pallas_tpu` (Mosaic), `cudnn` (dense mask, a baseline), `decode` (XLA, a short query chunk
against a long KV cache; forward only).  `impl="auto"` picks the fastest one
that can run here (`choose_impl`) and logs the choice at debug level; a backend named explicitly
that cannot run raises `BackendUnavailable` with the reason (no silent fallback).  The Pallas
backends run on CPU in interpret mode: set `pallas_gpu.INTERPRET` / `pallas_tpu.INTERPRET`, or
call their `attention(..., interpret=True)` directly.
"""

from __future__ import annotations

import logging

import jax

from bagel_jax.attention import sharded, target
from bagel_jax.attention.registry import IMPLS, KERNELS, BackendUnavailable, load, why_not

_log = logging.getLogger(__name__)


# Below this many query rows the block loop has little to skip and dense XLA is kept (decoding, the
# shapes demo's 128-token rows).
BLOCKSPARSE_MIN_T = 256


def choose_impl(platform: str | target.Device, t: int, s: int) -> str:
  """The backend `impl='auto'` uses for this platform (or target device) and shape.

  GPU: the Pallas Triton kernel (compute capability >= 8.0); TPU: the Pallas Mosaic kernel;
  CPU with at least `BLOCKSPARSE_MIN_T` queries (training rows, prefill): the block-sparse XLA
  backend (computes only blocks that can see each other); otherwise (short queries such as text
  decoding, or a GPU the kernel does not support) dense XLA for small problems and the chunked XLA
  backend beyond 2^20 logits per head.
  """
  device = platform if isinstance(platform, target.Device) else None
  platform = device.platform if device is not None else platform
  for plat, impl in (("gpu", "pallas_gpu"), ("tpu", "pallas_tpu")):
    if platform == plat:
      reason = why_not(impl, device)
      if reason is None:
        return impl
      _log.debug("attention impl=auto: %s cannot run: %s", impl, reason)
  if platform == "cpu" and t >= BLOCKSPARSE_MIN_T:
    return "xla_blocksparse"
  return "reference" if t * s <= 1 << 20 else "xla_chunked"


def attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, impl: str = "auto",
              scale: float | None = None) -> jax.Array:
  b, t, hq, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"attention: k {k.shape} / v {v.shape} do not match q {q.shape}")
  if hq % k.shape[2]:
    raise ValueError(f"attention: {hq} query heads are not a multiple of {k.shape[2]} KV heads")
  s = k.shape[1]
  for name, arr, n in (("k_start", k_start, t), ("k_end", k_end, t), ("q_start", q_start, s), ("q_end", q_end, s)):
    if arr.shape != (b, n):
      raise ValueError(f"attention: {name} has shape {arr.shape}, expected {(b, n)}")
  if scale is None:
    scale = d**-0.5
  if impl == "auto":
    device = target.current()
    impl = choose_impl(device, t, s)
    _log.debug("attention impl=auto chose %s for T=%d S=%d on %s (%s)", impl, t, s, device.platform, device.kind)
  fn = load(impl)
  if impl in KERNELS:  # XLA cannot partition these: one call per shard of the active mesh
    return sharded.sharded_call(lambda *a: fn(*a, scale=scale), q, k, v, k_start, k_end, q_start, q_end, q_positions)
  return fn(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale=scale)


__all__ = ["IMPLS", "BackendUnavailable", "attention", "choose_impl"]
