"""Preallocated KV caches, the context segments written into them, and the prefill/extend steps.

A *context* (upstream's gen / cfg_text / cfg_img contexts, `inferencer.py`) is one row of a
`KVCache`: keys and values `[L, B, S, Hkv, hd]` allocated once to a capacity S, with per-row
`lengths` (valid slots) and `next_rope` (the rope id the next item gets).  Upstream's
`NaiveCache` reallocates a merged tensor at every update (`qwen2_navit.py` `forward_inference`);
here new keys/values are scattered into free slots of the preallocated arrays, and slots at or
beyond a row's length are invisible to every query.

A context is built from *segments* (`TextSegment`, `VitSegment`, `VaeSegment`), upstream's
`prepare_prompts` / `prepare_vit_images` / `prepare_vae_images` items:
- text: `<|im_start|>` + ids + `<|im_end|>`, causal, rope +1 per token, und expert;
- ViT image: `<|vision_start|>` + patches + `<|vision_end|>`, one bidirectional block at one rope
  id, then rope +1; und expert;
- clean VAE image: the same block shape, latent tokens embedded at t = 0; markers use the und
  expert, latents the gen expert; rope +1.
Several segments go into one forward (a *chunk*): the interval mask makes that identical to
upstream's one call per segment (earlier segments are visible, later ones are not).

Attention of a chunk of T queries against a cache of capacity S runs over the keys
[cache slots 0..S-1; chunk S..S+T-1] with the interval arrays of `bagel_jax.attention`:
cached slot k is visible to every query iff k < length (q_start = 0, q_end = S+T, else q_end = 0);
a chunk key follows its segment's mode (causal: q_start = its position; block: the block start).
Padding tokens of a chunk see nothing and are seen by nobody; their keys are never written.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.config import BagelConfig, LLMConfig
from bagel_jax.image import navit_position_ids
from bagel_jax.layout import EXPERT_GEN, EXPERT_UND, TOKEN_PAD, TOKEN_TEXT, TOKEN_VAE, TOKEN_VIT
from bagel_jax.model.qwen2_mot import AttentionSpec, DecoderOptions, scatter_tokens

from bagel_jax.inference.errors import InferenceError


# ----------------------------------------------------------------------------- sizes

def bucket(n: int, minimum: int = 16) -> int:
  """Rounds n up to a size bucket (at most ~25% waste), so that shapes repeat across requests."""
  n = max(int(n), 1)
  if n <= minimum:
    return minimum
  g = max(minimum, 1 << max(n.bit_length() - 3, 0))
  return -(-n // g) * g


# ----------------------------------------------------------------------------- the cache

@flax.struct.dataclass
class KVCache:
  """Keys/values of B contexts: k, v [L, B, S, Hkv, hd]; lengths, next_rope [B] int32."""

  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  next_rope: jax.Array

  @property
  def capacity(self) -> int:
    return self.k.shape[2]

  @property
  def batch(self) -> int:
    return self.k.shape[1]


def empty_cache(cfg: LLMConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
  shape = (cfg.num_hidden_layers, batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
  z = jnp.zeros((batch,), jnp.int32)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), z, z)


@functools.partial(jax.jit, static_argnames=("capacity",))
def take_rows(cache: KVCache, rows: jax.Array, lengths: jax.Array, next_rope: jax.Array,
              capacity: int | None = None) -> KVCache:
  """A new cache of the given rows (with their own lengths and rope ids), optionally re-sized.

  Rows can repeat and lengths can be shorter than the source row: a context that is a prefix
  of another (upstream's cfg_text context is always a prefix of gen) reads the same slots.
  """
  k = jnp.take(cache.k, rows, axis=1)
  v = jnp.take(cache.v, rows, axis=1)
  if capacity is not None and capacity != k.shape[2]:
    if capacity > k.shape[2]:
      pad = ((0, 0), (0, 0), (0, capacity - k.shape[2]), (0, 0), (0, 0))
      k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    else:
      k, v = k[:, :, :capacity], v[:, :, :capacity]
  return KVCache(k, v, lengths.astype(jnp.int32), next_rope.astype(jnp.int32))


@jax.jit
def _concat(caches: list[KVCache], perm: jax.Array) -> KVCache:
  cat = lambda xs, axis: jnp.take(jnp.concatenate(xs, axis=axis), perm, axis=axis)
  return KVCache(cat([c.k for c in caches], 1), cat([c.v for c in caches], 1),
                 cat([c.lengths for c in caches], 0), cat([c.next_rope for c in caches], 0))


def concat_rows(caches: Sequence[KVCache], perm) -> KVCache:
  """Caches of equal capacity stacked along the batch axis, rows then reordered by `perm`."""
  return _concat(list(caches), jnp.asarray(perm, jnp.int32))


def write_kv(cache_arr: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
  """cache_arr [L, B, S, ...] with new [L, B, T, ...] written at slots [B, T] (slot >= S: dropped)."""
  return jax.vmap(lambda c, x, p: c.at[:, p].set(x.astype(c.dtype), mode="drop"),
                  in_axes=(1, 1, 0), out_axes=1)(cache_arr, new, slots)


def cache_key_intervals(lengths: jax.Array, capacity: int, big: int) -> tuple[jax.Array, jax.Array]:
  """q_start, q_end [B, S] of cached keys: valid slots are visible to all later queries."""
  b = lengths.shape[0]
  slot = jnp.arange(capacity, dtype=jnp.int32)[None]
  q_start = jnp.zeros((b, capacity), jnp.int32)
  q_end = jnp.where(slot < lengths[:, None], big, 0).astype(jnp.int32)
  return q_start, q_end


# ----------------------------------------------------------------------------- segments

@dataclasses.dataclass(frozen=True, eq=False)
class TextSegment:
  """Tokenizer ids of one text, without the `<|im_start|>` / `<|im_end|>` that frame it."""

  ids: tuple[int, ...]

  @property
  def num_tokens(self) -> int:
    return len(self.ids) + 2

  @property
  def rope_advance(self) -> int:
    return len(self.ids) + 2


@dataclasses.dataclass(frozen=True, eq=False)
class VitSegment:
  """A ViT image: patchified pixels [gh*gw, 3*p*p] in [-1, 1] and its patch grid."""

  patches: np.ndarray
  grid: tuple[int, int]

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1] + 2

  rope_advance = 1


@dataclasses.dataclass(frozen=True, eq=False)
class VaeSegment:
  """A clean VAE image: scaled latent tokens [h*w, p*p*z] (patchified) and the latent grid."""

  tokens: np.ndarray
  grid: tuple[int, int]

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1] + 2

  rope_advance = 1


Segment = Union[TextSegment, VitSegment, VaeSegment]


def context_length(segs: Sequence[Segment]) -> int:
  return sum(s.num_tokens for s in segs)


def context_rope(segs: Sequence[Segment]) -> int:
  return sum(s.rope_advance for s in segs)


# ----------------------------------------------------------------------------- chunks

@flax.struct.dataclass
class Chunk:
  """B rows of query tokens to run against a cache (or to start one). Intervals are relative
  to the chunk start; `n` counts each row's valid tokens (the rest is padding)."""

  kind: jax.Array  # [B, T] TOKEN_*
  text_ids: jax.Array  # [B, T]
  expert: jax.Array  # [B, T]
  rope_ids: jax.Array  # [B, T] absolute rope ids
  k_end: jax.Array  # [B, T] relative (0 for padding)
  q_start: jax.Array  # [B, T] relative
  q_end: jax.Array  # [B, T] relative (0 for padding)
  n: jax.Array  # [B]
  rope_end: jax.Array  # [B] the row's next rope id after this chunk
  und_idx: jax.Array  # [B, Cu] padded with T
  gen_idx: jax.Array  # [B, Cg]
  vit_patches: jax.Array  # [B, Nv, 3*p*p]
  vit_pos: jax.Array  # [B, Nv]
  vit_block_start: jax.Array  # [B, Nv] in the row's ViT token stream
  vit_block_end: jax.Array
  vit_idx: jax.Array  # [B, Nv] chunk positions (padded with T)
  vae_tokens: jax.Array  # [B, Nl, p*p*z]
  vae_pos: jax.Array  # [B, Nl] `image.navit_position_ids` over max_latent_size
  vae_idx: jax.Array  # [B, Nl]

  @property
  def length(self) -> int:
    return self.kind.shape[1]


def build_chunk(rows: Sequence[Sequence[Segment]], start_ropes: Sequence[int], cfg: BagelConfig, *,
                length: int | None = None, exact: bool = False) -> Chunk:
  """Lays out each row's segments one after another (numpy, on the host).

  Shapes are bucketed (`bucket`) unless `exact`; `length` forces the token axis. Kept whole: one loop
  over the segments fills every per-token array of the chunk together.
  """
  tok = cfg.tokens
  b = len(rows)
  need_t = max((context_length(r) for r in rows), default=0)
  t = length if length is not None else (need_t if exact else bucket(need_t))
  if need_t > t:
    raise InferenceError(f"chunk needs {need_t} tokens but its length is {t}")
  pdim_vit = cfg.vit.patch_dim
  pdim_vae = cfg.patch_latent_dim

  per_row = []
  for segs, rope0 in zip(rows, start_ropes):
    r = {k: [] for k in ("kind", "text", "expert", "rope", "k_end", "q_start", "vit_p", "vit_pos", "vit_bs",
                         "vit_be", "vit_idx", "vae_t", "vae_pos", "vae_idx")}
    pos, rope, nvit = 0, int(rope0), 0
    for seg in segs:
      start = pos
      if isinstance(seg, TextSegment):
        ids = [tok.bos_token_id] + [int(i) for i in seg.ids] + [tok.eos_token_id]
        for j, tid in enumerate(ids):
          r["kind"].append(TOKEN_TEXT); r["text"].append(tid); r["expert"].append(EXPERT_UND)
          r["rope"].append(rope + j); r["k_end"].append(start + j + 1); r["q_start"].append(start + j)
        pos += len(ids)
        rope += len(ids)
        continue
      gh, gw = seg.grid
      end = start + gh * gw + 2
      is_vit = isinstance(seg, VitSegment)
      kinds = [TOKEN_TEXT] + [TOKEN_VIT if is_vit else TOKEN_VAE] * (gh * gw) + [TOKEN_TEXT]
      texts = [tok.start_of_image] + [0] * (gh * gw) + [tok.end_of_image]
      experts = [EXPERT_UND] + [EXPERT_UND if is_vit else EXPERT_GEN] * (gh * gw) + [EXPERT_UND]
      r["kind"] += kinds; r["text"] += texts; r["expert"] += experts
      r["rope"] += [rope] * (end - start); r["k_end"] += [end] * (end - start); r["q_start"] += [start] * (end - start)
      idx = list(range(start + 1, end - 1))
      if is_vit:
        side = cfg.vit_max_num_patch_per_side
        if not cfg.interpolate_pos and (gh > side or gw > side):
          raise InferenceError(f"ViT image of {gh}x{gw} patches exceeds the position table "
                               f"({side}x{side} patches = {side * cfg.vit.patch_size} px per side)")
        patches = np.asarray(seg.patches, np.float32).reshape(gh * gw, pdim_vit)
        r["vit_p"].append(patches); r["vit_pos"] += navit_position_ids(gh, gw, side, cfg.interpolate_pos).tolist()
        r["vit_bs"] += [nvit] * (gh * gw); r["vit_be"] += [nvit + gh * gw] * (gh * gw); r["vit_idx"] += idx
        nvit += gh * gw
      else:
        side = cfg.max_latent_size
        if not cfg.interpolate_pos and (gh > side or gw > side):
          raise InferenceError(f"VAE image of {gh}x{gw} latent tokens exceeds the position table "
                               f"({side}x{side} tokens = {side * cfg.latent_downsample} px per side)")
        r["vae_t"].append(np.asarray(seg.tokens, np.float32).reshape(gh * gw, pdim_vae))
        r["vae_pos"] += navit_position_ids(gh, gw, side, cfg.interpolate_pos).tolist(); r["vae_idx"] += idx
      pos = end
      rope += 1
    r["n"], r["rope_end"] = pos, rope
    per_row.append(r)

  def size(key: str) -> int:
    need = max((len(r[key]) for r in per_row), default=0)
    return 0 if need == 0 else (need if exact else bucket(need))

  nu = max((sum(1 for e in r["expert"] if e == EXPERT_UND) for r in per_row), default=0)
  ng = max((sum(1 for e in r["expert"] if e == EXPERT_GEN) for r in per_row), default=0)
  cu = nu if exact else bucket(nu)
  cg = 0 if ng == 0 else (ng if exact else bucket(ng))
  nv, nl = size("vit_pos"), size("vae_pos")

  def arr(shape, fill, dtype=np.int32):
    return np.full((b,) + shape, fill, dtype)

  out = dict(kind=arr((t,), TOKEN_PAD), text_ids=arr((t,), 0), expert=arr((t,), EXPERT_UND),
             rope_ids=arr((t,), 0), k_end=arr((t,), 0), q_start=arr((t,), 0), q_end=arr((t,), 0),
             n=np.zeros((b,), np.int32), rope_end=np.zeros((b,), np.int32),
             und_idx=arr((cu,), t), gen_idx=arr((cg,), t),
             vit_patches=arr((nv, pdim_vit), 0.0, np.float32), vit_pos=arr((nv,), 0),
             vit_block_start=arr((nv,), 0), vit_block_end=arr((nv,), 0), vit_idx=arr((nv,), t),
             vae_tokens=arr((nl, pdim_vae), 0.0, np.float32), vae_pos=arr((nl,), 0), vae_idx=arr((nl,), t))
  for i, r in enumerate(per_row):
    n = r["n"]
    out["kind"][i, :n] = r["kind"]; out["text_ids"][i, :n] = r["text"]; out["expert"][i, :n] = r["expert"]
    out["rope_ids"][i, :n] = r["rope"]; out["k_end"][i, :n] = r["k_end"]; out["q_start"][i, :n] = r["q_start"]
    out["q_end"][i, :n] = n
    if n < t:  # padding tokens keep the row's next rope id (harmless: they see nothing)
      out["rope_ids"][i, n:] = r["rope_end"]
    out["n"][i], out["rope_end"][i] = n, r["rope_end"]
    experts = np.asarray(r["expert"], np.int32)
    und = np.nonzero(experts == EXPERT_UND)[0]
    gen = np.nonzero(experts == EXPERT_GEN)[0]
    out["und_idx"][i, :len(und)] = und
    out["gen_idx"][i, :len(gen)] = gen
    k = len(r["vit_pos"])
    if k:
      out["vit_patches"][i, :k] = np.concatenate(r["vit_p"]); out["vit_pos"][i, :k] = r["vit_pos"]
      out["vit_block_start"][i, :k] = r["vit_bs"]; out["vit_block_end"][i, :k] = r["vit_be"]
      out["vit_idx"][i, :k] = r["vit_idx"]
    k = len(r["vae_pos"])
    if k:
      out["vae_tokens"][i, :k] = np.concatenate(r["vae_t"]); out["vae_pos"][i, :k] = r["vae_pos"]
      out["vae_idx"][i, :k] = r["vae_idx"]
  return Chunk(**out)


def chunk_spec(chunk: Chunk, lengths: jax.Array, capacity: int) -> AttentionSpec:
  """The attention intervals of `chunk` against a cache of `capacity` slots (keys: [cache; chunk])."""
  b, t = chunk.kind.shape
  s = capacity
  big = s + t
  valid = jnp.arange(t, dtype=jnp.int32)[None] < chunk.n[:, None]
  k_start = jnp.zeros((b, t), jnp.int32)
  k_end = jnp.where(valid, s + chunk.k_end, 0).astype(jnp.int32)
  cq_start, cq_end = cache_key_intervals(lengths, s, big)
  q_start = jnp.concatenate([cq_start, (s + chunk.q_start).astype(jnp.int32)], axis=1)
  q_end = jnp.concatenate([cq_end, jnp.where(valid, s + chunk.q_end, 0).astype(jnp.int32)], axis=1)
  q_positions = jnp.broadcast_to(s + jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  return AttentionSpec(k_start, k_end, q_start, q_end, q_positions)


def embed_chunk(bagel, chunk: Chunk) -> jax.Array:
  """The LLM input of a chunk [B, T, D]: text embeddings, ViT features, clean latents (t = 0)."""
  x = bagel.llm.embed(chunk.text_ids)
  x = jnp.where((chunk.kind == TOKEN_TEXT)[..., None], x, 0).astype(bagel.dtype)
  if chunk.vit_idx.shape[1]:
    v = bagel.vit_embeddings(chunk.vit_patches, chunk.vit_pos, chunk.vit_block_start, chunk.vit_block_end)
    x = scatter_tokens(x, chunk.vit_idx, v.astype(x.dtype))
  if chunk.vae_idx.shape[1]:
    # Upstream `prepare_vae_images(timestep=0)`: conditioning latents are embedded at t = 0.
    t0 = jnp.zeros(chunk.vae_pos.shape, jnp.float32)
    e = bagel.latent_embeddings(chunk.vae_tokens, t0, chunk.vae_pos)
    x = scatter_tokens(x, chunk.vae_idx, e.astype(x.dtype))
  return x


def _run_chunk(model, params, chunk: Chunk, cache: KVCache | None):
  bagel = model._bagel(params)
  x = embed_chunk(bagel, chunk)
  s = 0 if cache is None else cache.capacity
  lengths = jnp.zeros(chunk.n.shape, jnp.int32) if cache is None else cache.lengths
  spec = chunk_spec(chunk, lengths, s)
  past = None if cache is None else (cache.k, cache.v)
  opts = DecoderOptions(attention_impl=model.attention_impl, return_kv=True)
  h, kv = bagel.llm(x, (chunk.und_idx, chunk.gen_idx), chunk.rope_ids, spec, past_kv=past, opts=opts)
  return bagel, h, kv, lengths


def _slots(chunk: Chunk, lengths: jax.Array, capacity: int) -> jax.Array:
  t = chunk.length
  j = jnp.arange(t, dtype=jnp.int32)[None]
  return jnp.where(j < chunk.n[:, None], lengths[:, None] + j, capacity + t).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "capacity", "cache_dtype"))
