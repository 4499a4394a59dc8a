"""One attention API over BAGEL's interval mask, several backends.

    attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, impl="auto", scale=None)

q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq % Hkv == 0 (GQA by head count, K/V are
never repeated); k_start, k_end: [B, T] int32; q_start, q_end: [B, S] int32;
q_positions: [B, T] int32 absolute query positions (default arange(T)).
Rows with nothing visible return zeros.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax

from bagel_jax.attention import reference

Backend = Callable[..., jax.Array]

IMPLS = ("auto", "reference", "xla_chunked", "pallas_gpu", "pallas_tpu", "cudnn")

_log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
  """A backend that was asked for by name cannot run here."""


def _load(impl: str) -> Backend:
  if impl == "reference":
    return reference.reference_attention
  if impl == "xla_chunked":
    return reference.xla_chunked_attention
  if impl == "pallas_gpu":
    try:
      from bagel_jax.attention import pallas_gpu
    except ImportError as e:
      raise BackendUnavailable(f"attention impl 'pallas_gpu' is not available: {e}") from None
    return pallas_gpu.attention
  if impl == "pallas_tpu":
    try:
      from bagel_jax.attention import pallas_tpu
    except ImportError as e:
      raise BackendUnavailable(f"attention impl 'pallas_tpu' is not available: {e}") from None
    return pallas_tpu.attention
  if impl == "cudnn":
    try:
      from bagel_jax.attention import cudnn
    except ImportError as e:
      raise BackendUnavailable(f"attention impl 'cudnn' is not available: {e}") from None
    return cudnn.attention
  raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")


def choose_impl(platform: str, t: int, s: int) -> str:
  """The backend `impl='auto'` uses for this platform and shape."""
  if platform == "gpu":
    try:
      _load("pallas_gpu")
      return "pallas_gpu"
    except BackendUnavailable:
      pass
  if platform == "tpu":
    try:
      _load("pallas_tpu")
      return "pallas_tpu"
    except BackendUnavailable:
      pass
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
    impl = choose_impl(jax.default_backend(), t, s)
    _log.debug("attention impl=auto chose %s for T=%d S=%d on %s", impl, t, s, jax.default_backend())
  fn = _load(impl)
  return fn(q, k, v, k_start, k_end, q_start, q_end, q_positions, scale=scale)
