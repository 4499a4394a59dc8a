"""Benchmark runners in the official formats of upstream's evaluations.

    python -m bagel_jax.eval BENCH --checkpoint DIR --data PATH --out DIR [options]
    python -m bagel_jax.eval BENCH --help          # the benchmark's own options and defaults
    python -m bagel_jax.eval --list

Generation/editing: geneval, wise, imgedit, gedit, kris, rise.  Understanding: mme, mmbench, mmmu,
mmvet, mathvista, pope, mmvp, vqa.  Settings default to upstream's scripts (docs/evaluation.md).
Reruns skip finished items; OUT/summary.json has counts, timing and the offline scores.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

BENCHMARKS = {
    "geneval": "bagel_jax.eval.geneval:GenEval",
    "wise": "bagel_jax.eval.wise:Wise",
    "imgedit": "bagel_jax.eval.imgedit:ImgEdit",
    "gedit": "bagel_jax.eval.gedit:GEdit",
    "kris": "bagel_jax.eval.kris:Kris",
    "rise": "bagel_jax.eval.rise:Rise",
    "mme": "bagel_jax.eval.mme:MME",
    "mmbench": "bagel_jax.eval.mmbench:MMBench",
    "mmmu": "bagel_jax.eval.mmmu:MMMU",
    "mmvet": "bagel_jax.eval.mmvet:MMVet",
    "mathvista": "bagel_jax.eval.mathvista:MathVista",
    "pope": "bagel_jax.eval.pope:Pope",
    "mmvp": "bagel_jax.eval.mmvp:MMVP",
    "vqa": "bagel_jax.eval.vqa:VQA",
}


def benchmark_class(name: str):
  module, cls = BENCHMARKS[name].split(":")
  return getattr(importlib.import_module(module), cls)


def _interval(text: str) -> tuple[float, float]:
  from bagel_jax.inference.generate import _interval as parse
  return parse(text)


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True, help="upstream release folder or a folder converted to Orbax")
  p.add_argument("--data", required=True, help="the benchmark's data (file or folder, see docs/evaluation.md)")
  p.add_argument("--out", required=True, help="output folder (the layout the official scorer reads)")
  p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: CHECKPOINT/tokenizer.json)")
  p.add_argument("--batch-size", type=int, default=4, help="items per Inferencer call on each replica")
  p.add_argument("--devices", type=int, default=None, help="local devices to use (default: all)")
  p.add_argument("--devices-per-replica", type=int, default=1,
                 help="devices per model replica (>1: tensor-parallel by the project's sharding rules)")
  p.add_argument("--limit", type=int, default=None, help="only the first N items (smoke runs)")
  p.add_argument("--seed", type=int, default=0, help="base seed of the per-item noise")
  p.add_argument("--score-only", action="store_true", help="no inference: assemble and score what is on disk")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
  p.add_argument("--quantize", choices=("none", "int8"), default="none")
  p.add_argument("--attention", default="auto", help="attention backend (auto, reference, xla_chunked, ...)")
  p.add_argument("--no-progress", action="store_true")


def _generation(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("generation settings (default: upstream's script for this benchmark)")
  g.add_argument("--resolution", type=int, default=None, help="text-to-image side in pixels")
  g.add_argument("--steps", type=int, default=None, help="num_timesteps (steps - 1 Euler steps)")
  g.add_argument("--cfg-text-scale", type=float, default=None)
  g.add_argument("--cfg-img-scale", type=float, default=None)
  g.add_argument("--cfg-interval", type=_interval, default=None, help="LOW,HIGH")
  g.add_argument("--cfg-renorm-type", choices=("global", "channel", "text_channel"), default=None)
  g.add_argument("--cfg-renorm-min", type=float, default=None)
  g.add_argument("--timestep-shift", type=float, default=None)
  g.add_argument("--think", action="store_true", help="plan with the reasoning system prompt first (upstream --think)")
  g.add_argument("--max-think-tokens", type=int, default=None)


def parser(name: str) -> argparse.ArgumentParser:
  cls = benchmark_class(name)
  p = argparse.ArgumentParser(prog=f"python -m bagel_jax.eval {name}", description=cls.description or None)
  _common(p)
  if cls.task == "understanding":
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"answer token limit, <|im_start|> included (default {cls.max_new_tokens})")
  else:
    _generation(p)
  cls.add_arguments(p)
  return p


def _replicas_fn(args):
  def build():
    import jax
    import jax.numpy as jnp

    from bagel_jax.eval.runner import build_replicas
    from bagel_jax.inference import Inferencer
    inf = Inferencer.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, quantize=args.quantize,
                                     dtype=None if args.dtype is None else getattr(jnp, args.dtype),
                                     attention_impl=args.attention)
    devices = jax.local_devices()[:args.devices] if args.devices else jax.local_devices()
    return build_replicas(inf, devices, args.devices_per_replica)
  return build


def main(argv=None, replicas=None) -> int:
  """CLI entry. `replicas`: ready Inferencers to use instead of loading --checkpoint (tests, notebooks)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "--list"):
    print(__doc__ if argv[:1] != ["--list"] else "\n".join(BENCHMARKS))
    return 0 if argv else 2
  name = argv[0].lower()
  if name not in BENCHMARKS:
    print(f"error: unknown benchmark {argv[0]!r}; one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
    return 2
  args = parser(name).parse_args(argv[1:])
  from bagel_jax import sharding as shd
  from bagel_jax.config import ConfigError, load_config
  from bagel_jax.eval.core import EvalError
  from bagel_jax.eval.runner import run
  from bagel_jax.inference import InferenceError
  from bagel_jax.tokenizer import TokenizerError
  from bagel_jax.weights import CheckpointError
  try:
    if args.batch_size < 1:
      raise EvalError(f"--batch-size must be at least 1; got {args.batch_size}")
    if replicas is None:
      shd.initialize_distributed()
    t0 = time.perf_counter()
    bench = benchmark_class(name)(args, load_config(args.checkpoint))
    items = bench.load()
    if len({it.key for it in items}) != len(items):
      raise EvalError(f"{args.data}: duplicate item keys")
    items = items[:args.limit] if args.limit else items
    timing = {"load_data_s": time.perf_counter() - t0}
    summary = run(bench, items, (lambda: list(replicas)) if replicas is not None else _replicas_fn(args),
                  batch_size=args.batch_size, progress=not args.no_progress, score_only=args.score_only,
                  timing=timing)
  except (EvalError, InferenceError, ConfigError, CheckpointError, TokenizerError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  counts = summary["counts"]
  for f in summary.get("failures", [])[:5]:
    print(f"failed: {f['key']}: {f['error']}", file=sys.stderr)
  print(f"{name}: {counts.get('generated', 0)} items run, {counts.get('finished_before', 0)} already finished, "
        f"{counts.get('failed', 0)} failed -> {args.out}", file=sys.stderr)
  if summary.get("scores"):
    print(_format_scores(summary["scores"]))
  return 1 if counts.get("failed") else 0


def _format_scores(scores: dict) -> str:
  import json
  return json.dumps(scores, indent=1, ensure_ascii=False)


if __name__ == "__main__":
  sys.exit(main())
