"""The trainer's config: every key with upstream's defaults, and the checks made before anything compiles.

`base_config()` lists every key the trainer reads (`train/pretrain_unified_navit.py`'s defaults);
config files (`configs/NAME.py`) start from it. The checks here refuse a bad config in one line
naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from bagel_jax.train.errors import TrainConfigError


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with upstream's defaults (`train/pretrain_unified_navit.py`)."""
  c = ml_collections.ConfigDict()
  c.model = dict(
      preset="tiny",  # "tiny" | "7b_mot" | "shapes"; ignored when `checkpoint` is set
      checkpoint="",  # a folder with llm_config.json / vit_config.json (release or converted), or a Hugging Face repo id
      max_latent_size=0,  # 0: as the preset / checkpoint (the release: 64, i.e. 1024 px)
      param_dtype="float32",  # master weights
      dtype="float32",  # compute ("bfloat16" on accelerators)
      attention="auto",
      remat="none",
      unroll_layers=False,  # layers as straight-line code, not a scan: faster CPU steps for a few layers, slower compiles
  )
  c.init = dict(checkpoint="")  # "" random init; or a release folder (ema.safetensors), a converted Orbax folder or a repo id
  # init.hf: start from Hugging Face checkpoints as upstream pre-training does (llm/vit/vae paths and
  # upstream's model arguments, bagel_jax.weights.hf_init.HFInitArgs); "" llm = not used
  c.init.hf = _hf_defaults()
  c.tokenizer = "shapes"  # "shapes" or a tokenizer.json (or a folder holding one, e.g. the release folder)
  c.data = dict(
      groups={},  # name -> dict(format=..., weight=..., ...); see bagel_jax.data.pipeline
      rows=1,  # global batch: packed rows per step (upstream: 1 packed sequence per GPU)
      capacity=dict(tokens=36864, und=0, gen=0, vit=0, vae=0, ce=0, vae_images=0),  # 0: = tokens (vae_images: tokens/8)
      expected_tokens=32768,  # close a row once it holds this many tokens (upstream expected_num_tokens)
      max_tokens_per_sample=16384,  # longer samples are skipped (upstream max_num_tokens_per_sample)
      vae_max_size=1024, vae_min_size=512,  # upstream T2I/edit VAE transform (stride = latent_downsample)
      vit_max_size=980, vit_min_size=224, vit_max_pixels=14 * 14 * 9 * 1024,  # stride = ViT patch
      text_cond_dropout=0.1, vit_cond_dropout=0.3, vae_cond_dropout=0.3,
      ce_reweighting=False,
      seed=42,
      workers=0,  # grain worker processes (mp_prefetch); 0 = in-process
      read_threads=1, read_buffer=8,
      max_skip_fraction=0.25,  # corrupt / unreadable records skipped (and counted) up to this share of all read
  )
  c.optim = dict(lr=1e-4, schedule="constant", warmup_steps=2000, min_lr=1e-7, b1=0.9, b2=0.95, eps=1e-15,
                 weight_decay=0.0, clip=1.0, freeze_llm=False, freeze_vit=False, freeze_vit_connector=False,
                 freeze_und=False)
  c.train = dict(
      steps=500_000, seed=4396, ce_weight=1.0, mse_weight=1.0, timestep_shift=1.0,
      ema_decay=0.9999,  # 0: no EMA
      log_every=10, save_every=2000, keep=3, async_save=True, max_nonfinite_streak=10,
      mesh="",  # e.g. "fsdp=8" or "data=2,fsdp=4"; "" = every device on fsdp
      sharding_rules={},  # logical axis -> mesh axes over sharding.DEFAULT_RULES, e.g. {"embed": "fsdp", "mlp": ""}
      peak_tflops=0.0,  # per device, for the MFU estimate (0: from the device kind, if known)
      grad_accum_steps=1,  # micro-batches of data.rows rows per optimizer step (one compiled lax.scan)
  )
  c.vae_stage = dict(steps=0, group="", batch=32, lr=1e-3, kl_weight=1e-6, seed=0, stats_images=1024)
  c.eval = dict(kind="", use_ema=True, cfg_scale=4.0, num_steps=25, timestep_shift=1.0, gen_prompts_per_combo=4,
                und_images=200, seed=0, split="test")
  c.debug = dict(  # for the tests
      hang_after_step=-1,  # after saving this step (save complete), wait to be killed
      hang_during_save_step=-1,  # hold this step's async save just before it commits, wait to be killed
      nonfinite_batches=False,  # every batch's images are NaN: each step's loss is non-finite
  )
  return c


