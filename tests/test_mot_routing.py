"""Token routing: moving tokens to expert slots and back by gathers gives exactly what zero-filled
buffers scattered into per expert give, forward and backward (padded slots, tokens in no expert,
an expert without slots)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bagel_jax.config import LLMConfig
from bagel_jax.model import qwen2_mot as M
from bagel_jax.model.embeddings import rope_cos_sin

B, T = 2, 12
CFG = LLMConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, qk_norm=True)


def scatter_apply(h, routing, fn):
  """The routing before TokenRouting: gather each expert's tokens, scatter its outputs into zeros."""
  out = jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), jax.eval_shape(lambda h: fn(h, 0), h))
  for e, (start, size) in enumerate(routing.expert_slots):
    if size:
      idx = routing.slot_token[:, start:start + size]
      out = jax.tree.map(lambda o, y: M.scatter_tokens(o, idx, y), out, fn(M.gather_tokens(h, idx), e))
  return out


def expert_indexes(seed, und, gen):
  """Per row: a random split of the first T - 2 tokens (the last two are row padding in no expert),
  each expert padded with T to its capacity."""
  rng = np.random.default_rng(seed)
  idx = ([], [])
  for _ in range(B):
    perm = rng.permutation(T - 2)
    n_und = rng.integers(max(0, T - 2 - gen), min(und, T - 2) + 1)
    parts = (perm[:n_und], perm[n_und:])
    for e, cap in enumerate((und, gen)):
      idx[e].append(np.concatenate([parts[e], np.full(cap - len(parts[e]), T)]))
  return tuple(jnp.asarray(np.stack(i), jnp.int32) for i in idx)


def layer_loss(p, x, routing):
  ar = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  spec = M.AttentionSpec(jnp.zeros_like(ar), ar + 1, ar, jnp.full_like(ar, T))
  cos, sin = rope_cos_sin(ar, CFG.head_dim, CFG.rope_theta)
  y, (k, v) = M.decoder_layer(CFG, p, x, routing, cos, sin, spec, None, M.DecoderOptions("reference"), jnp.float32)
  w = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
  return jnp.sum(y * w) + jnp.sum(k * k) + jnp.sum(v), (y, k, v)


@pytest.mark.parametrize("und,gen", [(8, 6), (10, 0), (0, 10), (12, 12)])
def test_gathered_routing_equals_scatter_routing(monkeypatch, und, gen):
  layers = M.MoTLayers(CFG, rngs=nnx.Rngs(0))
  p = jax.tree.map(lambda a: a[0], nnx.to_pure_dict(nnx.state(layers)))
  p = jax.tree.map(lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), p)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, CFG.hidden_size)), jnp.float32)
  routing = M.route_tokens(expert_indexes(und * 31 + gen, und, gen), T)
  grad = jax.jit(jax.value_and_grad(layer_loss, argnums=(0, 1), has_aux=True))
  (loss, outs), grads = grad(p, x, routing)
  monkeypatch.setattr(M, "_expert_apply", scatter_apply)
  (want_loss, want_outs), want_grads = jax.jit(jax.value_and_grad(layer_loss, argnums=(0, 1), has_aux=True))(
      p, x, routing)
  np.testing.assert_array_equal(loss, want_loss)
  for got, want in zip(jax.tree.leaves((outs, grads)), jax.tree.leaves((want_outs, want_grads))):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)  # the weight-gradient dots may sum in another order
  # the row padding is in no expert: its residual passes through untouched
  np.testing.assert_array_equal(outs[0][:, -2:], x[:, -2:])


def test_route_tokens_inverts_the_slots():
  und, gen = expert_indexes(3, 8, 6)
  r = M.route_tokens((und, gen), T)
  assert r.expert_slots == ((0, 8), (8, 6))
  slot_token, token_slot = np.asarray(r.slot_token), np.asarray(r.token_slot)
  s = slot_token.shape[1]
  for b in range(B):
    for slot, tok in enumerate(slot_token[b]):
      if tok < T:
        assert token_slot[b, tok] == slot
    for tok, slot in enumerate(token_slot[b]):
      assert slot == s or slot_token[b, slot] == tok
    assert (token_slot[b, -2:] == s).all()
