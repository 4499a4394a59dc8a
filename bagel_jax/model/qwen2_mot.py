"""The Mixture-of-Transformers Qwen2 decoder (upstream `Qwen2MoTDecoderLayer`, `PackedAttentionMoT`).

Every decoder weight has a leading layer axis L and an expert axis of size 2
(0 = und, 1 = gen).  A token goes through exactly one expert: the tokens are moved
into expert slots (the und tokens, then the gen tokens, each padded to a static
capacity), each expert runs a dense matmul on its slots, and the outputs are moved
back.  In the backward both moves are gathers, each the other's gradient
(`TokenRouting`), so no zero-filled gradient buffer is scattered into.  One attention runs over
the whole sequence.  Layers are applied with `jax.lax.scan` over the stacked parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from bagel_jax.attention import attention
from bagel_jax.config import LLMConfig
from bagel_jax.model.embeddings import apply_rope, rope_cos_sin
from bagel_jax.sharding import constrain

# Logical names of the LLM residual stream [B, T, D]; constrained at every layer boundary (a no-op
# unless a train/sampler step traces under `sharding.use_rules`; costs nothing in the 7B plan).
RESIDUAL = ("activation_batch", "activation_length", "activation_embed")

NUM_EXPERTS = 2

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype (weight applied by the caller)."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype)


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, T, ...], idx [B, C] (T = padding) -> [B, C, ...]; padded rows are zeros."""
  return jax.vmap(lambda xb, ib: xb.at[ib].get(mode="fill", fill_value=0))(x, idx)


def scatter_tokens(base: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
  """base [B, T, ...] with rows idx [B, C] set to values [B, C, ...]; padded indexes are dropped."""
  return jax.vmap(lambda bb, ib, vb: bb.at[ib].set(vb, mode="drop"))(base, idx, values)


@flax.struct.dataclass
class TokenRouting:
  """Which expert slot computes each token, built once per forward and shared by every layer.

  slot_token [B, S]: the token in each slot, the und slots first (T = an empty slot);
  token_slot [B, T]: each token's slot (S = the token is in no expert, e.g. row padding).
  The two are inverse one-to-one maps between the tokens and the slots they fill, so both
  directions are gathers, and the gradient of one direction is the other.
  """

  slot_token: jax.Array
  token_slot: jax.Array
  und_slots: int = flax.struct.field(pytree_node=False)

  @property
  def expert_slots(self) -> tuple[tuple[int, int], tuple[int, int]]:
    """(first slot, slot count) per expert."""
    s = self.slot_token.shape[1]
    return (0, self.und_slots), (self.und_slots, s - self.und_slots)


def route_tokens(expert_idx: tuple[jax.Array, jax.Array], num_tokens: int) -> TokenRouting:
  """TokenRouting from the per-expert token indexes ([B, C_und], [B, C_gen]; num_tokens = padding)."""
  slot_token = jnp.concatenate([i.astype(jnp.int32) for i in expert_idx], axis=1)
  s = slot_token.shape[1]
  slots = jnp.arange(s, dtype=jnp.int32)
  token_slot = jax.vmap(lambda st: jnp.full((num_tokens,), s, jnp.int32).at[st].set(slots, mode="drop"))(slot_token)
  return TokenRouting(slot_token, token_slot, int(expert_idx[0].shape[1]))


def _segments(und_slots: int, num_slots: int) -> tuple[tuple[int, int], ...]:
  """(first slot, slot count) of each expert that has slots."""
  return tuple((a, n) for a, n in ((0, und_slots), (und_slots, num_slots - und_slots)) if n)


def _split(x, slot_token, token_slot, und_slots):
  """x [B, T, ...] -> per expert with slots, its tokens [B, C_e, ...] (zeros in empty slots)."""
  return tuple(gather_tokens(x, slot_token[:, a:a + n]) for a, n in _segments(und_slots, slot_token.shape[1]))


def _merge(ys, slot_token, token_slot, und_slots):
  """Per-expert outputs [B, C_e, ...] -> [B, T, ...] (zeros for tokens in no expert), by gathers per token."""
  out = None
  for y, (a, n) in zip(ys, _segments(und_slots, slot_token.shape[1])):
    local = jnp.where((token_slot >= a) & (token_slot < a + n), token_slot - a, n)  # n: out of range, a zero
    part = gather_tokens(y, local)
    out = part if out is None else out + part  # each token reads one expert, the other gives an exact zero
  return out


def _scatter_merge(ys, slot_token, token_slot, und_slots):
  """`_merge` by scattering each expert's outputs into zeros (the forward pass: what XLA's TPU / GPU
  cost analyses rate cheapest for inference, where no backward needs the zeros)."""
  segs = _segments(und_slots, slot_token.shape[1])
  out = jnp.zeros((ys[0].shape[0], token_slot.shape[1]) + ys[0].shape[2:], ys[0].dtype)
  for y, (a, n) in zip(ys, segs):
    out = scatter_tokens(out, slot_token[:, a:a + n], y)
  return out


# The gradient of a gather per expert is a gather per token and the other way round: neither
# direction's backward scatters into a zero-filled buffer.
split_to_experts = jax.custom_vjp(_split, nondiff_argnums=(3,))
merge_from_experts = jax.custom_vjp(_scatter_merge, nondiff_argnums=(3,))
split_to_experts.defvjp(lambda x, st, ts, u: (_split(x, st, ts, u), (st, ts)),
                        lambda u, res, gs: (_merge(gs, *res, u), None, None))
merge_from_experts.defvjp(lambda ys, st, ts, u: (_scatter_merge(ys, st, ts, u), (st, ts)),
                          lambda u, res, g: (_split(g, *res, u), None, None))


def _param(rngs: nnx.Rngs, init, shape, dtype) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype))


