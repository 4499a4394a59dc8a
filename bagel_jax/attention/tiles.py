"""Kernel tile sizes per target: data the Pallas backends read for their default tiles.

    tiles.tpu(device) -> TpuTiles     # by TPU generation ("TPU v5 lite" -> v5e)
    tiles.gpu(device) -> GpuTiles     # by NVIDIA compute capability (8.0, 9.0, 10.0)

`device` is a `target.Device` (the active mesh's, see `bagel_jax.attention.target`), so a program
compiled for an abstract v5e mesh on a CPU host gets the v5e tiles.  The entries were chosen by
`python -m bagel_jax.bench tiles --target ...` (docs/benchmarks.md, "Kernel tiles per target"): every
candidate is ranked by a roofline model of the kernel on BAGEL packed rows (visited blocks x
per-block compute or K/V traffic, plus the TPU's per-grid-step overhead), and the best one that the
target's compiler accepts (VMEM / shared memory) is kept.  Unknown generations get `TPU_DEFAULT` /
`GPU_DEFAULT`.  bf16/fp16 inputs; the GPU backend halves the tiles for fp32.
"""

from __future__ import annotations

import dataclasses

from bagel_jax.attention import target


@dataclasses.dataclass(frozen=True)
class TpuTiles:
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int


@dataclasses.dataclass(frozen=True)
class GpuTiles:
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_warps: int | None = None  # None: 4 for head dim <= 64, else 8
  num_stages: int = 2


TPU_DEFAULT = TpuTiles(512, 512, 256, 256)
GPU_DEFAULT = GpuTiles(128, 64, 64, 64)

# generation -> tiles (forward block_q, block_k; backward block_q, block_k), from
# `python -m bagel_jax.bench tiles --target v4:1x1x1 --target v5e:1x1 --target v5p:1x1x1 --target v6e:1x1
# --target tpu7x:1x1x1` (2026-12-02; the table and the model in docs/benchmarks.md).
TPU = {
    "v4": TpuTiles(1024, 1024, 1024, 512),
    "v5e": TpuTiles(1024, 512, 512, 512),
    "v5p": TpuTiles(1024, 1024, 1024, 512),
    "v6e": TpuTiles(1024, 1024, 1024, 512),
    "tpu7x": TpuTiles(1024, 1024, 1024, 512),
}

# compute capability -> tiles, from `python -m bagel_jax.bench tiles --target a100-80:1 --target h100:1
# --target b200:1` (sm_80: A100; sm_90: H100 / H200; sm_100: B200, whose compiler refuses sm_90's 128 x 128
# and 128 x 64 backward tiles: shared memory).
GPU = {
    8.0: GpuTiles(128, 64, 128, 64),
    9.0: GpuTiles(128, 64, 128, 128),
    10.0: GpuTiles(128, 64, 64, 64),
}


def tpu(device: target.Device | None = None) -> TpuTiles:
  """The tiles for this TPU (default: the active mesh's device)."""
  device = target.current() if device is None else device
  return TPU.get(target.tpu_generation(device.kind) or "", TPU_DEFAULT)


def gpu(device: target.Device | None = None) -> GpuTiles:
  """The tiles for this GPU (default: the active mesh's device): its compute capability's entry, else the
  nearest lower one (e.g. sm_89 uses sm_80's), else `GPU_DEFAULT`."""
  device = target.current() if device is None else device
  cc = device.compute_capability
  if cc is None:
    return GPU_DEFAULT
  lower = [c for c in GPU if c <= cc]
  return GPU[max(lower)] if lower else GPU_DEFAULT


__all__ = ["TpuTiles", "GpuTiles", "TPU", "GPU", "TPU_DEFAULT", "GPU_DEFAULT", "tpu", "gpu"]
