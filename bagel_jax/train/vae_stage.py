"""The VAE stage of the shapes demo: a tiny VAE trained on one data group's images, then frozen.

Upstream starts from FLUX's released VAE; the CPU demo trains its own tiny one first, and derives
the latent scale/shift factors (as FLUX's 0.3611 / 0.1159) so the LLM sees unit-variance latents.
The parameters go to `WORKDIR/vae` (saved by the loop from every process: Orbax saves are
collective), the statistics to `WORKDIR/vae_stats.json`; a rerun reuses both.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bagel_jax.model.autoencoder import AutoEncoder
from bagel_jax.train.config import TrainConfigError

_log = logging.getLogger("bagel_jax.train")


def as_bytes(x) -> bytes:
  if isinstance(x, np.ndarray):
    x = x.item()
  return bytes(x)


def stage_images(config, cfg, group: str) -> np.ndarray:
  """Every image of data group `group`, decoded and transformed as the VAE sees them: [N, H, W, 3]."""
  from bagel_jax.data import pipeline
  from bagel_jax.data.transforms import decode_image

  g = dict(config.data.groups[group])
  src = pipeline.make_source(group, g)
  vae_t, _ = pipeline.transforms_for(config.data, g, cfg)
  key = g.get("image_key", "image")
  images = np.stack([vae_t(decode_image(as_bytes(src[i][key]))) for i in range(len(src))])
  if len({im.shape for im in images}) != 1:
    raise TrainConfigError("the VAE stage needs images of one size")
  return images


def _vae_loss(merged: Callable, kl_weight: float):
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
    return l1 + l2 + kl_weight * kl, (l2, kl)
  return loss_fn


def train_vae(vs, params: Any, merged: Callable, images: np.ndarray) -> Any:
  """`vs.steps` Adam steps (warmup + cosine) on random batches of `images`; returns the parameters."""
  from tqdm import tqdm

  steps = int(vs.steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adam(optax.warmup_cosine_decay_schedule(0.0, float(vs.lr), min(100, steps // 10),
                                                                 steps, float(vs.lr) * 0.05)))
  opt = tx.init(params)
  loss_fn = _vae_loss(merged, float(vs.kl_weight))

  @jax.jit
  def step(p, o, x, rng):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x, rng)
    upd, o = tx.update(grads, o, p)
    return optax.apply_updates(p, upd), o, loss, aux

  rng = np.random.default_rng(int(vs.seed))
  key = jax.random.key(int(vs.seed))
  bar = tqdm(range(steps), desc="VAE stage", dynamic_ncols=True, mininterval=2.0)
  for i in bar:
    x = images[rng.integers(0, len(images), int(vs.batch))]
    key, k = jax.random.split(key)
    params, opt, loss, (l2, kl) = step(params, opt, jnp.asarray(x), k)
    if i % 50 == 0 or i == steps - 1:
      bar.set_postfix(loss=f"{float(loss):.4f}", mse=f"{float(l2):.5f}", kl=f"{float(kl):.1f}")
  return params


def latent_stats(params: Any, merged: Callable, images: np.ndarray, m: int) -> dict[str, float]:
  """Shift/scale factors of posterior samples of the first `m` images (in batches of 256, the last one
  full), and the reconstruction MSE."""

  @jax.jit
  def enc(p, x, rng):
    mean, logvar = jnp.split(merged(p).encode_moments(x), 2, axis=-1)
    return mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(rng, mean.shape)

  @jax.jit
  def recon(p, x):
    ae = merged(p)
    mean, _ = jnp.split(ae.encode_moments(x), 2, axis=-1)
    return ae.decoder(mean)

  zs = np.concatenate([np.asarray(enc(params, jnp.asarray(images[i:i + 256]), jax.random.key(i)))
                       for i in range(0, m, 256)])
  rec_mse = float(np.mean([np.mean((np.asarray(recon(params, jnp.asarray(images[i:i + 256]))) - images[i:i + 256]) ** 2)
                           for i in range(0, m, 256)]))
  return {"shift_factor": float(zs.mean()), "scale_factor": float(1.0 / max(zs.std(), 1e-6)), "recon_mse": rec_mse}


def vae_stage(setup) -> tuple[Any, dict]:
  """Trains the (tiny) VAE on one data group's images; returns (vae params, stats). Saved in WORKDIR/vae."""
  from bagel_jax.train import checkpoints

  config, cfg = setup.config, setup.model_cfg
  vs = config.vae_stage
  out = setup.workdir / "vae"
  stats_file = setup.workdir / "vae_stats.json"
  gdef, abstract_state = nnx.split(nnx.eval_shape(lambda: AutoEncoder(cfg.vae, rngs=nnx.Rngs(params=0))))
  if stats_file.is_file() and out.is_dir():
    return checkpoints.load_params(out, nnx.to_pure_dict(abstract_state)), json.loads(stats_file.read_text())

  t0 = time.time()
  images = stage_images(config, cfg, vs.group)
  n = len(images)
  _log.info("VAE stage: %d images %s decoded in %.1fs", n, images.shape[1:], time.time() - t0)

  def merged(p):
    st = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(st, p)
    return nnx.merge(gdef, st)

  params = nnx.to_pure_dict(nnx.split(AutoEncoder(cfg.vae, rngs=nnx.Rngs(params=int(vs.seed))))[1])
  params = train_vae(vs, params, merged, images)
  stats = latent_stats(params, merged, images, min(n, int(vs.stats_images)))
  stats.update(steps=int(vs.steps), images=n, seconds=round(time.time() - t0, 1))
  _log.info("VAE stage done: %s", stats)
  # Every process trained the same VAE (same seed and data); the stats file is written by process 0.
  if jax.process_index() == 0:
    stats_file.write_text(json.dumps(stats, indent=1))
  return params, stats
