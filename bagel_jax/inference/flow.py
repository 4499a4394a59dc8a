"""The Euler flow sampler with classifier-free guidance (upstream `generate_image` / `_forward_flow`).

The image being generated is a query chunk `<|vision_start|>` + h*w latent tokens +
`<|vision_end|>`, all at the context's next rope id, one bidirectional block, markers through
the und expert and latents through the gen expert; its keys are never cached.  The CFG contexts
(gen, cfg_text, cfg_img) are rows of one stacked `KVCache` (batch axis [contexts x requests]),
so every guided step is ONE batched forward, and the whole denoising loop is one compiled
`lax.scan`: the grid, the CFG on/off flags and the scales are traced arrays, so neither the
step nor the prompt (within a cache-size bucket) recompiles it.

Upstream behaviour reproduced (each marked "Quirk" where it is implemented):
- the grid: t = shift(linspace(1, 0, N)) in float32, N - 1 Euler steps x <- x - v (t_i - t_{i+1});
- CFG applies on a step iff `cfg_interval[0] < t <= cfg_interval[1]` (strict lower bound);
- the text branch, and with it all guidance, runs only when cfg_text_scale > 1: image-only
  CFG (text scale <= 1, image scale > 1) is silently ignored;
- renorm "global" takes norms over all tokens and channels, "channel" per token,
  "text_channel" renormalises the text-guided velocity per token before the image guidance and
  does not renormalise after it;
- x stays float32 whatever the compute dtype.

With `taylorseer` settings (upstream's `enable_taylorseer`, `bagel_jax.inference.taylorseer`) the
scan's carry also holds each CFG branch's Taylor factors, and each step decides in the graph which
branches run the LLM and which are forecast.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.image import navit_position_ids
from bagel_jax.inference import taylorseer as ts_cache
from bagel_jax.inference.errors import InferenceError
from bagel_jax.inference.kv_cache import KVCache, cache_key_intervals
from bagel_jax.model.qwen2_mot import AttentionSpec, DecoderOptions

RENORM_TYPES = ("global", "channel", "text_channel")


@dataclasses.dataclass(frozen=True)
class FlowSettings:
  """Upstream's `interleave_inference` defaults."""

  num_timesteps: int = 50
  timestep_shift: float = 3.0
  cfg_text_scale: float = 3.0
  cfg_img_scale: float = 1.5
  cfg_interval: tuple[float, float] = (0.4, 1.0)
  cfg_renorm_type: str = "global"
  cfg_renorm_min: float = 0.0
  # Upstream's "global" norm spans the whole packed batch (its code notes it only supports batch 1).
  # False: per image (identical for one image); True: over the batch, as upstream computes it.
  global_renorm_over_batch: bool = False

  def validate(self) -> None:
    if int(self.num_timesteps) < 2:
      raise InferenceError(f"num_timesteps must be at least 2 (it gives num_timesteps - 1 Euler steps); "
                           f"got {self.num_timesteps}")
    if self.cfg_renorm_type not in RENORM_TYPES:
      raise InferenceError(f"cfg_renorm_type must be one of {RENORM_TYPES}; got {self.cfg_renorm_type!r}")
    if len(tuple(self.cfg_interval)) != 2:
      raise InferenceError(f"cfg_interval must be (low, high); got {self.cfg_interval!r}")

  @property
  def use_text_cfg(self) -> bool:
    # Quirk (upstream `_forward_flow`): text guidance, and the whole CFG block, only when cfg_text_scale > 1.
    return float(self.cfg_text_scale) > 1.0

  @property
  def use_img_cfg(self) -> bool:
    # Quirk: the image branch runs only inside the text branch, so image-only CFG is silently ignored.
    return self.use_text_cfg and float(self.cfg_img_scale) > 1.0

  @property
  def num_contexts(self) -> int:
    return 1 + int(self.use_text_cfg) + int(self.use_img_cfg)


