"""Train step timing on one device: `python -m bagel_jax.bench train_step [--layers 4] [--tokens 8192] [--tiny]`.

The 7B model (fp32 master weights, AdamW + EMA, bf16 compute, remat full, attention auto) cut to
`--layers` decoder layers, one packed row of `--tokens` tokens (one 512 px generation image, one
448 px ViT image, a quarter CE tokens; `train.plan.row_plans`), random weights.  Prints compile
time, median step time, peak memory and MFU from the slice's model FLOPs (`train.plan.model_flops`)
and the device's peak rate (`aot.targets.peak_for_kind`); the full-depth step time is an ESTIMATE
at the slice's MFU.  `--tiny`: the tiny model on CPU (a smoke run; no MFU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time


def _batch(abstract, packed, key):
  import jax
  import jax.numpy as jnp

  rand = lambda x: jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)
  return abstract.replace(layout=jax.tree.map(jnp.asarray, packed), vit_patches=rand(abstract.vit_patches),
                          vae_images=jnp.clip(rand(abstract.vae_images), -1, 1))


def _setup(tiny: bool, layers: int, tokens: int):
  import jax
  import jax.numpy as jnp

  from bagel_jax import config as C
  from bagel_jax import sharding as shd
  from bagel_jax.train import plan
  from bagel_jax.train.step import init_train_state, jit_train_step

  base = C.bagel_tiny() if tiny else C.bagel_7b_mot()
  cfg = base.replace(llm=dataclasses.replace(base.llm, num_hidden_layers=layers))
  mix = (plan.RowMix(tokens=tokens, gen_images=1, gen_side=32, und_images=1, und_side=28, ce_tokens=tokens // 4)
         if tiny else plan.RowMix(tokens=tokens, gen_images=1, und_images=1, ce_tokens=tokens // 4))
  dtype = jnp.float32 if tiny else jnp.bfloat16
  model, tx, hp, state, batch, lay, vae = plan.train_parts(cfg, None, attention="auto", remat="full", mix=mix,
                                                           rows=1, param_dtype=jnp.float32, dtype=dtype)
  mesh = shd.make_mesh("fsdp=1", devices=jax.devices()[:1])
  rules = shd.DEFAULT_RULES
  ss = shd.train_state_shardings(state, mesh, rules)
  step = jit_train_step(model, tx, hp, mesh, rules, ss, shd.batch_shardings(batch, mesh, rules),
                        shd.replicated(vae, mesh))
  key = jax.random.key(0)
  params = model.init(key)
  st = init_train_state(params["bagel"], tx, key, hp.ema_decay is not None)
  return cfg, lay, step, st, params["vae"], _batch(batch, lay, jax.random.PRNGKey(1))


def run(tiny: bool, layers: int, tokens: int, reps: int = 3) -> dict:
  import jax

  from bagel_jax.aot.targets import peak_for_kind
  from bagel_jax.train import plan

  cfg, lay, step, state, vae, batch = _setup(tiny, layers, tokens)
  t0 = time.perf_counter()
  state, metrics = step(state, vae, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    state, metrics = step(state, vae, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  t = statistics.median(times)
  dev = jax.devices()[0]
  flops = plan.model_flops(cfg, lay, 1)["model_flops"]
  peak = peak_for_kind(dev.device_kind)
  full = 28 if not tiny else layers
  res = {"device": dev.device_kind, "layers": layers, "tokens": tokens, "compile_s": round(compile_s, 2),
         "step_s": round(t, 4), "model_tflop": flops / 1e12, "tflops_per_s": flops / t / 1e12}
  if peak:
    res["mfu"] = round(flops / t / peak, 4)
    full_flops = plan.model_flops(cfg.replace(llm=dataclasses.replace(cfg.llm, num_hidden_layers=full)), lay, 1)
    res["full_depth_step_s_ESTIMATE"] = round(full_flops["model_flops"] / (flops / t), 3)
  stats = dev.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    res["peak_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 3)
  return res


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m bagel_jax.bench train_step", description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--tiny", action="store_true")
  a = p.parse_args(argv)
  print(json.dumps(run(a.tiny, a.layers, a.tokens), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
