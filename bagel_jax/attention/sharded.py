"""Kernel calls under a mesh: each shard runs the kernel on its own rows and heads (`jax.shard_map`).

XLA cannot partition a Pallas kernel: Mosaic refuses ("cannot be automatically partitioned"),
and a Triton call is replicated (every input all-gathered onto every device).  Attention is
independent across samples and across KV-head groups, so a kernel needs no communication when
the batch is split over the mesh axes of the logical `activation_batch` rule and the heads over
those of `activation_heads` / `activation_kv_heads` (the rules of `bagel_jax.sharding`, the same
ones that place every other activation).  The sequence axes are never split here: a kernel sees
whole rows.

    out = sharded_call(fn, mesh, rules, q, k, v, k_start, k_end, q_start, q_end, q_positions)

Heads are split only when both the query and the KV head counts divide by the tensor axes (so a
shard's query heads use exactly its KV heads); otherwise they stay whole on every shard.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from bagel_jax import sharding

Q_NAMES = ("activation_batch", None, "activation_heads", None)
KV_NAMES = ("activation_batch", None, "activation_kv_heads", None)


def _entry(spec: P, i: int):
  return spec[i] if i < len(spec) else None


def kernel_specs(mesh, rules: sharding.Rules, q_shape, k_shape) -> tuple[P, P, P]:
  """(q / output spec, k / v spec, interval spec) for a kernel call on this mesh."""
  qs = sharding.logical_to_spec(Q_NAMES, rules, mesh, q_shape)
  ks = sharding.logical_to_spec(KV_NAMES, rules, mesh, k_shape)
  batch = _entry(qs, 0) if _entry(qs, 0) == _entry(ks, 0) else None
  heads = _entry(qs, 2) if _entry(qs, 2) == _entry(ks, 2) else None
  return P(batch, None, heads, None), P(batch, None, heads, None), P(batch, None)


def context_mesh():
  """The mesh kernels shard over: `sharding.use_rules`'s, else `jax.set_mesh`'s (None if neither,
  or if every axis is already manual, i.e. inside a shard_map)."""
  am = jax.sharding.get_abstract_mesh()
  if not am.empty and am.are_all_axes_manual:
    return None
  mesh = sharding.active_mesh()
  if mesh is not None:
    return mesh
  return None if am.empty else am


def context_rules() -> sharding.Rules:
  return sharding.active_rules() or sharding.DEFAULT_RULES


def sharded_call(fn: Callable[..., jax.Array], q, k, v, k_start, k_end, q_start, q_end, q_positions,
                 *, mesh=None, rules: sharding.Rules | None = None) -> jax.Array:
  """fn(q, k, v, k_start, k_end, q_start, q_end, q_positions) per shard of the context mesh.

  With no mesh (or one device) this is a plain call."""
  mesh = context_mesh() if mesh is None else mesh
  if mesh is None or mesh.size == 1:
    return fn(q, k, v, k_start, k_end, q_start, q_end, q_positions)
  rules = context_rules() if rules is None else rules
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32)[None], q.shape[:2])
  qs, kvs, rows = kernel_specs(mesh, rules, q.shape, k.shape)
  in_specs = (qs, kvs, kvs, rows, rows, rows, rows, rows)
  args = [jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
          for x, spec in zip((q, k, v, k_start, k_end, q_start, q_end, q_positions), in_specs)]
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=qs, check_vma=False)
  return mapped(*args)


__all__ = ["kernel_specs", "sharded_call", "context_mesh", "context_rules"]
