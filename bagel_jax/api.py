"""The pure functional API: parameters in, arrays out, nothing hidden.

    model = BagelModel(cfg)                    # static: config, dtypes, attention backend
    params = model.init(jax.random.key(0))     # {"bagel": {...}, "vae": {...}} of arrays
    out = model.forward(params, batch)         # hidden, CE logits, velocities
    total, parts = model.loss(params, batch)

Every method is a pure function of its arguments and can be wrapped in `jax.jit`
(the `BagelModel` itself is hashable, so it can be a static argument).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bagel_jax.weights import table as weights
from bagel_jax.config import BagelConfig, load_config
from bagel_jax.layout import Layout
from bagel_jax.model.autoencoder import AutoEncoder
from bagel_jax.model.bagel import Bagel, Batch, Losses, Outputs, losses

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BagelModel:
  cfg: BagelConfig
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32
  attention_impl: str = "auto"
  remat: str = "none"
  unroll_layers: bool = False  # straight-line layers instead of a scan (small models on CPU: no stacked buffers)

  # ---- construction
  def _modules(self, rngs: nnx.Rngs) -> tuple[Bagel, AutoEncoder]:
    bagel = Bagel(self.cfg, rngs=rngs, param_dtype=self.param_dtype, dtype=self.dtype,
                  attention_impl=self.attention_impl, remat=self.remat, unroll_layers=self.unroll_layers)
    vae = AutoEncoder(self.cfg.vae, rngs=rngs, param_dtype=self.param_dtype, dtype=self.dtype)
    return bagel, vae

  def init(self, rng: jax.Array) -> Params:
    """Random parameters (upstream's inits where they matter: llm2vae is zero)."""
    return _init_fn(self)(rng)

  def abstract_params(self) -> Params:
    """ShapeDtypeStructs of every parameter, without allocating anything."""
    return _abstract(self)[2]

  def num_params(self) -> dict[str, int]:
    a = self.abstract_params()
    return {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in a.items()}

  def _bagel(self, params: Params) -> Bagel:
    gdef, state, _ = _abstract(self)
    return nnx.merge(gdef[0], _fill(state[0], params["bagel"]))

  def _vae(self, params: Params) -> AutoEncoder:
    gdef, state, _ = _abstract(self)
    return nnx.merge(gdef[1], _fill(state[1], params["vae"]))

  # ---- loading
  def load_upstream(self, folder, *, allow_extra: bool = False) -> Params:
    """Reads an upstream release folder (ema.safetensors, ae.safetensors, configs) into params."""
    cfg = load_config(folder)
    if cfg != self.cfg:
      raise weights.CheckpointError(f"{folder}: its configs do not match this model's config")
    host = weights.load_upstream(folder, self.cfg, self.abstract_params(), allow_extra=allow_extra)
    return jax.tree.map(jnp.asarray, host)

  # ---- computation
  def forward(self, params: Params, batch: Batch) -> Outputs:
    return self._bagel(params).forward(batch)

  def loss(self, params: Params, batch: Batch, ce_weight: float = 1.0, mse_weight: float = 1.0,
           denominators: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, Losses]:
    """(total, parts); `denominators`: see `bagel_jax.model.bagel.losses`."""
    parts = losses(self.forward(params, batch), batch, ce_weight, mse_weight, denominators)
    return parts.total, parts

  def encode_moments(self, params: Params, images: jax.Array) -> jax.Array:
    """images [N, H, W, 3] in [-1, 1] -> posterior moments [N, H/8, W/8, 2*z] (mean, logvar)."""
    return self._vae(params).encode_moments(images)

  def encode_images(self, params: Params, images: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Scaled latents [N, h, w, z]: a posterior sample (upstream samples) or, with rng=None, the mean."""
    moments = self.encode_moments(params, images)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    vae = self.cfg.vae
    return vae.scale_factor * (z - vae.shift_factor)

  def decode_latents(self, params: Params, latents: jax.Array) -> jax.Array:
    """Scaled latents [N, h, w, z] -> images [N, H, W, 3] in about [-1, 1] (not clamped)."""
    return self._vae(params).decode(latents)

  def latent_tokens(self, latents: jax.Array, layout: Layout) -> jax.Array:
    """Per-row VAE latents [B, Ni, h, w, z] -> the layout's latent tokens [B, Nl, p*p*z].

    Each token takes its image's latent at its (row, col) in the image's grid (upstream crops
    every padded latent to its own grid and patchifies in (row, col, p, q, channel) order);
    an image's tokens follow each other row-major, images in order (`layout.pack`), so the
    token's place within its image gives (row, col), whatever the position ids are.
    """
    p = self.cfg.latent_patch_size
    b, ni, h, w, c = latents.shape
    tok = latents.reshape(b, ni, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    tok = tok.reshape(b, ni, h // p, w // p, p * p * c)
    img = jnp.maximum(layout.vae_image_ids, 0)
    grid = layout.vae_image_grid
    sizes = grid[..., 0] * grid[..., 1]
    first = jnp.take_along_axis(jnp.cumsum(sizes, axis=-1) - sizes, img, axis=1)
    cols = jnp.maximum(jnp.take_along_axis(grid[..., 1], img, axis=1), 1)
    local = jnp.arange(img.shape[1])[None] - first
    row, col = local // cols, local % cols
    out = jax.vmap(lambda t, i, r, cc: t[i, r, cc])(tok, img, row, col)
    return jnp.where((layout.vae_image_ids >= 0)[..., None], out, 0)


@functools.lru_cache(maxsize=16)
def _abstract(model: BagelModel):
  bagel, vae = nnx.eval_shape(lambda: model._modules(nnx.Rngs(params=0)))
  gb, sb = nnx.split(bagel)
  gv, sv = nnx.split(vae)
  abstract = {"bagel": nnx.to_pure_dict(sb), "vae": nnx.to_pure_dict(sv)}
  return (gb, gv), (sb, sv), abstract


@functools.lru_cache(maxsize=16)
def _init_fn(model: BagelModel):
  def init(rng):
    # XLA compiles threefry-based initialisers slowly (tens of seconds for the VAE on CPU);
    # the RBG generator compiles several times faster, seeded from the caller's key.
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    data = jnp.ravel(data).astype(jnp.uint32)
    rbg = jax.random.wrap_key_data(jnp.resize(data, (4,)), impl="rbg")
    bagel, vae = model._modules(nnx.Rngs(params=rbg))
    return {"bagel": nnx.to_pure_dict(nnx.state(bagel)), "vae": nnx.to_pure_dict(nnx.state(vae))}

  return jax.jit(init)


def _fill(abstract_state: nnx.State, pure: dict) -> nnx.State:
  state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, pure)
  return state


__all__ = ["BagelModel", "Batch", "Outputs", "Losses", "Params"]
