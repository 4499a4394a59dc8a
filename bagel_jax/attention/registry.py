"""The attention backends by name, and the error a named backend raises when it cannot run here.

Backends import `BackendUnavailable` from here; this module imports no backend (each is loaded by
module name on first use), so nothing imports back. A new backend is one module with
`attention(q, k, v, k_start, k_end, q_start, q_end, q_positions=None, *, scale)` and, if it
cannot run everywhere, `unavailable_reason() -> str | None`; add it to `BACKENDS`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import jax

from bagel_jax.attention import target

Backend = Callable[..., jax.Array]

# name -> (module, function)
BACKENDS: dict[str, tuple[str, str]] = {
    "reference": ("bagel_jax.attention.reference", "reference_attention"),
    "xla_chunked": ("bagel_jax.attention.reference", "xla_chunked_attention"),
    "xla_blocksparse": ("bagel_jax.attention.xla_blocksparse", "attention"),
    "flash_xla": ("bagel_jax.attention.flash_xla", "attention"),
    "pallas_gpu": ("bagel_jax.attention.pallas_gpu", "attention"),
    "pallas_tpu": ("bagel_jax.attention.pallas_tpu", "attention"),
    "cudnn": ("bagel_jax.attention.cudnn", "attention"),
    "decode": ("bagel_jax.attention.decode", "attention"),
}

IMPLS = ("auto", *BACKENDS)


class BackendUnavailable(RuntimeError):
  """A backend that was asked for by name cannot run here."""


def _module(impl: str):
  if impl not in BACKENDS:
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
  try:
    return importlib.import_module(BACKENDS[impl][0])
  except ImportError as e:
    raise BackendUnavailable(f"attention impl {impl!r} is not available: {e}") from None


def load(impl: str) -> Backend:
  """The backend function named `impl` (raises BackendUnavailable if its module cannot be imported)."""
  return getattr(_module(impl), BACKENDS[impl][1])


# Backends that XLA cannot partition (Pallas kernels, the decode loop): called per shard through
# `sharded.sharded_call` under a mesh.
KERNELS = frozenset({"pallas_gpu", "pallas_tpu", "decode"})


def why_not(impl: str, device: target.Device | None = None) -> str | None:
  """None if `impl` can run on `device` (default: the active mesh's, see `target.current`), else the reason."""
  return _why_not(impl, target.current() if device is None else device)


@functools.lru_cache(maxsize=None)
def _why_not(impl: str, device: target.Device) -> str | None:
  try:
    module = _module(impl)
  except BackendUnavailable as e:
    return str(e)
  reason = getattr(module, "unavailable_reason", None)
  return reason(device=device) if reason is not None else None


__all__ = ["BACKENDS", "IMPLS", "KERNELS", "Backend", "BackendUnavailable", "load", "why_not"]
