"""The device a computation is being built for: the active mesh's, else JAX's default device.

Backends ask `current()` whether they can run, and `impl="auto"` picks by it, so a program traced
under `jax.set_mesh(mesh)` (or `sharding.use_rules(mesh, ...)`) for abstract TPU / GPU devices
(`bagel_jax.aot`) sees those devices even on a CPU-only host.
"""

from __future__ import annotations

import dataclasses
import re

import jax

# Compute capability by device kind, for meshes that carry only the kind (abstract meshes).
_NVIDIA_CC = ((r"A100|A800|A30|A10\b|A40|A6000|RTX 30", 8.0), (r"L4\b|L40|RTX 40|Ada", 8.9),
              (r"H100|H200|H800|H20\b|GH200", 9.0), (r"B200|B300|GB200|GB300", 10.0),
              (r"RTX PRO 6000 Blackwell|RTX 50", 12.0), (r"V100", 7.0), (r"P100", 6.0), (r"T4\b", 7.5))


@dataclasses.dataclass(frozen=True)
class Device:
  platform: str  # "cpu", "gpu", "tpu"
  kind: str  # e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3"
  compute_capability: float | None = None  # NVIDIA GPUs only


# TPU generation by device kind (what jax.Device.device_kind reports, real or abstract).
TPU_GENERATIONS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                   "TPU v6 lite": "v6e", "TPU v6e": "v6e", "TPU7x": "tpu7x"}


def tpu_generation(kind: str) -> str | None:
  """"v4", "v5e", "v5p", "v6e" or "tpu7x" for a TPU device kind, None if unknown."""
  return TPU_GENERATIONS.get(kind)


def nvidia_compute_capability(kind: str) -> float | None:
  for pattern, cc in _NVIDIA_CC:
    if re.search(pattern, kind):
      return cc
  return None


def _platform(p: str) -> str:
  return "gpu" if p in ("cuda", "rocm", "gpu") else p


def of(device) -> Device:
  """A Device from a jax.Device or an AbstractDevice."""
  kind = str(getattr(device, "device_kind", "") or "")
  cc = getattr(device, "compute_capability", None)
  try:
    cc = float(cc) if cc is not None else None
  except (TypeError, ValueError):
    cc = None
  platform = _platform(str(device.platform))
  if cc is None and platform == "gpu":
    cc = nvidia_compute_capability(kind)
  return Device(platform, kind, cc)


def mesh_device(mesh) -> Device | None:
  """The device kind of a Mesh or AbstractMesh (None for an empty one)."""
  if mesh is None or getattr(mesh, "empty", False):
    return None
  if isinstance(mesh, jax.sharding.Mesh):
    return of(mesh.devices.flat[0])
  abstract = getattr(mesh, "abstract_device", None)
  return of(abstract) if abstract is not None else None


def current() -> Device:
  """The device of the active mesh (`sharding.use_rules`, then `jax.set_mesh`), else jax.devices()[0]."""
  from bagel_jax import sharding

  for mesh in (sharding.active_mesh(), jax.sharding.get_abstract_mesh()):
    found = mesh_device(mesh)
    if found is not None:
      return found
  return of(jax.devices()[0])


__all__ = ["Device", "TPU_GENERATIONS", "current", "mesh_device", "nvidia_compute_capability", "of", "tpu_generation"]