class MoTLinear(nnx.Module):
  """A linear layer stacked over (layer, expert): kernel [L, 2, in, out], optional bias [L, 2, out]."""

  def __init__(self, layers: int, d_in: int, d_out: int, *, use_bias: bool, rngs: nnx.Rngs, param_dtype):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-2, out_axis=-1, batch_axis=(0, 1))
    self.kernel = _param(rngs, init, (layers, NUM_EXPERTS, d_in, d_out), param_dtype)
    self.bias = nnx.Param(jnp.zeros((layers, NUM_EXPERTS, d_out), param_dtype)) if use_bias else None


class MoTLayers(nnx.Module):
  """All decoder layers' weights, stacked [L, 2, ...]."""

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    n, d, f, hd = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    ones = lambda *s: nnx.Param(jnp.ones((n, NUM_EXPERTS) + s, param_dtype))
    self.input_layernorm = ones(d)
    self.q_proj = MoTLinear(n, d, hq * hd, use_bias=True, rngs=rngs, param_dtype=param_dtype)
    self.k_proj = MoTLinear(n, d, hk * hd, use_bias=True, rngs=rngs, param_dtype=param_dtype)
    self.v_proj = MoTLinear(n, d, hk * hd, use_bias=True, rngs=rngs, param_dtype=param_dtype)
    self.o_proj = MoTLinear(n, hq * hd, d, use_bias=False, rngs=rngs, param_dtype=param_dtype)
    # qk_norm=False: upstream's q_norm / k_norm (and their _moe_gen twins) are nn.Identity.
    self.q_norm = ones(hd) if cfg.qk_norm else None
    self.k_norm = ones(hd) if cfg.qk_norm else None
    self.post_attention_layernorm = ones(d)
    self.gate_proj = MoTLinear(n, d, f, use_bias=False, rngs=rngs, param_dtype=param_dtype)
    self.up_proj = MoTLinear(n, d, f, use_bias=False, rngs=rngs, param_dtype=param_dtype)
    self.down_proj = MoTLinear(n, f, d, use_bias=False, rngs=rngs, param_dtype=param_dtype)


