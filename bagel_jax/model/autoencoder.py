"""The FLUX autoencoder (upstream `modeling/autoencoder.py`), NHWC, in Flax NNX.

Structure and parameter names follow FLUX's so that a parameter's pure-dict path reads
like its upstream key (`encoder.down.1.block.0.conv1.weight` ->
`encoder/down/1/block/0/conv1/kernel`; GroupNorm `weight` -> `scale`):

- `ResnetBlock`: GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus the input (through a
  1x1 `nin_shortcut` when the channel count changes).
- `AttnBlock`: single-head self-attention over the H*W positions with 1x1 q, k, v and
  `proj_out`, scale 1/sqrt(C), residual.
- `Downsample`: zero-pad right and bottom by one, then a 3x3 conv with stride 2, no padding.
- `Upsample`: nearest-neighbour x2, then a 3x3 conv.
- `Encoder`: conv_in, `down[i]` (num_res_blocks blocks, a downsample except at the last
  level), mid (block_1, attn_1, block_2), norm_out, swish, conv_out -> 2*z moments.
- `Decoder`: conv_in, mid, `up[i]` run from the lowest resolution (i = L-1) to `up[0]`
  (num_res_blocks+1 blocks, an upsample except at level 0), norm_out, swish, conv_out.

GroupNorm is 32 groups, eps 1e-6, statistics in float32 (two-pass variance).  1x1 convs are
stored as `nnx.Conv` kernels [1, 1, I, O].  The posterior draw is explicit: `encode(x, eps)`;
`sample_latents(ae, x, rng)` draws eps, `latent_mean(ae, x)` uses the posterior mean.
Images are [B, H, W, 3] in [-1, 1]; latents are [B, H/f, W/f, z] in the scaled space
(scale * (z - shift)).  Outputs of `encode_moments`, `encode` and `decode` are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bagel_jax.config import VAEConfig

GN_GROUPS = 32
GN_EPS = 1e-6


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


class _Factory:
  """Shared constructor arguments of every layer of one autoencoder."""

  def __init__(self, rngs: nnx.Rngs, param_dtype, dtype, precision):
    self.rngs, self.param_dtype, self.dtype, self.precision = rngs, param_dtype, dtype, precision

  def conv(self, cin: int, cout: int, k: int, stride: int = 1, padding="SAME") -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), (stride, stride), padding=padding, rngs=self.rngs,
                    param_dtype=self.param_dtype, dtype=self.dtype, precision=self.precision)

  def norm(self, c: int) -> nnx.GroupNorm:
    # Stats in float32 (flax forces float32 reductions), two-pass variance as torch.
    return nnx.GroupNorm(c, num_groups=GN_GROUPS, epsilon=GN_EPS, use_fast_variance=False, rngs=self.rngs,
                         param_dtype=self.param_dtype, dtype=self.dtype)


class ResnetBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, f: _Factory):
    self.norm1 = f.norm(cin)
    self.conv1 = f.conv(cin, cout, 3)
    self.norm2 = f.norm(cout)
    self.conv2 = f.conv(cout, cout, 3)
    self.nin_shortcut = f.conv(cin, cout, 1) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(swish(self.norm1(x)))
    h = self.conv2(swish(self.norm2(h)))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nnx.Module):

  def __init__(self, c: int, f: _Factory):
    self.precision = f.precision
    self.norm = f.norm(c)
    self.q = f.conv(c, c, 1)
    self.k = f.conv(c, c, 1)
    self.v = f.conv(c, c, 1)
    self.proj_out = f.conv(c, c, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    h = self.norm(x)
    q, k, v = (m(h).reshape(b, hh * ww, c) for m in (self.q, self.k, self.v))
    s = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision,
                   preferred_element_type=jnp.float32) * (c ** -0.5)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bqk,bkc->bqc", p, v, precision=self.precision).reshape(b, hh, ww, c)
    return x + self.proj_out(o)


class Downsample(nnx.Module):

  def __init__(self, c: int, f: _Factory):
    self.conv = f.conv(c, c, 3, stride=2, padding="VALID")

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):

  def __init__(self, c: int, f: _Factory):
    self.conv = f.conv(c, c, 3)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Mid(nnx.Module):
  """block_1 -> attn_1 -> block_2 at the lowest resolution."""

  def __init__(self, c: int, f: _Factory):
    self.block_1 = ResnetBlock(c, c, f)
    self.attn_1 = AttnBlock(c, f)
    self.block_2 = ResnetBlock(c, c, f)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.block_2(self.attn_1(self.block_1(x)))


def _blocks(cin: int, cout: int, n: int, f: _Factory) -> nnx.List:
  return nnx.List([ResnetBlock(cin if j == 0 else cout, cout, f) for j in range(n)])


class DownLevel(nnx.Module):
  """Encoder level: `block[j]` then `downsample` (None at the last level)."""

  def __init__(self, cin: int, cout: int, n_blocks: int, resample: bool, f: _Factory):
    self.block = _blocks(cin, cout, n_blocks, f)
    self.downsample = Downsample(cout, f) if resample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for blk in self.block:
      x = blk(x)
    return x if self.downsample is None else self.downsample(x)


class UpLevel(nnx.Module):
  """Decoder level: `block[j]` then `upsample` (None at level 0, the highest resolution)."""

  def __init__(self, cin: int, cout: int, n_blocks: int, resample: bool, f: _Factory):
    self.block = _blocks(cin, cout, n_blocks, f)
    self.upsample = Upsample(cout, f) if resample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for blk in self.block:
      x = blk(x)
    return x if self.upsample is None else self.upsample(x)


class Encoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, f: _Factory):
    ch, mult = cfg.ch, tuple(cfg.ch_mult)
    n = len(mult)
    self.conv_in = f.conv(cfg.in_channels, ch, 3)
    chans = [ch] + [ch * m for m in mult]
    self.down = nnx.List([DownLevel(chans[i], chans[i + 1], cfg.num_res_blocks, i < n - 1, f)
                          for i in range(n)])
    top = chans[-1]
    self.mid = Mid(top, f)
    self.norm_out = f.norm(top)
    self.conv_out = f.conv(top, 2 * cfg.z_channels, 3)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(swish(self.norm_out(h)))


class Decoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, f: _Factory):
    ch, mult = cfg.ch, tuple(cfg.ch_mult)
    n = len(mult)
    top = ch * mult[-1]
    self.conv_in = f.conv(cfg.z_channels, top, 3)
    self.mid = Mid(top, f)
    # up[i] is level i (up[0] the highest resolution); level i takes the channels of level i+1.
    cin = [ch * mult[i + 1] if i < n - 1 else top for i in range(n)]
    self.up = nnx.List([UpLevel(cin[i], ch * mult[i], cfg.num_res_blocks + 1, i > 0, f)
                        for i in range(n)])
    self.norm_out = f.norm(ch * mult[0])
    self.conv_out = f.conv(ch * mult[0], cfg.out_ch, 3)

  def __call__(self, z: jax.Array) -> jax.Array:
    h = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      h = level(h)
    return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nnx.Module):
  """FLUX AE: `encode_moments`, `encode(x, eps)`, `decode(z)`; NHWC."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32,
               precision=None):
    if cfg.downsample != 2 ** (len(cfg.ch_mult) - 1):
      raise ValueError(f"VAE downsample {cfg.downsample} does not match ch_mult {tuple(cfg.ch_mult)} "
                       f"({len(cfg.ch_mult) - 1} halvings)")
    for c in {cfg.ch * m for m in cfg.ch_mult}:
      if c % GN_GROUPS:
        raise ValueError(f"VAE channel count {c} is not a multiple of {GN_GROUPS} GroupNorm groups")
    self.cfg = cfg
    self.dtype = dtype
    f = _Factory(rngs, param_dtype, dtype, precision)
    self.encoder = Encoder(cfg, f)
    self.decoder = Decoder(cfg, f)

  def encode_moments(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, 3] in [-1, 1] -> [B, H/f, W/f, 2*z]: posterior mean channels, then log-variance."""
    if x.ndim != 4 or x.shape[-1] != self.cfg.in_channels:
      raise ValueError(f"expected images [B, H, W, {self.cfg.in_channels}], got shape {x.shape}")
    return self.encoder(x.astype(self.dtype)).astype(jnp.float32)

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """Raw posterior latents -> the scaled space the LLM sees: scale * (z - shift)."""
    return self.cfg.scale_factor * (z - self.cfg.shift_factor)

  def encode(self, x: jax.Array, eps: jax.Array) -> jax.Array:
    """Scaled posterior sample: scale * (mean + exp(logvar/2) * eps - shift), [B, h, w, z]."""
    f = self.cfg.downsample  # each Downsample maps a side n to n // 2
    want = (x.shape[0], x.shape[1] // f, x.shape[2] // f, self.cfg.z_channels)
    if tuple(eps.shape) != want:
      raise ValueError(f"eps shape {tuple(eps.shape)} does not match the latent shape {want}")
    return _sample(self, self.encode_moments(x), lambda shape: eps)

  def decode(self, z: jax.Array) -> jax.Array:
    """Scaled latents [B, h, w, z] -> images [B, h*f, w*f, 3] (not clamped)."""
    if z.ndim != 4 or z.shape[-1] != self.cfg.z_channels:
      raise ValueError(f"expected latents [B, h, w, {self.cfg.z_channels}], got shape {z.shape}")
    z = z.astype(jnp.float32) / self.cfg.scale_factor + self.cfg.shift_factor
    return self.decoder(z.astype(self.dtype)).astype(jnp.float32)


def _sample(ae: AutoEncoder, moments: jax.Array, draw) -> jax.Array:
  mean, logvar = jnp.split(moments, 2, axis=-1)
  eps = draw(mean.shape)
  if eps.shape != mean.shape:
    raise ValueError(f"eps shape {eps.shape} does not match the latent shape {mean.shape}")
  return ae.scale_latents(mean + jnp.exp(0.5 * logvar) * eps.astype(jnp.float32))


def sample_latents(ae: AutoEncoder, x: jax.Array, rng: jax.Array) -> jax.Array:
  """Upstream's encode: a posterior sample with eps ~ N(0, 1) drawn from `rng`, scaled."""
  return _sample(ae, ae.encode_moments(x), lambda shape: jax.random.normal(rng, shape, jnp.float32))


def latent_mean(ae: AutoEncoder, x: jax.Array) -> jax.Array:
  """Deterministic latents: the scaled posterior mean, scale * (mean - shift)."""
  return ae.scale_latents(jnp.split(ae.encode_moments(x), 2, axis=-1)[0])


__all__ = ["AutoEncoder", "Encoder", "Decoder", "DownLevel", "UpLevel", "Mid", "ResnetBlock", "AttnBlock",
           "Downsample", "Upsample",
           "sample_latents", "latent_mean"]