def timestep_grid(num_timesteps: int, shift: float) -> np.ndarray:
  """Upstream's grid in float32: torch.linspace(1, 0, N) (its two-sided formula), then shifted."""
  n = int(num_timesteps)
  if n < 2:
    raise InferenceError(f"num_timesteps must be at least 2; got {num_timesteps}")
  start, end = np.float32(1.0), np.float32(0.0)
  step = np.float32((end - start) / np.float32(n - 1))
  i = np.arange(n)
  lin = np.where(i < n // 2, start + step * i.astype(np.float32),
                 end - step * (n - 1 - i).astype(np.float32)).astype(np.float32)
  s = np.float32(shift)
  return (s * lin / (np.float32(1.0) + (s - np.float32(1.0)) * lin)).astype(np.float32)


def schedule(settings: FlowSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(t [N-1], dt [N-1], cfg_on [N-1]) for the Euler steps, as float32/bool numpy arrays."""
  grid = timestep_grid(settings.num_timesteps, settings.timestep_shift)
  ts, dts = grid[:-1], (grid[:-1] - grid[1:]).astype(np.float32)
  lo, hi = (np.float32(v) for v in settings.cfg_interval)
  # Quirk (upstream `generate_image`): CFG iff `t > cfg_interval[0] and t <= cfg_interval[1]` (compared in float32).
  on = (ts > lo) & (ts <= hi)
  return ts, dts, on


def combine_cfg(v: jax.Array, v_text: jax.Array | None, v_img: jax.Array | None, text_scale, img_scale,
                renorm_type: str, renorm_min, over_batch: bool = False) -> jax.Array:
  """Upstream's guidance combination (`_forward_flow`, l.873-905). v, v_*: [B, N, C] float32."""
  if v_text is None:  # no text CFG: the conditional velocity as is
    return v
  if renorm_type == "text_channel":
    v_t_ = v_text + text_scale * (v - v_text)
    # Quirk: per-token renorm of the text-guided velocity against v, BEFORE the image guidance ...
    scale = jnp.clip(jnp.linalg.norm(v, axis=-1, keepdims=True)
                     / (jnp.linalg.norm(v_t_, axis=-1, keepdims=True) + 1e-8), renorm_min, 1.0)
    v_t = v_t_ * scale
    # ... and no renorm after it.
    return v_t if v_img is None else v_img + img_scale * (v_t - v_img)
  v_ = v_text + text_scale * (v - v_text)
  if v_img is not None:
    v_ = v_img + img_scale * (v_ - v_img)
  if renorm_type == "global":
    # Quirk: one norm over all tokens and channels (upstream: of the whole packed batch).
    axes = (0, 1, 2) if over_batch else (1, 2)
    n_v = jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))
    n_g = jnp.sqrt(jnp.sum(v_ * v_, axis=axes, keepdims=True))
  elif renorm_type == "channel":
    n_v = jnp.linalg.norm(v, axis=-1, keepdims=True)
    n_g = jnp.linalg.norm(v_, axis=-1, keepdims=True)
  else:
    raise ValueError(f"cfg_renorm_type {renorm_type!r} is not supported")
  # torch's clamp(min, max) with min > max gives max; jnp.clip does the same.
  return v_ * jnp.clip(n_v / (n_g + 1e-8), renorm_min, 1.0)


