"""Named accelerator targets as abstract devices (no accelerator needed).

    devices, spec = resolve("v5p:2x2x1")      # TPU topology (libtpu from `jax[tpu]`)
    devices, spec = resolve("h100:8")          # 8 H100s on one host (the CUDA plugin)

TPU: `GEN:TOPOLOGY` with GEN in v4, v5e, v5p, v6e, tpu7x and TOPOLOGY as in Cloud TPU names
("v5e:2x2", "v5p:2x2x2", "tpu7x:2x2x1"); v4 is compiled as megacore.  GPU: `NAME:N` or
`NAME:HOSTSxN` with NAME in a100-40, a100-80, h100, h200, b200; the target description
(`stream_executor.GpuTargetConfigProto`: SM count, shared memory, clocks, memory size) is the
one the installed CUDA plugin ships for that GPU.  Both come from
`jax.experimental.topologies.get_topology_desc`; compiling for them runs the real compilers
(XLA TPU with Mosaic, XLA GPU with Triton and ptxas) on this host.

Peak rates: GPUs from their description (tensor-core bf16 FMA rate x 2, memory bandwidth);
TPUs from the published per-chip figures (below), divided among the devices of a chip.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import pathlib
import re

from bagel_jax.attention.target import TPU_GENERATIONS

GB = 1e9
GIB = 1024**3


class TargetError(ValueError):
  """A target name that cannot be resolved (unknown name, or the compile packages are missing)."""


@dataclasses.dataclass(frozen=True)
class TargetSpec:
  name: str  # as given, e.g. "v5p:2x2x1"
  platform: str  # "tpu" or "gpu"
  device_kind: str
  num_devices: int
  memory_bytes: int  # per device
  peak_flops: float  # bf16 dense, per device
  hbm_bandwidth: float  # bytes/s per device
  onchip_bytes: int  # TPU VMEM / GPU shared memory per block (opt-in)
  compute_capability: float | None = None


# Published per-chip figures: (HBM bytes, bf16 TFLOP/s, HBM GB/s, VMEM MiB).  Source: the Google Cloud
# TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e, /tpu7x: "Peak compute
# per chip (bf16)", "HBM2/HBM capacity", "HBM bandwidth").  GPU figures are not tabled here: they are
# read from the CUDA plugin's target description of each GPU (`gpu_peak_flops`, memory_bandwidth).
TPU_CHIPS = {
    "v4": (32 * GIB, 275.0, 1228.0, 32),
    "v5e": (16 * GIB, 197.0, 819.0, 128),
    "v5p": (95 * GIB, 459.0, 2765.0, 95),
    "v6e": (32 * GIB, 918.0, 1640.0, 128),
    "tpu7x": (192 * GIB, 2307.0, 7380.0, 64),
}

GPU_KINDS = {
    "a100-40": "NVIDIA A100-SXM4-40GB",
    "a100-80": "NVIDIA A100-SXM4-80GB",
    "h100": "NVIDIA H100 80GB HBM3",
    "h200": "NVIDIA H200 141GB HBM3e",
    "b200": "NVIDIA B200",
}

_PROTO_HEADER = b"# proto-message: stream_executor.GpuTargetConfigProto\n"


def _plugin_library() -> pathlib.Path:
  try:
    import jax_plugins.xla_cuda12 as plugin
  except ImportError as e:
    raise TargetError(f"GPU targets need the CUDA plugin: pip install -e '.[aot]' ({e})") from None
  found = sorted(pathlib.Path(plugin.__file__).parent.glob("xla_cuda_plugin*.so"))
  if not found:
    raise TargetError(f"no xla_cuda_plugin*.so next to {plugin.__file__}")
  return found[0]


@functools.lru_cache(maxsize=1)
def gpu_target_configs() -> dict[str, str]:
  """device_description_str -> GpuTargetConfigProto text, as shipped inside the CUDA plugin."""
  out = {}
  with open(_plugin_library(), "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    start = m.find(_PROTO_HEADER)
    while start != -1:
      end = m.find(b"\x00", start)
      text = m[start + len(_PROTO_HEADER):end].decode("utf-8", "replace")
      name = re.search(r'device_description_str: "([^"]+)"', text)
      if name and 'platform_name: "CUDA"' in text:
        out[name.group(1)] = text
      start = m.find(_PROTO_HEADER, end)
  return out


def _field(text: str, name: str) -> float:
  m = re.search(rf"\b{name}: ([\d.e+]+)", text)
  if not m:
    raise TargetError(f"GPU target description has no {name}")
  return float(m.group(1))


def gpu_peak_flops(text: str) -> float:
  """bf16 tensor-core FLOP/s: SMs x units x FMAs per clock x clock x 2 (from matrix_unit_description)."""
  units = text[text.index("matrix_unit_description"):]
  m = re.search(r"key: 16\s*value \{\s*clock_rate_ghz: ([\d.]+)\s*units_per_core: (\d+)\s*ops_per_clock: (\d+)", units)
  if not m:
    raise TargetError("GPU target description has no bf16 matrix-unit rate")
  clock, per_core, ops = float(m.group(1)), int(m.group(2)), int(m.group(3))
  return 2.0 * _field(text, "core_count") * per_core * ops * clock * 1e9


def _parse(name: str) -> tuple[str, str]:
  gen, sep, topo = name.partition(":")
  if not sep or not topo:
    raise TargetError(f"target {name!r}: expected GEN:TOPOLOGY (e.g. v5p:2x2x1, h100:8); known: {', '.join(known())}")
  return gen.lower(), topo


def known() -> list[str]:
  return [*TPU_CHIPS, *GPU_KINDS]


def _tpu(name: str, gen: str, topo: str):
  from jax.experimental import topologies

  kw = {"chip_config_name": "megacore"} if gen == "v4" else {}
  # libtpu allows one process per host (/tmp/libtpu_lockfile); compiling needs no TPU, so let
  # several compiling processes (parallel tests, two CLIs) load it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(topology_name=f"{gen}:{topo}", platform="tpu", **kw)
  except Exception as e:  # libtpu missing, or a topology it does not know
    hint = " (TPU targets need libtpu: pip install -e '.[aot]')" if "tpu" not in str(e).lower() else ""
    raise TargetError(f"target {name!r}: {str(e).splitlines()[0]}{hint}") from None
  devices = list(desc.devices)
  hbm, tflops, bw, vmem = TPU_CHIPS[gen]
  per_chip = max(1, sum(1 for d in devices if d.coords == devices[0].coords))
  spec = TargetSpec(name, "tpu", devices[0].device_kind, len(devices), hbm // per_chip, tflops * 1e12 / per_chip,
                    bw * 1e9 / per_chip, vmem * 1024**2)
  return devices, spec


def _gpu(name: str, gen: str, topo: str):
  from jax.experimental import topologies

  parts = topo.lower().split("x")
  if not all(p.isdigit() and int(p) > 0 for p in parts) or len(parts) > 2:
    raise TargetError(f"target {name!r}: expected {gen}:N or {gen}:HOSTSxN devices")
  hosts, per_host = (1, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
  configs = gpu_target_configs()
  kind = GPU_KINDS[gen]
  if kind not in configs:
    raise TargetError(f"target {name!r}: the installed CUDA plugin has no description of {kind!r}")
  text = configs[kind]
  desc = topologies.get_topology_desc(platform="cuda", target_config=text, topology=f"1x{hosts}x{per_host}")
  devices = list(desc.devices)
  cc = float(getattr(devices[0], "compute_capability", 0) or 0) or None
  spec = TargetSpec(name, "gpu", kind, len(devices), int(_field(text, "device_memory_size")), gpu_peak_flops(text),
                    _field(text, "memory_bandwidth"), int(_field(text, "shared_memory_per_block_optin")), cc)
  return devices, spec


TPU_KINDS = TPU_GENERATIONS


def peak_for_kind(kind: str) -> float | None:
  """bf16 peak FLOP/s of one device of this kind (a real device's `device_kind`), None if unknown."""
  if kind in TPU_KINDS:
    return TPU_CHIPS[TPU_KINDS[kind]][1] * 1e12  # one device per chip, except tpu7x (two)
  try:
    text = gpu_target_configs().get(kind)
  except TargetError:
    return None
  return gpu_peak_flops(text) if text else None


def resolve(name: str):
  """(abstract devices, TargetSpec) of a named target."""
  gen, topo = _parse(name)
  if gen in TPU_CHIPS:
    return _tpu(name, gen, topo)
  if gen in GPU_KINDS:
    return _gpu(name, gen, topo)
  raise TargetError(f"unknown target {name!r}; known: {', '.join(known())} (e.g. v5e:2x2, h100:8)")


__all__ = ["TargetSpec", "TargetError", "TPU_CHIPS", "GPU_KINDS", "TPU_KINDS", "peak_for_kind", "resolve", "known", "gpu_target_configs",
           "gpu_peak_flops"]
