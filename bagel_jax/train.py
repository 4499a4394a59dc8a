"""Training: `python -m bagel_jax.train --config configs/NAME.py [--config.key=value ...] --workdir DIR`.

One run, in this order (everything that can be refused is checked before anything compiles):
1. the config: model (a preset, or an upstream/converted checkpoint folder), tokenizer, optimizer,
   data groups (paths exist, datasets are not empty, image sizes fit the position tables);
2. the VAE stage, if `vae_stage.steps > 0` and `WORKDIR/vae` does not exist yet (the shapes demo
   trains its tiny VAE here; it is frozen afterwards, like upstream's FLUX VAE);
3. the train state: restored from the latest checkpoint in `WORKDIR/checkpoints` (model,
   optimizer, EMA, step, RNG and the data iterator: the run continues exactly as if it had not
   stopped), or initialised (random, or from `init.checkpoint`: an upstream release folder with
   `ema.safetensors` or a converted Orbax folder);
4. the loop: `train_step.jit_train_step` on the mesh (`train.mesh`, default all devices on
   'fsdp'), metrics every `train.log_every` steps to the console (tqdm), `WORKDIR/metrics.jsonl`
   and TensorBoard (`WORKDIR/tb`); async Orbax saves every `train.save_every` steps, keeping
   `train.keep`; SIGTERM saves and exits cleanly; a non-finite loss or gradient skips the update
   (counted), `train.max_nonfinite_streak` in a row stop the run;
5. the evaluation of `eval.kind` ("shapes": `bagel_jax.evaluate`), if any.

`base_config()` lists every key with upstream's defaults; config files start from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any

import ml_collections

_log = logging.getLogger("bagel_jax.train")


# ----------------------------------------------------------------------------- the config
def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with upstream's defaults (`train/pretrain_unified_navit.py`)."""
  c = ml_collections.ConfigDict()
  c.model = dict(
      preset="tiny",  # "tiny" | "7b_mot" | "shapes"; ignored when `checkpoint` is set
      checkpoint="",  # a folder with llm_config.json / vit_config.json (release or converted): the model config
      max_latent_size=0,  # 0: as the preset / checkpoint (the release: 64, i.e. 1024 px)
      param_dtype="float32",  # master weights
      dtype="float32",  # compute ("bfloat16" on accelerators)
      attention="auto",
      remat="none",
  )
  c.init = dict(checkpoint="")  # "" random init; or a release folder (ema.safetensors) or a converted Orbax folder
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
  )
  c.vae_stage = dict(steps=0, group="", batch=32, lr=1e-3, kl_weight=1e-6, seed=0, stats_images=1024)
  c.eval = dict(kind="", use_ema=True, cfg_scale=4.0, num_steps=25, timestep_shift=1.0, gen_prompts_per_combo=4,
                und_images=200, seed=0, split="test")
  c.debug = dict(hang_after_step=-1)  # tests: after saving this step, wait to be killed
  return c


class TrainConfigError(ValueError):
  """A config the trainer refuses before building anything."""


def check_mesh(config) -> None:
  """train.mesh fits the devices and data.rows splits over the batch axes (no compilation)."""
  from bagel_jax import sharding as shd
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


def _dtype(name: str):
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
  m = config.model
  if m.checkpoint:
    return load_config(m.checkpoint)
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


# ----------------------------------------------------------------------------- set-up (no compilation)
@dataclasses.dataclass
class Setup:
  config: Any
  workdir: pathlib.Path
  model_cfg: Any
  tokenizer: Any
  data: Any  # PackBatches
  group_names: list


