"""The pure BAGEL train step (upstream `train/pretrain_unified_navit.py`, l.666-735).

    state = init_train_state(params["bagel"], tx, jax.random.key(0), ema=True)
    state, metrics = train_step(model, tx, hp, state, params["vae"], batch)   # pure; jit it
    step = jit_train_step(model, tx, hp, mesh, rules, state_shardings, batch_sharding)  # sharded + donated

One step:
1. splits `state.rng` into VAE-posterior, timestep and noise keys;
2. encodes the (zero-padded, NHWC, [-1, 1]) VAE images to a posterior *sample* under
   `stop_gradient` (upstream samples; the VAE is frozen and not in the trainable tree) and
   cuts the layout's latent tokens out of them;
3. draws one raw timestep u ~ N(0, 1) per VAE image (one per video clip: `Layout.vae_image_timestep`),
   t = shift(sigmoid(u)) for generation targets and t = 0 for clean (conditioning) images, and
   noise eps ~ N(0, I) per latent token;
4. loss = ce_weight * CE + mse_weight * MSE (`BagelModel.loss`, upstream's normalisation) with
   the params cast to the compute dtype (`StepConfig.cast_params`),
   gradients with respect to the trainable "bagel" tree; frozen leaves (`StepConfig.frozen`,
   by default the two fixed sin-cos tables) get zero gradient and are never changed;
5. if the loss, the gradient norm or the updated parameters are not finite (a NaN/inf learning
   rate, an overflowing update) the update is skipped (params, optimizer state and EMA unchanged) and `nonfinite_streak` / `nonfinite_total` count it; otherwise the streak
   resets. `step` counts calls (batches consumed); the optimizer's own count only advances on
   applied updates.
6. EMA: ema = d * ema + (1 - d) * param after every applied update (upstream: decay 0.9999).

`state.rng` is raw uint32 key data (so checkpoints hold plain arrays); `init_train_state`
accepts a typed key or raw key data.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from bagel_jax.api import BagelModel
from bagel_jax.train import accumulate
from bagel_jax.layout import Layout
from bagel_jax.model.bagel import Batch, shift_timesteps
from bagel_jax.sharding import MeshBound, path_str, use_rules

PyTree = Any

# Upstream's PositionEmbedding tables are requires_grad=False: never trained, never decayed.
FROZEN_TABLES = (r"(^|/)vit_pos_embed$", r"(^|/)latent_pos_embed$")


@flax.struct.dataclass
class TrainBatch:
  """What the data pipeline hands the step. Every field has the global batch axis B first."""

  layout: Layout
  vit_patches: jax.Array  # [B, Nv, 3*p*p] patchified ViT pixels in [-1, 1]
  vae_images: jax.Array  # [B, Ni, H, W, 3] NHWC in [-1, 1], zero-padded per row and per image


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of train_step calls
  params: PyTree  # the trainable "bagel" subtree (pure dict of arrays)
  opt_state: PyTree
  ema: PyTree | None  # same tree as params, or None
  rng: jax.Array  # uint32 raw key data (jax.random.key_data)
  nonfinite_streak: jax.Array  # int32: consecutive skipped steps
  nonfinite_total: jax.Array  # int32: all skipped steps


@dataclasses.dataclass(frozen=True)
class StepConfig:
  ce_weight: float = 1.0
  mse_weight: float = 1.0
  timestep_shift: float = 1.0
  ema_decay: float | None = None  # None: no EMA
  # Regexes matched (re.search) against "/"-joined parameter paths of the bagel tree, e.g.
  # "^llm/" for upstream's freeze_llm or "^(vit|connector)/" for freeze_vit.
  frozen: tuple[str, ...] = FROZEN_TABLES
  # Cast the (fp32 master) params to the model's compute dtype before the forward, as upstream's
  # FSDP MixedPrecision(param_dtype=bf16): FSDP all-gathers move half the bytes; gradients flow
  # back through the cast in the master dtype. A no-op when model.dtype is the params' dtype.
  # Off by default: the bf16 copy of the whole (sharded) tree lives through the step, which the
  # plan measured as +2.6 GiB per device on the 7B model at 32k tokens (fsdp=8).
  cast_params: bool = False
  # Micro-batches per optimizer step (`bagel_jax.train.accumulate`): the batch holds N x rows rows.
  grad_accum_steps: int = 1


# ----------------------------------------------------------------------------- helpers
def frozen_mask(params: PyTree, patterns: tuple[str, ...]) -> PyTree:
  """A tree of Python bools: True where a leaf's path matches one of `patterns`."""
  regs = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(lambda p, _: any(r.search(path_str(p)) for r in regs), params)


def _as_key_data(rng: jax.Array) -> jax.Array:
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return jnp.asarray(rng, jnp.uint32)