def prefill(model, params, chunk: Chunk, capacity: int, cache_dtype=None) -> KVCache:
  """Runs `chunk` as the start of B fresh contexts and returns their cache (capacity slots)."""
  _, _, (k, v), _ = _run_chunk(model, params, chunk, None)
  dtype = cache_dtype or k.dtype
  cache = empty_cache(model.cfg.llm, chunk.n.shape[0], capacity, dtype)
  slots = _slots(chunk, cache.lengths, capacity)
  return KVCache(write_kv(cache.k, k, slots), write_kv(cache.v, v, slots), chunk.n, chunk.rope_end)


@functools.partial(jax.jit, static_argnames=("model",))
def extend(model, params, cache: KVCache, chunk: Chunk) -> KVCache:
  """Appends `chunk` to each row of `cache` (rows with n = 0 are left as they are)."""
  _, _, (k, v), lengths = _run_chunk(model, params, chunk, cache)
  slots = _slots(chunk, lengths, cache.capacity)
  rope = jnp.where(chunk.n > 0, chunk.rope_end, cache.next_rope)
  return KVCache(write_kv(cache.k, k, slots), write_kv(cache.v, v, slots), lengths + chunk.n, rope)


def check_capacity(lengths: Sequence[int], extra: int, capacity: int) -> None:
  worst = max(lengths, default=0) + extra
  if worst > capacity:
    raise InferenceError(f"KV cache overflow: {worst} slots needed, capacity {capacity}")


__all__ = ["KVCache", "Chunk", "TextSegment", "VitSegment", "VaeSegment", "Segment", "bucket", "empty_cache",
           "take_rows", "concat_rows", "write_kv", "build_chunk", "chunk_spec", "embed_chunk", "prefill", "extend",
           "context_length", "context_rope", "check_capacity", "cache_key_intervals"]
