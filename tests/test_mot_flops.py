"""One expert per token: a compiled MoT layer costs about one dense layer, not two."""

import jax
import jax.numpy as jnp
from flax import nnx

from bagel_jax.config import LLMConfig
from bagel_jax.model import qwen2_mot as M
from bagel_jax.model.embeddings import rope_cos_sin


def _layer_flops(expert_idx, cfg, t):
  layers = M.MoTLayers(cfg, rngs=nnx.Rngs(0))
  p = jax.tree.map(lambda a: a[0], nnx.to_pure_dict(nnx.state(layers)))
  ar = jnp.arange(t, dtype=jnp.int32)[None]
  spec = M.AttentionSpec(jnp.zeros_like(ar), ar + 1, ar, jnp.full_like(ar, t))
  opts = M.DecoderOptions(attention_impl="reference")

  def f(p, x, expert_idx):  # the indexes are arguments: constants would let XLA fold the routing away
    cos, sin = rope_cos_sin(ar, cfg.head_dim, cfg.rope_theta)
    return M.decoder_layer(cfg, p, x, M.route_tokens(expert_idx, t), cos, sin, spec, None, opts, jnp.float32)[0]

  x = jnp.zeros((1, t, cfg.hidden_size))
  cost = jax.jit(f).lower(p, x, expert_idx).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"]


def test_mot_layer_flops_match_one_dense_layer():
  cfg = LLMConfig(vocab_size=64, hidden_size=256, intermediate_size=768, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
  t = 256
  ar = jnp.arange(t, dtype=jnp.int32)[None]
  dense = _layer_flops((ar, jnp.zeros((1, 0), jnp.int32)), cfg, t)
  mot = _layer_flops((ar[:, : t // 2] * 2, ar[:, : t // 2] * 2 + 1), cfg, t)
  both = _layer_flops((ar, ar), cfg, t)  # what computing both experts for every token would cost
  assert abs(mot / dense - 1) < 0.10, (mot, dense)
  assert both / dense > 1.7, (both, dense)