def prepare(config, workdir) -> Setup:
  """Validates the config and builds the data pipeline; raises a one-line error before any compile."""
  from bagel_jax.data import pipeline
  from bagel_jax.data.tokenizer import load_tokenizer
  from bagel_jax import optim
  import jax

  workdir = pathlib.Path(workdir)
  t = config.train
  for k in ("steps", "log_every"):
    if int(t[k]) <= 0:
      raise TrainConfigError(f"train.{k}={t[k]} must be positive")
  if not 0.0 <= float(t.ema_decay) < 1.0:
    raise TrainConfigError(f"train.ema_decay={t.ema_decay} must be in [0, 1)")
  _dtype(config.model.param_dtype), _dtype(config.model.dtype)
  optim.schedule(config.optim, int(t.steps))  # refuses a bad schedule
  from bagel_jax.attention.api import IMPLS
  from bagel_jax.model.qwen2_mot import REMAT_POLICIES
  if config.model.remat not in REMAT_POLICIES:
    raise TrainConfigError(f"model.remat={config.model.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
  if config.model.attention not in IMPLS:
    raise TrainConfigError(f"model.attention={config.model.attention!r}: expected one of {IMPLS}")
  cfg = model_config(config)
  tok = load_tokenizer(config.tokenizer)
  check_tokenizer(tok, cfg)
  data = pipeline.make_pipeline(config.data, cfg, tok, seed=int(config.data.seed),
                                process_index=jax.process_index(), process_count=jax.process_count())
  check_mesh(config)
  if config.vae_stage.steps and config.vae_stage.group not in config.data.groups:
    raise TrainConfigError(f"vae_stage.group={config.vae_stage.group!r} is not a data group "
                           f"({sorted(config.data.groups)})")
  if config.eval.kind not in ("", "shapes"):
    raise TrainConfigError(f"eval.kind={config.eval.kind!r}: expected '' or 'shapes'")
  if config.eval.kind and jax.process_count() > 1:
    raise TrainConfigError(f"eval.kind={config.eval.kind!r} runs in a single process; set --config.eval.kind= "
                           "for multi-process runs and evaluate the checkpoint afterwards")
  return Setup(config, workdir, cfg, tok, data, pipeline.group_names(config.data))


# ----------------------------------------------------------------------------- the VAE stage
def vae_stage(setup: Setup):
  """Trains the (tiny) VAE on one data group's images; returns (vae params, stats). Saved in WORKDIR/vae."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from bagel_jax import checkpointing
  from bagel_jax.data import pipeline
  from bagel_jax.data.transforms import decode_image
  from bagel_jax.model.autoencoder import AutoEncoder

  config, cfg = setup.config, setup.model_cfg
  vs = config.vae_stage
  out = setup.workdir / "vae"
  stats_file = setup.workdir / "vae_stats.json"
  ae_abstract = nnx.eval_shape(lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(params=0)))
  gdef, abstract_state = nnx.split(ae_abstract)
  abstract = nnx.to_pure_dict(abstract_state)
  if stats_file.is_file() and out.is_dir():
    return checkpointing.load_params(out, abstract), json.loads(stats_file.read_text())

  g = dict(config.data.groups[vs.group])
  src = pipeline.make_source(vs.group, g)
  vae_t, _ = pipeline.transforms_for(config.data, g, cfg)
  key = g.get("image_key", "image")
  n = len(src)
  t0 = time.time()
  images = np.stack([vae_t(decode_image(_as_bytes(src[i][key]))) for i in range(n)])
  if len({im.shape for im in images}) != 1:
    raise TrainConfigError("the VAE stage needs images of one size")
  _log.info("VAE stage: %d images %s decoded in %.1fs", n, images.shape[1:], time.time() - t0)

  model = AutoEncoder(cfg.vae, rngs=nnx.Rngs(params=int(vs.seed)))
  _, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adam(optax.warmup_cosine_decay_schedule(0.0, float(vs.lr), min(100, int(vs.steps) // 10),
                                                                 int(vs.steps), float(vs.lr) * 0.05)))
  opt = tx.init(params)

  def merged(p):
    st = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(st, p)
    return nnx.merge(gdef, st)

  def loss_fn(p, x, rng):
    ae = merged(p)
    moments = ae.encode_moments(x)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    rec = ae.decoder(z)
    l1 = jnp.mean(jnp.abs(rec - x))
    l2 = jnp.mean((rec - x) ** 2)
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    return l1 + l2 + float(vs.kl_weight) * kl, (l2, kl)

  @jax.jit
  def step(p, o, x, rng):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x, rng)
    upd, o = tx.update(grads, o, p)
    return optax.apply_updates(p, upd), o, loss, aux

  rng = np.random.default_rng(int(vs.seed))
  key_ = jax.random.key(int(vs.seed))
  from tqdm import tqdm
  bar = tqdm(range(int(vs.steps)), desc="VAE stage", dynamic_ncols=True, mininterval=2.0)
  for i in bar:
    x = images[rng.integers(0, n, int(vs.batch))]
    key_, k = jax.random.split(key_)
    params, opt, loss, (l2, kl) = step(params, opt, jnp.asarray(x), k)
    if i % 50 == 0 or i == int(vs.steps) - 1:
      bar.set_postfix(loss=f"{float(loss):.4f}", mse=f"{float(l2):.5f}", kl=f"{float(kl):.1f}")

  # Latent statistics -> scale/shift so the LLM sees unit-variance latents (as FLUX's 0.3611 / 0.1159).
  @jax.jit
  def enc(p, x, rng):
    mean, logvar = jnp.split(merged(p).encode_moments(x), 2, axis=-1)
    return mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(rng, mean.shape)

  @jax.jit
  def recon(p, x):
    ae = merged(p)
    mean, _ = jnp.split(ae.encode_moments(x), 2, axis=-1)
    return ae.decoder(mean)

  m = min(n, int(vs.stats_images))
  zs = np.concatenate([np.asarray(enc(params, jnp.asarray(images[i:i + 256]), jax.random.key(i)))
                       for i in range(0, m, 256)])
  rec_mse = float(np.mean([np.mean((np.asarray(recon(params, jnp.asarray(images[i:i + 256]))) - images[i:i + 256]) ** 2)
                           for i in range(0, m, 256)]))
  stats = {"shift_factor": float(zs.mean()), "scale_factor": float(1.0 / max(zs.std(), 1e-6)),
           "recon_mse": rec_mse, "steps": int(vs.steps), "images": n, "seconds": round(time.time() - t0, 1)}
  _log.info("VAE stage done: %s", stats)
  # Every process trained the same VAE (same seed and data). The parameters are saved to `out` by
  # `run` from all processes at once (Orbax's saves are collective); the stats file by process 0.
  if jax.process_index() == 0:
    stats_file.write_text(json.dumps(stats, indent=1))
  return params, stats


def _as_bytes(x):
  import numpy as np
  if isinstance(x, np.ndarray):
    x = x.item()
  return bytes(x)


# ----------------------------------------------------------------------------- metrics
_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "v5p": 459.0, "v5 lite": 197.0, "v5e": 197.0,
                "v4": 275.0, "v6": 918.0}


def peak_flops(config) -> float | None:
  import jax
  if float(config.train.peak_tflops) > 0:
    return float(config.train.peak_tflops) * 1e12 * jax.device_count()
  kind = jax.devices()[0].device_kind.lower()
  for k, v in _PEAK_TFLOPS.items():
    if k in kind:
      return v * 1e12 * jax.device_count()
  return None


def flops_per_token(cfg) -> float:
  """Training FLOPs per LLM token: 6 x the parameters one token passes through (one expert)."""
  llm = cfg.llm
  d, f, hd = llm.hidden_size, llm.intermediate_size, llm.head_dim
  per_layer = d * (llm.num_attention_heads * hd) * 2 + d * (llm.num_key_value_heads * hd) * 2 + 3 * d * f
  return 6.0 * llm.num_hidden_layers * per_layer


def attention_flops(cfg, sum_sq_len: float) -> float:
  """fwd+bwd attention score/value FLOPs for samples of these lengths (masked blocks counted as half)."""
  llm = cfg.llm
  return 6.0 * llm.num_hidden_layers * llm.num_attention_heads * llm.head_dim * sum_sq_len


class MetricsWriter:

  def __init__(self, workdir: pathlib.Path, enabled: bool):
    self.enabled = enabled
    self.file = open(workdir / "metrics.jsonl", "a") if enabled else None
    self.tb = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(workdir / "tb"))
      except Exception as e:  # noqa: BLE001
        _log.warning("no TensorBoard logs: %s", e)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self.file.write(json.dumps({"step": step, **metrics}) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(f"train/{k}", v, step)
      self.tb.flush()

  def close(self) -> None:
    if self.file:
      self.file.close()
    if self.tb is not None:
      self.tb.close()


# ----------------------------------------------------------------------------- the run
def _init_params(setup: Setup, model, vae_params, shardings, vae_shardings):
  """Fresh parameters: from init.checkpoint, else random (the VAE from the stage if there is one)."""
  import jax
  from flax import nnx

  from bagel_jax.model.autoencoder import AutoEncoder
  from bagel_jax.model.bagel import Bagel

  config = setup.config
  src = config.init.checkpoint
  if src:
    folder = pathlib.Path(src)
    abstract = model.abstract_params()
    if (folder / "state").is_dir():
      # Each device reads only its own slices, straight into the target shardings.
      from bagel_jax.checkpoint import load_checkpoint
      params = load_checkpoint(folder, shardings={"bagel": shardings, "vae": vae_shardings})
    elif (folder / "ema.safetensors").is_file():
      from bagel_jax import weights
      from bagel_jax.config import load_config
      release = load_config(folder)
      if release.llm != model.cfg.llm or release.vit != model.cfg.vit:
        raise TrainConfigError(f"init.checkpoint={src}: its llm/vit configs differ from the model's "
                               "(set model.checkpoint to the same folder)")
      params = weights.load_upstream(folder, model.cfg, abstract)  # host arrays, placed below
    else:
      raise TrainConfigError(f"init.checkpoint={src}: neither a converted Orbax folder (state/) nor a release "
                             "folder (ema.safetensors)")
    cast = lambda x, a: x.astype(a.dtype)  # noqa: E731  (master weights in param_dtype)
    bagel = jax.device_put(jax.tree.map(cast, params["bagel"], abstract["bagel"]), shardings)
    vae = jax.tree.map(cast, params["vae"], abstract["vae"]) if vae_params is None else vae_params
    return bagel, jax.device_put(vae, vae_shardings)

  seed = int(config.train.seed)
  # Small models: eager init (XLA compiles random-init graphs slowly on CPU), then placed.
  # Large ones: jitted straight into their shardings, so no device ever holds a whole copy.
  eager = sum(x.size for x in jax.tree.leaves(model.abstract_params())) < EAGER_INIT_MAX_PARAMS

  def init_bagel(key):
    b = Bagel(model.cfg, rngs=nnx.Rngs(params=key), param_dtype=model.param_dtype, dtype=model.dtype,
              attention_impl=model.attention_impl, remat=model.remat)
    return nnx.to_pure_dict(nnx.state(b))

  def init_vae(key):
    return nnx.to_pure_dict(nnx.state(AutoEncoder(model.cfg.vae, rngs=nnx.Rngs(params=key))))

  def make(fn, key, sh):
    return jax.device_put(fn(key), sh) if eager else jax.jit(fn, out_shardings=sh)(key)

  bagel = make(init_bagel, jax.random.key(seed), shardings)
  if vae_params is None:
    vae_params = make(init_vae, jax.random.key(seed + 1), vae_shardings)
  return bagel, jax.device_put(vae_params, vae_shardings)


EAGER_INIT_MAX_PARAMS = 200_000_000


class _Stop:
  """SIGTERM -> finish the current step, save, exit."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    def handler(signum, frame):
      del frame
      self.requested = True
      _log.warning("signal %d received: saving and stopping after this step", signum)
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def run(config, workdir) -> dict:
  """The whole run (see the module docstring). Returns the last logged metrics (+ eval results)."""
  setup = prepare(config, workdir)  # refuses bad input before anything compiles

  import jax
  import numpy as np
  from tqdm import tqdm

  from bagel_jax import checkpointing, optim
  from bagel_jax import sharding as shd
  from bagel_jax import train_step as ts
  from bagel_jax.api import BagelModel

  workdir = setup.workdir
  workdir.mkdir(parents=True, exist_ok=True)
  _log.info("config and data checked (%d group(s): %s)", len(setup.group_names), ", ".join(setup.group_names))
  is_main = jax.process_index() == 0
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
  cfg = setup.model_cfg

  # VAE: trained here (demo), or frozen from the checkpoint / random init.
  vae_params = None
  if int(config.vae_stage.steps) > 0:
    vae_params, stats = vae_stage(setup)
    cfg = cfg.replace(vae=dataclasses.replace(cfg.vae, scale_factor=stats["scale_factor"],
                                              shift_factor=stats["shift_factor"]))
  model = BagelModel(cfg, param_dtype=_dtype(config.model.param_dtype), dtype=_dtype(config.model.dtype),
                     attention_impl=config.model.attention, remat=config.model.remat)

  mesh = shd.make_mesh(config.train.mesh or None)
  rules = sharding_rules(config)
  abstract = model.abstract_params()
  param_sh = shd.param_shardings(abstract["bagel"], mesh, rules)
  repl = jax.sharding.NamedSharding(mesh, jax.P())
  vae_sh = jax.tree.map(lambda _: repl, abstract["vae"])

  steps = int(config.train.steps)
  tx, sched = optim.make_optimizer(config.optim, abstract["bagel"], steps)
  patterns = optim.frozen_patterns(config.optim)
  ema = float(config.train.ema_decay) > 0
  hp = ts.StepConfig(ce_weight=float(config.train.ce_weight), mse_weight=float(config.train.mse_weight),
                     timestep_shift=float(config.train.timestep_shift),
                     ema_decay=float(config.train.ema_decay) if ema else None, frozen=patterns)
  abstract_state = jax.eval_shape(lambda p: ts.init_train_state(p, tx, jax.random.key(0), ema), abstract["bagel"])
  state_sh = shd.train_state_shardings(abstract_state, mesh, rules)

  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", keep=int(config.train.keep),
                                    save_every=int(config.train.save_every), async_save=bool(config.train.async_save))
  data_iter = iter(setup.data)
  start = ckpt.latest_step()
  vae_file = workdir / "vae"
  if start is not None:
    target = shd.abstract_with_shardings(abstract_state, state_sh)
    state, data_state, _ = ckpt.restore(start, target)
    data_iter.set_state(data_state)
    vae_abs = shd.abstract_with_shardings(abstract["vae"], vae_sh)
    vae_params = checkpointing.load_params(vae_file, vae_abs) if vae_params is None else jax.device_put(vae_params, vae_sh)
    _log.info("resumed from %s at step %d", ckpt.directory, start)
  else:
    t0 = time.time()
    bagel, vae_params = _init_params(setup, model, vae_params, param_sh, vae_sh)
    _log.info("parameters ready (%.1fs)", time.time() - t0)
    if not _all_agree(vae_file.exists()):  # Orbax saves are collective: every process takes part
      checkpointing.save_params(vae_file, vae_params)
      _log.info("saved the VAE parameters (%.1fs)", time.time() - t0)
    init = ts.jit_init_train_state(tx, mesh, state_sh, ema)
    state = init(bagel, jax.random.key_data(jax.random.key(int(config.train.seed) + 2)))
    start = 0
    _log.info("initialised the train state")
  n_train, n_frozen = optim.count_params(abstract["bagel"], patterns)
  _log.info("model: %s trainable / %s frozen parameters (+ VAE %s, frozen); mesh %s", f"{n_train:,}",
            f"{n_frozen:,}", f"{sum(x.size for x in jax.tree.leaves(abstract['vae'])):,}", shd.describe(mesh))

  step_fn = None  # built at the first batch (static shapes: one compile)
  writer = MetricsWriter(workdir, is_main)
  peak = peak_flops(config)
  fpt = flops_per_token(cfg)
  log_every = int(config.train.log_every)
  hang = int(config.debug.hang_after_step)
  max_streak = int(config.train.max_nonfinite_streak)
  streak = int(jax.device_get(state.nonfinite_streak))
  nonfinite_total = int(jax.device_get(state.nonfinite_total))
  acc: list = []
  last: dict = {}
  t_last, tok_acc, flops_acc = time.time(), 0, 0.0
  meta = {"config": json.loads(config.to_json_best_effort()), "model": repr(cfg)}
  bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True, disable=not is_main, mininterval=1.0)
  pending = None  # (step, metrics, info) of the step in flight

  def finish(pending_item):
    """Host side of a finished step: streak check and logging."""
    nonlocal streak, t_last, tok_acc, flops_acc, last, nonfinite_total
    s, metrics, info = pending_item
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    streak = streak + 1 if m["skipped"] else 0
    nonfinite_total += int(m["skipped"])
    if max_streak and streak >= max_streak:
      raise FloatingPointError(f"{streak} steps in a row had a non-finite loss or gradient (last at step {s}); "
                               "stopping. Lower the learning rate or check the data.")
    acc.append(m)
    tok_acc += info["tokens"]
    flops_acc += fpt * info["tokens"] + attention_flops(cfg, info["tokens_sq"])
    if s % log_every == 0 or s == steps:
      dt = max(time.time() - t_last, 1e-9)
      out = {k: float(np.mean([a[k] for a in acc])) for k in ("loss", "ce", "mse", "grad_norm")}
      out.update(lr=float(optim.current_lr(sched, state.opt_state)) if s else 0.0,
                 tokens_per_s=tok_acc / dt, steps_per_s=len(acc) / dt,
                 skipped_samples=info["skipped"] + info["oversized"], nonfinite_updates=nonfinite_total,
                 samples=info["samples"])
      if peak:
        out["mfu"] = flops_acc / dt / peak
      for g, k in info["samples_per_group"].items():
        name = setup.group_names[int(g)] if int(g) < len(setup.group_names) else g
        out[f"samples/{name}"] = k
      writer.write(s, out)
      bar.set_postfix(loss=f"{out['loss']:.4f}", ce=f"{out['ce']:.3f}", mse=f"{out['mse']:.4f}")
      last = {"step": s, **out}
      acc.clear()
      t_last, tok_acc, flops_acc = time.time(), 0, 0.0

  with _Stop() as stop:
    step = start
    try:
      while step < steps:
        arrays, info = next(data_iter)
        info = dict(info, tokens_sq=_tokens_sq(arrays["layout"]))
        batch = ts.TrainBatch(layout=arrays["layout"], vit_patches=arrays["vit_patches"],
                              vae_images=arrays["vae_images"])
        if step_fn is None:
          # This process holds rows / process_count of the global batch: shard the global shape.
          n_proc = jax.process_count()
          global_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * n_proc,) + x.shape[1:], x.dtype),
                                      jax.eval_shape(lambda b: b, batch))
          batch_sh = shd.batch_shardings(global_batch, mesh, rules)
          step_fn = ts.jit_train_step(model, tx, hp, mesh, rules, state_sh, batch_sh, vae_sh)
          t0 = time.time()
          _log.info("compiling the train step (%s rows x %d tokens)", arrays["layout"].token_kind.shape[0],
                    arrays["layout"].token_kind.shape[1])
        gbatch = shd.host_local_to_global(batch, batch_sh)
        state, metrics = step_fn(state, vae_params, gbatch)
        if step == start:
          jax.block_until_ready(metrics)
          _log.info("first step (compile + run) took %.1fs", time.time() - t0)
          t_last = time.time()
        if pending is not None:
          finish(pending)
        step += 1
        pending = (step, metrics, info)
        bar.update(1)
        saving = ckpt.should_save(step) or stop.requested or step == steps or step == hang
        if saving:
          finish(pending)
          pending = None
          ckpt.save(step, state, data_iter.get_state(), meta, force=True)
        if step == hang:
          ckpt.wait()
          (workdir / f"HANG_{step}").write_text("waiting to be killed\n")
          while True:
            time.sleep(1.0)
        if stop.requested:
          _log.warning("stopped by signal at step %d (checkpoint saved)", step)
          break
      if pending is not None:
        finish(pending)
    finally:
      bar.close()
      ckpt.close()
      writer.close()

  result = dict(last)
  if config.eval.kind == "shapes" and not stop.requested and step >= steps:
    from bagel_jax import evaluate
    params = {"bagel": state.ema if (config.eval.use_ema and state.ema is not None) else state.params,
              "vae": vae_params}
    result["eval"] = evaluate.evaluate_shapes(model, params, setup.tokenizer, config, workdir)
  if is_main:
    (workdir / "result.json").write_text(json.dumps(result, indent=1, default=str))
  return result


