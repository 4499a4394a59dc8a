"""BAGEL's understanding encoder: SigLIP NaViT (upstream `modeling/bagel/siglip_navit.py`).

Images of different sizes are patchified (`bagel_jax.image.patchify`, 14x14 patches,
features ordered row-in-patch, col-in-patch, channel) and packed into one token stream;
each image is one bidirectional attention block (`block_start`/`block_end` give every
token its image's [start, end) in that stream; padding tokens get an empty interval and
come out as LN(bias-only) garbage that callers drop).

    embeddings = patch_embedding(patches) + position_embedding[position_ids]
    L x [x + MHA(LN1(x)); x + MLP(LN2(x))]          (MLP: fc1, gelu-tanh, fc2)
    features = post_layernorm(x)

As in every upstream loader, the 2-D RoPE is off (learned absolute positions instead)
and the encoder has `num_hidden_layers` = the release config's count minus one; the
original SigLIP `post_layernorm` is still applied.  Layers are stacked with a leading
layer axis (created with `nnx.vmap`, applied with `jax.lax.scan`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from bagel_jax.attention import attention
from bagel_jax.config import ViTConfig
from bagel_jax.model.connector import activation
from bagel_jax.model.qwen2_mot import REMAT_POLICIES


def _layer_norm(cfg: ViTConfig, *, rngs, param_dtype, dtype) -> nnx.LayerNorm:
  # use_fast_variance=False: var = mean((x - mean)^2), as torch does.
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, rngs=rngs,
                       param_dtype=param_dtype, dtype=dtype)


class SiglipEncoderLayer(nnx.Module):
  """One encoder layer's weights (flat: upstream self_attn.* and mlp.* live side by side)."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
    d, f = cfg.hidden_size, cfg.intermediate_size
    lin = functools.partial(nnx.Linear, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.layer_norm1 = _layer_norm(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.q_proj = lin(d, d)
    self.k_proj = lin(d, d)
    self.v_proj = lin(d, d)
    self.out_proj = lin(d, d)
    self.layer_norm2 = _layer_norm(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.fc1 = lin(d, f)
    self.fc2 = lin(f, d)

  def __call__(self, x: jax.Array, block_start: jax.Array, block_end: jax.Array, *, cfg: ViTConfig,
               attention_impl: str) -> jax.Array:
    b, n, d = x.shape
    h, hd = cfg.num_attention_heads, cfg.head_dim
    y = self.layer_norm1(x)
    q = self.q_proj(y).reshape(b, n, h, hd)
    k = self.k_proj(y).reshape(b, n, h, hd)
    v = self.v_proj(y).reshape(b, n, h, hd)
    # Bidirectional within each image: the key and query intervals are both the token's block.
    a = attention(q, k, v, block_start, block_end, block_start, block_end, impl=attention_impl,
                  scale=hd**-0.5)
    x = x + self.out_proj(a.reshape(b, n, d))
    y = self.fc2(activation(cfg.hidden_act)(self.fc1(self.layer_norm2(x))))
    return x + y


class SiglipVisionModel(nnx.Module):
  """vit_model.vision_model: patch linear + learned positions, stacked encoder layers, post-LN."""

  def __init__(self, cfg: ViTConfig, max_patches_per_side: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               dtype=jnp.float32, attention_impl: str = "auto", remat: str = "none", unroll_layers: bool = False):
    self.cfg = cfg
    self.remat = remat
    self.unroll_layers = unroll_layers
    self.max_patches_per_side = max_patches_per_side
    self.dtype = dtype
    self.attention_impl = attention_impl
    d = cfg.hidden_size
    # Upstream's Conv2d(3, d, 14, stride 14) as the Linear it converts it to; kernel [3*14*14, d].
    self.patch_embedding = nnx.Linear(cfg.patch_dim, d, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.position_embedding = nnx.Param(
        nnx.initializers.normal(1.0)(rngs.params(), (max_patches_per_side**2, d), param_dtype))

    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs: nnx.Rngs) -> SiglipEncoderLayer:
      return SiglipEncoderLayer(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

    self.layers = make_layers(rngs)  # every parameter has a leading layer axis
    self.post_layernorm = _layer_norm(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

  def embed(self, patches: jax.Array, position_ids: jax.Array) -> jax.Array:
    """patches [B, N, 3*p*p], position_ids [B, N] -> patch linear + learned position embedding."""
    x = self.patch_embedding(patches.astype(self.dtype))
    return x + self.position_embedding[...].astype(self.dtype)[position_ids]

  def encode(self, x: jax.Array, block_start: jax.Array, block_end: jax.Array) -> jax.Array:
    """Runs the stacked encoder layers (no post-LN)."""
    graphdef, state = nnx.split(self.layers)
    cfg, impl = self.cfg, self.attention_impl

    def body(x, layer_state):
      layer = nnx.merge(graphdef, layer_state)
      # Not constrained (unlike the LLM's residual stream): pinning the ViT activations to the batch
      # sharding cost 4.3 GiB more temporaries per device in the 7B plan than XLA's own propagation.
      return layer(x, block_start, block_end, cfg=cfg, attention_impl=impl), None

    if self.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, state, unroll=self.unroll_layers)
    return x

  def __call__(self, patches: jax.Array, position_ids: jax.Array, block_start: jax.Array,
               block_end: jax.Array) -> jax.Array:
    """patches [B, N, 3*p*p] in [-1, 1]; position_ids, block_start, block_end [B, N] int32 -> [B, N, hidden]."""
    x = self.embed(patches, position_ids)
    x = self.encode(x, block_start.astype(jnp.int32), block_end.astype(jnp.int32))
    return self.post_layernorm(x)
