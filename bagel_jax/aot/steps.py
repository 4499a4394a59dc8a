"""The three programs `bagel_jax.aot` compiles, built from ShapeDtypeStructs on a target mesh.

- `train`: `train.step.jit_train_step` on packed rows (the memory plan's row mix), state donated.
- `denoise`: one step of `inference.flow.jit_denoise` for a square image with CFG contexts
  against a prefilled KV cache of `context` tokens.
- `decode`: one token per row of `inference.text.decode_step` against a KV cache of `context` slots.

Each returns (compiled, seconds to lower and compile).  Lowering runs under `jax.set_mesh(mesh)`
(the jitted functions are `sharding.MeshBound`), so attention picks and compiles the target's
kernels (see `bagel_jax.attention.target`).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from bagel_jax import sharding as shd


@dataclasses.dataclass(frozen=True)
class Shapes:
  rows_per_shard: int = 1  # training rows per batch shard
  image: int = 1024  # denoising image side (pixels)
  contexts: int = 3  # CFG contexts of the denoising step (1 = no CFG)
  images: int = 1  # images denoised at once
  context: int = 512  # prefilled KV tokens (denoise, decode)
  decode_rows: int = 8  # rows decoded at once


def _timed_compile(jitted, *args):
  t0 = time.time()
  compiled = jitted.lower(*args).compile()
  return compiled, time.time() - t0


def _abstract(tree, shardings):
  return shd.abstract_with_shardings(tree, shardings)


def compile_train(parts, mesh, rules):
  """parts: (model, tx, hp, abstract state, abstract batch, abstract VAE params) from `train.plan.train_parts`."""
  from bagel_jax.train.step import jit_train_step

  model, tx, hp, state, batch, vae = parts
  ss = shd.train_state_shardings(state, mesh, rules)
  bs = shd.batch_shardings(batch, mesh, rules)
  vs = shd.replicated(vae, mesh)
  step = jit_train_step(model, tx, hp, mesh, rules, ss, bs, vs)
  return _timed_compile(step, _abstract(state, ss), _abstract(vae, vs), _abstract(batch, bs))


def _cache(model, rows: int, capacity: int):
  from bagel_jax.inference.kv_cache import KVCache

  llm = model.cfg.llm
  shape = (llm.num_hidden_layers, rows, capacity, llm.num_key_value_heads, llm.head_dim)
  kv = jax.ShapeDtypeStruct(shape, model.dtype)
  ints = jax.ShapeDtypeStruct((rows,), jnp.int32)
  return KVCache(kv, kv, ints, ints)


def check_denoise_image(shapes: Shapes, cfg) -> None:
  """ValueError naming --image when the denoised image does not fit the model's latent grid."""
  stride = cfg.latent_downsample
  if shapes.image <= 0 or shapes.image % stride:
    raise ValueError(f"--image {shapes.image} is not a positive multiple of the latent stride {stride}")
  g = shapes.image // stride
  if not cfg.interpolate_pos and g > cfg.max_latent_size:
    raise ValueError(f"--image {shapes.image} gives a {g}x{g} latent grid; this model's max_latent_size is "
                     f"{cfg.max_latent_size} (--image at most {cfg.max_latent_size * stride})")


def compile_denoise(model, mesh, rules, shapes: Shapes):
  from bagel_jax.inference import flow

  params = model.abstract_params()
  g = shapes.image // model.cfg.latent_downsample
  cache = _cache(model, shapes.contexts * shapes.images, shapes.context)
  ps = shd.param_shardings(params, mesh, rules)
  cs = flow.cache_shardings(cache, mesh, rules)
  step = flow.jit_denoise(model, mesh, ps, cs, grid=(g, g), num_contexts=shapes.contexts, renorm_type="global",
                          rules=rules)
  repl = jax.sharding.NamedSharding(mesh, jax.P())
  channels = params["bagel"]["vae2llm"]["kernel"].shape[0]
  x0 = jax.ShapeDtypeStruct((shapes.images, g * g, channels), jnp.float32, sharding=repl)
  one = lambda dt: jax.ShapeDtypeStruct((1,), dt, sharding=repl)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=repl)
  return _timed_compile(step, _abstract(params, ps), _abstract(cache, cs), x0, one(jnp.float32), one(jnp.float32),
                        one(jnp.bool_), scalar, scalar, scalar)


def compile_decode(model, mesh, rules, shapes: Shapes):
  from bagel_jax.inference import flow, text

  params = model.abstract_params()
  cache = _cache(model, shapes.decode_rows, shapes.context)
  ps = shd.param_shardings(params, mesh, rules)
  cs = flow.cache_shardings(cache, mesh, rules)
  repl = jax.sharding.NamedSharding(mesh, jax.P())

  def run(params, cache, tokens, active):
    with shd.use_rules(mesh, rules):
      return text.decode_step(model, model._bagel(params), cache, tokens, active)

  jitted = shd.MeshBound(jax.jit(run, in_shardings=(ps, cs, repl, repl), out_shardings=(repl, cs),
                                 donate_argnums=(1,)), mesh)
  rows = shapes.decode_rows
  return _timed_compile(jitted, _abstract(params, ps), _abstract(cache, cs),
                        jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=repl),
                        jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=repl))


__all__ = ["Shapes", "compile_train", "compile_denoise", "compile_decode"]