@flax.struct.dataclass
class AttentionSpec:
  """Where each query sits and what it may see (see bagel_jax.attention).

  Keys are the concatenation [past cache (S0), this chunk (T)]; interval arrays index that
  key axis.  For a plain packed forward S0 = 0 and q_positions = arange(T).
  """

  k_start: jax.Array  # [B, T]
  k_end: jax.Array  # [B, T]
  q_start: jax.Array  # [B, S0 + T]
  q_end: jax.Array  # [B, S0 + T]
  q_positions: jax.Array | None = None  # [B, T]


@dataclasses.dataclass(frozen=True)
class DecoderOptions:
  attention_impl: str = "auto"
  remat: str = "none"
  return_kv: bool = False
  # Unrolled, the backward keeps each layer's residuals in its own buffer; a scan stacks them in
  # [L, ...] buffers that XLA:CPU zero-fills and copies every step (25% of the shapes demo's step).
  # Compile time grows with the layer count, so large models keep the scan.
  unroll_layers: bool = False


def _expert_linear(h_e: jax.Array, lin: dict[str, jax.Array], e: int, dtype) -> jax.Array:
  y = jnp.einsum("bci,io->bco", h_e, lin["kernel"][e].astype(dtype), preferred_element_type=jnp.float32)
  if lin.get("bias") is not None:
    y = y + lin["bias"][e].astype(jnp.float32)
  return y.astype(dtype)


def _expert_apply(h: jax.Array, routing: TokenRouting, fn: Callable[[jax.Array, int], Any]):
  """Each token of h [B, T, D] through its expert's fn(tokens [B, C_e, D], expert); tokens in no expert give zeros.

  The tokens are gathered per expert and the outputs scattered back per token (`split_to_experts`,
  `merge_from_experts`); in the backward both are gathers: no zero-filled gradient buffer."""
  r = routing
  experts = [e for e, (_, n) in enumerate(r.expert_slots) if n]
  if not experts:  # no token in any expert
    return jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), jax.eval_shape(lambda h: fn(h, 0), h))
  parts = split_to_experts(h, r.slot_token, r.token_slot, r.und_slots)
  outs = [fn(part, e) for part, e in zip(parts, experts)]
  return jax.tree.map(lambda *ys: merge_from_experts(ys, r.slot_token, r.token_slot, r.und_slots), *outs)


def decoder_layer(cfg: LLMConfig, p: dict[str, Any], x: jax.Array, routing: TokenRouting, cos, sin, spec: AttentionSpec,
                  past_kv: tuple[jax.Array, jax.Array] | None, opts: DecoderOptions, dtype):
  """One MoT layer. x [B, T, D]; returns (x, (k, v)) with k, v [B, T, Hkv, hd] after QK-norm (if any) and RoPE."""
  b, t, _ = x.shape
  hq, hk, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  eps = cfg.rms_norm_eps

  # Attention: per-expert pre-norm, projections and QK-norm; one shared attention.
  h = rms_normalize(x, eps)

  def qkv(h_e, e):
    h_e = h_e * p["input_layernorm"][e].astype(dtype)
    c = h_e.shape[1]
    q_e = _expert_linear(h_e, p["q_proj"], e, dtype).reshape(b, c, hq, hd)
    k_e = _expert_linear(h_e, p["k_proj"], e, dtype).reshape(b, c, hk, hd)
    v_e = _expert_linear(h_e, p["v_proj"], e, dtype).reshape(b, c, hk, hd)
    if cfg.qk_norm:
      q_e = rms_normalize(q_e, eps) * p["q_norm"][e].astype(dtype)
      k_e = rms_normalize(k_e, eps) * p["k_norm"][e].astype(dtype)
    return q_e, k_e, v_e

  q, k, v = _expert_apply(h, routing, qkv)
  q = apply_rope(q, cos, sin).astype(dtype)
  k = apply_rope(k, cos, sin).astype(dtype)
  if past_kv is not None:
    k_all = jnp.concatenate([past_kv[0].astype(dtype), k], axis=1)
    v_all = jnp.concatenate([past_kv[1].astype(dtype), v], axis=1)
  else:
    k_all, v_all = k, v
  a = attention(q, k_all, v_all, spec.k_start, spec.k_end, spec.q_start, spec.q_end, spec.q_positions,
                impl=opts.attention_impl)
  a = checkpoint_name(a.reshape(b, t, hq * hd), "attention_out")
  x = x + _expert_apply(a, routing, lambda a_e, e: _expert_linear(a_e, p["o_proj"], e, dtype))

  # MLP: per-expert post-norm and SwiGLU.
  h = rms_normalize(x, eps)

  def mlp(h_e, e):
    h_e = h_e * p["post_attention_layernorm"][e].astype(dtype)
    g = _expert_linear(h_e, p["gate_proj"], e, dtype)
    u = _expert_linear(h_e, p["up_proj"], e, dtype)
    return _expert_linear(jax.nn.silu(g) * u, p["down_proj"], e, dtype)

  x = x + _expert_apply(h, routing, mlp)
  return x, (k, v)


