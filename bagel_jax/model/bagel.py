"""BAGEL: the MoT LLM, the SigLIP NaViT + connector, and the latent (flow-matching) heads.

`Bagel.forward(batch)` is upstream's `Bagel.forward` in training mode: it embeds text,
ViT and noised VAE tokens into one packed stream, runs the MoT decoder with the
layout's interval mask, applies the per-expert final norm and returns the hidden
states, CE logits (at CE positions) and predicted velocities (at every VAE token).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from bagel_jax.config import BagelConfig
from bagel_jax.layout import TOKEN_TEXT, Layout
from bagel_jax.model.connector import MLPConnector
from bagel_jax.model.embeddings import FrozenTable, TimestepEmbedder, sincos_2d_table
from bagel_jax.model.qwen2_mot import AttentionSpec, DecoderOptions, Qwen2MoT, gather_tokens, scatter_tokens
from bagel_jax.model.siglip import SiglipVisionModel


@flax.struct.dataclass
class Batch:
  """One training/eval batch: the layout plus the payloads it points at."""

  layout: Layout
  vit_patches: jax.Array  # [B, Nv, 3*p*p] patchified ViT pixels in [-1, 1]
  vae_latents: jax.Array  # [B, Nl, 64] clean latent tokens x0 (patchified, scaled)
  noise: jax.Array  # [B, Nl, 64] epsilon for every latent token
  timesteps: jax.Array  # [B, Nl] flow time t in [0, 1] (0 for clean conditioning images)


@flax.struct.dataclass
class Outputs:
  hidden: jax.Array  # [B, T, D] after the final (per-expert) norm
  ce_logits: jax.Array  # [B, Nc, V] float32
  velocity: jax.Array  # [B, Nl, 64] llm2vae at every VAE token
  llm_input: jax.Array  # [B, T, D] the packed input embedding


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
  """Upstream's timestep shift t' = s t / (1 + (s - 1) t)."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def interval_spec(layout: Layout) -> AttentionSpec:
  return AttentionSpec(layout.k_start, layout.k_end, layout.q_start, layout.q_end, None)


