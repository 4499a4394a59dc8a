"""One `bagel_jax.aot` job: the model and shapes to compile, run for each named target.

    job = Job.from_args(args)
    results = run_target(job, "v5p:2x2x1", print)   # one Result per program
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from bagel_jax.aot import analysis, steps, targets


class JobError(ValueError):
  """A job that cannot be built from the command line (bad config, program, mesh)."""


def compile_oom(e: BaseException) -> str | None:
  """The compiler's one-line message if `e` is a compile-time out-of-device-memory error, else None."""
  text = str(e)
  for line in text.splitlines():
    i = line.find("Ran out of memory")
    if i >= 0:
      return line[i:].split(" HLO module")[0].strip()
  return text.splitlines()[0].strip() if "RESOURCE_EXHAUSTED" in text else None


class CompileRefused(RuntimeError):
  """The target's compiler refused a program: it needs more device memory than the target has."""

  def __init__(self, why: str, layers: int):
    super().__init__(f"at {layers} layers: {why}")
    self.why = why  # the compiler's own one-line message


@dataclasses.dataclass(frozen=True)
class Result:
  target: str
  device_kind: str
  mesh: str
  program: str
  attention: str
  layers: int
  compiled_layers: tuple[int, ...]  # (L,) or (K, 2K) when extrapolated
  report: analysis.CompileReport | None  # per device, at full depth; None where the compiler refused
  estimate_seconds: float | None  # roofline lower bound at peak rates
  refused: str | None = None  # the compiler's out-of-memory message

  @property
  def fits(self) -> bool:
    return self.report is not None and self.report.fits

  def to_json(self) -> dict[str, Any]:
    out = {k: v for k, v in dataclasses.asdict(self).items() if k != "report"}
    if self.report is not None:
      out.update(dataclasses.asdict(self.report), total=self.report.total)
    out["fits"] = self.fits
    return out


@dataclasses.dataclass(frozen=True)
class Job:
  cfg: Any  # BagelConfig
  config: Any  # the ml_collections training config, or None
  programs: tuple[str, ...]
  mesh: str | None
  attention: str
  remat: str
  layers: int | None
  roofline: bool
  shapes: steps.Shapes
  mix: Any  # train.plan.RowMix
  param_dtype: Any
  dtype: Any

  @classmethod
  def from_args(cls, a) -> "Job":
    import jax.numpy as jnp

    from bagel_jax import config as C
    from bagel_jax.train import plan

    programs = tuple(p.strip() for p in a.programs.split(",") if p.strip())
    bad = [p for p in programs if p not in ("train", "denoise", "decode")]
    if bad or not programs:
      raise JobError(f"--programs {a.programs!r}: expected a comma-separated subset of train, denoise, decode")
    try:
      config = plan._load_config(a.config)
    except (OSError, AttributeError, SyntaxError) as e:
      raise JobError(f"--config {a.config}: {e}") from None
    if a.preset is not None:
      if not hasattr(C, a.preset):
        raise JobError(f"--preset {a.preset!r} is not a preset in bagel_jax.config")
      cfg = getattr(C, a.preset)()
    elif config is not None:
      cfg, _ = plan.model_config_or_preset(config, print)
    else:
      raise JobError("give a training --config or a model --preset")
    shapes = steps.Shapes(rows_per_shard=a.rows_per_shard, image=a.image, contexts=a.contexts, context=a.context,
                          decode_rows=a.decode_rows)
    mix = plan.row_mix_from_args(a, config)
    if "train" in programs:
      try:
        plan.packed_row(mix, cfg)
      except ValueError as e:
        raise JobError(f"training row (--gen_side {mix.gen_side}, --und_side {mix.und_side}, --tokens "
                       f"{mix.tokens}): {e}") from None
    if "denoise" in programs:
      try:
        steps.check_denoise_image(shapes, cfg)
      except ValueError as e:
        raise JobError(str(e)) from None
    get = lambda path, default: plan._get(config, path, default=default)
    return cls(cfg, config, programs, a.mesh, a.attention, a.remat or get("model.remat", "full"), a.layers, a.roofline, shapes,
               mix, jnp.dtype(get("model.param_dtype", "float32")), jnp.dtype(get("model.dtype", "bfloat16")))


def _rules(job: Job):
  from bagel_jax import sharding as shd
  from bagel_jax.train import plan

  overrides = plan._get(job.config, "train.sharding_rules", default=None)
  return shd.rules_with(overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)


def _compile_one(job: Job, program: str, layers: int, mesh, rules):
  import dataclasses as dc

  from bagel_jax.api import BagelModel
  from bagel_jax.train import plan

  cfg = job.cfg.replace(llm=dc.replace(job.cfg.llm, num_hidden_layers=layers))
  if program == "train":
    from bagel_jax import sharding as shd
    rows = job.shapes.rows_per_shard * shd.batch_shards(mesh, rules)
    parts = plan.train_parts(cfg, job.config, attention=job.attention, remat=job.remat, mix=job.mix, rows=rows,
                             param_dtype=job.param_dtype, dtype=job.dtype)
    return steps.compile_train(parts[:5] + parts[6:], mesh, rules)
  model = BagelModel(cfg, param_dtype=job.dtype, dtype=job.dtype, attention_impl=job.attention)
  fn = steps.compile_denoise if program == "denoise" else steps.compile_decode
  return fn(model, mesh, rules, job.shapes)