def _all_agree(flag: bool) -> bool:
  """Process 0's answer on every process (a file-system check may race with another process's write)."""
  import jax
  import numpy as np
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _tokens_sq(layout) -> float:
  """Sum over packed samples of length^2 (for the attention FLOP estimate)."""
  import numpy as np
  sid = np.asarray(layout.sample_ids)
  total = 0.0
  for row in sid:
    _, counts = np.unique(row[row >= 0], return_counts=True)
    total += float(np.sum(counts.astype(np.float64) ** 2))
  return total


# ----------------------------------------------------------------------------- the command line
def main(argv=None) -> None:
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "a config file (configs/NAME.py); override keys with "
                                  "--config.key=value", lock_config=True)
  flags.DEFINE_string("workdir", None, "where checkpoints, logs, metrics and samples go")
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("bagel_jax")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    from bagel_jax.sharding import initialize_distributed
    initialize_distributed()
    try:
      result = run(flags.FLAGS.config, flags.FLAGS.workdir)
    except _refused() as e:
      print(f"bagel_jax.train: error: {e}", file=sys.stderr)
      sys.exit(2)
    if "eval" in result:
      print(json.dumps(result["eval"], indent=1))

  def parse(args):
    try:
      check_overrides(args)
    except TrainConfigError as e:
      print(f"bagel_jax.train: error: {e}", file=sys.stderr)
      sys.exit(2)
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      print(f"bagel_jax.train: error: {e}", file=sys.stderr)
      sys.exit(2)
    except (KeyError, AttributeError, ValueError, TypeError) as e:
      print(f"bagel_jax.train: error: bad config override: {str(e).splitlines()[0]}", file=sys.stderr)
      sys.exit(2)

  app.run(_main, argv=argv, flags_parser=parse)


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
  spec.loader.exec_module(mod)
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


def _refused():
  from bagel_jax.config import ConfigError
  from bagel_jax.data.samples import SampleError
  from bagel_jax.data.sources import DataError
  from bagel_jax.data.tokenizer import TokenizerError
  from bagel_jax.layout import LayoutError
  from bagel_jax.optim import OptimConfigError
  from bagel_jax.checkpointing import CheckpointMismatch
  from bagel_jax.weights import CheckpointError
  from bagel_jax.sharding import ShardingError
  return (ShardingError, TrainConfigError, ConfigError, DataError, TokenizerError, LayoutError, OptimConfigError, SampleError,
          CheckpointMismatch, CheckpointError, FloatingPointError)


if __name__ == "__main__":
  main()
