"""Position and time embeddings: RoPE (LLM), the timestep embedder, the frozen 2-D sin-cos tables.

- `rope_cos_sin` / `apply_rope`: HF Qwen2 rotate-half RoPE over the whole head_dim,
  inv_freq_i = theta^(-2i/d), halves duplicated, cos/sin in float32 from integer rope ids.
- `timestep_frequencies` / `TimestepEmbedder`: upstream's DiT-style embedder
  (`modeling_utils.py` `TimestepEmbedder`): a [cos, sin] sinusoid of the flow time
  t in [0, 1] (NOT t x 1000) in float32, then Linear, SiLU, Linear.
- `sincos_2d_table`: upstream's `get_2d_sincos_pos_embed` (MAE/DiT) for a G x G grid,
  held in a `FrozenTable` (`vit_pos_embed`, `latent_pos_embed`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class FrozenTable(nnx.Variable):
  """A frozen table that the checkpoint stores (the 2-D sin-cos position tables).

  Not an `nnx.Param`: optimizers built with `wrt=nnx.Param` leave it alone, while
  `nnx.state(module)` still holds it, so it is saved, loaded and converted like a weight.
  """


# ----------------------------------------------------------------------------- 2-D sin-cos table
def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[M] positions -> [M, dim] = [sin(p w_k), cos(p w_k)], w_k = 10000^(-k/(dim/2)), float64."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding width {dim} must be even")
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_table(grid: int, dim: int) -> np.ndarray:
  """Upstream's frozen 2-D sin-cos table [grid*grid, dim], float32 (computed in float64).

  Row index r*grid + c.  The first dim/2 features encode the column c, the last dim/2 the
  row r (upstream's meshgrid puts w first); each half is [sin, cos] with
  omega_k = 10000^(-k/(dim/4)).
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos table width {dim} must be a multiple of 4")
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  table = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
  return table.astype(np.float32)


# ----------------------------------------------------------------------------- timestep embedder
def timestep_frequencies(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """t [N] (flow time in [0, 1], not x1000) -> [N, dim] = [cos(t f_k), sin(t f_k)] in float32.

  f_k = exp(-ln(max_period) * k / (dim // 2)), k < dim // 2; an odd dim gets a zero last column.
  """
  half = dim // 2
  k = jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(jnp.float32(-math.log(max_period)) * k / jnp.float32(half))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class TimestepEmbedder(nnx.Module):
  """time_embedder: sinusoid(t) -> mlp_in (upstream mlp.0) -> SiLU -> mlp_out (mlp.2)."""

  def __init__(self, hidden: int, freq_dim: int = 256, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               dtype=jnp.float32):
    self.freq_dim = freq_dim
    self.dtype = dtype
    self.mlp_in = nnx.Linear(freq_dim, hidden, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.mlp_out = nnx.Linear(hidden, hidden, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

  def __call__(self, t: jax.Array) -> jax.Array:
    """t [N] -> [N, hidden]."""
    h = self.mlp_in(timestep_frequencies(t, self.freq_dim).astype(self.dtype))
    return self.mlp_out(jax.nn.silu(h))


# ----------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """Integer rope ids [..., T] -> (cos, sin), each float32 [..., T, head_dim] (halves duplicated)."""
  if head_dim % 2:
    raise ValueError(f"RoPE head_dim {head_dim} must be even")
  inv_freq = 1.0 / (jnp.float32(theta) ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [..., T, H, D] with cos/sin [..., T, D] (shared by all heads): x cos + rotate_half(x) sin.

  Computed in float32, returned in x's dtype.
  """
  c = cos[..., None, :].astype(jnp.float32)
  s = sin[..., None, :].astype(jnp.float32)
  xf = x.astype(jnp.float32)
  return (xf * c + _rotate_half(xf) * s).astype(x.dtype)