class Qwen2MoT(nnx.Module):
  """Embedding, stacked MoT layers, per-expert final norm and the (shared) LM head.

  tie_word_embeddings: no lm_head parameter; the logits use embed_tokens (upstream's tied
  Qwen2ForCausalLM: lm_head.weight is embed_tokens.weight).
  """

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
    self.cfg = cfg
    self.dtype = dtype
    self.embed_tokens = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
    self.layers = MoTLayers(cfg, rngs=rngs, param_dtype=param_dtype)
    self.norm = nnx.Param(jnp.ones((NUM_EXPERTS, cfg.hidden_size), param_dtype))
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
    self.lm_head = (None if cfg.tie_word_embeddings
                    else nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), param_dtype)))

  def embed(self, ids: jax.Array) -> jax.Array:
    return self.embed_tokens[...].astype(self.dtype)[ids]

  def logits(self, hidden: jax.Array) -> jax.Array:
    if self.lm_head is None:
      return jnp.einsum("...d,vd->...v", hidden, self.embed_tokens[...].astype(self.dtype),
                        preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", hidden, self.lm_head[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)

  def final_norm(self, x: jax.Array, expert: jax.Array) -> jax.Array:
    """`norm` on und tokens, `norm_moe_gen` on gen tokens (elementwise, so a per-token weight pick is exact)."""
    w = self.norm[...].astype(self.dtype)[expert]
    return rms_normalize(x, self.cfg.rms_norm_eps) * w

  def __call__(self, x: jax.Array, expert_idx: tuple[jax.Array, jax.Array], rope_ids: jax.Array,
               spec: AttentionSpec, *, past_kv: tuple[jax.Array, jax.Array] | None = None,
               opts: DecoderOptions = DecoderOptions()):
    """Runs all layers. x [B, T, D]; past_kv: ([L, B, S0, Hkv, hd], same) cached keys/values.

    Returns (hidden before the final norm [B, T, D], (k, v) [L, B, T, Hkv, hd] or None).
    """
    cfg, dtype = self.cfg, self.dtype
    cos, sin = rope_cos_sin(rope_ids, cfg.head_dim, cfg.rope_theta)
    params = jax.tree.map(lambda v: v, nnx.to_pure_dict(nnx.state(self.layers)))
    routing = route_tokens(expert_idx, x.shape[1])

    def body(x, xs):
      p, past = xs
      x, kv = decoder_layer(cfg, p, constrain(x, RESIDUAL), routing, cos, sin, spec, past, opts, dtype)
      return constrain(x, RESIDUAL), (kv if opts.return_kv else None)

    policy = REMAT_POLICIES[opts.remat]
    if opts.remat != "none":
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, kv = jax.lax.scan(body, x.astype(dtype), (params, past_kv), unroll=opts.unroll_layers)
    return x, kv
