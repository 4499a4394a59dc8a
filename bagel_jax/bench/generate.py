"""Inference benchmark: `python -m bagel_jax.bench generate [--config auto|tiny|7b] [--quantize int8] ...`.

Measures, for text-to-image with CFG (upstream's notebook settings: cfg_text 4.0, interval
0.4..1.0, global renorm, shift 3.0): compile time, end-to-end time (prefill + denoising + VAE
decode) of a second run, time per denoising step, peak device memory, parameter memory, and
greedy text decoding tokens/s.  `--config auto` runs the tiny fixture model on CPU and the 7B
config with random weights when a GPU/TPU is present.  Prints one JSON object (and writes it to
--out).  Peak memory is the process's peak, so run one configuration per process.

Goals (issue 7, H100, 1024x1024, 50 steps, CFG): bf16 <= 10 s end to end and <= 32 GB peak;
int8 <= 18 GB peak.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

GOALS = {"end_to_end_s": 10.0, "peak_gb_bf16": 32.0, "peak_gb_int8": 18.0}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bagel_jax.bench generate", description=__doc__.splitlines()[0])
  p.add_argument("--config", choices=("auto", "tiny", "7b"), default="auto")
  p.add_argument("--size", default=None, help="HxW (default: 1024x1024 for 7b, 64x64 for tiny)")
  p.add_argument("--steps", type=int, default=50, help="num_timesteps (steps - 1 Euler steps)")
  p.add_argument("--prompt-tokens", type=int, default=32)
  p.add_argument("--decode-tokens", type=int, default=128)
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
  p.add_argument("--quantize", choices=("none", "int8"), default="none")
  p.add_argument("--attention", default="auto")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="also write the JSON here")
  return p


def _peak_gb(dev) -> float | None:
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # CPU backends may not implement it
    return None
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def run(args) -> dict:
  """The generation benchmark, read top to bottom (build, warm up, time, print): kept whole."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bagel_jax.api import BagelModel
  from bagel_jax.config import bagel_7b_mot, bagel_tiny, load_config
  from bagel_jax.inference import Inferencer
  from bagel_jax.inference import kv_cache as kc
  from bagel_jax.inference.quantize import param_bytes, quantize_params, random_params
  from bagel_jax.inference.text import generate_tokens

  dev = jax.devices()[0]
  accel = dev.platform != "cpu"
  config = args.config if args.config != "auto" else ("7b" if accel else "tiny")
  dtype = getattr(jnp, args.dtype) if args.dtype else (jnp.bfloat16 if accel else jnp.float32)
  fixture = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "bagel_tiny_a"
  key = jax.random.key(args.seed)
  if config == "tiny" and fixture.is_dir():
    cfg = load_config(fixture)
    model = BagelModel(cfg, param_dtype=dtype, dtype=dtype, attention_impl=args.attention)
    params = quantize_params(model.load_upstream(fixture), args.quantize, free_inputs=True)
    weights = "bagel_tiny_a fixture"
  else:
    cfg = bagel_tiny() if config == "tiny" else bagel_7b_mot()
    model = BagelModel(cfg, param_dtype=dtype, dtype=dtype, attention_impl=args.attention)
    params = random_params(model, key, args.quantize)
    weights = "random"
  jax.block_until_ready(params)
  side = cfg.max_image_side_gen
  size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else ((1024, 1024) if config == "7b" else (side, side))
  inf = Inferencer(model, params, None)
  rng = np.random.default_rng(args.seed)
  prompt = rng.integers(0, min(cfg.llm.vocab_size, 150000), args.prompt_tokens).tolist()
  kw = dict(num_timesteps=args.steps, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.0,
            cfg_interval=(0.4, 1.0), cfg_renorm_type="global", image_shapes=size, output="array")

  t0 = time.perf_counter()
  inf.batch([[prompt]], seed=0, **kw)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  inf.batch([[rng.integers(0, 1000, args.prompt_tokens).tolist()]], seed=1, **kw)
  e2e = time.perf_counter() - t0
  timing = dict(inf.timing)
  steps = args.steps - 1

  # Text decoding: a prefilled context, then a fixed number of greedy tokens (eos disabled).
  n_dec = kc.bucket(args.decode_tokens)
  seg = kc.TextSegment(tuple(prompt))
  chunk = jax.tree.map(jnp.asarray, kc.build_chunk([[seg]], [0], cfg))
  cache = kc.prefill(model, params, chunk, kc.bucket(seg.num_tokens + n_dec))

  def decode():
    out = generate_tokens(model, params, cache, jnp.array([cfg.tokens.bos_token_id]), jnp.int32(n_dec),
                          jnp.int32(-1), key, jnp.float32(1), jnp.int32(0), jnp.float32(1), max_tokens=n_dec)
    return jax.block_until_ready(out[0])

  decode()
  t0 = time.perf_counter()
  decode()
  dec_s = time.perf_counter() - t0

  peak = _peak_gb(dev)
  res = {
      "device": str(dev.device_kind), "platform": dev.platform, "config": config, "weights": weights,
      "dtype": jnp.dtype(dtype).name, "quantize": args.quantize, "attention": args.attention,
      "size": f"{size[0]}x{size[1]}", "num_timesteps": args.steps, "euler_steps": steps,
      "cfg": "text 4.0, interval (0.4, 1.0], global renorm",
      "first_run_s (compile + run)": round(first, 3), "end_to_end_s": round(e2e, 3),
      "prefill_s": round(timing.get("prefill_s", 0), 4), "denoise_s": round(timing.get("denoise_s", 0), 4),
      "per_step_s": round(timing.get("denoise_s", 0) / max(steps, 1), 5),
      "vae_decode_s": round(timing.get("vae_decode_s", 0), 4),
      "decode_tokens": n_dec, "decode_tokens_per_s": round(n_dec / dec_s, 1),
      "param_gb": round(param_bytes(params) / 2**30, 3), "peak_device_gb": None if peak is None else round(peak, 3),
  }
  if config == "7b" and accel:
    res["goals"] = {"end_to_end_s <= 10": e2e <= GOALS["end_to_end_s"]}
    if peak is not None:
      lim = GOALS["peak_gb_int8"] if args.quantize == "int8" else GOALS["peak_gb_bf16"]
      res["goals"][f"peak_device_gb <= {lim:g}"] = peak <= lim
  return res


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  res = run(args)
  text = json.dumps(res, indent=1)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
