"""What a compiled program holds: per-device memory, kernel custom calls, collectives, cost.

    report = analyze(compiled, spec, seconds)     # a CompileReport
"""

from __future__ import annotations

import dataclasses
import re

from bagel_jax.aot.targets import TargetSpec

# Custom-call targets of our kernels: Mosaic (TPU), Triton and Mosaic GPU (GPU).
KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*\S+\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_CALL = re.compile(r'custom_call_target="([^"]+)"')


@dataclasses.dataclass(frozen=True)
class CompileReport:
  seconds: float
  argument: int
  output: int
  alias: int
  temp: int
  code: int
  kernels: int  # kernel custom calls in the optimized HLO
  collectives: dict[str, int]
  flops: float | None  # per device, from the compiler's cost analysis (None where it has none)
  bytes_accessed: float | None
  memory_limit: int

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp + self.code

  @property
  def fits(self) -> bool:
    return self.total <= self.memory_limit


def kernel_calls(hlo_text: str) -> int:
  return sum(1 for t in _CALL.findall(hlo_text) if t in KERNEL_TARGETS)


def collective_counts(hlo_text: str) -> dict[str, int]:
  counts = {c: 0 for c in COLLECTIVES}
  for op in _OP.findall(hlo_text):
    counts[op] += 1
  return counts


def _cost(compiled) -> tuple[float | None, float | None]:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # some backends have none
    return None, None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca:
    return None, None
  return float(ca.get("flops", 0.0)) or None, float(ca.get("bytes accessed", 0.0)) or None


def analyze(compiled, spec: TargetSpec, seconds: float) -> CompileReport:
  ma = compiled.memory_analysis()
  text = compiled.as_text()
  flops, nbytes = _cost(compiled)
  return CompileReport(seconds, ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
                       ma.temp_size_in_bytes, ma.generated_code_size_in_bytes, kernel_calls(text),
                       collective_counts(text), flops, nbytes, spec.memory_bytes)


def roofline_seconds(flops: float, nbytes: float, spec: TargetSpec) -> float:
  """A lower bound on one device's time: the larger of compute and memory time at peak rates."""
  return max(flops / spec.peak_flops, nbytes / spec.hbm_bandwidth)


__all__ = ["CompileReport", "KERNEL_TARGETS", "COLLECTIVES", "analyze", "kernel_calls", "collective_counts",
           "roofline_seconds"]