def image_hidden(model, bagel, k: jax.Array, v: jax.Array, lengths: jax.Array, ropes: jax.Array,
                 x_t: jax.Array, t: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """The last decoder layer's output [rows, N, hidden] at the latent tokens of the image query
  (before the final norm), for rows = len(lengths) contexts.

  x_t [B, N, C] is shared by all contexts (rows are [ctx0 x B, ctx1 x B, ...]).
  """
  cfg = model.cfg
  b, n, _ = x_t.shape
  rows = lengths.shape[0]
  reps = rows // b
  t_len = n + 2
  s = k.shape[2]
  pos = jnp.asarray(navit_position_ids(grid[0], grid[1], cfg.max_latent_size, cfg.interpolate_pos))
  lat = bagel.latent_embeddings(x_t, jnp.full((b, n), t, jnp.float32), jnp.broadcast_to(pos[None], (b, n)))
  marks = bagel.llm.embed(jnp.array([cfg.tokens.start_of_image, cfg.tokens.end_of_image], jnp.int32))
  x = jnp.concatenate([jnp.broadcast_to(marks[0], (b, 1, marks.shape[-1])), lat.astype(marks.dtype),
                       jnp.broadcast_to(marks[1], (b, 1, marks.shape[-1]))], axis=1)
  x = jnp.tile(x, (reps, 1, 1))
  big = s + t_len
  cq_start, cq_end = cache_key_intervals(lengths, s, big)
  spec = AttentionSpec(
      k_start=jnp.zeros((rows, t_len), jnp.int32),
      k_end=jnp.full((rows, t_len), big, jnp.int32),
      q_start=jnp.concatenate([cq_start, jnp.full((rows, t_len), s, jnp.int32)], axis=1),
      q_end=jnp.concatenate([cq_end, jnp.full((rows, t_len), big, jnp.int32)], axis=1),
      q_positions=jnp.broadcast_to(s + jnp.arange(t_len, dtype=jnp.int32)[None], (rows, t_len)))
  und = jnp.broadcast_to(jnp.array([0, t_len - 1], jnp.int32)[None], (rows, 2))
  gen = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32)[None], (rows, n))
  rope = jnp.broadcast_to(ropes[:, None], (rows, t_len))
  opts = DecoderOptions(attention_impl=model.attention_impl, return_kv=False)
  h, _ = bagel.llm(x, (und, gen), rope, spec, past_kv=(k, v), opts=opts)
  return h[:, 1:n + 1]


def hidden_velocity(bagel, h: jax.Array) -> jax.Array:
  """llm2vae(norm_moe_gen(h)) for latent-token hidden states h [rows, N, hidden]: float32 velocities."""
  h = bagel.llm.final_norm(h, jnp.ones(h.shape[:2], jnp.int32))
  return bagel.llm2vae(h).astype(jnp.float32)