class Bagel(nnx.Module):
  def __init__(self, cfg: BagelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32,
               attention_impl: str = "auto", remat: str = "none", unroll_layers: bool = False):
    self.cfg = cfg
    self.dtype = dtype
    self.options = DecoderOptions(attention_impl=attention_impl, remat=remat, unroll_layers=unroll_layers)
    d = cfg.llm.hidden_size
    self.llm = Qwen2MoT(cfg.llm, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    if cfg.visual_und:
      side = cfg.vit_max_num_patch_per_side
      self.vit = SiglipVisionModel(cfg.vit, side, rngs=rngs, param_dtype=param_dtype, dtype=dtype,
                                   attention_impl=attention_impl, remat=remat, unroll_layers=unroll_layers)
      self.connector = MLPConnector(cfg.vit.hidden_size, d, cfg.connector_act, rngs=rngs,
                                    param_dtype=param_dtype, dtype=dtype)
      self.vit_pos_embed = FrozenTable(jnp.asarray(sincos_2d_table(side, d), param_dtype))
    if cfg.visual_gen:
      pdim = cfg.patch_latent_dim
      self.time_embedder = TimestepEmbedder(d, cfg.frequency_embedding_size, rngs=rngs,
                                            param_dtype=param_dtype, dtype=dtype)
      self.vae2llm = nnx.Linear(pdim, d, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
      self.llm2vae = nnx.Linear(d, pdim, rngs=rngs, param_dtype=param_dtype, dtype=dtype,
                                kernel_init=nnx.initializers.zeros)  # upstream zero-inits llm2vae
      self.latent_pos_embed = FrozenTable(jnp.asarray(sincos_2d_table(cfg.max_latent_size, d), param_dtype))

  # ---- input embeddings
  def vit_embeddings(self, patches, position_ids, block_start, block_end) -> jax.Array:
    """ViT -> connector -> + vit_pos_embed: the LLM input at ViT token slots [B, Nv, D]."""
    feats = self.vit(patches.astype(self.dtype), position_ids, block_start, block_end)
    out = self.connector(feats)
    return out + self.vit_pos_embed[...].astype(self.dtype)[position_ids]

  def latent_embeddings(self, x_t, t, position_ids) -> jax.Array:
    """vae2llm(x_t) + time_embedder(t) + latent_pos_embed[pos]: [B, Nl, D]."""
    te = self.time_embedder(t.reshape(-1)).reshape(t.shape + (-1,))
    return (self.vae2llm(x_t.astype(self.dtype)) + te.astype(self.dtype)
            + self.latent_pos_embed[...].astype(self.dtype)[position_ids])

  def embed(self, batch: Batch) -> jax.Array:
    lay = batch.layout
    x = self.llm.embed(lay.text_ids)
    x = jnp.where((lay.token_kind == TOKEN_TEXT)[..., None], x, 0).astype(self.dtype)
    if self.cfg.visual_und and lay.vit_indexes.shape[1]:
      v = self.vit_embeddings(batch.vit_patches, lay.vit_position_ids, lay.vit_block_start, lay.vit_block_end)
      x = scatter_tokens(x, lay.vit_indexes, v)
    if self.cfg.visual_gen and lay.vae_indexes.shape[1]:
      t = batch.timesteps.astype(jnp.float32)[..., None]
      x_t = (1.0 - t) * batch.vae_latents + t * batch.noise
      x = scatter_tokens(x, lay.vae_indexes, self.latent_embeddings(x_t, batch.timesteps, lay.latent_position_ids))
    return x

  # ---- forward
  def forward(self, batch: Batch) -> Outputs:
    lay = batch.layout
    x0 = self.embed(batch)
    h, _ = self.llm(x0, (lay.und_indexes, lay.gen_indexes), lay.rope_ids, interval_spec(lay), opts=self.options)
    h = self.llm.final_norm(h, lay.expert)
    ce_logits = self.llm.logits(gather_tokens(h, lay.ce_indexes))
    if self.cfg.visual_gen:
      vel = self.llm2vae(gather_tokens(h, lay.vae_indexes)).astype(jnp.float32)
    else:
      vel = jnp.zeros(lay.vae_indexes.shape + (self.cfg.patch_latent_dim,), jnp.float32)
    return Outputs(hidden=h, ce_logits=ce_logits, velocity=vel, llm_input=x0)

  __call__ = forward


@flax.struct.dataclass
class Losses:
  total: jax.Array
  ce: jax.Array
  mse: jax.Array
  ce_per_token: jax.Array  # [B, Nc]
  mse_per_token: jax.Array  # [B, Nl] mean over the 64 dims
  num_ce: jax.Array
  num_mse: jax.Array


def losses(out: Outputs, batch: Batch, ce_weight: float = 1.0, mse_weight: float = 1.0,
           denominators: tuple[jax.Array, jax.Array] | None = None) -> Losses:
  """Upstream's normalisation: CE = sum(w * ce) / sum(w) over CE tokens (w = 1 unless reweighted);
  MSE = sum over noisy tokens (t > 0) of the mean over 64 dims / number of noisy tokens.

  `denominators` = (sum of w, number of noisy tokens) of a larger batch this one is part of
  (gradient accumulation); by default this batch's own."""
  lay = batch.layout
  logits = out.ce_logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, lay.ce_labels[..., None], axis=-1)[..., 0]
  ce_tok = lse - picked
  w = lay.ce_weights
  num_ce = jnp.sum(w > 0)
  ce_den = jnp.maximum(jnp.sum(w), 1e-12) if denominators is None else denominators[0]
  ce = jnp.sum(ce_tok * w) / ce_den
  target = batch.noise - batch.vae_latents
  mse_tok = jnp.mean((out.velocity - target.astype(jnp.float32)) ** 2, axis=-1)
  noisy = (lay.vae_noisy > 0) & (batch.timesteps > 0)
  num_mse = jnp.sum(lay.vae_noisy > 0)
  mse_den = jnp.maximum(num_mse, 1) if denominators is None else denominators[1]
  mse = jnp.sum(jnp.where(noisy, mse_tok, 0.0)) / mse_den
  total = ce_weight * ce + mse_weight * mse
  return Losses(total=total, ce=ce, mse=mse, ce_per_token=ce_tok, mse_per_token=mse_tok,
                num_ce=num_ce, num_mse=num_mse)
