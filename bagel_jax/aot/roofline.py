"""Roofline ESTIMATES of the 7B train step and of a 1024 px denoising step per target (see `plan7b`).

    time >= max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth)     per device
    MFU   = model FLOPs / (time x peak)

Peak rates per device come from `aot.targets` (TPU: published per-chip figures; GPU: the CUDA
plugin's target description).  Nothing here has been measured on a device.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from bagel_jax.aot import analysis, memplan, runner, targets

HEADER = ("| target | program | model TFLOP | compiler TFLOP | bytes GB (source) | compute ms | memory ms | "
          "predicted ms | MFU |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


@dataclasses.dataclass(frozen=True)
class Estimate:
  target: str
  program: str
  model_flops: float  # per device, the MFU basis
  executed_flops: float  # per device, used for the compute time
  compiler_flops: float | None  # per device, cost analysis (TPU)
  nbytes: float
  bytes_source: str
  spec: targets.TargetSpec

  @property
  def compute_s(self) -> float:
    return self.executed_flops / self.spec.peak_flops

  @property
  def memory_s(self) -> float:
    return self.nbytes / self.spec.hbm_bandwidth

  @property
  def seconds(self) -> float:
    return max(self.compute_s, self.memory_s)

  @property
  def mfu(self) -> float:
    return self.model_flops / (self.seconds * self.spec.peak_flops)


def line(e: Estimate) -> str:
  ca = f"{e.compiler_flops / 1e12:.1f}" if e.compiler_flops else "-"
  return (f"| {e.target} | {e.program} | {e.model_flops / 1e12:.1f} | {ca} | {e.nbytes / 1e9:.1f} ({e.bytes_source}) | "
          f"{e.compute_s * 1e3:.0f} | {e.memory_s * 1e3:.0f} | {e.seconds * 1e3:.0f} | {e.mfu:.0%} |")


def _scaled_cost(r2: analysis.CompileReport, r4: analysis.CompileReport, layers: int,
                 zero: Callable[[], analysis.CompileReport]) -> tuple[float, float] | None:
  """Full-depth (FLOPs, bytes) from the 2- and 4-layer compiles' cost analyses.  Where the compiler counts
  a scan body once (the two agree), the layer cost is the 2-layer minus a 0-layer compile (`zero()`)."""
  if r2.flops is None or r4.flops is None:
    return None
  b2, b4 = r2.bytes_accessed or 0.0, r4.bytes_accessed or 0.0
  if r4.flops > 1.01 * r2.flops:  # counted per layer
    return r2.flops + (layers - 2) * (r4.flops - r2.flops) / 2, b2 + (layers - 2) * (b4 - b2) / 2
  r0 = zero()
  b0 = r0.bytes_accessed or 0.0
  return r0.flops + layers * (r2.flops - r0.flops), b0 + layers * (b2 - b0)


def _estimate(job: runner.Job, name: str, program: str, full: analysis.CompileReport,
              pair: tuple[analysis.CompileReport, analysis.CompileReport], model_flops: float,
              recompute: float) -> Estimate:
  from bagel_jax import sharding as shd

  devices, spec = targets.resolve(name)
  mesh = shd.make_mesh("fsdp=-1", devices=devices)
  zero = lambda: runner._report(job, program, 0, mesh, runner._rules(job), spec)
  cost = _scaled_cost(*pair, job.cfg.llm.num_hidden_layers, zero)  # TPU; None where there is no cost analysis
  executed = model_flops * recompute
  if cost is not None:
    return Estimate(name, program, model_flops, max(executed, cost[0]), cost[0], cost[1], "cost analysis", spec)
  return Estimate(name, program, model_flops, executed, None, float(full.total), "memory footprint", spec)


def train_model_flops(job: runner.Job, devices: int) -> float:
  """Model FLOPs per device of one train step (`train.plan.model_flops` over the job's packed row)."""
  from bagel_jax.train import plan

  parts = plan.train_parts(job.cfg, job.config, attention="reference", remat=job.remat, mix=job.mix, rows=devices,
                           param_dtype=job.param_dtype, dtype=job.dtype)
  return plan.model_flops(job.cfg, parts[5], devices)["model_flops"] / devices


def denoise_model_flops(cfg, shapes) -> float:
  """Forward FLOPs of one denoising step: every CFG context runs the LLM over the image's latent tokens
  (+ 2 markers), which see the cached context and the whole image (+ the patch embed / head, small)."""
  llm = cfg.llm
  g = shapes.image // cfg.latent_downsample
  t = g * g + 2
  d, f, hd = llm.hidden_size, llm.intermediate_size, llm.head_dim
  hq, hk = llm.num_attention_heads, llm.num_key_value_heads
  per_tok_layer = 2 * (d * hq * hd + 2 * d * hk * hd + hq * hd * d + 3 * d * f)
  attn = 4 * t * (shapes.context + t) * hq * hd
  return float(shapes.contexts * shapes.images * llm.num_hidden_layers * (t * per_tok_layer + attn))


def train_estimate(job: runner.Job, name: str, full: analysis.CompileReport,
                   pair: tuple[analysis.CompileReport, analysis.CompileReport], out=print) -> Estimate:
  _, spec = targets.resolve(name)
  e = _estimate(job, name, "train", full, pair, train_model_flops(job, spec.num_devices),
                memplan.REMAT_COST.get(job.remat, 1.0))
  out(line(e))
  return e


def denoise_estimate(name: str, out=print) -> Estimate:
  from bagel_jax.aot import plan7b

  job = plan7b._job(plan7b.RECIPE, programs="denoise")
  full, pair, spec = plan7b.compile_total(job, name, "denoise")
  out(f"[{name}] denoise 1024 px: {full.total / 2**30:.2f} GiB per device, kernel calls {full.kernels}")
  e = _estimate(job, name, "denoise", full, pair, denoise_model_flops(job.cfg, job.shapes) / spec.num_devices, 1.0)
  out(line(e))
  return e


__all__ = ["Estimate", "HEADER", "line", "train_estimate", "denoise_estimate", "denoise_model_flops",
           "train_model_flops"]