def _report(job: Job, program: str, layers: int, mesh, rules, spec) -> analysis.CompileReport:
  try:
    compiled, secs = _compile_one(job, program, layers, mesh, rules)
  except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory refusal is turned into a result
    why = compile_oom(e)
    if why is None:
      raise
    raise CompileRefused(why, layers) from None
  return analysis.analyze(compiled, spec, secs)


def _linear(a: analysis.CompileReport, b: analysis.CompileReport, k1: int, k2: int, n: int):
  """Figures of b's program at n layers, from compiles at k1 and k2 layers (linear in depth)."""
  f = lambda x, y: int(x + (y - x) * (n - k1) / (k2 - k1))
  return dataclasses.replace(b, argument=f(a.argument, b.argument), output=f(a.output, b.output),
                             alias=f(a.alias, b.alias), temp=f(a.temp, b.temp), seconds=a.seconds + b.seconds)


def _cost(job: Job, program: str, mesh, rules, spec, full: int):
  """(flops, bytes) per device at full depth from 0- and 1-layer compiles (a while body is counted once)."""
  costs = []
  for n in (0, 1):
    r = _report(job, program, n, mesh, rules, spec)
    if r.flops is None:
      return None, None
    costs.append((r.flops, r.bytes_accessed or 0.0))
  (f0, b0), (f1, b1) = costs
  return f0 + full * (f1 - f0), b0 + full * (b1 - b0)


def run_program(job: Job, program: str, mesh, rules, spec: targets.TargetSpec) -> Result:
  from bagel_jax import sharding as shd

  full = job.cfg.llm.num_hidden_layers
  if job.layers is None or 2 * job.layers >= full:
    report, layers = _report(job, program, full, mesh, rules, spec), (full,)
  else:
    k1, k2 = max(job.layers, 2), 2 * max(job.layers, 2)  # a 1-layer scan is inlined: not on the line
    a, b = (_report(job, program, k, mesh, rules, spec) for k in (k1, k2))
    report = _linear(a, b, k1, k2, full)
    layers = (k1, k2)
  flops, nbytes = _cost(job, program, mesh, rules, spec, full) if job.roofline else (None, None)
  est = analysis.roofline_seconds(flops, nbytes, spec) if flops is not None else None
  report = dataclasses.replace(report, flops=flops, bytes_accessed=nbytes)
  return Result(spec.name, spec.device_kind, shd.describe(mesh), program, job.attention, full, layers, report, est)


def describe(r: Result, job_roofline: bool = False) -> str:
  g, p = 1024**3, r.report
  if p is None:
    return (f"[{r.target}] {r.program} (mesh {r.mesh}; attention={r.attention}): DOES NOT FIT: the compiler "
            f"refuses it {r.refused}")
  coll = ", ".join(f"{k} {v}" for k, v in p.collectives.items() if v) or "none"
  how = (f"EXTRAPOLATED from {r.compiled_layers[0]} and {r.compiled_layers[1]} layers to {r.layers}"
         if len(r.compiled_layers) == 2 else f"{r.layers} layers")
  lines = [f"[{r.target}] {r.program} ({how}; mesh {r.mesh}; attention={r.attention}): compiled in {p.seconds:.1f} s",
           f"  per device: arguments {p.argument / g:.2f} GiB, outputs {p.output / g:.2f} GiB (aliased "
           f"{p.alias / g:.2f}), temporaries {p.temp / g:.2f} GiB, code {p.code / 2**20:.1f} MiB",
           f"  total {p.total / g:.2f} GiB of {p.memory_limit / g:.1f} GiB ({r.device_kind}): "
           f"{'fits' if p.fits else 'DOES NOT FIT'}",
           f"  kernel custom calls: {p.kernels}{'  (no kernel: XLA attention)' if p.kernels == 0 else ''}; "
           f"collectives: {coll}"]
  if r.estimate_seconds is not None:
    lines.append(f"  roofline ESTIMATE: {p.flops / 1e12:.2f} TFLOP and {p.bytes_accessed / 1e9:.2f} GB per device "
                 f"(cost analysis, layers scaled from 0/1-layer compiles) -> >= {r.estimate_seconds * 1e3:.1f} ms")
  elif job_roofline:
    lines.append("  roofline: the compiler gives no cost analysis for this target")
  return "\n".join(lines)


def run_target(job: Job, name: str, out: Callable[[str], None]) -> list[Result]:
  from bagel_jax import sharding as shd

  devices, spec = targets.resolve(name)
  try:
    mesh = shd.make_mesh(job.mesh or "fsdp=-1", devices=devices)
  except shd.ShardingError as e:
    raise JobError(f"--mesh {job.mesh!r} on {name} ({len(devices)} devices): {e}") from None
  rules = _rules(job)
  results = []
  for program in job.programs:
    try:
      r = run_program(job, program, mesh, rules, spec)
    except CompileRefused as e:
      r = Result(spec.name, spec.device_kind, shd.describe(mesh), program, job.attention,
                 job.cfg.llm.num_hidden_layers, (), None, None, refused=str(e))
    out(describe(r, job.roofline))
    results.append(r)
  return results


__all__ = ["CompileRefused", "Job", "JobError", "Result", "compile_oom", "run_target", "run_program", "describe"]
