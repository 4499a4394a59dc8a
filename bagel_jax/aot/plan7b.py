"""The 7B memory plan and roofline per target: `python -m bagel_jax.aot plan-7b [--target v5p:2x2x2 ...]`.

For each target (default: `DEFAULT_TARGETS`, 8 devices each) the train step of upstream's
pre-training recipe (`configs/bagel_7b_pretrain.py`: one packed row of 36,864 tokens per device,
fsdp over the 8 devices, remat `full`, fp32 master weights + AdamW + fp32 EMA, bf16 compute, the
target's attention kernel) is compiled with 2 and 4 decoder layers and extrapolated to 28
(`aot.runner`).  Where it does not fit the device, the step is compiled again at half the tokens
per device (a row with half the images and CE tokens), a memory model is fitted
(`aot.memplan.MemoryModel`: state and gradients divided by fsdp, the rest linear in tokens) and
the least change of each knob that fits is searched and printed, the cheapest first
(`memplan.fitting_changes`, `memplan.smallest`).  Where the target's compiler refuses the recipe
outright (TPU: a compile-time HBM out-of-memory, even at 2 layers), the step is compiled at
halved tokens per device until it compiles, and the model is fitted from that compile and one at
half its tokens: the recipe's row then says what the compiler said and that its total is a
prediction.  `--verify` compiles the chosen change.

`--roofline` adds a roofline ESTIMATE per target (`roofline`): the step takes at least
max(FLOPs / peak, bytes / HBM bandwidth) per device.  FLOPs: the model FLOPs of the packed row
(`train.plan.model_flops`: 6 x active matmul parameters x tokens + visible attention pairs + ViT,
upstream's MFU basis) times the recomputation of the remat policy (`memplan.REMAT_COST`); on TPU
also the compiler's cost analysis (decoder layers scaled from the 2- and 4-layer compiles, kernel
FLOPs not included: Mosaic calls carry none), and the larger is used.  Bytes: the TPU compiler's
"bytes accessed"; the GPU compiler gives no cost analysis, so there the bytes are the step's
memory footprint (arguments + outputs + temporaries, each byte counted once: a lower bound).
MFU = model FLOPs / (time x peak).  `--denoise` does the same for one denoising step of a
1024 px image (3 CFG contexts against 512 cached tokens, one device: `DENOISE_TARGETS`).
Peak rates: `aot.targets` (TPU: published per-chip figures; GPU: the CUDA plugin's description).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from bagel_jax.aot import analysis, memplan, runner, targets

DEFAULT_TARGETS = ("v4:2x2x2", "v5e:2x4", "v5p:2x2x2", "v6e:2x4", "a100-80:8", "h100:8", "h200:8", "b200:8")
CONFIG = "configs/bagel_7b_pretrain.py"
RECIPE = memplan.Recipe(fsdp=8, tokens=36864, remat="full")
DENOISE_TARGETS = {"v4": "v4:1x1x1", "v5e": "v5e:1x1", "v5p": "v5p:1x1x1", "v6e": "v6e:1x1", "a100-80": "a100-80:1",
                   "h100": "h100:1", "h200": "h200:1", "b200": "b200:1"}
GIB = 1024**3


def _job(recipe: memplan.Recipe, programs: str = "train", config: str = CONFIG) -> runner.Job:
  """The aot job of this recipe; the row mix scales with the tokens (4 generation + 4 understanding images
  and 8,192 CE tokens at 36,864 tokens)."""
  from bagel_jax.aot.__main__ import _args

  scale = recipe.tokens / RECIPE.tokens
  n = lambda x: max(1, round(x * scale))
  argv = ["--target", "unused", "--config", config, "--programs", programs, "--layers", "2", "--remat", recipe.remat,
          "--tokens", str(recipe.tokens), "--gen_images", str(n(4)), "--und_images", str(n(4)),
          "--ce_tokens", str(n(8192))]
  return runner.Job.from_args(_args(argv))


def _mesh(job: runner.Job, devices):
  from bagel_jax import sharding as shd

  return shd.make_mesh("fsdp=-1", devices=devices), runner._rules(job)


def compile_total(job: runner.Job, name: str, program: str = "train"):
  """(report at full depth, extrapolated from 2 and 4 layers; the 2- and 4-layer reports; spec)."""
  devices, spec = targets.resolve(name)
  mesh, rules = _mesh(job, devices)
  full = job.cfg.llm.num_hidden_layers
  a, b = (runner._report(job, program, k, mesh, rules, spec) for k in (2, 4))
  return runner._linear(a, b, 2, 4, full), (a, b), spec


def sharded_bytes(report: analysis.CompileReport) -> float:
  """Bytes per device that fsdp divides: the state (arguments: fp32 parameters, AdamW's two moments, EMA)
  and its fp32 gradients (a quarter of the state, inside the temporaries)."""
  return report.argument * 1.25


def _target_for(name: str, fsdp: int) -> str:
  """The same generation with `fsdp` devices (GPU: hosts of 8; TPU: a slice of that many chips)."""
  gen = name.split(":")[0]
  if gen in targets.GPU_KINDS:
    return f"{gen}:{fsdp}" if fsdp <= 8 else f"{gen}:{fsdp // 8}x8"
  two_d = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
  three_d = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
  return f"{gen}:{(two_d if gen in ('v5e', 'v6e') else three_d)[fsdp]}"


def largest_compiling(name: str, out=print, start: int = RECIPE.tokens):
  """(tokens, full-depth report) of the largest halving of `start` tokens per device whose 2- and 4-layer
  compiles fit the target's compiler (multiples of `memplan.TOKEN_STEP`); None if even that fails."""
  tokens = start // 2
  while tokens >= memplan.TOKEN_STEP:
    tokens -= tokens % memplan.TOKEN_STEP
    try:
      rep, _, _ = compile_total(_job(dataclasses.replace(RECIPE, tokens=tokens)), name)
      return tokens, rep
    except runner.CompileRefused as e:
      out(f"[{name}] at {tokens:,} tokens/device the compiler refuses: {e.why}")
    tokens //= 2
  return None


@dataclasses.dataclass(frozen=True)
class PlanRow:
  target: str
  device_kind: str
  memory: int  # device bytes
  total: int  # compiled (extrapolated) bytes per device at the recipe; predicted where refused is set
  changes: tuple[memplan.Change, ...]
  best: memplan.Change | None
  verified: int | None = None  # compiled bytes of the best change (--verify)
  refused: str | None = None  # the compiler's out-of-memory message for the recipe itself


def _model_without_recipe(name: str, why: str, out) -> tuple[memplan.MemoryModel, int]:
  """The memory model from the largest compiling tokens per device and half of them, when the recipe
  itself is refused; and the recipe's predicted bytes."""
  found = largest_compiling(name, out)
  if found is None:
    raise runner.JobError(f"{name}: the compiler refuses the step even at {memplan.TOKEN_STEP:,} tokens per device "
                          f"({why})")
  tokens, rep = found
  half = tokens // 2 - (tokens // 2) % memplan.TOKEN_STEP
  rep_half, _, _ = compile_total(_job(dataclasses.replace(RECIPE, tokens=half)), name)
  out(f"[{name}] at {tokens:,} and {half:,} tokens/device: {rep.total / GIB:.2f} and {rep_half.total / GIB:.2f} GiB "
      f"(compiled {rep.seconds + rep_half.seconds:.0f} s)")
  base = dataclasses.replace(RECIPE, tokens=tokens)
  model = memplan.MemoryModel.from_compiles(base, rep.total, sharded_bytes(rep), (half, rep_half.total))
  return model, model.predict(RECIPE)


def plan_target(name: str, out=print, verify: bool = False):
  """(PlanRow, the job, the full-depth report or None where the compiler refused the recipe, the 2- and
  4-layer reports or None) of one target."""
  job = _job(RECIPE)
  spec = targets.resolve(name)[1]
  try:
    rep, pair, spec = compile_total(job, name)
  except runner.CompileRefused as e:
    why = e.why
    out(f"[{name}] recipe ({RECIPE.describe()}): the compiler refuses it: {why}")
    model, total = _model_without_recipe(name, why, out)
    changes = memplan.fitting_changes(RECIPE, model.predict, spec.memory_bytes)
    row = PlanRow(name, spec.device_kind, spec.memory_bytes, total, tuple(changes), memplan.smallest(changes),
                  refused=why)
    return _verified(row, name, out) if verify else row, job, None, None
  out(f"[{name}] recipe ({RECIPE.describe()}): {rep.total / GIB:.2f} GiB per device of {spec.memory_bytes / GIB:.1f} "
      f"(compiled {rep.seconds:.0f} s, 2 and 4 layers extrapolated to 28; kernel calls {rep.kernels})")
  if rep.fits:
    change = memplan.Change("none", RECIPE, rep.total, 1.0)
    return PlanRow(name, spec.device_kind, spec.memory_bytes, rep.total, (change,), change), job, rep, pair
  half = dataclasses.replace(RECIPE, tokens=RECIPE.tokens // 2)
  rep_half, _, _ = compile_total(_job(half), name)
  out(f"[{name}] at {half.tokens:,} tokens/device: {rep_half.total / GIB:.2f} GiB (compiled {rep_half.seconds:.0f} s)")
  model = memplan.MemoryModel.from_compiles(RECIPE, rep.total, sharded_bytes(rep), (half.tokens, rep_half.total))
  changes = memplan.fitting_changes(RECIPE, model.predict, spec.memory_bytes)
  row = PlanRow(name, spec.device_kind, spec.memory_bytes, rep.total, tuple(changes), memplan.smallest(changes))
  return _verified(row, name, out) if verify else row, job, rep, pair


def _verified(row: PlanRow, name: str, out) -> PlanRow:
  """The row with its best change compiled (on a slice of that many devices)."""
  best = row.best
  if best is None or best.knob == "none":
    return row
  vname = _target_for(name, best.recipe.fsdp)
  vrep, _, _ = compile_total(_job(best.recipe), vname)
  out(f"[{name}] verified {best.recipe.describe()} on {vname}: {vrep.total / GIB:.2f} GiB "
      f"({'fits' if vrep.fits else 'DOES NOT FIT'})")
  return dataclasses.replace(row, verified=vrep.total)


def plan_line(row: PlanRow) -> str:
  g = GIB
  if row.best is not None and row.best.knob == "none":
    change, other = "none (fits)", "-"
  else:
    change = (f"**{row.best.describe(RECIPE)}**: {row.best.predicted / g:.1f} GiB predicted"
              + (f", {row.verified / g:.1f} compiled" if row.verified else "")) if row.best else "nothing fits"
    other = "; ".join(f"{c.describe(RECIPE)} ({c.predicted / g:.1f} GiB)" for c in row.changes if c is not row.best) or "-"
  total = f"{row.total / g:.2f}" if row.refused is None else f"refused ({row.refused}); {row.total / g:.1f} predicted"
  return (f"| {row.target} | {row.memory / g:.1f} | {total} | {'yes' if row.total <= row.memory else 'no'} "
          f"| {change} | {other} |")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m bagel_jax.aot plan-7b", description=__doc__.split("\n\n")[0])
  ap.add_argument("--target", action="append", default=None, help=f"default: {', '.join(DEFAULT_TARGETS)}")
  ap.add_argument("--verify", action="store_true", help="compile the chosen change too")
  ap.add_argument("--roofline", action="store_true", help="print the roofline estimate of the train step")
  ap.add_argument("--denoise", action="store_true", help="and of a 1024 px denoising step (one device)")
  a = ap.parse_args(argv)
  from bagel_jax.aot import roofline

  rows, roofs = [], []
  try:
    for name in a.target or DEFAULT_TARGETS:
      row, job, rep, pair = plan_target(name, print, a.verify)
      rows.append(row)
      print(plan_line(row), flush=True)
      if a.roofline and rep is None:
        print(f"[{name}] no train roofline: the compiler refused the recipe")
      elif a.roofline:
        roofs.append(roofline.train_estimate(job, name, rep, pair, print))
      if a.denoise:
        roofs.append(roofline.denoise_estimate(DENOISE_TARGETS[name.split(":")[0]], print))
  except (targets.TargetError, runner.JobError) as e:
    print(f"aot plan-7b: {e}", file=sys.stderr)
    return 2
  print(f"\nrecipe: {RECIPE.describe()} ({CONFIG}); per device, 2 and 4 layers compiled and extrapolated to 28\n")
  print("| target | device GiB | compiled GiB | fits | smallest change that fits | other knobs |")
  print("| --- | --- | --- | --- | --- | --- |")
  for row in rows:
    print(plan_line(row))
  if roofs:
    print()
    print(roofline.HEADER)
    for r in roofs:
      print(roofline.line(r))
  return 0


__all__ = ["DEFAULT_TARGETS", "RECIPE", "PlanRow", "plan_target", "plan_line", "main"]