def init_train_state(params_bagel: PyTree, tx: optax.GradientTransformation, rng: jax.Array,
                     ema: bool) -> TrainState:
  """A fresh state. Pure: jit it with `out_shardings` to build it sharded (see `jit_init_train_state`)."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params_bagel,
      opt_state=tx.init(params_bagel),
      ema=jax.tree.map(jnp.copy, params_bagel) if ema else None,  # own buffers (donation)
      rng=_as_key_data(rng),
      nonfinite_streak=jnp.zeros((), jnp.int32),
      nonfinite_total=jnp.zeros((), jnp.int32),
  )


def timesteps_from_raw(raw: jax.Array, noisy: jax.Array, shift: float) -> jax.Array:
  """Upstream's training timesteps from raw draws u ~ N(0, 1): t = shift(sigmoid(u)) for generation
  targets, 0 for clean (conditioning) images (upstream: u = -inf, sigmoid(-inf) = 0)."""
  return jnp.where(noisy, shift_timesteps(jax.nn.sigmoid(raw), shift), 0.0)


def image_timesteps(key: jax.Array, lay: Layout, shape: tuple[int, int], shift: float) -> jax.Array:
  """[B, Ni] flow time per VAE image: one raw draw per image, the frames of a video clip sharing the
  draw of its first frame (`Layout.vae_image_timestep`; upstream draws t once per split)."""
  raw = jax.random.normal(key, shape, jnp.float32)
  if shape[1]:
    raw = jnp.take_along_axis(raw, lay.vae_image_timestep, axis=1)
  return timesteps_from_raw(raw, lay.vae_image_noisy > 0, shift)


def flow_batch(model: BagelModel, hp: StepConfig, vae_params: PyTree, batch: TrainBatch,
               rng: jax.Array) -> Batch:
  """TrainBatch -> the model's Batch: VAE posterior sample, per-image timesteps, noise."""
  lay = batch.layout
  k_vae, k_t, k_noise = jax.random.split(rng, 3)
  b, ni = batch.vae_images.shape[:2]
  nl = lay.vae_indexes.shape[1]
  pdim = model.cfg.patch_latent_dim
  if ni and nl:
    h, w = batch.vae_images.shape[2:4]
    imgs = batch.vae_images.reshape((b * ni, h, w, batch.vae_images.shape[-1]))
    lat = model.encode_images({"vae": vae_params}, imgs, k_vae)
    lat = jax.lax.stop_gradient(lat.astype(jnp.float32))
    x0 = model.latent_tokens(lat.reshape((b, ni) + lat.shape[1:]), lay)
  else:
    x0 = jnp.zeros((b, nl, pdim), jnp.float32)
  t_img = image_timesteps(k_t, lay, (b, ni), hp.timestep_shift)
  img = jnp.maximum(lay.vae_image_ids, 0)
  t_tok = jnp.take_along_axis(t_img, img, axis=1) if ni else jnp.zeros((b, nl), jnp.float32)
  t_tok = jnp.where(lay.vae_image_ids >= 0, t_tok, 0.0)
  noise = jax.random.normal(k_noise, (b, nl, pdim), jnp.float32)
  return Batch(layout=lay, vit_patches=batch.vit_patches, vae_latents=x0, noise=noise, timesteps=t_tok)


def compute_cast(params: PyTree, dtype) -> PyTree:
  """Floating leaves wider than `dtype` cast to it (others unchanged)."""
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    return params

  def one(x):
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits > jnp.finfo(dtype).bits:
      return x.astype(dtype)
    return x

  return jax.tree.map(one, params)