def image_velocity(model, bagel, k: jax.Array, v: jax.Array, lengths: jax.Array, ropes: jax.Array,
                   x_t: jax.Array, t: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """llm2vae at the latent tokens of the image query, for rows = len(lengths) contexts."""
  return hidden_velocity(bagel, image_hidden(model, bagel, k, v, lengths, ropes, x_t, t, grid))


_PROGRESS: dict[str, Any] = {"bar": None}


def _tick(_):
  bar = _PROGRESS["bar"]
  if bar is not None:
    bar.update(1)


class _Callback:
  """tqdm's update/close for a callback `sink(steps done, total)` (e.g. a web page's progress bar)."""

  def __init__(self, sink, total: int):
    self.sink, self.total, self.n = sink, total, 0

  def update(self, k: int) -> None:
    self.n += k
    self.sink(self.n, self.total)

  def close(self) -> None:
    pass


class progress_bar:
  """Context manager: shows a tqdm bar over the denoising steps of samplers compiled with progress=True
  (or, with `sink`, calls sink(steps done, total) after each step instead)."""

  def __init__(self, total: int, desc: str = "denoising", enabled: bool = True, sink=None):
    self.total, self.desc, self.enabled, self.sink = total, desc, enabled, sink

  def __enter__(self):
    if self.sink is not None:
      _PROGRESS["bar"] = _Callback(self.sink, self.total)
    elif self.enabled:
      from tqdm import tqdm
      _PROGRESS["bar"] = tqdm(total=self.total, desc=self.desc, unit="step")
    return self

  def __exit__(self, *exc):
    bar, _PROGRESS["bar"] = _PROGRESS["bar"], None
    if bar is not None:
      bar.close()


TRACE_COUNT = {"denoise": 0}


def _plain_step(velocity, combine, b: int, num_contexts: int, record: bool, progress: bool):
  """The uncached scan body: carry x; every step runs the LLM for each active CFG branch."""

  def step(x, xs):
    i, t, dt, on = xs
    if num_contexts == 1:
      v_out = velocity(x, t, b)
      raw = v_out
    else:
      def guided(x):
        allv = velocity(x, t, num_contexts * b)
        return combine([allv[j * b:(j + 1) * b] for j in range(num_contexts)]), allv

      def plain(x):
        # Outside the CFG interval upstream runs the conditional forward only (scales set to 1).
        v_c = velocity(x, t, b)
        return v_c, jnp.concatenate([v_c, jnp.zeros(((num_contexts - 1) * b,) + v_c.shape[1:], v_c.dtype)])

      v_out, raw = jax.lax.cond(on, guided, plain, x)
    # Quirk: x stays float32 (upstream keeps x_t fp32 while v is bf16): x <- x - v * dt.
    x = x - v_out.astype(jnp.float32) * dt
    if progress:
      jax.debug.callback(_tick, i)
    return x, ((v_out, raw) if record else None)

  return step


def _branch_forwards(feature, b: int, c: int, shape: jax.ShapeDtypeStruct):
  """The forwards a cached step chooses from by index: none, the cond rows only, all c branches."""

  def none(x, t):
    return jnp.zeros((c, b) + shape.shape[1:], shape.dtype)

  def cond_only(x, t):
    f = feature(x, t, b)
    return jnp.concatenate([f[None], jnp.zeros((c - 1, b) + shape.shape[1:], f.dtype)])

  def all_rows(x, t):
    return feature(x, t, c * b).reshape((c, b) + shape.shape[1:])

  return [none, cond_only] + ([all_rows] if c > 1 else [])


def _cached_step(settings: ts_cache.TaylorSeerSettings, feature, to_velocity, combine, b: int, c: int,
                 shape: jax.ShapeDtypeStruct, record: bool, progress: bool):
  """The TaylorSeer scan body: carry (x, TaylorState); per branch, full or forecast by its own call count.

  At most one forward per step, over the rows that need it: the cond rows, or all branches when a
  CFG branch is full (a forecast branch among them keeps its forecast, as upstream, whose forecast
  layers ignore their input).
  """
  forwards = _branch_forwards(feature, b, c, shape)

  def step(carry, xs):
    x, st = carry
    i, t, dt, on = xs
    active = jnp.stack([jnp.asarray(True)] + [on] * (c - 1))
    guess = ts_cache.forecast(settings, st, t)
    kind = ts_cache.call_types(settings, st, active)
    full = kind == ts_cache.FULL
    which = jnp.where(full[0], 1, 0)
    if c > 1:
      which = jnp.where(jnp.any(full[1:]), 2, which)
    computed = jax.lax.switch(which, forwards, x, t)
    feat = jnp.where(full.reshape((c,) + (1,) * (guess.ndim - 1)), computed.astype(guess.dtype), guess)
    new_st = ts_cache.advance(settings, st, kind, computed, guess, t)
    vel = to_velocity(feat.reshape((c * b,) + feat.shape[2:]))
    parts = [vel[j * b:(j + 1) * b] for j in range(c)]
    v_out = parts[0] if c == 1 else jax.lax.cond(on, combine, lambda p: p[0], parts)
    x = x - v_out.astype(jnp.float32) * dt
    if progress:
      jax.debug.callback(_tick, i)
    if not record:
      return (x, new_st), None
    ran = jnp.repeat(kind != ts_cache.NOT_RUN, b).reshape((c * b,) + (1,) * (vel.ndim - 1))
    return (x, new_st), (v_out, jnp.where(ran, vel, 0.0)) + ts_cache.record(st, kind, new_st)

  return step


def _denoise(model, params, cache: KVCache, x0: jax.Array, ts: jax.Array, dts: jax.Array, cfg_on: jax.Array,
            text_scale: jax.Array, img_scale: jax.Array, renorm_min: jax.Array, *, grid: tuple[int, int],
            num_contexts: int, renorm_type: str, over_batch: bool = False, record: bool = False,
            progress: bool = False, taylorseer: ts_cache.TaylorSeerSettings | None = None):
  """The whole denoising loop. cache rows: [gen x B, cfg_text x B, cfg_img x B][:num_contexts x B].

  taylorseer: TaylorSeer step caching (`bagel_jax.inference.taylorseer`), its factors in the scan's
  carry, fresh on every call.  Returns (x [B, N, C] float32, and with `record`: (guided velocities
  [steps, B, N, C], raw branch velocities [steps, num_contexts x B, N, C] (zeros where a branch did
  not run), and with taylorseer (step_type, branch_step, n_terms) [steps, num_contexts])).
  """
  TRACE_COUNT["denoise"] += 1  # runs at trace time only: counts compilations
  bagel = model._bagel(params)
  b = x0.shape[0]
  k, v, lengths, ropes = cache.k, cache.v, cache.lengths, cache.next_rope

  def hidden(x, t, rows):
    return image_hidden(model, bagel, k[:, :rows], v[:, :rows], lengths[:rows], ropes[:rows], x, t, grid)

  def velocity(x, t, rows):
    return hidden_velocity(bagel, hidden(x, t, rows))

  def combine(parts):
    return combine_cfg(parts[0], parts[1], parts[2] if num_contexts > 2 else None, text_scale, img_scale,
                       renorm_type, renorm_min, over_batch)

  x0 = x0.astype(jnp.float32)
  if taylorseer is None:
    step, carry = _plain_step(velocity, combine, b, num_contexts, record, progress), x0
  else:
    feature = velocity if taylorseer.caches_velocity else hidden
    shape = jax.eval_shape(lambda x, t: feature(x, t, b), x0, ts[0])
    state = ts_cache.init_state(taylorseer, num_contexts, (b,) + shape.shape[1:], shape.dtype)
    to_velocity = (lambda f: f) if taylorseer.caches_velocity else (lambda h: hidden_velocity(bagel, h))
    step = _cached_step(taylorseer, feature, to_velocity, combine, b, num_contexts, shape, record, progress)
    carry = (x0, state)
  steps = ts.shape[0]
  xs = (jnp.arange(steps, dtype=jnp.int32), ts.astype(jnp.float32), dts.astype(jnp.float32), cfg_on)
  carry, rec = jax.lax.scan(step, carry, xs)
  return (carry if taylorseer is None else carry[0]), rec


denoise = jax.jit(_denoise, static_argnames=("model", "grid", "num_contexts", "renorm_type", "over_batch",
                                              "record", "progress", "taylorseer"))


def cache_shardings(cache: KVCache, mesh: jax.sharding.Mesh, rules=None) -> KVCache:
  """KV cache [L, B, S, Hkv, hd]: KV heads split as the rules split attention heads; the few CFG rows replicated."""
  from bagel_jax import sharding as shd
  rules = shd.DEFAULT_RULES if rules is None else rules
  spec = shd.logical_to_spec((None, None, None, "activation_kv_heads", None), rules, mesh, cache.k.shape)
  kv, repl = jax.sharding.NamedSharding(mesh, spec), jax.sharding.NamedSharding(mesh, jax.P())
  return KVCache(kv, kv, repl, repl)


def jit_denoise(model, mesh: jax.sharding.Mesh, param_shardings, cache_sharding: KVCache, *,
                grid: tuple[int, int], num_contexts: int, renorm_type: str, over_batch: bool = False,
                rules=None, progress: bool = False, taylorseer: ts_cache.TaylorSeerSettings | None = None):
  """`denoise` on a mesh: explicit in/out shardings, the initial noise donated to the result.

      step = jit_denoise(model, mesh, sharding.param_shardings(params, mesh), cache_shardings(cache, mesh),
                         grid=grid, num_contexts=3, renorm_type="global")
      x = step(params, cache, x0, ts, dts, cfg_on, text_scale, img_scale, renorm_min)
  """
  from bagel_jax import sharding as shd
  rules = shd.DEFAULT_RULES if rules is None else rules
  repl = jax.sharding.NamedSharding(mesh, jax.P())

  def run(params, cache, x0, ts, dts, cfg_on, text_scale, img_scale, renorm_min):
    with shd.use_rules(mesh, rules):
      x, _ = _denoise(model, params, cache, x0, ts, dts, cfg_on, text_scale, img_scale, renorm_min, grid=grid,
                      num_contexts=num_contexts, renorm_type=renorm_type, over_batch=over_batch, record=False,
                      progress=progress, taylorseer=taylorseer)
    return x

  jitted = jax.jit(run, in_shardings=(param_shardings, cache_sharding) + (repl,) * 7, out_shardings=repl,
                   donate_argnums=(2,))
  return shd.MeshBound(jitted, mesh)


__all__ = ["FlowSettings", "jit_denoise", "cache_shardings", "timestep_grid", "schedule", "combine_cfg", "image_velocity",
           "image_hidden", "hidden_velocity", "denoise",
           "progress_bar", "TRACE_COUNT"]
