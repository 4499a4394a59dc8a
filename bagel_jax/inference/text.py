"""Text generation against a KV cache: greedy or sampled, one compiled loop (upstream `generate_text`).

Upstream's loop (`bagel.py` `generate_text`), reproduced: the first token fed is `<|im_start|>`
at the context's next rope id; every iteration first appends the current token to the output,
then runs it (causal, und expert, its K/V appended to the cache), then picks the next token;
the loop stops after `max_length` iterations or when the picked token is `<|im_end|>` (which
is not appended).  So the output starts with `<|im_start|>` and holds at most `max_length`
tokens.  Upstream checks the stop token of sample 0 only ("only support batch=1"); here each
row stops on its own and the loop ends when all rows have.

Sampling: upstream draws from softmax(logits / temperature); top-k and top-p are additions
(top_k = 0 and top_p = 1 leave upstream's distribution unchanged).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bagel_jax.inference.kv_cache import KVCache, cache_key_intervals, write_kv
from bagel_jax.model.qwen2_mot import AttentionSpec, DecoderOptions


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Masks logits [B, V] outside the top-k (k <= 0: off) and the top-p nucleus (p >= 1: off)."""
  v = logits.shape[-1]
  srt = jnp.sort(logits, axis=-1)[..., ::-1]
  k = jnp.where(top_k <= 0, v, jnp.clip(top_k, 1, v)).astype(jnp.int32)
  kth = jnp.take_along_axis(srt, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1)
  logits = jnp.where(logits < kth, -jnp.inf, logits)
  srt = jnp.where(jnp.arange(v)[None] < k, srt, -jnp.inf)
  probs = jax.nn.softmax(srt, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
  keep = (before < top_p) | (jnp.arange(v)[None] == 0)
  last = jnp.sum(keep, axis=-1, keepdims=True) - 1
  thr = jnp.take_along_axis(srt, last, axis=-1)
  return jnp.where(logits < thr, -jnp.inf, logits)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
  """One draw per row from softmax(filtered logits / temperature)."""
  scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  return jax.random.categorical(key, filter_logits(scaled, top_k, top_p), axis=-1).astype(jnp.int32)


def decode_step(model, bagel, cache: KVCache, tokens: jax.Array, active: jax.Array):
  """Feeds one token per row; returns (logits [B, V] float32, cache with the new K/V appended)."""
  b = tokens.shape[0]
  s = cache.capacity
  big = s + 1
  x = bagel.llm.embed(tokens[:, None])
  cq_start, cq_end = cache_key_intervals(cache.lengths, s, big)
  spec = AttentionSpec(
      k_start=jnp.zeros((b, 1), jnp.int32),
      k_end=jnp.full((b, 1), s + 1, jnp.int32),
      q_start=jnp.concatenate([cq_start, jnp.full((b, 1), s, jnp.int32)], axis=1),
      q_end=jnp.concatenate([cq_end, jnp.full((b, 1), big, jnp.int32)], axis=1),
      q_positions=jnp.full((b, 1), s, jnp.int32))
  und = jnp.zeros((b, 1), jnp.int32)
  gen = jnp.zeros((b, 0), jnp.int32)
  opts = DecoderOptions(attention_impl=model.attention_impl, return_kv=True)
  h, (k, v) = bagel.llm(x, (und, gen), cache.next_rope[:, None], spec, past_kv=(cache.k, cache.v), opts=opts)
  h = bagel.llm.final_norm(h, jnp.zeros((b, 1), jnp.int32))
  logits = bagel.llm.logits(h)[:, 0].astype(jnp.float32)
  slots = jnp.where(active & (cache.lengths < s), cache.lengths, s + 1)[:, None]
  step = active.astype(jnp.int32)
  new = KVCache(write_kv(cache.k, k, slots), write_kv(cache.v, v, slots), cache.lengths + step,
                cache.next_rope + step)
  return logits, new


@functools.partial(jax.jit, static_argnames=("model", "max_tokens", "do_sample", "record_logits"))
def generate_tokens(model, params, cache: KVCache, start_tokens: jax.Array, max_length: jax.Array,
                    eos_id: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                    *, max_tokens: int, do_sample: bool = False, record_logits: bool = False):
  """The decoding loop, compiled once per (cache shape, max_tokens bucket, flags).

  Returns (tokens [B, max_tokens] (-1 after a row's end), counts [B], logits
  [max_tokens, B, V] or None, the cache with every fed token appended).
  `max_length` (<= max_tokens) is a traced limit: changing it does not recompile.
  """
  bagel = model._bagel(params)
  b = start_tokens.shape[0]
  vocab = model.cfg.llm.vocab_size
  out = jnp.full((b, max_tokens), -1, jnp.int32)
  logit_buf = jnp.zeros((max_tokens, b, vocab), jnp.float32) if record_logits else None

  def cond(state):
    step, _, _, done, *_ = state
    return (step < jnp.minimum(max_length, max_tokens)) & ~jnp.all(done)

  def body(state):
    step, cache, cur, done, out, counts, logit_buf, rng = state
    active = ~done
    out = out.at[:, step].set(jnp.where(active, cur, -1))
    counts = counts + active.astype(jnp.int32)
    logits, cache = decode_step(model, bagel, cache, cur, active)
    if record_logits:
      logit_buf = logit_buf.at[step].set(logits)
    rng, key = jax.random.split(rng)
    if do_sample:
      nxt = sample_logits(logits, key, temperature, top_k, top_p)
    else:
      nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    nxt = jnp.where(active, nxt, cur)
    done = done | (nxt == eos_id)
    return step + 1, cache, nxt, done, out, counts, logit_buf, rng

  state = (jnp.int32(0), cache, start_tokens.astype(jnp.int32), jnp.zeros((b,), bool), out,
           jnp.zeros((b,), jnp.int32), logit_buf, rng)
  _, cache, _, _, out, counts, logit_buf, _ = jax.lax.while_loop(cond, body, state)
  return out, counts, logit_buf, cache


__all__ = ["generate_tokens", "decode_step", "sample_logits", "filter_logits", "strip_generated"]


def strip_generated(text: str) -> str:
  """Upstream's `output.split('<|im_end|>')[0].split('<|im_start|>')[1]` (tolerant of a missing start)."""
  head = text.split("<|im_end|>")[0]
  parts = head.split("<|im_start|>")
  return parts[1] if len(parts) > 1 else parts[0]