def all_finite(tree: PyTree) -> jax.Array:
  """True when every floating value of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _select(pred: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


# ----------------------------------------------------------------------------- the step
def micro_batch_grads(model: BagelModel, hp: StepConfig, vae_params: PyTree, denominators=None) -> Callable:
  """f(params, batch, rng) -> ({loss, ce, mse, num_ce, num_mse}, grads) for one (micro-)batch."""

  def fn(params, batch, rng):
    mb = flow_batch(model, hp, vae_params, batch, rng)

    def loss_fn(p):
      if hp.cast_params:
        p = compute_cast(p, model.dtype)
      return model.loss({"bagel": p, "vae": vae_params}, mb, hp.ce_weight, hp.mse_weight, denominators)

    (total, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return {"loss": total, "ce": parts.ce, "mse": parts.mse, "num_ce": parts.num_ce, "num_mse": parts.num_mse}, grads

  return fn


def loss_and_grads(model: BagelModel, hp: StepConfig, params: PyTree, vae_params: PyTree, batch: TrainBatch,
                   rng: jax.Array) -> tuple[dict, PyTree]:
  """Loss parts and gradients of the whole batch.  With `hp.grad_accum_steps` = N > 1 the batch
  (rows in `accumulate.interleave` order) runs as N micro-batches in a `lax.scan`, micro-batch n
  with key `jax.random.split(rng, N)[n]`, each normalised by the whole batch's CE weight and noisy
  token count (`bagel_jax.train.accumulate`)."""
  n = hp.grad_accum_steps
  if n == 1:
    return micro_batch_grads(model, hp, vae_params)(params, batch, rng)
  fn = micro_batch_grads(model, hp, vae_params, accumulate.loss_denominators(batch.layout))
  return accumulate.accumulate(fn, params, accumulate.split_micro(batch, n), jax.random.split(rng, n))


def train_step(model: BagelModel, tx: optax.GradientTransformation, hp: StepConfig, state: TrainState,
               vae_params: PyTree, batch: TrainBatch) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step. Pure: `jax.jit(functools.partial(train_step, model, tx, hp))`."""
  rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
  parts, grads = loss_and_grads(model, hp, state.params, vae_params, batch, step_rng)
  total = parts["loss"]
  frozen = frozen_mask(state.params, hp.frozen)
  grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(total) & jnp.isfinite(grad_norm)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params = jax.tree.map(lambda n, o, f: o if f else n.astype(o.dtype), params, state.params, frozen)
  ok = ok & all_finite(params)  # a finite loss and gradient can still give a non-finite update
  params = _select(ok, params, state.params)
  opt_state = _select(ok, opt_state, state.opt_state)
  ema = state.ema
  if ema is not None:
    if hp.ema_decay is None:
      raise ValueError("state has an EMA but StepConfig.ema_decay is None")
    d = hp.ema_decay
    new_ema = jax.tree.map(
        lambda e, p, f: e if f else (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)).astype(e.dtype),
        ema, params, frozen)
    ema = _select(ok, new_ema, ema)

  skipped = (~ok).astype(jnp.int32)
  new_state = TrainState(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      ema=ema,
      rng=jax.random.key_data(rng),
      nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32),
      nonfinite_total=(state.nonfinite_total + skipped).astype(jnp.int32),
  )
  metrics = {
      "loss": total.astype(jnp.float32),
      "ce": parts["ce"].astype(jnp.float32),
      "mse": parts["mse"].astype(jnp.float32),
      "grad_norm": grad_norm.astype(jnp.float32),
      "num_ce": parts["num_ce"].astype(jnp.int32),
      "num_mse": parts["num_mse"].astype(jnp.int32),
      "skipped": skipped,
  }
  return new_state, metrics


# ----------------------------------------------------------------------------- jitted, sharded
def jit_train_step(model: BagelModel, tx: optax.GradientTransformation, hp: StepConfig, mesh: jax.sharding.Mesh,
                   rules, state_shardings: TrainState, batch_sharding, vae_shardings=None,
                   compiler_options: dict | None = None) -> MeshBound:
  """`train_step` jitted with explicit in/out shardings; the state (argument 0) is donated.

  rules: logical-axis rules (`bagel_jax.sharding.Rules`), active while tracing so activation
  constraints resolve; batch_sharding: a TrainBatch of NamedShardings or one NamedSharding for
  all of it; vae_shardings: the VAE params' shardings (default: replicated); compiler_options:
  XLA options for this executable (`jax.jit(compiler_options=...)`).
  """
  repl = jax.sharding.NamedSharding(mesh, jax.P())

  def fn(state, vae_params, batch):
    with use_rules(mesh, rules):
      return train_step(model, tx, hp, state, vae_params, batch)

  jitted = jax.jit(fn, in_shardings=(state_shardings, repl if vae_shardings is None else vae_shardings,
                                     batch_sharding),
                   out_shardings=(state_shardings, repl), donate_argnums=(0,), compiler_options=compiler_options)
  return MeshBound(jitted, mesh)


def jit_init_train_state(tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, state_shardings: TrainState,
                         ema: bool, compiler_options: dict | None = None) -> MeshBound:
  """`init_train_state` jitted so each device only ever holds its shards: f(params_bagel, rng) -> state.

  The params argument is donated (the state takes its buffers)."""
  jitted = jax.jit(lambda p, r: init_train_state(p, tx, r, ema),
                   in_shardings=(state_shardings.params, jax.sharding.NamedSharding(mesh, jax.P())),
                   out_shardings=state_shardings,
                   donate_argnums=(0,), compiler_options=compiler_options)
  return MeshBound(jitted, mesh)


__all__ = ["TrainBatch", "TrainState", "StepConfig", "FROZEN_TABLES", "init_train_state", "train_step",
           "flow_batch", "image_timesteps", "timesteps_from_raw",
           "frozen_mask", "compute_cast", "jit_train_step", "jit_init_train_state",
           "MeshBound", "path_str"]
