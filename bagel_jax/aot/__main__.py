"""Compile the train, denoising and decode steps for TPU / GPU targets on a CPU-only host.

    python -m bagel_jax.aot --target v5p:2x2x1 --config configs/bagel_7b_mot.py [--mesh fsdp=4]
    python -m bagel_jax.aot --target h100:8 --target v6e:2x4 --preset bagel_7b_mot --layers 2
    python -m bagel_jax.aot plan-7b [--target v5p:2x2x2 ...] [--verify] [--roofline] [--denoise]

Targets (see `bagel_jax.aot.targets`): TPU `v4|v5e|v5p|v6e|tpu7x:TOPOLOGY`, GPU
`a100-40|a100-80|h100|h200|b200:N` (N devices per host) or `:HOSTSxN`; needs `pip install -e '.[aot]'`.
For each target and program it prints what was compiled (model, mesh, attention backend, shapes)
and, per device: argument / output / temporary / code memory, the total against the device's
memory (fits or not), compile time, the number of kernel custom calls (0 means XLA attention:
no kernel was used) and the collectives.  With `--layers K` the programs are compiled with K and
2K decoder layers and every figure is extrapolated linearly to the full depth (stated as such).
Exit status: 0 if everything fits, 1 if something does not, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# A compile-only tool: never initialise an accelerator backend, and share libtpu with other compilers.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

PROGRAMS = ("train", "denoise", "decode")


def _args(argv):
  from bagel_jax.aot.steps import Shapes
  from bagel_jax.train import plan

  ap = argparse.ArgumentParser(prog="python -m bagel_jax.aot", description=__doc__.split("\n\n")[0])
  ap.add_argument("--target", action="append", required=True, help="e.g. v5p:2x2x1, v6e:2x2, h100:8 (repeatable)")
  ap.add_argument("--config", default=None, help="a training config (ml_collections get_config()); its model, "
                  "remat, sharding rules and optimizer are used")
  ap.add_argument("--preset", default=None, help="a bagel_jax.config preset instead (bagel_7b_mot, bagel_tiny)")
  ap.add_argument("--mesh", default=None, help="mesh over the target's devices (default: fsdp over all)")
  ap.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma-separated subset of {PROGRAMS}")
  ap.add_argument("--attention", default="auto", help="attention impl (auto picks the target's kernel)")
  ap.add_argument("--remat", default=None, help="remat policy (default: the config's, else full)")
  ap.add_argument("--layers", type=int, default=None, help="compile K and 2K decoder layers and extrapolate")
  ap.add_argument("--tokens", type=int, default=None, help="packed tokens per training row")
  ap.add_argument("--rows_per_shard", type=int, default=Shapes.rows_per_shard)
  plan.add_row_mix_args(ap)
  ap.add_argument("--image", type=int, default=Shapes.image, help="denoising image side in pixels")
  ap.add_argument("--contexts", type=int, default=Shapes.contexts, help="CFG contexts of the denoising step")
  ap.add_argument("--context", type=int, default=Shapes.context, help="KV cache tokens (denoise, decode)")
  ap.add_argument("--decode_rows", type=int, default=Shapes.decode_rows)
  ap.add_argument("--roofline", action="store_true", help="also compile 0- and 1-layer models for the cost "
                  "analysis and print a roofline estimate of each program's time")
  ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
  return ap.parse_args(argv)


def main(argv=None) -> int:
  from bagel_jax.aot import runner, targets

  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "plan-7b":  # the 7B memory plan and roofline per target
    from bagel_jax.aot import plan7b
    return plan7b.main(argv[1:])
  a = _args(argv)
  try:
    job = runner.Job.from_args(a)
    results = []
    for name in a.target:
      results.extend(runner.run_target(job, name, print))
  except (targets.TargetError, runner.JobError) as e:
    print(f"aot: {e}", file=sys.stderr)
    return 2
  if a.json:
    with open(a.json, "w") as f:
      json.dump([r.to_json() for r in results], f, indent=1)
  return 0 if all(r.fits for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