def _hf_defaults() -> dict:
  import dataclasses
  from bagel_jax.weights.hf_init import HFInitArgs
  return dataclasses.asdict(HFInitArgs())


def check_mesh(config) -> None:
  """train.mesh fits the devices and data.rows splits over the batch axes (no compilation)."""
  from bagel_jax import sharding as shd
  if int(config.train.grad_accum_steps) < 1:
    raise TrainConfigError(f"train.grad_accum_steps={config.train.grad_accum_steps} must be at least 1")
  rules = sharding_rules(config)
  try:
    mesh = shd.make_mesh(config.train.mesh or None)
  except shd.ShardingError as e:
    raise TrainConfigError(f"train.mesh={config.train.mesh!r}: {e}") from None
  n = shd.batch_shards(mesh, rules)
  if int(config.data.rows) % n:
    raise TrainConfigError(f"data.rows={config.data.rows} does not split over the batch mesh axes "
                           f"({shd.describe(mesh)}: {n} shards); set data.rows to a multiple of {n} or change train.mesh")


def sharding_rules(config):
  """sharding.DEFAULT_RULES with `train.sharding_rules` applied (config data, checked in `prepare`)."""
  from bagel_jax import sharding as shd
  r = config.train.sharding_rules
  return shd.rules_with(r.to_dict() if hasattr(r, "to_dict") else r)


def dtype_of(name: str):
  import jax.numpy as jnp
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise TrainConfigError(f"dtype {name!r}: expected float32, bfloat16 or float16") from None


def model_config(config):
  cfg = _model_config(config)
  if int(config.model.get("max_latent_size", 0) or 0):
    cfg = cfg.replace(max_latent_size=int(config.model.max_latent_size))
  return cfg


def _model_config(config):
  from bagel_jax.config import bagel_7b_mot, bagel_tiny, load_config
  from bagel_jax.train import init_hf
  hf = init_hf.hf_args(config)
  if hf is not None:
    return init_hf.open_hf(hf).cfg
  m = config.model
  if m.checkpoint:
    from bagel_jax.weights.hub import resolve_checkpoint
    return load_config(resolve_checkpoint(m.checkpoint, need_tokenizer=False))
  presets = {"tiny": bagel_tiny, "7b_mot": bagel_7b_mot}
  if m.preset == "shapes":
    from bagel_jax.data import shapes
    return shapes.model_config()
  if m.preset not in presets:
    raise TrainConfigError(f"model.preset={m.preset!r}: expected one of {sorted(presets) + ['shapes']} "
                           "(or set model.checkpoint)")
  return presets[m.preset]()


def check_tokenizer(tok, cfg) -> None:
  specials = dataclasses.asdict(cfg.tokens)
  top = max(specials.values())
  if top >= cfg.llm.vocab_size:
    raise TrainConfigError(f"special token id {top} is outside the model's vocabulary ({cfg.llm.vocab_size})")
  if tok.vocab_size > cfg.llm.vocab_size:
    raise TrainConfigError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's vocabulary "
                           f"({cfg.llm.vocab_size})")


def _config_file(args) -> str | None:
  for i, a in enumerate(args):
    if a == "--config" and i + 1 < len(args):
      return args[i + 1]
    if a.startswith("--config="):
      return a.split("=", 1)[1]
  return None


def check_overrides(args) -> None:
  """Refuses `--config.a.b=v` keys the config does not have, naming the closest existing key."""
  import difflib
  import importlib.util

  path = _config_file(args)
  if path is None:
    return
  file, _, arg = path.partition(":")
  if not os.path.isfile(file):
    raise TrainConfigError(f"config file {file} not found")
  spec = importlib.util.spec_from_file_location("_bagel_config", file)
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except SyntaxError as e:
    raise TrainConfigError(f"config file {file}: {type(e).__name__}: {e}") from None
  if not callable(getattr(mod, "get_config", None)):
    raise TrainConfigError(f"config file {file} has no get_config() function (an ml_collections config file "
                           "defines get_config() returning the config)")
  cfg = mod.get_config(arg) if arg else mod.get_config()
  for a in args:
    if not a.startswith("--config."):
      continue
    key = a[len("--config."):].split("=", 1)[0]
    node, walked = cfg, []
    for part in key.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        near = difflib.get_close_matches(part, keys, n=1)
        where = ".".join(walked) or "the config"
        hint = f"; did you mean {'.'.join(walked + [near[0]])}?" if near else f" (it has: {', '.join(sorted(keys))})"
        raise TrainConfigError(f"unknown config key {key!r}: {where} has no {part!r}{hint}")
      node = node[part]
      walked.append(part)
